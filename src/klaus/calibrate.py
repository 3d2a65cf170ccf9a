"""Calibration: what the float network sees on a few unlabeled photos.

Only ONNX Runtime is needed: the activations a weight multiplies are exposed as
extra graph outputs of the float model. Their per-channel means give the
expected output shift a palettized weight causes, which the layer's bias then
cancels (bias correction, Nagel et al. 2019; Banner et al. 2019).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import KlausDataError, KlausError
from .onnxgraph import TensorRole
from .preprocess import Preprocess, prepare

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


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


def calibration_batch(files: Sequence[Path], preprocess: Preprocess, crops: int = 10) -> np.ndarray:
    """Preprocessed inputs; unreadable files are skipped (they must not stop a build)."""
    tensors = []
    for f in files:
        try:
            tensors.append(prepare(f, preprocess, crops=crops))
        except KlausError:
            continue
    if not tensors:
        raise KlausDataError("no readable calibration images")
    return np.concatenate(tensors, axis=0)


@dataclass
class InputStats:
    """First and second moments of a layer input over batch and space, per channel."""

    total: np.ndarray  # (C,) sum of x
    gram: np.ndarray | None  # (C, C) sum of x x^T, when asked for
    count: int = 0

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(1, self.count)

    @property
    def hessian(self) -> np.ndarray:
        """E[x x^T]: the Hessian of a linear layer's squared output error."""
        return self.gram / max(1, self.count)


def input_statistics(
    model: onnx.ModelProto,
    batch: np.ndarray,
    activations: Sequence[str],
    gram_for: Sequence[str] = (),
    chunk: int = 16,
) -> dict[str, InputStats]:
    """Per-channel statistics (channel axis 1) of named activations of the float model."""
    from .runtime import make_session

    wanted = list(dict.fromkeys(a for a in activations if a))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    graph_inputs = {i.name for i in probe.graph.input}
    for name in wanted:
        if name not in existing and name not in graph_inputs:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = make_session(probe)
    input_name = session.get_inputs()[0].name
    fetch = [n for n in wanted if n not in graph_inputs]
    grams = set(gram_for)
    stats: dict[str, InputStats] = {}
    for start in range(0, batch.shape[0], chunk):
        part = batch[start : start + chunk]
        outs = dict(zip(fetch, session.run(fetch, {input_name: part}))) if fetch else {}
        outs.update({n: part for n in wanted if n in graph_inputs})
        for name, value in outs.items():
            rows = np.moveaxis(value, 1, -1).reshape(-1, value.shape[1]).astype(np.float64)
            s = stats.setdefault(name, InputStats(np.zeros(rows.shape[1]), np.zeros((rows.shape[1],) * 2) if name in grams else None))
            s.total += rows.sum(axis=0)
            if s.gram is not None:
                s.gram += rows.T @ rows
            s.count += rows.shape[0]
    return stats


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
        return matrix @ mean_in if matrix.shape[1] == mean_in.shape[0] else None
    return None


def correct_biases(
    originals: Mapping[str, np.ndarray],
    decoded: Mapping[str, np.ndarray],
    roles: Mapping[str, TensorRole],
    means: Mapping[str, np.ndarray],
    biases: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """New bias arrays that cancel each palettized weight's expected output shift."""
    corrected: dict[str, np.ndarray] = {}
    for name, approx in decoded.items():
        role = roles[name]
        if not role.bias or role.activation not in means or role.bias not in biases:
            continue
        shift = output_shift(approx.astype(np.float64) - originals[name], role, means[role.activation])
        if shift is None or shift.shape != biases[role.bias].shape:
            continue
        base = corrected.get(role.bias, biases[role.bias].astype(np.float64))
        corrected[role.bias] = (base - shift).astype(np.float32)
    return corrected


def split_files(files: Sequence[Path], split: str, wnid_index: Mapping[str, int]) -> list[Path]:
    """Keep files whose ImageNet class (wnid prefix or folder) has the given index parity.

    The project's convention: even classes calibrate, odd classes evaluate.
    """
    if split == "all":
        return list(files)
    want = {"even": 0, "odd": 1}[split]
    kept = []
    for f in files:
        wnid = f.name.split("_", 1)[0] if f.name.split("_", 1)[0] in wnid_index else f.parent.name
        if wnid in wnid_index and wnid_index[wnid] % 2 == want:
            kept.append(f)
    return kept


def load_calibration(
    sources: Sequence[str | os.PathLike[str]],
    preprocess: Preprocess,
    *,
    split: str = "all",
    limit: int | None = None,
    crops: int = 1,
    wnid_index: Mapping[str, int] | None = None,
) -> np.ndarray | None:
    """The calibration batch the CLI options describe, or None when no sources are given."""
    if not sources:
        return None
    files = split_files(image_files(sources), split, wnid_index or {})
    if limit:
        files = files[:limit]
    if not files:
        raise KlausDataError(f"no calibration images in {', '.join(map(str, sources))} (split {split})")
    return calibration_batch(files, preprocess, crops)
