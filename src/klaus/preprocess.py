"""Preprocessing: an RGB image -> the normalized float32 tensor a model was trained on.

:class:`Preprocess` is the input pipeline stored in a model's metadata (size, resize rule,
crop, interpolation, mean/std, channel order, layout), validated field by field because it
comes from a file. :func:`to_tensor` resizes, crops (one or ten crops) and normalizes as
reference pipelines do (one crop: resampling only the window kept, see :func:`_window`);
:func:`prepare` opens the image first (:func:`klaus.images.load_image`, which holds every
image Klaus opens to one pixel limit). :func:`preprocess_for_input` and
:func:`check_input_shape` fit the preprocessing to the input a graph declares.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

import numpy as np

from klaus.errors import KlausFormatError, KlausModelError
from klaus.images import MAX_RESIZED_PIXELS, Source, load_image, pillow_quiet, to_rgb

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "INTERPOLATIONS",
    "MAX_INPUT_SIZE",
    "Preprocess",
    "check_input_shape",
    "crop_boxes",
    "normalize",
    "prepare",
    "preprocess_for_input",
    "resized_size",
    "shape_text",
    "to_pixels",
    "to_tensor",
]

#: Largest square input a model may declare; keeps corrupt metadata from
#: asking for absurd allocations.
MAX_INPUT_SIZE = 4096

#: The interpolations a model may ask for, and the names of Pillow's ``Image.Resampling`` filters
#: that give them (names: Pillow is imported where an image is first resized, :mod:`klaus.images`).
INTERPOLATIONS: dict[str, str] = {
    "nearest": "NEAREST",
    "bilinear": "BILINEAR",
    "bicubic": "BICUBIC",
    "lanczos": "LANCZOS",
    "box": "BOX",
    "hamming": "HAMMING",
}
_RESIZE_RULES = ("shorter", "stretch")
_CHANNEL_ORDERS = ("RGB", "BGR")
_LAYOUTS = ("NCHW", "NHWC")
_CROPS = (1, 10)
# Radius (in output pixels) of the filters whose weights vary smoothly with the sampling
# position, so that one window can be resampled on its own (see _window).
_SUPPORT: dict[str, float] = {"BILINEAR": 1.0, "HAMMING": 1.0, "BICUBIC": 2.0, "LANCZOS": 3.0}

Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------
# Preprocess spec


@dataclass(frozen=True)
class Preprocess:
    """The input pipeline a model was trained with, as stored in its metadata.

    ``mean``/``std`` are in 0..255 pixel units and listed in the order of the
    tensor's channels (i.e. in ``channel_order``), as Caffe-style BGR models
    declare them.  Direct construction with bad values raises ``ValueError``;
    :meth:`from_dict` (untrusted input) raises :class:`KlausFormatError`.
    """

    input_size: int = 224
    resize: str = "shorter"
    crop_ratio: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        _check_int("input_size", self.input_size, 1, MAX_INPUT_SIZE)
        _check_choice("resize", self.resize, _RESIZE_RULES)
        ratio = _check_real("crop_ratio", self.crop_ratio)
        if not 0.1 <= ratio <= 1.0:
            raise ValueError(f"'crop_ratio' must be in 0.1..1.0, got {_show(ratio)}")
        _check_choice("interpolation", self.interpolation, tuple(INTERPOLATIONS))
        _check_choice("channel_order", self.channel_order, _CHANNEL_ORDERS)
        _check_choice("layout", self.layout, _LAYOUTS)
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "crop_ratio", ratio)
        object.__setattr__(self, "mean", _check_triple("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _check_triple("std", self.std, positive=True))

    @property
    def resize_side(self) -> int:
        """Side the image is resized to before cropping (256 for 224 / 0.875)."""
        return round(self.input_size / self.crop_ratio)

    @property
    def resample(self) -> Image.Resampling:
        from PIL import Image

        return Image.Resampling[INTERPOLATIONS[self.interpolation]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; :meth:`from_dict` inverts it exactly."""
        return {
            "input_size": self.input_size,
            "resize": self.resize,
            "crop_ratio": self.crop_ratio,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": self.channel_order,
            "layout": self.layout,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Preprocess:
        """Validate metadata read from a (possibly corrupt) model file.

        Missing fields take their defaults; unknown fields are rejected so a
        typo cannot silently fall back to a default.
        """
        if not isinstance(d, Mapping):
            raise KlausFormatError(f"invalid preprocess metadata: expected an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(repr(k) for k in d if k not in known)
        if unknown:
            raise KlausFormatError(f"invalid preprocess metadata: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise KlausFormatError(f"invalid preprocess metadata: {exc}") from exc


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or not lo <= int(value) <= hi:
        raise ValueError(f"'{name}' must be an integer in {lo}..{hi}, got {_show(value)}")


def _check_real(name: str, value: object) -> float:
    try:
        number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else None
    except OverflowError:  # e.g. 10**400
        number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"'{name}' must be a finite number, got {_show(value)}")
    return number


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"'{name}' must be one of {', '.join(choices)}; got {_show(value)}")


def _check_triple(name: str, value: object, *, positive: bool) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"'{name}' must be a list of 3 numbers, got {_show(value)}")
    a, b, c = (_check_real(name, v) for v in value)
    if positive and min(a, b, c) <= 0:
        raise ValueError(f"'{name}' values must be > 0, got {_show(value)}")
    return (a, b, c)


