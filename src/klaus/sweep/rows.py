"""Computing a sweep's rows: each setting compressed in memory, serialized (the byte count is the real
file's), parsed back and evaluated on the same preprocessed images; the fp32 row is the reference
the others' top-1 agreement is measured against."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import onnx

from .. import __version__, codecs, evaluate
from ..compression import NAMED_RECIPES, compress_onnx, compress_to_budget
from ..compression.budget import MIN_BUDGET_ELEMENTS
from ..errors import KlausError, KlausModelError, naming
from ..format import KlausModel, parse_model, serialize
from ..runtime import Classifier
from .data import CalibrationSet, EvalSet
from .settings import MIXED_RECIPE, Setting, uniform_recipe
from .source import SweepSource


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
    if (
        not recipe.get("fc_bits")
        and not recipe.get("conv_bits")
        and not recipe.get("depthwise_bits")
        and not recipe.get("rules")
    ):
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
                        raise KlausModelError(
                            naming(str(exc).removeprefix(f"<{setting.label}>: "), source.origin)
                        ) from None
                    row = _error_row(setting, evalset, _first_line(exc))
                else:
                    if setting.kind == "reference":
                        reference_top1 = top5[:, 0].copy()
                        row = _rescore(row, evalset, top5, reference_top1)
            rows.append(row)
            if on_row:
                on_row(row)
    return SweepResult(
        source.name,
        source.describe(),
        evalset.data,
        evalset.split,
        evalset.crops,
        len(evalset.samples),
        evalset.failed,
        None if calibration is None else calibration.describe(),
        command,
        tuple(rows),
        _describe_scope(settings),
        _describe_schemes(settings),
    )


def _describe_scope(settings: Sequence[Setting]) -> str:
    bits = [s for s in settings if s.kind == "bits" and s.recipe is not None]
    if not bits:
        return ""
    layers = {"fc": "fully connected layers", "conv": "convolutions (incl. depthwise)", "all": "all layers"}[
        bits[0].scope or "all"
    ]
    widths = ", ".join(str(b) for b in dict.fromkeys(s.bits for s in bits))
    others = "" if bits[0].scope == "all" else "other layers and "
    smallest = next(s.recipe.min_elements for s in bits if s.recipe is not None)
    floor = f"{others}tensors under {smallest} weights stay fp16"
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
    use_calib = calibration.batch if (calibration is not None and setting.calibrated) else None
    allocation = None
    start = time.perf_counter()
    if setting.kind == "mixed":
        model, allocation = _budgeted(setting, source, use_calib, calibration.crops if calibration is not None else 1)
    else:
        recipe = setting.recipe
        if recipe is None:
            raise KlausModelError(f"setting {setting.label!r} has no recipe")
        if setting.step is not None:
            recipe = uniform_recipe(recipe, setting.step, source.graph)
        model = compress_onnx(
            source.graph,
            recipe,
            preprocess=source.preprocess,
            labels=source.labels,
            card=source.card,
            output=source.output,
            calibration=use_calib,
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
        setting.label,
        setting.kind,
        setting.scope,
        setting.bits,
        setting.recipe.name if setting.recipe is not None else str(stored.recipe.get("name") or "") or None,
        method,
        use_calib is not None,
        len(blob),
        **_palette_stats(stored),  # type: ignore[arg-type]
        n=acc.n,
        failed=acc.failed,
        top1=acc.top1,
        top5=acc.top5,
        agreement=acc.agreement,
        compress_seconds=seconds,
        eval_seconds=eval_seconds,
        scheme=setting.row_scheme,
        step=setting.step,
        budget_bytes=setting.budget_bytes,
        allocation=None if allocation is None else _allocation_summary(allocation),
    )
    return row, top5


def _budgeted(
    setting: Setting, source: SweepSource, calibration: np.ndarray | None, views: int = 1
) -> tuple[KlausModel, object]:
    """A mixed row's model: the named recipe as it is now (not at import), fitted to the budget (``views`` crops per photo)."""
    if calibration is None or setting.budget_bytes is None:
        raise KlausModelError("a budgeted row needs calibration images (--calib)")
    return compress_to_budget(
        source.graph,
        NAMED_RECIPES[MIXED_RECIPE],
        setting.budget_bytes,
        preprocess=source.preprocess,
        labels=source.labels,
        card=source.card,
        output=source.output,
        calibration=calibration,
        views=views,
        min_elements=MIN_BUDGET_ELEMENTS if setting.min_elements is None else setting.min_elements,
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
        setting.label,
        setting.kind,
        None,
        8,
        None,
        "ort-dynamic-qint8",
        False,
        int8.stat().st_size,
        None,
        None,
        None,
        None,
        None,
        acc.n,
        acc.failed,
        acc.top1,
        acc.top5,
        acc.agreement,
        seconds,
        eval_seconds,
        scheme=setting.row_scheme,
    )


def _error_row(setting: Setting, evalset: EvalSet, error: str) -> SweepRow:
    return SweepRow(
        setting.label,
        setting.kind,
        setting.scope,
        setting.bits,
        None if setting.recipe is None else setting.recipe.name,
        None,
        False,
        None,
        None,
        None,
        None,
        None,
        None,
        0,
        len(evalset.samples),
        None,
        None,
        None,
        None,
        None,
        error,
        scheme=setting.row_scheme,
        step=setting.step,
        budget_bytes=setting.budget_bytes,
    )


def frontier(rows: Sequence[SweepRow]) -> list[SweepRow]:
    """The measured rows no smaller row beats: the best top-1 at each size, smallest file first."""
    done = sorted(
        ((r.file_bytes, r.top1, r) for r in rows if r.file_bytes is not None and r.top1 is not None),
        key=lambda measured: (measured[0], -measured[1]),
    )
    best: list[SweepRow] = []
    best_top1 = 0.0
    for _, top1, r in done:
        if not best or top1 > best_top1:
            best.append(r)
            best_top1 = top1
    return best
