"""The compression pipeline: an ONNX classifier plus a recipe in, a `.klaus` model out."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from . import __version__, codecs, onnxgraph
from .calibrate import InputStats, Window, weight_importance
from .errors import KlausModelError
from .format import PAGE_SIZE, KlausModel, LabelRow, TensorRecord, looks_like_klaus, read_model, write_model
from .labels import imagenet_label_rows as imagenet_label_rows
from .labels import labels_for
from .labels import plain_label_rows as plain_label_rows
from .onnxgraph import data_inputs as data_inputs
from .preprocess import Preprocess, shape_text
from .quantize import LayerRule, PalettizedTensor, Recipe, palettize, palettize_gptq

if TYPE_CHECKING:
    from .mixed import Allocation

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ModelCard:
    """Provenance written into the file's metadata."""

    name: str
    source: str = "unknown"
    license: str = "unknown"
    creator: str = "unknown"
    description: str = ""


def _linear(role: onnxgraph.TensorRole, array: np.ndarray) -> bool:
    """Layers whose input Hessian is a plain channel Gram matrix: Gemm and 1x1 Conv."""
    if role.op == "Gemm":
        return True
    return role.op == "Conv" and role.group == 1 and all(d == 1 for d in array.shape[2:])


def quantize_weights(
    weights: dict[str, np.ndarray],
    roles: dict[str, onnxgraph.TensorRole],
    recipe: Recipe,
    stats: dict[str, InputStats] | None = None,
    progress: Progress | None = None,
) -> dict[str, PalettizedTensor]:
    """Palettize every tensor the recipe gives bits to (GPTQ where the recipe and calibration allow)."""
    out = {}
    for name, bits in planned_bits(weights, roles, recipe).items():
        if progress:
            progress(name)
        out[name] = quantize_tensor(weights[name], roles[name], bits, recipe, stats, recipe.step_for(name))
    return out


def quantize_tensor(
    array: np.ndarray,
    role: onnxgraph.TensorRole,
    bits: int,
    recipe: Recipe,
    stats: dict[str, InputStats] | None,
    step: float | None = None,
) -> PalettizedTensor:
    """One tensor as the recipe says: GPTQ where it has an input Hessian, else (weighted) k-means.

    ``step`` replaces the k-means palette by uniform levels that far apart.
    """
    common = {
        "granularity": recipe.granularity, "iterations": recipe.iterations, "rate_penalty": recipe.rate_penalty,
        "step": step,
    }
    st = stats.get(role.activation) if stats else None
    if recipe.method == "gptq" and st is not None and st.gram is not None and st.count > 0:
        return palettize_gptq(array, bits, st.hessian, out_axis=role.out_axis, factor=st.factor(), **common)
    if recipe.method == "gptq" and st is not None and role.kind == "depthwise" and st.fits_windows(array.shape):
        return palettize_gptq(array, bits, st.patch_hessian, factor=st.patch_factor(), **common)
    importance = None if st is None or not recipe.weighted else weight_importance(role, array.shape, st.energy)
    return palettize(array, bits, axis=role.out_axis, importance=importance, **common)


def planned_bits(weights: dict[str, np.ndarray], roles: dict[str, onnxgraph.TensorRole], recipe: Recipe) -> dict[str, int]:
    plan = {}
    for name, array in weights.items():
        bits = recipe.bits_for(name, roles[name].kind, array.size)
        if bits is not None and array.ndim > 0 and array.size > 0:
            plan[name] = bits
    return plan


def calibration_stats(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    roles: dict[str, onnxgraph.TensorRole],
    recipe: Recipe,
    calibration: np.ndarray,
) -> dict[str, InputStats]:
    """Input statistics of every layer the recipe palettizes (Gram matrices only for GPTQ)."""
    from .calibrate import input_statistics

    plan = planned_bits(weights, roles, recipe)
    activations = [roles[n].activation for n in plan]
    grams = [roles[n].activation for n in plan if recipe.method == "gptq" and _linear(roles[n], weights[n])]
    windows = depthwise_windows(model, roles, {n: weights[n].shape for n in plan}) if recipe.method == "gptq" else {}
    return input_statistics(model, calibration, activations, grams, windows=windows)


