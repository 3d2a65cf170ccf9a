"""The plan of a build: which tensors get how many bits, and the calibration statistics
their quantizers need (input energies, Gram matrices, depthwise window Hessians), one set
per layer (:class:`~klaus.compression.calibrate.Reading`)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
import onnx

from .. import onnxgraph
from ..errors import KlausModelError
from .calibrate import InputStats, Reading, Window, layer_statistics
from .recipe import LayerRule, Recipe


def is_linear(role: onnxgraph.TensorRole, array: np.ndarray) -> bool:
    """Layers whose input Hessian is a plain channel Gram matrix: Gemm, MatMul and ungrouped 1x1 Conv."""
    if role.op in ("Gemm", "MatMul"):
        return role.kind == "fc"
    return role.op == "Conv" and role.group == 1 and all(d == 1 for d in array.shape[2:])


def planned_bits(
    weights: dict[str, np.ndarray], roles: dict[str, onnxgraph.TensorRole], recipe: Recipe
) -> dict[str, int]:
    """Bits of every tensor the recipe palettizes (non-empty tensors only), in graph order."""
    plan = {}
    for name, array in weights.items():
        bits = recipe.bits_for(name, roles[name].kind, array.size)
        if bits is not None and array.ndim > 0 and array.size > 0:
            plan[name] = bits
    return plan


def check_layer_rules(layers: Sequence[str], graph: onnx.ModelProto, where: str) -> None:
    """Refuse a ``--layer PATTERN=BITS`` rule whose pattern matches no float weight of ``graph``: a typo or
    a name the graph does not use would otherwise do nothing, silently, and be stored in the file."""
    names = [t.name for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    for text in layers:
        pattern = LayerRule.parse(text).pattern
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise KlausModelError(
                f"{where}: --layer {text}: {pattern!r} matches no weight of the model "
                f"('klaus inspect {where}' lists the names)"
            )


def calibration_stats(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    roles: dict[str, onnxgraph.TensorRole],
    recipe: Recipe,
    calibration: np.ndarray,
) -> dict[str, InputStats]:
    """Input statistics of every layer the recipe palettizes, by weight name (Gram matrices only for GPTQ)."""
    plan = planned_bits(weights, roles, recipe)
    return layer_statistics(model, calibration, layer_readings(model, weights, roles, recipe, list(plan)))


def layer_readings(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    roles: dict[str, onnxgraph.TensorRole],
    recipe: Recipe,
    names: list[str],
) -> dict[str, Reading]:
    """How each named layer reads its input, and what its quantizer needs of it: for GPTQ a Gram
    matrix (linear layers) or input windows (2-D depthwise convolutions); otherwise moments only."""
    gptq = recipe.method == "gptq"
    windows = depthwise_windows(model, roles, {n: weights[n].shape for n in names}) if gptq else {}
    return {
        n: Reading(roles[n].activation, roles[n].in_axis, gptq and is_linear(roles[n], weights[n]), windows.get(n))
        for n in names
    }


def depthwise_windows(
    model: onnx.ModelProto, roles: dict[str, onnxgraph.TensorRole], shapes: dict[str, tuple[int, ...]]
) -> dict[str, Window]:
    """The input window of every listed 2-D depthwise convolution with explicit padding, by weight name."""
    nodes = {node.output[0]: node for node in model.graph.node if node.output}
    found: dict[str, Window] = {}
    for name, shape in shapes.items():
        role = roles[name]
        node = nodes.get(role.output)
        if role.kind != "depthwise" or node is None or node.op_type != "Conv":
            continue
        window = _window(node, tuple(int(d) for d in shape[2:]))
        if window is not None:
            found[name] = window
    return found


def _window(node: onnx.NodeProto, kernel: tuple[int, ...]) -> Window | None:
    attrs = onnxgraph.attributes(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if len(kernel) != 2 or auto_pad not in (b"NOTSET", "NOTSET"):
        return None
    strides, pads, dilations = (
        _ints(attrs.get("strides", (1, 1))),
        _ints(attrs.get("pads", (0, 0, 0, 0))),
        _ints(attrs.get("dilations", (1, 1))),
    )
    if len(strides) != 2 or len(pads) != 4 or len(dilations) != 2:
        return None  # not a 2-D window: weighted rounding instead of a window Hessian
    return Window(
        kernel=(kernel[0], kernel[1]),
        strides=(strides[0], strides[1]),
        pads=(pads[0], pads[1], pads[2], pads[3]),
        dilations=(dilations[0], dilations[1]),
    )


def _ints(value: object) -> tuple[int, ...]:
    """A node attribute's integer list as a tuple (empty if it is not a list)."""
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else ()