# --------------------------------------------------------------------------
# Tensor


def resized_size(width: int, height: int, spec: Preprocess, crops: int = 1) -> tuple[int, int]:
    """Size of the image after the resize rule, before cropping.

    "stretch" with one crop fills the input exactly; with ten crops it
    stretches to ``resize_side`` so the corner crops differ from the center.
    """
    _check_crops(crops)
    if spec.resize == "stretch":
        side = spec.input_size if crops == 1 else spec.resize_side
        return side, side
    side = spec.resize_side
    if width <= height:
        return side, max(side, round(height * side / width))
    return max(side, round(width * side / height)), side


def crop_boxes(width: int, height: int, spec: Preprocess, crops: int = 1) -> list[Box]:
    """Crop windows ``(left, top, right, bottom)`` in resized-image coordinates.

    One box per output crop, in tensor order.  For ten crops: top-left,
    top-right, bottom-left, bottom-right, center, then the same five windows
    again, which :func:`to_tensor` mirrors horizontally (Caffe's oversample).
    """
    rw, rh = resized_size(width, height, spec, crops)
    s = spec.input_size
    left, top = (rw - s) // 2, (rh - s) // 2
    center = (left, top, left + s, top + s)
    if crops == 1:
        return [center]
    windows = [(0, 0, s, s), (rw - s, 0, rw, s), (0, rh - s, s, rh), (rw - s, rh - s, rw, rh), center]
    return windows + windows


def to_tensor(image: Image.Image, spec: Preprocess, crops: int = 1) -> np.ndarray:
    """Resize, crop and normalize into a float32 batch of ``crops`` model inputs."""
    return normalize(to_pixels(image, spec, crops), spec)


def to_pixels(image: Image.Image, spec: Preprocess, crops: int = 1) -> np.ndarray:
    """The ``crops`` resized and cropped RGB windows, uint8 ``(crops, S, S, 3)``, before normalization.

    ``normalize(to_pixels(image, spec), spec)`` is :func:`to_tensor`; the indexer keeps
    the pixels (a quarter of the float bytes) until it assembles a batch.
    """
    _check_crops(crops)
    rgb = image if image.mode == "RGB" else to_rgb(image)
    boxes = crop_boxes(rgb.width, rgb.height, spec, crops)
    windows = boxes[:5] if crops == 10 else boxes
    with pillow_quiet():  # cropping a large photo (within max_pixels) would warn again
        patches = _windows(rgb, windows, spec, crops)
    if crops == 10:
        patches = np.concatenate([patches, patches[:, :, ::-1]])
    return patches


def normalize(pixels: np.ndarray, spec: Preprocess, out: np.ndarray | None = None) -> np.ndarray:
    """``(pixels - mean) / std`` in float32, in the spec's channel order and layout.

    ``pixels`` is uint8 ``(n, S, S, 3)`` RGB as :func:`to_pixels` returns it. The
    channel flip and the layout transpose are done on the uint8 pixels, then one
    subtraction and one division write straight into ``out`` (a new C-contiguous array
    unless given): the same float32 operations, so the same bits, as converting to
    float first, at a fraction of the memory traffic.
    """
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must be (n, height, width, 3), got shape {pixels.shape}")
    if spec.channel_order == "BGR":
        pixels = pixels[..., ::-1]
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        pixels = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
        mean, std = mean.reshape(1, 3, 1, 1), std.reshape(1, 3, 1, 1)
    if out is None:
        out = np.empty(pixels.shape, np.float32)
    elif out.shape != pixels.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {pixels.shape}, got {out.dtype} {out.shape}")
    np.subtract(pixels, mean, out=out, dtype=np.float32)
    np.divide(out, std, out=out)
    return out