def depthwise_windows(
    model: onnx.ModelProto, roles: dict[str, onnxgraph.TensorRole], shapes: dict[str, tuple[int, ...]]
) -> dict[str, Window]:
    """The input window of every listed 2-D depthwise convolution, by its input activation.

    An activation read by two convolutions with different windows gets none (it
    falls back to weighted rounding) rather than a Hessian that fits only one of them.
    """
    nodes = {node.output[0]: node for node in model.graph.node if node.output}
    found: dict[str, Window | None] = {}
    for name, shape in shapes.items():
        role = roles[name]
        node = nodes.get(role.output)
        if role.kind != "depthwise" or node is None or node.op_type != "Conv":
            continue
        window = _window(node, tuple(int(d) for d in shape[2:]))
        if role.activation in found and found[role.activation] != window:
            window = None
        found[role.activation] = window
    return {a: w for a, w in found.items() if w is not None}


def _window(node: onnx.NodeProto, kernel: tuple[int, ...]) -> Window | None:
    attrs = onnxgraph.attributes(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if len(kernel) != 2 or auto_pad not in (b"NOTSET", "NOTSET"):
        return None
    return Window(
        kernel=(kernel[0], kernel[1]),
        strides=tuple(int(v) for v in attrs.get("strides", (1, 1))),
        pads=tuple(int(v) for v in attrs.get("pads", (0, 0, 0, 0))),
        dilations=tuple(int(v) for v in attrs.get("dilations", (1, 1))),
    )


def encode_tensor(name: str, array: np.ndarray, q: PalettizedTensor | None, recipe: Recipe, png: codecs.PngOptions) -> TensorRecord:
    """A palettized tensor as palette + PNG index map, anything else as raw floats."""
    if q is None:
        return TensorRecord(name, tuple(array.shape), recipe.float_codec, 0, codecs.encode_raw(array, recipe.float_codec))
    rows, cols = codecs.index_map_shape(array.shape)
    return TensorRecord(
        name,
        tuple(array.shape),
        "palette-png",
        q.bits,
        codecs.encode_png_indices(q.indices.reshape(rows, cols), q.bits, png),
        palette=q.palette.astype("<f2").tobytes(),
        scales=None if q.scales is None else q.scales.astype("<f2").tobytes(),
        scale_axis=None if q.scales is None else q.scale_axis,
    )


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
    check_inputs(model, preprocess, labels, card)
    skeleton, weights = onnxgraph.split_weights(model)
    roles = onnxgraph.tensor_roles(model)
    check_fp16_range(weights, roles, recipe, card.name)
    recipe = effective_recipe(recipe, calibration is not None)
    stats = None if calibration is None else calibration_stats(model, weights, roles, recipe, calibration)
    weights, quantized = _palettized(model, weights, roles, recipe, stats, calibration, progress, finetune=True)
    return _assemble(
        skeleton, weights, quantized, recipe, calibration, preprocess=preprocess, labels=labels, card=card,
        output=output, png=png,
    )


def check_inputs(
    model: onnx.ModelProto, preprocess: Preprocess, labels: Sequence[LabelRow], card: ModelCard, where: str | None = None,
    recipe: Recipe | None = None,
) -> None:
    """What every build checks before any work: a safe, valid classifier graph (check_classifier),
    input size, unique label names and, given the ``recipe``, weights that fit where it stores them
    (:func:`check_fp16_range`). Errors name ``where`` (default: the card's model name)."""
    where = where or card.name
    onnxgraph.validate_skeleton(model, where)
    check_classifier(model, layout=preprocess.layout, classes=len(labels), where=where)
    check_preprocess_fits(model, preprocess, where)
    names = [row.name for row in labels]
    if len(set(names)) != len(names):
        raise KlausModelError(f"{where}: label names must be unique")
    if recipe is not None:
        check_fp16_range(onnxgraph.split_weights(model)[1], onnxgraph.tensor_roles(model), recipe, where)


FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def check_fp16_range(
    weights: dict[str, np.ndarray], roles: dict[str, onnxgraph.TensorRole], recipe: Recipe, where: str
) -> None:
    """Palettes, and float tensors in an fp16 recipe, are stored at half precision: a weight beyond
    fp16's ±65504 would become infinite there, so such a model is refused before any work."""
    for name, w in weights.items():
        as_fp16 = recipe.float_codec == "raw-f16" or recipe.bits_for(name, roles[name].kind, w.size) is not None
        peak = float(np.abs(w).max()) if w.size else 0.0
        if as_fp16 and peak > FP16_MAX:
            raise KlausModelError(
                f"{where}: weight {name!r} holds values up to {peak:.3g}, beyond the ±{FP16_MAX:g} of the fp16 palettes "
                "and tensors this recipe stores; only --lossless (fp32) can store it"
            )


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)


