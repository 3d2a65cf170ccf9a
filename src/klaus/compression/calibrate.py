"""Calibration: what the float network sees on a few unlabeled photos.

Only ONNX Runtime is needed: the activations a weight multiplies are exposed as
extra graph outputs of the float model. Their per-channel means give the
expected output shift a palettized weight causes, which the layer's bias then
cancels (bias correction, Nagel et al. 2019; Banner et al. 2019).

Statistics belong to the layer that reads an activation, not to the activation:
a 1x1 and a 3x3 convolution reading the same tensor (a ResNet downsampling block),
or a MatMul contracting the last axis of a (batch, tokens, channels) value, each
get statistics of the shape their weight needs (:class:`Reading`, :func:`layer_statistics`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import KlausDataError, KlausError
from ..images import IMAGE_SUFFIXES
from ..labels import imagenet_label_rows, wnid_of
from ..onnxgraph import TensorRole, batches, fixed_batch, with_outputs
from ..preprocess import Preprocess, prepare
from ..runtime import make_session
from .gptq import DEFAULT_DAMP, HessianFactor, hessian_factor, hessian_factors


def image_files(sources: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Every image under the given files/folders, sorted, so calibration is deterministic."""
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise KlausDataError(f"{source}: no such calibration file or folder")
    return files


def calibration_batch(
    files: Sequence[Path],
    preprocess: Preprocess,
    crops: int = 10,
    on_error: Callable[[KlausError], None] | None = None,
) -> np.ndarray:
    """Preprocessed inputs; unreadable files are skipped (they must not stop a build) and
    passed to ``on_error`` (so a user can be told)."""
    tensors = []
    for f in files:
        try:
            tensors.append(prepare(f, preprocess, crops=crops))
        except KlausError as exc:
            if on_error is not None:
                on_error(exc)
    if not tensors:
        raise KlausDataError(f"no readable calibration images ({len(files)} tried)")
    return np.concatenate(tensors, axis=0)


# Windows per image for a depthwise layer's Hessian (a k x k matrix per channel, k the
# kernel taps): a regular subgrid of 7 x 7 to 8 x 8 output positions. Over a few hundred
# photos that is tens of thousands of windows per channel -- plenty for k <= 25 -- at a
# fraction of the cost of all 112 x 112 of an early layer.
WINDOW_POSITIONS = 64


@dataclass(frozen=True)
class Window:
    """Where a 2-D convolution reads its input: kernel size, strides, pads (top, left, bottom, right), dilations."""

    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)

    def patches(self, x: np.ndarray, positions: int | None = None) -> np.ndarray:
        """(N, C, kh*kw, windows): the input windows of every channel of ``x`` (N, C, H, W), zero padding included.

        With ``positions``, output rows and columns are thinned by one regular stride
        so that at most about that many windows per image remain (all when None).
        """
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.strides, self.dilations
        top, left, bottom, right = self.pads
        xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        thin = 1 if positions is None else max(1, int(np.ceil(np.sqrt(ho * wo / positions))))
        taps = [
            xp[:, :, a * dh : a * dh + sh * (ho - 1) + 1 : sh * thin, b * dw : b * dw + sw * (wo - 1) + 1 : sw * thin]
            for a in range(kh)
            for b in range(kw)
        ]
        stacked = np.stack(taps, axis=2)  # (N, C, taps, rows, cols), contiguous
        return stacked.reshape(*stacked.shape[:3], -1)


def channel_rows(value: np.ndarray, axis: int = 1) -> np.ndarray:
    """An activation as contiguous float32 rows of its ``axis`` channels, one per batch item and position."""
    return np.ascontiguousarray(np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis]), dtype=np.float32)


def shrunk(matrix: np.ndarray, count: int) -> np.ndarray:
    """A (C, C) second-moment matrix from ``count`` rows, shrunk towards its diagonal by C / (C + count)."""
    rho = matrix.shape[0] / (matrix.shape[0] + max(1, count))
    return (1.0 - rho) * matrix + rho * np.diag(np.diag(matrix))