def prepare(
    source: Source,
    spec: Preprocess,
    crops: int = 1,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Load ``source`` and turn it into the model input batch for ``spec``."""
    image = load_image(source, target=_decode_target(spec, crops), max_pixels=max_pixels)
    return to_tensor(image, spec, crops)


def _check_crops(crops: int) -> None:
    if crops not in _CROPS:
        raise ValueError(f"crops must be 1 or 10, got {crops!r}")


def _decode_target(spec: Preprocess, crops: int) -> int:
    """Smallest side the decoded image needs so the resize never upsamples."""
    _check_crops(crops)
    if spec.resize == "stretch" and crops == 1:
        return spec.input_size
    return spec.resize_side


def _windows(img: Image.Image, boxes: list[Box], spec: Preprocess, crops: int) -> np.ndarray:
    """Stack of uint8 crops (n, S, S, 3) of the image resized by the spec's rule.

    One window with a smooth filter (bilinear, bicubic, Lanczos, Hamming): only that
    window is resampled (:func:`_window`). Otherwise the whole image is resized then
    sliced, exactly like reference pipelines; only when that would be huge (a 1 x
    100000 strip resized to a 256 shorter side) is each window resampled straight from
    its source region via ``resize(box=)``: same filter, but rounding can differ by a
    pixel value or (nearest/box) a sampling position.
    """
    rw, rh = resized_size(img.width, img.height, spec, crops)
    if len(boxes) == 1 and spec.resample.name in _SUPPORT:
        window = _window(img, boxes[0], rw, rh, spec.resample)
        if window is not None:
            return window[None]
    if rw * rh <= MAX_RESIZED_PIXELS:
        full = np.asarray(img.resize((rw, rh), spec.resample))
        return np.stack([full[top:bottom, left:right] for left, top, right, bottom in boxes])
    sx, sy = img.width / rw, img.height / rh
    return np.stack(
        [
            np.asarray(
                img.resize(
                    (right - left, bottom - top),
                    spec.resample,
                    box=(left * sx, top * sy, min(img.width, right * sx), min(img.height, bottom * sy)),
                )
            )
            for left, top, right, bottom in boxes
        ]
    )


def _window(img: Image.Image, box: Box, rw: int, rh: int, resample: Image.Resampling) -> np.ndarray | None:
    """The window ``box`` of ``img`` resized to ``rw`` x ``rh``, computing little else.

    Pillow resizes in two single-axis passes, rounding to uint8 in between. The first
    pass here is Pillow's own, bit-exact, but only over the source rows (or columns)
    that the window's second-pass filter reaches; the second computes only the
    window, via ``resize(box=)``. Pillow passes a box as float32, which can move a
    filter coefficient by one unit of its fixed-point rounding, so a pixel may differ
    from resize-then-crop by one level, never more (none does when that scale is a
    binary fraction, e.g. 375 -> 256 rows). The passes run in the order Pillow's own
    resize would use (:func:`_pillow_vertical_first`). ``None`` if that order is not known
    or the first pass would be huge (then the caller resamples as for ten crops).
    For a 500 x 375 photo this samples about 40 % fewer pixels than resizing it whole.
    """
    vertical_first = _pillow_vertical_first()
    if vertical_first is None:
        return None
    left, top, right, bottom = box
    width, height = img.size
    if vertical_first(width, height, rw, rh):  # columns first: the mirror image of the branch below
        sx = width / rw
        x0, x1 = _source_span(left, right, sx, width, resample)
        if (x1 - x0) * rh > MAX_RESIZED_PIXELS:
            return None
        cols = img if (x0, x1) == (0, width) else img.crop((x0, 0, x1, height))
        if rh != height:
            cols = cols.resize((x1 - x0, rh), resample)
        if (top, bottom) != (0, rh):
            cols = cols.crop((0, top, x1 - x0, bottom))
        last = min(x1 - x0, right * sx - x0)  # right * sx may round past the last column
        window = cols.resize((right - left, bottom - top), resample, box=(left * sx - x0, 0, last, bottom - top))
        return np.asarray(window)
    sy = height / rh
    y0, y1 = _source_span(top, bottom, sy, height, resample)
    if rw * (y1 - y0) > MAX_RESIZED_PIXELS:  # a 200000 x 2 strip: its first pass alone would be huge
        return None
    rows = img if (y0, y1) == (0, height) else img.crop((0, y0, width, y1))
    if rw != width:
        rows = rows.resize((rw, y1 - y0), resample)
    if (left, right) != (0, rw):
        rows = rows.crop((left, 0, right, y1 - y0))
    last = min(y1 - y0, bottom * sy - y0)  # bottom * sy may round past the last row
    window = rows.resize((right - left, bottom - top), resample, box=(0, top * sy - y0, right - left, last))
    return np.asarray(window)


def _source_span(start: int, stop: int, scale: float, size: int, resample: Image.Resampling) -> tuple[int, int]:
    """Source rows (or columns) that output pixels ``start..stop`` of one axis draw on, at ``scale``."""
    reach = _SUPPORT[resample.name] * max(scale, 1.0) + 1.0  # filter radius in source pixels, plus one to spare
    return max(0, math.floor((start + 0.5) * scale - reach)), min(size, math.ceil((stop - 0.5) * scale + reach))


def _noise(height: int, width: int) -> np.ndarray:
    """Fixed pseudo-random uint8 pixels (SplitMix64 of the pixel index): neither numpy.random (10 ms to import,
    and OpenSSL) nor the random module (4 ms) is loaded to make them."""
    z = np.arange(height * width, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return ((z ^ (z >> np.uint64(31))) & np.uint64(0xFF)).astype(np.uint8).reshape(height, width)


@functools.cache
def _pillow_vertical_first() -> Callable[[int, int, int, int], bool] | None:
    """Which pass this Pillow runs first when resizing ``(w, h)`` to ``(rw, rh)``.

    Pillow before 13 always resamples rows (horizontal pass) first; Pillow 13 runs
    the vertical pass first when the height shrinks by more than twice as many pixels
    as the width. Told apart by resizing two small probes on either side of that
    threshold; ``None`` (so: resize whole images) if Pillow does something else.
    """
    rules: dict[str, Callable[[int, int, int, int], bool]] = {
        "horizontal first": lambda w, h, rw, rh: False,
        "vertical first past 2x": lambda w, h, rw, rh: h - rh > 0 and h - rh > 2 * (w - rw),
    }
    from PIL import Image

    noise = _noise(64, 64)
    cubic = Image.Resampling.BICUBIC
    observed = []
    for h, rh in ((61, 40), (60, 40)):  # width 40 -> 30: the height shrinks by 21, then by 20
        probe = Image.fromarray(noise[:h, :40])
        whole = np.asarray(probe.resize((30, rh), cubic))
        rows_first = np.asarray(probe.resize((30, h), cubic).resize((30, rh), cubic))
        cols_first = np.asarray(probe.resize((40, rh), cubic).resize((30, rh), cubic))
        if np.array_equal(rows_first, cols_first):
            return None  # a useless probe; cannot happen with this noise
        if np.array_equal(whole, rows_first):
            observed.append(False)
        elif np.array_equal(whole, cols_first):
            observed.append(True)
        else:
            return None
    for rule in rules.values():
        if [rule(40, 61, 30, 40), rule(40, 60, 30, 40)] == observed:
            return rule
    return None


# --------------------------------------------------------------------------
# Fitting a graph input


def shape_text(dims: Sequence[object]) -> str:
    """A shape as messages show it: ``(?, 3, 224, 224)``."""
    return "(" + ", ".join(str(d) if _fixed(d) else "?" for d in dims) + ")"


def _fixed(dim: object) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim > 0


def preprocess_for_input(shape: Sequence[object] | None, where: str) -> Preprocess:
    """EfficientNet-Lite preprocessing at the square size a graph input declares (224 if none).

    ``shape`` lists the input's dims as ONNX Runtime or the ONNX graph give them (ints fixed,
    anything else unknown). An input (N, S, S, 3) is taken as NHWC; anything else as NCHW.
    Errors name ``where``.
    """
    dims = list(shape or [])
    size, layout = None, "NCHW"
    if len(dims) == 4:
        if _fixed(dims[2]) and dims[2] == dims[3]:
            size = int(dims[2])  # type: ignore[call-overload]
        elif dims[3] == 3 and _fixed(dims[1]) and dims[1] == dims[2]:
            size, layout = int(dims[1]), "NHWC"  # type: ignore[call-overload]
    if size is not None and size > MAX_INPUT_SIZE:
        raise KlausModelError(
            f"{where}: the graph takes {size}x{size} inputs, more than the {MAX_INPUT_SIZE}-pixel limit"
        )
    return Preprocess(input_size=size or Preprocess().input_size, layout=layout)


def check_input_shape(shape: Sequence[object], preprocess: Preprocess, where: str, name: str = "input") -> None:
    """Refuse a graph input ``shape`` (ints fixed; anything else unknown) the preprocessing cannot feed.

    Klaus feeds (N, 3, S, S) (NHWC: (N, S, S, 3)) with N images or crops; a graph that fixes N
    is fed that many at a time (the last group padded), so only another rank, channel count or
    size is refused, in one line naming ``where``.
    """
    if not shape:  # rank unknown: ONNX Runtime will tell
        return
    fixed = [d if _fixed(d) else None for d in shape]
    s = preprocess.input_size
    wanted = [None, 3, s, s] if preprocess.layout == "NCHW" else [None, s, s, 3]
    made = f"(N, 3, {s}, {s})" if preprocess.layout == "NCHW" else f"(N, {s}, {s}, 3)"
    if len(fixed) != 4 or any(f is not None and f != w for f, w in zip(fixed[1:], wanted[1:], strict=True)):
        raise KlausModelError(
            f"{where}: input {name!r} has shape {shape_text(shape)}, but the preprocessing makes {made}"
        )