def _dims(value: onnx.ValueInfoProto) -> list[int | None] | None:
    """A value's shape (None for an unknown dimension), or None if not even its rank is known."""
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]


def check_classifier(model: onnx.ModelProto, *, layout: str = "NCHW", classes: int | None = None, where: str) -> None:
    """Refuse a graph that could only make a `.klaus` file Klaus rejects later or that is not a classifier.

    The graph passes ``onnx.checker``; every float weight (initializer or Constant) is
    finite; there is one input, a float image tensor (N, 3, H, W), or (N, H, W, 3) for
    ``layout`` NHWC; and one float output (N, classes). Unknown (symbolic) dimensions
    are accepted. Errors are one line naming ``where``.
    """
    onnxgraph.check_model(model, where)
    _check_finite(model, where)
    inputs = data_inputs(model)
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs) or "none"
        raise KlausModelError(f"{where}: the graph has {len(inputs)} inputs ({names}); a classifier takes one image tensor")
    image = inputs[0]
    wanted = "(N, 3, H, W)" if layout == "NCHW" else "(N, H, W, 3)"
    if not image.type.HasField("tensor_type") or image.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise KlausModelError(f"{where}: input {image.name!r} is {_type_name(image)}, not a float32 image tensor {wanted}")
    dims = _dims(image)
    channel = 1 if layout == "NCHW" else 3
    if dims is not None and (len(dims) != 4 or dims[channel] not in (None, 3)):
        other = "NHWC" if layout == "NCHW" else "NCHW"
        hint = f" (for {other} input use --layout {other})" if len(dims) == 4 and dims[4 - channel] == 3 else ""
        raise KlausModelError(f"{where}: input {image.name!r} has shape {shape_text(dims)}, not an image tensor {wanted}{hint}")
    outputs = model.graph.output
    if len(outputs) != 1:
        raise KlausModelError(f"{where}: the graph has {len(outputs)} outputs; a classifier has one, (N, classes)")
    output = outputs[0]
    if not output.type.HasField("tensor_type") or output.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise KlausModelError(f"{where}: output {output.name!r} is {_type_name(output)}, not float32 class scores")
    dims = _dims(output)
    if dims is None:  # rank unknown (onnx.checker requires a shape on graph outputs, so rarely)
        return
    if len(dims) != 2:
        raise KlausModelError(f"{where}: output {output.name!r} has shape {shape_text(dims)}, not (N, classes): not a classifier")
    if classes is not None and dims[1] is not None and dims[1] != classes:
        raise KlausModelError(f"{where}: output {output.name!r} has {dims[1]} classes but there are {classes} labels")


def _type_name(value: onnx.ValueInfoProto) -> str:
    if not value.type.HasField("tensor_type"):
        return f"a {value.type.WhichOneof('value') or 'untyped'} value"
    return f"a {onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()} tensor"