@dataclass
class InputStats:
    """First and second moments of a layer input over batch and space, per channel."""

    total: np.ndarray  # (C,) sum of x
    sumsq: np.ndarray  # (C,) sum of x^2
    gram: np.ndarray | None  # (C, C) sum of x x^T, when asked for
    count: int = 0
    # A depthwise convolution's Hessian: per channel, the sum of w w^T over its input
    # windows w (C, k, k with k = kernel taps), and how many windows were summed.
    patch_gram: np.ndarray | None = None
    patch_count: int = 0

    @classmethod
    def empty(cls, channels: int, with_gram: bool) -> InputStats:
        return cls(np.zeros(channels), np.zeros(channels), np.zeros((channels, channels)) if with_gram else None)

    def merged(self, other: InputStats) -> InputStats:
        """The statistics of both input sets together."""
        gram = None if self.gram is None or other.gram is None else self.gram + other.gram
        patches = None if self.patch_gram is None or other.patch_gram is None else self.patch_gram + other.patch_gram
        return InputStats(
            self.total + other.total,
            self.sumsq + other.sumsq,
            gram,
            self.count + other.count,
            patches,
            self.patch_count + other.patch_count,
        )

    def add(self, value: np.ndarray, window: Window | None = None, axis: int = 1) -> None:
        """Add a batch of the activation (channels on ``axis``); with ``window``, its window statistics too."""
        # float32 products per batch (BLAS sgemm), float64 accumulation across batches
        rows = channel_rows(value, axis)
        self.total += rows.sum(axis=0, dtype=np.float64)
        self.sumsq += np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
        if self.gram is not None:
            self.gram += rows.T @ rows
        self.count += rows.shape[0]
        if window is not None:
            self.add_patches(value, window)

    def add_patches(self, x: np.ndarray, window: Window) -> None:
        p = window.patches(np.asarray(x, dtype=np.float32), WINDOW_POSITIONS)
        # float32 BLAS per image, float64 across images
        gram = sum(np.matmul(image, image.transpose(0, 2, 1)).astype(np.float64) for image in p)
        self.patch_gram = gram if self.patch_gram is None else self.patch_gram + gram
        self.patch_count += p.shape[0] * p.shape[3]

    def fits_windows(self, shape: tuple[int, ...]) -> bool:
        """Whether window statistics were collected and match a depthwise weight of ``shape``
        (one channel per output, no channel multiplier)."""
        taps = int(np.prod(shape[1:]))
        return self.patch_gram is not None and self.patch_gram.shape == (shape[0], taps, taps)

    @property
    def patch_hessian(self) -> np.ndarray:
        """E[w w^T] over a depthwise layer's input windows, per channel (C, k, k): its output error is
        sum_c d_c^T H_c d_c for weight errors d_c, so GPTQ applies channel by channel. Windows number
        in the thousands per photo, so no shrinkage is needed."""
        if self.patch_gram is None:
            raise ValueError("no input windows were gathered for this layer")
        return self.patch_gram / max(1, self.patch_count)

    @property
    def energy(self) -> np.ndarray:
        """E[x^2] per channel: how much a weight on that input channel matters."""
        return self.sumsq / max(1, self.count)

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(1, self.count)

    @property
    def sample_hessian(self) -> np.ndarray:
        """E[x x^T] over the calibration rows: the Hessian of a linear layer's squared output error."""
        if self.gram is None:
            raise ValueError("no Gram matrix was gathered for this layer")
        return self.gram / max(1, self.count)

    @property
    def hessian(self) -> np.ndarray:
        """:attr:`sample_hessian` shrunk towards its diagonal by C / (C + N) (C inputs, N rows).

        With few rows per input (a 1280-wide FC layer sees one pooled vector per
        photo) the sample Hessian is rank-deficient and GPTQ overfits its
        rounding to the calibration photos; shrinking the off-diagonal part
        (Ledoit-Wolf style) keeps what generalizes. Measured on EfficientNet-Lite0's
        FC layer (500 photos, uniform 0.5 grid): KL on other photos 0.0039 with the
        diagonal alone, 0.0033 with the sample Hessian (rho 0.1), 0.0025 at rho 0.72.
        Conv layers see thousands of rows per input, so their rho stays near 0.
        """
        return shrunk(self.sample_hessian, self.count)

    def factor(self) -> HessianFactor:
        """GPTQ's factorization of :attr:`hessian`, computed once (valid while the sums don't change)."""
        if getattr(self, "_factor_count", None) != self.count:
            self._factor, self._factor_count = hessian_factor(self.hessian, DEFAULT_DAMP), self.count
        return self._factor

    def patch_factor(self) -> HessianFactor:
        """:meth:`factor` for :attr:`patch_hessian`, one factorization per channel."""
        if getattr(self, "_patch_factor_count", None) != self.patch_count:
            self._patch_factor = hessian_factors(self.patch_hessian, DEFAULT_DAMP)
            self._patch_factor_count = self.patch_count
        return self._patch_factor


