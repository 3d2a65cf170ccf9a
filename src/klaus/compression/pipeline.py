"""The compression pipeline: an ONNX classifier plus a recipe in, a `.klaus` model out.

check (:mod:`~klaus.compression.check`) → plan (:mod:`~klaus.compression.plan`) → quantize
(:mod:`~klaus.compression.quantize`) → write (:mod:`~klaus.compression.write`); under a size
budget the plan is chosen by :mod:`~klaus.compression.budget`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx

from .. import codecs, onnxgraph
from ..errors import KlausError, KlausModelError, KlausWriteError, naming, one_line
from ..format import KlausModel, LabelRow, looks_like_klaus, read_model
from ..labels import read_label_names
from ..names import printable
from ..onnxgraph import default_labels, graph_input_size, to_onnx
from ..preprocess import Preprocess
from .budget import compress_to_agreement, compress_to_budget
from .calibrate import CalibrationOptions, load_imagenet_calibration
from .check import check_classifier, check_fp16_range, check_inputs
from .mixed import Allocation
from .plan import calibration_stats, check_layer_rules
from .quantize import Progress, palettized
from .recipe import Recipe, effective_recipe
from .write import ModelCard, assemble, card_of, write


def compress_onnx(
    model: onnx.ModelProto,
    recipe: Recipe,
    *,
    preprocess: Preprocess,
    labels: Sequence[LabelRow],
    card: ModelCard,
    output: str = "logits",
    png: codecs.PngOptions = codecs.PngOptions(),
    calibration: np.ndarray | None = None,
    progress: Progress | None = None,
) -> KlausModel:
    """Palettize, bias-correct (when calibration inputs are given) and encode a model."""
    check_inputs(model, preprocess, labels, card.name)
    skeleton, weights = onnxgraph.split_weights(model)
    roles = onnxgraph.tensor_roles(model)
    check_fp16_range(weights, roles, recipe, card.name)
    recipe = effective_recipe(recipe, calibration is not None)
    stats = None if calibration is None else calibration_stats(model, weights, roles, recipe, calibration)
    weights, quantized = palettized(model, weights, roles, recipe, stats, calibration, progress, finetune=True)
    return assemble(
        skeleton,
        weights,
        quantized,
        recipe,
        calibration,
        preprocess=preprocess,
        labels=labels,
        card=card,
        output=output,
        png=png,
    )


def recompress(
    model: KlausModel,
    recipe: Recipe,
    png: codecs.PngOptions = codecs.PngOptions(),
    calibration: np.ndarray | None = None,
    progress: Progress | None = None,
) -> KlausModel:
    """Apply a recipe to an existing (ideally lossless) model, keeping its card and labels."""
    return compress_onnx(
        to_onnx(model),
        recipe,
        preprocess=model.preprocess,
        labels=model.labels,
        card=card_of(model),
        output=model.meta["output"],
        png=png,
        calibration=calibration,
        progress=progress,
    )


def load_source(path: str | os.PathLike[str]) -> KlausModel | onnx.ModelProto:
    """A compression source: a `.klaus` model or an ONNX file, told apart by content."""
    if looks_like_klaus(path):
        return read_model(path)
    return onnxgraph.load_onnx(str(path))


# ---------------------------------------------------------------- a build from a file, as `klaus compress` makes it

Warn = Callable[[str], None]


class Stages(Protocol):
    """Where a long build reports how far it is: :meth:`stage` when one of ``export``, ``calibration``,
    ``search``, ``quantize`` and ``write`` begins, :meth:`step` for each piece of work inside it (a tensor
    palettized, a search step). The CLI draws it on a terminal (klaus.cli.common.StageProgress)."""

    def stage(self, name: str) -> None: ...

    def step(self, detail: str) -> None: ...


@dataclass(frozen=True)
class PreprocessPreset:
    """How a family of models turns a photo into its input (``--preprocess NAME``): normalization in
    0..255 units, the resize filter and rule, and the center crop's share of the resized shorter side."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_ratio: float = 0.875
    resize: str = "shorter"
    description: str = ""