def _check_finite(model: onnx.ModelProto, where: str) -> None:
    """Every float weight finite: a NaN or infinity cannot be palettized, and raw codecs refuse it on reading."""
    from onnx import numpy_helper

    def tensors(graph: onnx.GraphProto):
        """(what to call it, tensor) for every initializer and node-attribute tensor, subgraphs included."""
        for init in graph.initializer:
            yield f"weight {init.name!r}", init
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    yield f"{node.op_type} node {node.name or (node.output[0] if node.output else '')!r}", a.t
                elif a.type == onnx.AttributeProto.GRAPH:
                    yield from tensors(a.g)
                for g in a.graphs:
                    yield from tensors(g)

    for what, tensor in tensors(model.graph):
        if tensor.data_type in FLOAT_TYPES and tensor.data_location != onnx.TensorProto.EXTERNAL:
            if not np.all(np.isfinite(numpy_helper.to_array(tensor))):
                raise KlausModelError(f"{where}: {what} holds NaN or infinite values")


def _palettized(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    roles: dict[str, onnxgraph.TensorRole],
    recipe: Recipe,
    stats: dict[str, InputStats] | None,
    calibration: np.ndarray | None,
    progress: Progress | None,
    finetune: bool,
) -> tuple[dict[str, np.ndarray], dict[str, PalettizedTensor]]:
    """Every float tensor as it will be stored (biases corrected) and the palettized ones."""
    quantized = quantize_weights(weights, roles, recipe, stats, progress)
    if stats is not None:
        weights = {**weights, **bias_corrected(weights, quantized, roles, stats)}
    if finetune and recipe.finetune_steps and calibration is not None and quantized:
        quantized, weights = finetuned(model, weights, quantized, roles, recipe, calibration, progress)
    return weights, quantized


def _assemble(
    skeleton: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    quantized: dict[str, PalettizedTensor],
    recipe: Recipe,
    calibration: np.ndarray | None,
    *,
    preprocess: Preprocess,
    labels: Sequence[LabelRow],
    card: ModelCard,
    output: str,
    png: codecs.PngOptions,
) -> KlausModel:
    """The `.klaus` model: encoded tensors plus the metadata that says how they were made."""
    records = [encode_tensor(name, array, quantized.get(name), recipe, png) for name, array in weights.items()]
    meta = {
        "model_name": card.name,
        "source": card.source,
        "license": card.license,
        "creator": card.creator,
        "description": card.description,
        "klaus_version": __version__,
        "output": output,
        "calibration_inputs": str(0 if calibration is None else calibration.shape[0]),
        "recipe": json.dumps(recipe.describe(), sort_keys=True, separators=(",", ":")),
    }
    return KlausModel(meta, preprocess, tuple(labels), skeleton.SerializeToString(deterministic=True), tuple(records))


FIT_BUILDS = 5  # builds a budget fit may spend shrinking an allocation that came out too big
FIT_REFINEMENTS = 2  # ... and growing one that left more than FIT_SLACK of the budget unused
FIT_SLACK, FIT_SLACK_PAGES = 0.005, 4
MIN_BUDGET_ELEMENTS = 1024  # smaller weights stay fp16 under a budget: not worth a palette
PROBE_INPUTS = 128  # calibration inputs used to measure each layer's sensitivity
PROBE_EVERY = 4  # ... every fourth one, held out of the statistics the probe tensors are fitted to


def _views(count: int, views: int) -> int:
    """Rows per photo; rows that do not split evenly into photos count one by one."""
    return views if views > 0 and count % views == 0 else 1