@dataclass(frozen=True)
class Reading:
    """How one layer reads its input, and so which statistics its quantizer gets.

    ``axis`` holds the channels the layer's weight contracts (1 for a convolution, -1 for
    a MatMul on (batch, tokens, channels) values); ``gram`` asks for the channel Gram
    matrix (GPTQ on a linear layer); ``window`` for a depthwise convolution's per-channel
    window Gram matrices. Layers that read an activation the same way share one set of sums.
    """

    activation: str
    axis: int = 1
    gram: bool = False
    window: Window | None = None


def layer_statistics(
    model: onnx.ModelProto, batch: np.ndarray, readings: Mapping[str, Reading], chunk: int = 16
) -> dict[str, InputStats]:
    """Per-channel statistics of the input of every layer in ``readings`` (keyed as it is, by weight name),
    from one pass of the float model over ``batch``.

    Two layers reading one tensor with different needs (a 1x1 and a 3x3 convolution, a
    Gemm and a depthwise convolution) get statistics of their own shape; layers with equal
    readings share one :class:`InputStats`. A graph with a fixed batch size is run in batches
    of that size (the last one padded, its padding rows left out of the statistics).
    """
    collected = _collect(model, batch, [r for r in readings.values() if r.activation], chunk)
    return {layer: collected[r] for layer, r in readings.items() if r.activation}


def input_statistics(
    model: onnx.ModelProto,
    batch: np.ndarray,
    activations: Sequence[str],
    gram_for: Sequence[str] = (),
    chunk: int = 16,
    windows: Mapping[str, Window] | None = None,
) -> dict[str, InputStats]:
    """Per-channel statistics (channel axis 1) of named activations of the float model, by activation.

    ``gram_for`` names activations whose channel Gram matrix is collected; ``windows`` names
    activations read by a depthwise convolution, whose per-channel window Gram matrices are
    collected too (:attr:`InputStats.patch_hessian`). Builds use :func:`layer_statistics`.
    """
    grams, windows = set(gram_for), windows or {}
    readings = [Reading(a, 1, a in grams, windows.get(a)) for a in dict.fromkeys(a for a in activations if a)]
    return {r.activation: stats for r, stats in _collect(model, batch, readings, chunk).items()}


def _collect(
    model: onnx.ModelProto, batch: np.ndarray, readings: Sequence[Reading], chunk: int
) -> dict[Reading, InputStats]:
    """One :class:`InputStats` per distinct reading, each activation fetched once per batch."""
    distinct = list(dict.fromkeys(readings))
    wanted = list(dict.fromkeys(r.activation for r in distinct))
    graph_inputs = {i.name for i in model.graph.input}
    session = make_session(with_outputs(model, wanted))
    input_name = session.get_inputs()[0].name
    fetch = [n for n in wanted if n not in graph_inputs]
    stats: dict[Reading, InputStats] = {}
    for part, real in batches(batch, chunk, fixed_batch(model)):
        outs = dict(zip(fetch, session.run(fetch, {input_name: part}), strict=True)) if fetch else {}
        outs.update({n: part for n in wanted if n in graph_inputs})
        for reading in distinct:
            value = outs[reading.activation]
            if real < len(part):  # padding of a fixed batch: batch items are rows of axis 0 (of the last axis
                value = value[:real] if reading.axis != 0 else value[..., :real]  # when axis 0 holds channels)
            if reading not in stats:
                stats[reading] = InputStats.empty(value.shape[reading.axis], reading.gram)
            stats[reading].add(value, reading.window, reading.axis)
    return stats


def weight_importance(role: TensorRole, shape: tuple[int, ...], energy: np.ndarray) -> np.ndarray | None:
    """E[x^2] of the input each weight multiplies, broadcast to the weight's shape.

    A weight's contribution to the output error is its rounding error times its
    input, so k-means weighted by this ("sensitive k-means") spends levels where
    errors cost the most.
    """
    if role.op == "Conv" and len(shape) >= 3:
        out_ch, in_per_group = shape[0], shape[1]
        if energy.shape[0] != in_per_group * role.group:
            return None
        group_of = np.arange(out_ch) // (out_ch // role.group)
        per = energy.reshape(role.group, in_per_group)[group_of]  # (O, I/g)
        return np.broadcast_to(per.reshape(out_ch, in_per_group, *([1] * (len(shape) - 2))), shape)
    if role.op in ("Gemm", "MatMul") and len(shape) == 2:
        axis_in = 1 - role.out_axis
        if energy.shape[0] != shape[axis_in]:
            return None
        return np.broadcast_to(energy[None, :] if axis_in == 1 else energy[:, None], shape)
    return None