PRESETS = {
    p.name: p
    for p in (
        PreprocessPreset(
            "lite", (127.0, 127.0, 127.0), (128.0, 128.0, 128.0), "bicubic",
            description="EfficientNet-Lite (the TensorFlow reference): (x - 127) / 128, bicubic, 87.5 % crop",
        ),
        PreprocessPreset(
            "torchvision", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "bilinear",
            description="torchvision's ImageNet models: mean 0.485,0.456,0.406 and std 0.229,0.224,0.225 (of 255), "
            "bilinear resize to 256, 224 crop",
        ),
        PreprocessPreset(
            "inception", (127.5, 127.5, 127.5), (127.5, 127.5, 127.5), "bilinear",
            description="Inception, TF-slim and Keras 'tf' mode: x / 127.5 - 1, bilinear, central 87.5 % crop",
        ),
    )
}  # fmt: skip
DEFAULT_PRESET = "lite"  # what an ONNX file gets unless told: the embedded model's family


@dataclass(frozen=True)
class OnnxOptions:
    """How an ONNX source becomes a `.klaus` file's preprocessing, labels and card (compress's options).

    ``input_size`` None takes the graph's fixed input size, else 224; ``resize``, ``crop_ratio``,
    ``interpolation``, ``mean`` and ``std`` left None come from ``preset`` (:data:`PRESETS`; None
    is :data:`DEFAULT_PRESET`); without ``labels_file`` a 1000-way classifier gets ImageNet-1k's
    labels; ``name`` and ``source`` default to the file's name.
    """

    input_size: int | None = None
    preset: str | None = None
    resize: str | None = None
    crop_ratio: float | None = None
    interpolation: str | None = None
    mean: tuple[float, float, float] | str | None = None  # or "127,127,127", as --mean is written
    std: tuple[float, float, float] | str | None = None
    channel_order: str = "RGB"
    layout: str = "NCHW"
    labels_file: str | None = None  # one class name per line (klaus.labels.read_label_names)
    simplify: bool = True
    name: str | None = None
    source: str | None = None
    license: str = "unknown"


@dataclass(frozen=True)
class Source:
    """What a build starts from: the float graph, and what the file will say about it."""

    graph: onnx.ModelProto
    preprocess: Preprocess
    labels: tuple[LabelRow, ...]
    card: ModelCard
    output: str = "logits"


@dataclass(frozen=True)
class Built:
    """A build: the model, the recipe as it ran, and what a budget search chose."""

    model: KlausModel
    recipe: Recipe  # as it ran: GPTQ falls back to k-means without calibration
    calibrated: bool
    allocation: Allocation | None = None
    agreement: float | None = None  # --max-drop: top-1 agreement on held-out calibration photos, percent


@dataclass(frozen=True)
class BuildReport:
    """What `klaus compress` and `klaus zoo build` report about the file they wrote."""

    path: str
    bytes: int
    recipe: Recipe
    seconds: float
    calibrated: bool
    allocation: Allocation | None = None

    def to_dict(self) -> dict[str, object]:
        report: dict[str, object] = {
            "path": self.path,
            "bytes": self.bytes,
            "recipe": self.recipe.describe(),
            "seconds": round(self.seconds, 2),
        }
        if self.allocation is not None:
            report["allocation"] = self.allocation.table()
            report["recipe"]["rules"] = ["(one per tensor, see allocation)"]  # type: ignore[index]
        return report


