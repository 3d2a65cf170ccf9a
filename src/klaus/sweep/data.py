"""A sweep's images: the labelled evaluation photos, preprocessed once for every row, and the
calibration photos the calibrated rows share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import evaluate
from ..compression.calibrate import calibration_batch, select_files
from ..errors import KlausDataError, KlausError
from ..labels import imagenet_label_rows
from ..preprocess import Preprocess, prepare
from .source import SweepSource

BATCH_IMAGES = 32  # evaluation images per ONNX Runtime call


@dataclass
class EvalSet:
    """Evaluation images, preprocessed once.

    Model inputs are kept as the uint8 pixels they were normalized from (a
    quarter of the memory, which matters for 10 crops) and re-normalized per
    batch; that is bit-identical to the float inputs, which is checked per
    image (should any image differ, every input is kept as float32 instead).
    """

    data: str
    split: str
    crops: int
    samples: list[evaluate.Sample]
    ok: np.ndarray  # bool per sample: readable
    preprocess: Preprocess
    errors: list[tuple[str, str]] = field(default_factory=list)
    inputs: np.ndarray | None = None  # (readable images * crops, ...) uint8 pixels or float32 inputs

    @property
    def n(self) -> int:
        return int(self.ok.sum())

    @property
    def failed(self) -> int:
        return len(self.samples) - self.n

    def batches(self, images: int = BATCH_IMAGES) -> Iterator[np.ndarray]:
        """Float32 model inputs for consecutive readable images, ``images`` at a time."""
        assert self.inputs is not None
        rows = images * self.crops
        for start in range(0, self.inputs.shape[0], rows):
            part = self.inputs[start : start + rows]
            yield part if part.dtype == np.float32 else _normalize(part, self.preprocess)


def _channel_shape(spec: Preprocess) -> tuple[int, ...]:
    return (1, 3, 1, 1) if spec.layout == "NCHW" else (1, 1, 1, 3)


def _normalize(pixels: np.ndarray, spec: Preprocess) -> np.ndarray:
    """preprocess's normalization, applied in tensor layout and channel order (same float32 ops)."""
    mean = np.asarray(spec.mean, np.float32).reshape(_channel_shape(spec))
    std = np.asarray(spec.std, np.float32).reshape(_channel_shape(spec))
    return np.ascontiguousarray((pixels.astype(np.float32) - mean) / std, dtype=np.float32)


def _to_pixels(x: np.ndarray, spec: Preprocess) -> np.ndarray | None:
    """The uint8 pixels a normalized input came from, or None if they would not reproduce it exactly."""
    mean = np.asarray(spec.mean, np.float64).reshape(_channel_shape(spec))
    std = np.asarray(spec.std, np.float64).reshape(_channel_shape(spec))
    pixels = np.rint(x.astype(np.float64) * std + mean)
    if pixels.min() < 0 or pixels.max() > 255:
        return None
    pixels = pixels.astype(np.uint8)
    return pixels if np.array_equal(_normalize(pixels, spec), x) else None


def load_eval_set(
    data: str | os.PathLike[str],
    source: SweepSource,
    *,
    split: str = "all",
    limit: int | None = None,
    crops: int = 1,
    on_image: Callable[[int], None] | None = None,
    on_error: Callable[[str, str], None] | None = None,
) -> EvalSet:
    """DATA's labelled images (split by class parity, then limited), preprocessed once."""
    samples = evaluate.load_dataset(data, source.labels)
    if split != "all":
        samples = evaluate.split_classes(samples, split)
    if limit:
        samples = samples[:limit]
    if not samples:
        raise KlausDataError(f"{data}: no images in split {split}")
    ok = np.zeros(len(samples), dtype=bool)
    parts: list[np.ndarray] = []  # uint8 pixels while every image round-trips exactly, else float32 inputs
    exact = True
    errors: list[tuple[str, str]] = []
    for i, s in enumerate(samples):
        try:
            x = prepare(s.path, source.preprocess, crops=crops)
        except KlausError as exc:
            errors.append((s.path, str(exc)))
            if on_error:
                on_error(s.path, str(exc))
        else:
            ok[i] = True
            pixels = _to_pixels(x, source.preprocess) if exact else None
            if exact and pixels is None:
                exact = False
                parts = [_normalize(p, source.preprocess) for p in parts]  # exact: each was verified
            parts.append(pixels if exact and pixels is not None else x)
        if on_image:
            on_image(1)
    if not parts:
        raise KlausDataError(f"{data}: none of the {len(samples)} images could be read")
    return EvalSet(str(data), split, crops, samples, ok, source.preprocess, errors, np.concatenate(parts, axis=0))


@dataclass(frozen=True)
class CalibrationSet:
    sources: tuple[str, ...]
    split: str
    crops: int
    files: tuple[Path, ...]
    batch: np.ndarray

    def describe(self) -> str:
        where = ", ".join(f"`{s}`" for s in self.sources)
        return f"{where}, split {self.split}, {len(self.files)} images, {self.crops} crop{'s' if self.crops > 1 else ''} each"

    def paths(self) -> set[str]:
        return {os.path.realpath(f) for f in self.files}


def load_calibration_set(
    sources: Sequence[str | os.PathLike[str]],
    source: SweepSource,
    *,
    split: str = "all",
    limit: int | None = None,
    crops: int = 1,
) -> CalibrationSet | None:
    """Like ``compression.calibrate.load_calibration``, but keeps the file list (for the overlap check and the header)."""
    if not sources:
        return None
    wnids = {row.wnid: row.index for row in source.labels if row.wnid} or {
        row.wnid: row.index for row in imagenet_label_rows()
    }
    files = select_files(sources, split, limit, wnids)
    batch = calibration_batch(files, source.preprocess, crops)
    return CalibrationSet(tuple(map(str, sources)), split, crops, tuple(files), batch)


def overlap(calibration: CalibrationSet | None, evalset: EvalSet) -> int:
    """How many evaluation samples are also calibration images (same resolved path)."""
    if calibration is None:
        return 0
    shared = calibration.paths()
    return sum(1 for s in evalset.samples if os.path.realpath(s.path) in shared)