def held_out_photos(count: int, every: int, views: int = 1) -> np.ndarray:
    """Rows of every ``every``-th photo; ``views`` consecutive rows (crops) make one photo."""
    return (np.arange(count) // _views(count, views)) % every == every - 1


def probe_rows(count: int, views: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(rows the statistics come from, rows that measure sensitivities).

    Every PROBE_EVERY-th photo is held out of the statistics the probe tensors
    are fitted to, so their KL says how the fit carries over to new photos; its
    first view (at most PROBE_INPUTS of them) is the probe. With very few
    inputs all of them do both.
    """
    if count < 2 * PROBE_EVERY * max(1, views):
        every = np.ones(count, dtype=bool)
        return every, every
    views = _views(count, views)
    held = held_out_photos(count, PROBE_EVERY, views)
    first = held & (np.arange(count) % views == 0)
    probe = np.zeros(count, dtype=bool)
    probe[np.flatnonzero(first)[:PROBE_INPUTS]] = True
    return ~held, probe


def merged_stats(a: dict[str, InputStats], b: dict[str, InputStats]) -> dict[str, InputStats]:
    """Statistics of two disjoint input sets combined (the sums add up)."""
    return {name: a[name].merged(b[name]) if name in b else a[name] for name in a}


class _Search:
    """What a budgeted build needs once: statistics, every layer's candidates and their measured sensitivity."""

    def __init__(self, model, recipe, calibration, *, preprocess, labels, card, output, png, min_elements, uniform, views,
                 progress):
        from . import mixed

        check_inputs(model, preprocess, labels, card)
        self.model, self.recipe, self.calibration = model, recipe, calibration
        self.skeleton, self.weights = onnxgraph.split_weights(model)
        self.roles = roles = onnxgraph.tensor_roles(model)
        check_fp16_range(self.weights, roles, recipe, card.name)
        eligible = [n for n, w in self.weights.items() if roles[n].kind != "other" and w.size >= min_elements]
        planned = replace(recipe, rules=tuple(LayerRule.exact(n, 8) for n in eligible))
        fit, probing = probe_rows(len(calibration), views)
        fit_stats = calibration_stats(model, self.weights, roles, planned, calibration[fit])
        rest = None if fit.all() else calibration_stats(model, self.weights, roles, planned, calibration[~fit])
        self.stats = stats = fit_stats if rest is None else merged_stats(fit_stats, rest)
        probe = calibration[probing]
        if progress:
            progress("candidates")
        weights = self.weights
        self.layers, probes = mixed.candidate_options(
            weights, roles, stats, eligible,
            lambda name, bits, step: quantize_tensor(weights[name], roles[name], bits, recipe, stats, step),
            steps=mixed.DEFAULT_STEPS if uniform else (),
            probe_quantize=None if rest is None else (
                lambda name, bits, step: quantize_tensor(weights[name], roles[name], bits, recipe, fit_stats, step)
            ),
        )
        if progress:
            progress("sensitivities")
        mixed.measure_scales(self.layers, weights, probes, lambda ws: self.probabilities(ws, probe), self.probabilities(weights, probe))
        self.meta = dict(preprocess=preprocess, labels=labels, card=card, output=output, png=png)
        self.progress = progress
        self.overhead: float | None = None
        self.fitted: tuple[Recipe, dict[str, np.ndarray], dict[str, PalettizedTensor]] | None = None

    def probabilities(self, weights: dict[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
        from .runtime import run_batches, softmax

        return softmax(run_batches(onnxgraph.join_weights(self.skeleton, weights), inputs))

    def build(self, allocation: Allocation, method: str | None = None) -> KlausModel:
        """The allocation built without fine-tuning; its pieces are kept for :meth:`finished`."""
        from . import mixed

        plan = replace(mixed.budget_recipe(self.recipe, allocation), method=method or self.recipe.method)
        weights, quantized = _palettized(
            self.model, self.weights, self.roles, plan, self.stats, self.calibration, self.progress, finetune=False
        )
        self.fitted = plan, weights, quantized
        return _assemble(self.skeleton, weights, quantized, plan, self.calibration, **self.meta)

    def measure_overhead(self, budget_bytes: float) -> float:
        """Bytes outside the planned tensors (labels, graph, small tensors, SQLite pages).

        Measured once, on a quick plain-k-means build of a first allocation.
        """
        from . import mixed
        from .format import serialize

        if self.overhead is None:
            first = mixed.allocate(self.layers, budget_bytes * 0.9)
            self.overhead = len(serialize(self.build(first, "kmeans"))) - first.predicted_bytes
        return self.overhead

    def fit(self, budget_bytes: int) -> tuple[KlausModel, Allocation]:
        """The allocation with the least predicted loss whose built file fits ``budget_bytes`` (no fine-tuning yet).

        Predicted bytes miss the built size by a little (PNG and SQLite overheads), so an
        allocation that overshoots is shrunk, and one that leaves more than FIT_SLACK of
        the budget unused is grown once or twice, keeping the largest build that fits.
        """
        from . import mixed
        from .format import serialize

        target = budget_bytes - self.measure_overhead(budget_bytes)
        best = None
        refinements = 0
        for _ in range(FIT_BUILDS + FIT_REFINEMENTS):
            allocation = mixed.allocate(self.layers, target)
            model = self.build(allocation)
            size = len(serialize(model))
            if size > budget_bytes:
                if best is not None:
                    break  # a refinement overshot: keep the last build that fit
                target -= (size - budget_bytes) * 1.5 + PAGE_SIZE
                continue
            best = model, allocation, self.fitted
            slack = budget_bytes - size
            if slack <= max(FIT_SLACK_PAGES * PAGE_SIZE, FIT_SLACK * budget_bytes) or refinements == FIT_REFINEMENTS:
                break
            target += 0.9 * slack  # the prediction error barely changes between nearby allocations
            refinements += 1
        if best is None:
            raise KlausModelError(f"cannot fit the model in {budget_bytes} bytes (smallest build: {size} bytes)")
        model, allocation, self.fitted = best
        return model, allocation

    def finished(self, model: KlausModel, fitted: tuple) -> KlausModel:
        """``model`` fine-tuned from its build's pieces (``fitted``) if the recipe asks: palette, scale
        and bias values change, never their count or the indices, so the size stays within the budget."""
        if not self.recipe.finetune_steps:
            return model
        plan, weights, quantized = fitted
        quantized, weights = finetuned(self.model, weights, quantized, self.roles, plan, self.calibration, self.progress)
        return _assemble(self.skeleton, weights, quantized, plan, self.calibration, **self.meta)


def compress_to_budget(
    model: onnx.ModelProto,
    recipe: Recipe,
    budget_bytes: int,
    *,
    preprocess: Preprocess,
    labels: Sequence[LabelRow],
    card: ModelCard,
    calibration: np.ndarray,
    output: str = "logits",
    png: codecs.PngOptions = codecs.PngOptions(),
    min_elements: int = MIN_BUDGET_ELEMENTS,
    uniform: bool = True,
    views: int = 1,
    progress: Progress | None = None,
) -> tuple[KlausModel, Allocation]:
    """The most accurate model whose file fits ``budget_bytes`` (see klaus.mixed).

    ``views`` consecutive calibration rows are crops of one photo (held out together).
    """
    search = _Search(model, recipe, calibration, preprocess=preprocess, labels=labels, card=card, output=output, png=png,
                     min_elements=min_elements, uniform=uniform, views=views, progress=progress)
    built, allocation = search.fit(budget_bytes)
    return search.finished(built, search.fitted), allocation


HOLDOUT_EVERY = 5  # --max-drop: every fifth calibration input checks agreement instead of calibrating
MAX_DROP_ROUNDS = 7


def compress_to_agreement(
    model: onnx.ModelProto,
    recipe: Recipe,
    max_drop: float,
    *,
    preprocess: Preprocess,
    labels: Sequence[LabelRow],
    card: ModelCard,
    calibration: np.ndarray,
    output: str = "logits",
    png: codecs.PngOptions = codecs.PngOptions(),
    min_elements: int = MIN_BUDGET_ELEMENTS,
    uniform: bool = True,
    views: int = 1,
    progress: Progress | None = None,
) -> tuple[KlausModel, Allocation, float]:
    """The smallest budgeted build whose top-1 agreement with the float model drops at most ``max_drop`` points.

    Agreement is measured on held-out calibration inputs (every fifth; the rest
    calibrate), so no evaluation photo is involved; it is returned with the model.
    The search bisects the byte budget between the smallest and the largest
    allocation in ``MAX_DROP_ROUNDS`` builds.
    """
    from . import mixed
    from .format import serialize

    if not 0 <= max_drop < 100:
        raise KlausModelError(f"--max-drop must be in 0..100 percentage points, got {max_drop:g}")
    held = held_out_photos(len(calibration), HOLDOUT_EVERY, views)
    if held.sum() < 20:
        raise KlausModelError(f"--max-drop needs at least {20 * HOLDOUT_EVERY} calibration inputs (got {len(calibration)})")
    search = _Search(model, recipe, calibration[~held], preprocess=preprocess, labels=labels, card=card, output=output,
                     png=png, min_elements=min_elements, uniform=uniform, views=views, progress=progress)
    check = calibration[held]
    reference = search.probabilities(search.weights, check).argmax(axis=1)

    def agreement(built: KlausModel) -> float:
        return float(np.mean(search.probabilities(built.decoded_weights(), check).argmax(axis=1) == reference) * 100)

    smallest = mixed.allocate(search.layers, 0.0).predicted_bytes
    largest = sum(max(c.bytes for c in layer.candidates) for layer in search.layers)
    overhead = search.measure_overhead(largest)
    lo, hi = smallest + overhead, largest * 1.02 + overhead + 4 * PAGE_SIZE
    best = None
    for round_ in range(MAX_DROP_ROUNDS):
        budget = int(np.sqrt(lo * hi)) if round_ else int(hi)
        try:
            built, allocation = search.fit(budget)
        except KlausModelError:
            lo = budget
            continue
        agree = agreement(built)
        if progress:
            progress(f"{len(serialize(built)) / 2**20:.2f} MiB: agreement {agree:.1f} % on held-out calibration inputs")
        if agree >= 100 - max_drop:
            best, hi = (built, allocation, agree, search.fitted), budget
        else:
            lo = budget
    if best is None:
        raise KlausModelError(f"no build kept top-1 agreement within {max_drop:g} points of the float model")
    built, allocation, agree, fitted = best
    return search.finished(built, fitted), allocation, agree


def finetuned(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    quantized: dict[str, PalettizedTensor],
    roles: dict[str, onnxgraph.TensorRole],
    recipe: Recipe,
    calibration: np.ndarray,
    progress: Progress | None,
) -> tuple[dict[str, PalettizedTensor], dict[str, np.ndarray]]:
    """Palettes, scales and biases after distillation from the float model (klaus.finetune)."""
    from .finetune import FinetuneOptions, finetune

    stored = {n: stored_float(w, recipe.float_codec) for n, w in weights.items() if n not in quantized}
    result = finetune(model, stored, quantized, roles, calibration, FinetuneOptions(steps=recipe.finetune_steps), progress)
    if progress:
        progress(f"fine-tuned: KL to the float model {result.kl_before:.5f} -> {result.kl_after:.5f} (calibration inputs)")
    return result.quantized, {**weights, **result.biases}


def stored_float(array: np.ndarray, codec: str) -> np.ndarray:
    """A float tensor as the file will hold it (fp16-rounded for raw-f16)."""
    return array.astype(np.float16).astype(np.float32) if codec == "raw-f16" else array


def effective_recipe(recipe: Recipe, calibrated: bool) -> Recipe:
    """GPTQ needs calibration inputs; without them the same bit plan runs as plain k-means."""
    if recipe.method == "gptq" and not calibrated:
        return replace(recipe, method="kmeans")
    return recipe


def bias_corrected(
    weights: dict[str, np.ndarray],
    quantized: dict[str, PalettizedTensor],
    roles: dict[str, onnxgraph.TensorRole],
    stats: dict[str, InputStats],
) -> dict[str, np.ndarray]:
    """Biases that cancel each palettized layer's expected output shift (float-model input means).

    (An empirical variant that re-measured every layer's mean output in the
    palettized model and corrected all biases at once over-corrected — later
    layers compensate what earlier corrections already fixed — and raised KL.)
    """
    from .calibrate import correct_biases

    layers = [n for n in quantized if roles[n].bias in weights]
    means = {name: s.mean for name, s in stats.items()}
    decoded = {n: quantized[n].decode() for n in layers}
    biases = {roles[n].bias: weights[roles[n].bias] for n in layers}
    return correct_biases(weights, decoded, roles, means, biases)


def card_of(model: KlausModel) -> ModelCard:
    meta = model.meta
    return ModelCard(meta["model_name"], meta["source"], meta["license"], meta["creator"], meta.get("description", ""))


def recompress(
    model: KlausModel,
    recipe: Recipe,
    png: codecs.PngOptions = codecs.PngOptions(),
    calibration: np.ndarray | None = None,
    progress: Progress | None = None,
) -> KlausModel:
    """Apply a recipe to an existing (ideally lossless) model, keeping its card and labels."""
    return compress_onnx(
        to_onnx(model), recipe, preprocess=model.preprocess, labels=model.labels, card=card_of(model),
        output=model.meta["output"], png=png, calibration=calibration, progress=progress,
    )


def to_onnx(model: KlausModel) -> onnx.ModelProto:
    """Decode every tensor and rebuild a self-contained ONNX model."""
    where = model.source_path or model.name
    skeleton = onnxgraph.parse_skeleton(model.graph, where)
    onnxgraph.validate_skeleton(skeleton, where)
    full = onnxgraph.join_weights(skeleton, model.decoded_weights())
    onnxgraph.check_model(full, where)
    return full


def load_source(path: str | os.PathLike[str]) -> KlausModel | onnx.ModelProto:
    """A compression source: a `.klaus` model or an ONNX file, told apart by content."""
    if looks_like_klaus(path):
        return read_model(path)
    return onnxgraph.load_onnx(str(path))


def output_classes(model: onnx.ModelProto) -> int | None:
    """Width of the first output if it is (batch, classes); None if unknown."""
    if not model.graph.output:
        return None
    dims = model.graph.output[0].type.tensor_type.shape.dim
    return int(dims[-1].dim_value) if len(dims) == 2 and dims[-1].dim_value > 0 else None


def default_labels(
    model: onnx.ModelProto, names: Iterable[str] | None = None, where: str | None = None
) -> tuple[LabelRow, ...]:
    """ImageNet labels for a 1000-way classifier, else the given names (:func:`klaus.labels.labels_for`)."""
    return labels_for(output_classes(model), names, where)


def graph_input_size(model: onnx.ModelProto, layout: str = "NCHW") -> int | None:
    """The fixed square spatial size of the graph input, if it declares one."""
    inputs = data_inputs(model)
    if not inputs:
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != 4:
        return None
    h, w = (dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2])
    return h.dim_value if h.dim_value and h.dim_value == w.dim_value else None


def check_preprocess_fits(model: onnx.ModelProto, preprocess: Preprocess, where: str) -> None:
    size = graph_input_size(model, preprocess.layout)
    if size is not None and size != preprocess.input_size:
        raise KlausModelError(
            f"{where}: the graph takes {size}x{size} inputs but the preprocessing makes "
            f"{preprocess.input_size}x{preprocess.input_size} (use --input-size {size})"
        )


def write(model: KlausModel, path: str | os.PathLike[str]) -> int:
    return write_model(model, path)  # as given: Path() would drop a trailing slash, which write_model refuses
