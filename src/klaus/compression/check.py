"""What a build checks before any work: a safe, valid, finite classifier graph that the
preprocessing and labels fit, with weights the recipe can store.

Every refusal is one :class:`KlausModelError` line naming the model file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from .. import onnxgraph
from ..errors import KlausModelError
from ..format import LabelRow
from ..onnxgraph import data_inputs, graph_input_size
from ..preprocess import Preprocess, shape_text
from .recipe import Recipe


def check_inputs(
    model: onnx.ModelProto, preprocess: Preprocess, labels: Sequence[LabelRow], where: str, recipe: Recipe | None = None
) -> None:
    """What every build checks before any work: a safe, valid classifier graph (check_classifier),
    input size, unique label names and, given the ``recipe``, weights that fit where it stores them
    (:func:`check_fp16_range`). Errors name ``where`` (the model file, or the model's name)."""
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
        raise KlausModelError(
            f"{where}: the graph has {len(inputs)} inputs ({names}); a classifier takes one image tensor"
        )
    image = inputs[0]
    wanted = "(N, 3, H, W)" if layout == "NCHW" else "(N, H, W, 3)"
    if not image.type.HasField("tensor_type") or image.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise KlausModelError(
            f"{where}: input {image.name!r} is {_type_name(image)}, not a float32 image tensor {wanted}"
        )
    dims = _dims(image)
    channel = 1 if layout == "NCHW" else 3
    if dims is not None and (len(dims) != 4 or dims[channel] not in (None, 3)):
        other = "NHWC" if layout == "NCHW" else "NCHW"
        hint = f" (for {other} input use --layout {other})" if len(dims) == 4 and dims[4 - channel] == 3 else ""
        raise KlausModelError(
            f"{where}: input {image.name!r} has shape {shape_text(dims)}, not an image tensor {wanted}{hint}"
        )
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
        raise KlausModelError(
            f"{where}: output {output.name!r} has shape {shape_text(dims)}, not (N, classes): not a classifier"
        )
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
        stored = tensor.data_type in FLOAT_TYPES and tensor.data_location != onnx.TensorProto.EXTERNAL
        if stored and not np.all(np.isfinite(numpy_helper.to_array(tensor))):
            raise KlausModelError(f"{where}: {what} holds NaN or infinite values")


def check_preprocess_fits(model: onnx.ModelProto, preprocess: Preprocess, where: str) -> None:
    size = graph_input_size(model, preprocess.layout)
    if size is not None and size != preprocess.input_size:
        raise KlausModelError(
            f"{where}: the graph takes {size}x{size} inputs but the preprocessing makes "
            f"{preprocess.input_size}x{preprocess.input_size} (use --input-size {size})"
        )