def preset_of(options: OnnxOptions) -> PreprocessPreset:
    """The :class:`PreprocessPreset` ``options`` name (the default one when they name none)."""
    name = options.preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise KlausModelError(f"unknown preprocessing preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[name]


def open_source(
    src: str,
    options: OnnxOptions = OnnxOptions(),
    *,
    lossless: bool = False,
    warn: Warn | None = None,
    note: Warn | None = None,
) -> Source:
    """SRC (an ONNX classifier, or a lossless `.klaus`) as a build's :class:`Source`; errors name ``src``.

    A `.klaus` keeps its own preprocessing, labels and card. One that is not lossless is refused
    with ``lossless`` (its decoded weights are no float reference) and otherwise ``warn``-ed about.
    An ONNX graph is checked before ONNX Runtime sees it, then simplified and its weights renamed;
    ``note`` hears when a PyTorch export gets the default (EfficientNet-Lite) preprocessing without
    being told, since torchvision's models expect their own.
    """
    source = load_source(src)
    if isinstance(source, KlausModel):
        if options.labels_file or options.preset:
            option = "--labels" if options.labels_file else "--preprocess"
            raise KlausModelError(
                f"{option} applies to ONNX input; a .klaus source keeps its own labels and preprocessing"
            )
        _check_lossless_source(source, src, lossless, warn)
        return Source(to_onnx(source), source.preprocess, tuple(source.labels), card_of(source), source.meta["output"])
    check_classifier(source, layout=options.layout, where=src)  # before ONNX Runtime sees it (simplify)
    preset = preset_of(options)
    if note and options.preset is None and options.mean is None and options.std is None and _from_pytorch(source):
        note(
            f"{src} was exported from PyTorch; torchvision's ImageNet models expect --preprocess torchvision "
            f"(it gets --preprocess {DEFAULT_PRESET}: {preset.description})"
        )
    try:
        preprocess = Preprocess(
            input_size=options.input_size or graph_input_size(source, options.layout) or 224,
            resize=options.resize or preset.resize,
            crop_ratio=options.crop_ratio if options.crop_ratio is not None else preset.crop_ratio,
            interpolation=options.interpolation or preset.interpolation,
            mean=triple(options.mean if options.mean is not None else preset.mean, "--mean"),
            std=triple(options.std if options.std is not None else preset.std, "--std"),
            channel_order=options.channel_order,
            layout=options.layout,
        )
    except ValueError as exc:
        raise KlausModelError(f"bad preprocessing option: {exc}") from None
    names = read_label_names(options.labels_file) if options.labels_file else None
    graph = onnxgraph.rename_weights(onnxgraph.simplify(source, src)) if options.simplify else source
    labels = default_labels(graph, names, where=src)
    # A file name need not be UTF-8 text, which the file's metadata must be: undecodable bytes as \xNN.
    card = ModelCard(
        options.name or printable(Path(src).stem),
        options.source or printable(Path(src).name),
        options.license,
        "klaus compress",
    )
    return Source(graph, preprocess, labels, card)


def _from_pytorch(graph: onnx.ModelProto) -> bool:
    """Whether torch.onnx wrote the graph (its producer name): such a model most likely expects
    torchvision's normalization, not EfficientNet-Lite's."""
    return graph.producer_name.strip().lower() == "pytorch"


def triple(value: tuple[float, float, float] | str, option: str) -> tuple[float, float, float]:
    """Three per-channel numbers, from a tuple or from text as ``option`` is written ("127,127,127")."""
    if not isinstance(value, str):
        return value
    try:
        values = tuple(float(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise KlausModelError(f"{option} needs three comma-separated numbers, got {value!r}")
    return values[0], values[1], values[2]


def _check_lossless_source(source: KlausModel, src: str, lossless: bool, warn: Warn | None) -> None:
    """A .klaus source should be lossless: its weights are the float model every recipe starts from."""
    lossy = [t for t in source.tensors if t.codec != "raw-f32"]
    if not lossy:
        return
    palettized = sum(t.codec == "palette-png" for t in lossy)
    kinds = [f"{n} {kind}" for n, kind in ((palettized, "palettized"), (len(lossy) - palettized, "fp16")) if n]
    what = f"{' and '.join(kinds)} of its {len(source.tensors)} tensors"
    if lossless:
        raise KlausModelError(
            f"{src}: is not a lossless .klaus ({what}), so --lossless would label decoded approximations a "
            "float reference; use the original ONNX or a lossless .klaus"
        )
    if warn:
        warn(
            f"{src} is not a lossless .klaus ({what}); compressing it again compounds the accuracy loss "
            "(start from the original ONNX or a lossless .klaus)"
        )


def build(
    source: Source,
    recipe: Recipe,
    *,
    calibration: np.ndarray | None = None,
    views: int = 1,
    budget_mib: float | None = None,
    max_drop: float | None = None,
    png: codecs.PngOptions = codecs.PngOptions(),
    progress: Progress | None = None,
) -> Built:
    """:func:`compress_onnx`, or a budgeted build when ``budget_mib`` or ``max_drop`` is given
    (:mod:`~klaus.compression.budget`; both need ``calibration``, ``views`` rows per photo);
    ``progress`` hears each tensor palettized and each search step."""
    common = {
        "preprocess": source.preprocess,
        "labels": source.labels,
        "card": source.card,
        "output": source.output,
        "png": png,
    }
    calibrated = calibration is not None
    if budget_mib is None and max_drop is None:
        model = compress_onnx(source.graph, recipe, calibration=calibration, progress=progress, **common)  # type: ignore[arg-type]
        return Built(model, effective_recipe(recipe, calibrated), calibrated)
    option = "--budget-mib" if budget_mib is not None else "--max-drop"
    if budget_mib is not None and max_drop is not None:
        raise KlausModelError("give --budget-mib or --max-drop, not both")
    if calibration is None:
        raise KlausModelError(f"{option} needs calibration photos (--calib DIR) to measure each layer's sensitivity")
    if budget_mib is not None:
        model, allocation = compress_to_budget(
            source.graph,
            recipe,
            int(budget_mib * 2**20),
            calibration=calibration,
            views=views,
            progress=progress,
            **common,  # type: ignore[arg-type]
        )
        return Built(model, effective_recipe(recipe, calibrated), calibrated, allocation)
    assert max_drop is not None
    model, allocation, agreement = compress_to_agreement(
        source.graph,
        recipe,
        max_drop,
        calibration=calibration,
        views=views,
        progress=progress,
        **common,  # type: ignore[arg-type]
    )
    return Built(model, effective_recipe(recipe, calibrated), calibrated, allocation, agreement)


def compress_file(
    src: str,
    out: str,
    recipe: Recipe,
    *,
    options: OnnxOptions = OnnxOptions(),
    layers: Sequence[str] = (),
    calibration: CalibrationOptions = CalibrationOptions(),
    budget_mib: float | None = None,
    max_drop: float | None = None,
    lossless: bool = False,
    png: codecs.PngOptions = codecs.PngOptions(),
    warn: Warn | None = None,
    note: Warn | None = None,
    hint: Warn | None = None,
    stages: Stages | None = None,
) -> BuildReport:
    """`klaus compress`: SRC built with ``recipe`` and written to OUT atomically.

    Everything the file must satisfy is checked before any work; ``layers`` are the ``--layer``
    rules the recipe holds (one matching no weight is an error; a calibration photo that cannot be
    read is ``warn``-ed about); ``note`` receives the agreement a ``max_drop`` build reached, ``hint``
    advice about the preprocessing (:func:`open_source`); ``stages`` how far the build is
    (calibration, search or quantize, write). Errors during the build name SRC (OUT for a file that
    cannot be written).
    """
    if recipe.finetune_steps and not calibration.sources:
        raise KlausModelError(
            "--finetune-steps needs calibration photos (--calib DIR): the float model teaches on them"
        )
    start = time.perf_counter()
    source = open_source(src, options, lossless=lossless, warn=warn, note=hint)
    check_inputs(source.graph, source.preprocess, source.labels, src, recipe)  # everything the file must satisfy
    check_layer_rules(layers, source.graph, src)
    if stages and calibration.sources:
        stages.stage("calibration")
    batch = calibration_photos(calibration, source.preprocess, warn)
    if stages:
        stages.stage("quantize" if budget_mib is None and max_drop is None else "search")
    try:
        built = build(
            source,
            recipe,
            calibration=batch,
            views=calibration.crops,
            budget_mib=budget_mib,
            max_drop=max_drop,
            png=png,
            progress=stages.step if stages else None,
        )
    except KlausWriteError as exc:  # a budget search builds file images (SQLite VACUUM) along the way
        raise KlausWriteError(f"{out}: {exc}") from None
    except KlausError as exc:
        raise KlausModelError(naming(one_line(str(exc)), src)) from None
    if stages:
        stages.stage("write")
    return write_build(built, out, start, note)


def calibration_photos(
    options: CalibrationOptions, preprocess: Preprocess, warn: Warn | None = None
) -> np.ndarray | None:
    """The calibration batch ``options`` describe (:func:`~klaus.compression.calibrate.load_imagenet_calibration`):
    a photo that cannot be read must not stop a build, but ``warn`` tells the user."""

    def skipped(exc: KlausError) -> None:
        if warn:
            warn(f"{one_line(str(exc))} (calibration image skipped)")

    return load_imagenet_calibration(options, preprocess, skipped)


def write_build(built: Built, out: str, start: float, note: Warn | None = None) -> BuildReport:
    """Write ``built`` to ``out`` (atomically); its report times the build from ``start`` (``time.perf_counter``).
    ``note`` receives the agreement a ``max_drop`` build reached."""
    if built.agreement is not None and note:
        note(f"top-1 agreement with the float model on held-out calibration photos: {built.agreement:.1f} %")
    size = write(built.model, out)
    return BuildReport(out, size, built.recipe, time.perf_counter() - start, built.calibrated, built.allocation)