def output_shift(delta: np.ndarray, role: TensorRole, mean_in: np.ndarray) -> np.ndarray | None:
    """Expected change of each output channel caused by a weight change ``delta``."""
    if role.op == "Conv":
        out_ch, in_per_group = delta.shape[0], delta.shape[1]
        groups = role.group
        if mean_in.shape[0] != in_per_group * groups:
            return None
        per_input = delta.reshape(out_ch, in_per_group, -1).sum(axis=2)
        group_of = np.arange(out_ch) // (out_ch // groups)
        means = mean_in.reshape(groups, in_per_group)[group_of]
        return (per_input * means).sum(axis=1)
    if role.op == "Gemm":
        matrix = delta if role.out_axis == 0 else delta.T
        return role.alpha * (matrix @ mean_in) if matrix.shape[1] == mean_in.shape[0] else None
    return None


def correct_biases(
    originals: Mapping[str, np.ndarray],
    decoded: Mapping[str, np.ndarray],
    roles: Mapping[str, TensorRole],
    means: Mapping[str, np.ndarray],
    biases: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """New bias arrays that cancel each palettized weight's expected output shift (``means``: the mean
    input of each layer, by weight name)."""
    corrected: dict[str, np.ndarray] = {}
    for name, approx in decoded.items():
        role = roles[name]
        if not role.bias or name not in means or role.bias not in biases:
            continue
        shift = output_shift(approx.astype(np.float64) - originals[name], role, means[name])
        if shift is None or shift.shape != biases[role.bias].shape or role.beta == 0:
            continue
        base = corrected.get(role.bias, biases[role.bias].astype(np.float64))
        corrected[role.bias] = (base - shift / role.beta).astype(np.float32)
    return corrected


def split_files(files: Sequence[Path], split: str, wnid_index: Mapping[str, int]) -> list[Path]:
    """Keep files whose ImageNet class (wnid prefix or folder) has the given index parity.

    The project's convention: even classes calibrate, odd classes evaluate.
    """
    if split == "all":
        return list(files)
    want = {"even": 0, "odd": 1}[split]
    return [
        f for f in files if (wnid := wnid_of(f)) is not None and wnid in wnid_index and wnid_index[wnid] % 2 == want
    ]


@dataclass(frozen=True)
class CalibrationOptions:
    """Which calibration photos a build uses (``--calib``, ``--calib-split``, ``--calib-limit``, ``--calib-crops``)."""

    sources: tuple[str, ...] = ()
    split: str = "all"  # even/odd: only photos of even/odd ImageNet class index
    limit: int | None = None
    crops: int = 1


def load_imagenet_calibration(
    options: CalibrationOptions, preprocess: Preprocess, on_error: Callable[[KlausError], None] | None = None
) -> np.ndarray | None:
    """The batch ``options`` describe (None without sources), photos split by their ImageNet class;
    a photo that cannot be read is passed to ``on_error`` and skipped."""
    if not options.sources:
        return None
    wnids = {row.wnid: row.index for row in imagenet_label_rows()}
    return load_calibration(
        options.sources,
        preprocess,
        split=options.split,
        limit=options.limit,
        crops=options.crops,
        wnid_index=wnids,
        on_error=on_error,
    )


def load_calibration(
    sources: Sequence[str | os.PathLike[str]],
    preprocess: Preprocess,
    *,
    split: str = "all",
    limit: int | None = None,
    crops: int = 1,
    wnid_index: Mapping[str, int] | None = None,
    on_error: Callable[[KlausError], None] | None = None,
) -> np.ndarray | None:
    """The calibration batch the CLI options describe, or None when no sources are given."""
    if not sources:
        return None
    files = select_files(sources, split, limit, wnid_index or {})
    try:
        return calibration_batch(files, preprocess, crops, on_error)
    except KlausDataError as exc:
        raise KlausDataError(f"{', '.join(map(str, sources))}: {exc}") from None


def select_files(
    sources: Sequence[str | os.PathLike[str]], split: str, limit: int | None, wnid_index: Mapping[str, int]
) -> list[Path]:
    """The calibration images the options name: found, split by class parity, capped."""
    files = split_files(image_files(sources), split, wnid_index)
    if limit:
        files = files[:limit]
    if not files:
        raise KlausDataError(f"no calibration images in {', '.join(map(str, sources))} (split {split})")
    return files
