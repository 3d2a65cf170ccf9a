"""Static shape propagation: how much memory a classifier graph asks for, known before it runs.

A graph made only of the operators image classifiers use (:data:`klaus.onnxwire.CLASSIFIER_OPS`)
can still ask for gigabytes: a ``Pad`` with pads of 100,000, an ``Expand`` to 100,000 x 100,000.
Every such size is written in the file (an attribute, an initializer, a ``Constant`` node, or a
small shape computation over them), so it can be known without running anything. This module
walks the graph in topological order at the declared input size (batch 1, or the graph's fixed
batch; the model's ``input_size`` where the graph leaves the image size free), computes each
intermediate tensor's shape, and folds the small integer tensors shape arithmetic is made of
(``Shape``, ``Gather``, ``Concat``, ``Slice``, ...) so ``Reshape``, ``Pad``, ``Expand`` and
``Slice`` see their operands.

Two bounds follow from the run-time cap (:func:`klaus.limits.max_run_bytes`, ``KLAUS_MAX_MEMORY_MB``):
no single activation over :func:`max_activation_bytes`, and the weights plus the activations alive
at once (each tensor from the node that makes it to the last node that reads it) within the cap.
A graph that breaks either is refused with one line naming the node and the size, before a
session is built; ``KLAUS_TRUST_MODEL=1`` lifts both, as it lifts the other file bounds.

A shape this walk cannot know (an operand computed from the image itself, an operator form it does
not model) leaves that tensor, and what depends on it, unknown and uncounted; ONNX Runtime's capped
arena remains the bound for those at run time. The walk reads the serialized graph at the wire level
(:mod:`klaus.onnxwire`) and never imports ``onnx``.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import limits
from .errors import KlausFormatError
from .onnxwire import (
    FIXED32,
    GRAPH_INITIALIZER,
    GRAPH_INPUT,
    GRAPH_NODE,
    GRAPH_OUTPUT,
    LENGTH,
    MODEL_GRAPH,
    MODEL_OPSET,
    ValueInfo,
    WireError,
    _ints,
    _opset,
    _signed,
    _text,
    _value_info,
    fields,
)

# One activation may take at most this share of the run-time cap: the largest in a classifier at
# batch 1 (the first convolution's output) is a few MiB.
ACTIVATION_SHARE = 4
# Integer tensors up to this many elements have their values followed (shape arithmetic).
MAX_FOLDED = 4096
DEFAULT_IMAGE = 224

# TensorProto.DataType -> bytes per element (complex and string types count as 8).
ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}
_NUMPY = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
INT64 = 7

# NodeProto, AttributeProto and TensorProto field numbers (onnx/onnx.proto3).
NODE_INPUT, NODE_OUTPUT, NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE = 1, 2, 3, 4, 5
ATTR_NAME, ATTR_F, ATTR_I, ATTR_S, ATTR_T, ATTR_FLOATS, ATTR_INTS = 1, 2, 3, 4, 5, 7, 8
T_DIMS, T_TYPE, T_FLOATS, T_INT32S, T_INT64S, T_NAME, T_RAW, T_DOUBLES = 1, 2, 4, 5, 7, 8, 9, 10


def max_activation_bytes() -> int | None:
    """The most one intermediate tensor may take (None: no limit, the files are trusted)."""
    return None if limits.trusted() else limits.max_run_bytes() // ACTIVATION_SHARE


class Value(NamedTuple):
    """What the walk knows of one tensor: its shape (None: unknown), bytes per element, and for
    small integer tensors the values themselves."""

    shape: tuple[int, ...] | None
    itemsize: int = 4
    data: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize if self.shape is not None else 0


UNKNOWN = Value(None)


@dataclass
class Node:
    """One NodeProto as the walk needs it: attributes as ints, floats, strings, lists or tensor Values."""

    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    attrs: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Footprint:
    """The walk's result, in bytes: the largest activation and the node making it, the peak of those
    alive at once and the node reaching it, the weights; the input shape walked, how many of the nodes
    had an output of known shape, and each value's shape (None: unknown)."""

    largest: int
    largest_node: str
    peak: int
    peak_node: str
    weights: int
    input_shape: tuple[int, ...] | None
    known: int
    nodes: int
    shapes: dict[str, tuple[int, ...] | None] = field(default_factory=dict, compare=False, repr=False)


# ---------------------------------------------------------------- reading the graph


def _tensor(data: memoryview) -> tuple[str, Value]:
    dims: list[int] = []
    dtype = 1
    name = ""
    parts: dict[int, list[tuple[int, int | memoryview]]] = {}
    for n, wire, value in fields(data):
        if n == T_DIMS:
            dims.extend(_ints(wire, value))
        elif n == T_TYPE and isinstance(value, int):
            dtype = value
        elif n == T_NAME:
            name = _text(value)
        elif n in (T_RAW, T_FLOATS, T_INT32S, T_INT64S, T_DOUBLES):
            parts.setdefault(n, []).append((wire, value))
    shape = tuple(dims)
    if any(d < 0 for d in shape):
        return name, UNKNOWN
    size = math.prod(shape)
    itemsize = ITEMSIZE.get(dtype, 8)
    array = _tensor_values(parts, dtype, size) if size <= MAX_FOLDED and dtype in _NUMPY else None
    return name, Value(shape, itemsize, array.reshape(shape) if array is not None else None)


def _tensor_values(parts: dict[int, list[tuple[int, int | memoryview]]], dtype: int, size: int) -> np.ndarray | None:
    kind = _NUMPY[dtype]
    out: np.ndarray | None = None
    raw = parts.get(T_RAW)
    if raw:
        blob = bytes(raw[-1][1])
        if len(blob) == size * np.dtype(kind).itemsize:
            out = np.frombuffer(blob, np.dtype(kind).newbyteorder("<")).astype(kind)
    elif T_INT64S in parts or T_INT32S in parts:
        numbers: list[int] = []
        for wire, value in parts.get(T_INT64S, parts.get(T_INT32S, [])):
            numbers.extend(_ints(wire, value))
        if len(numbers) == size and dtype in (2, 3, 5, 6, 7, 9):
            out = np.array(numbers, np.int64).astype(kind)
    elif T_FLOATS in parts and dtype == 1:
        floats: list[float] = []
        for wire, value in parts[T_FLOATS]:
            floats.extend(_floats(wire, value))
        if len(floats) == size:
            out = np.array(floats, np.float32)
    elif size == 0:
        out = np.zeros(0, kind)
    return out


def _floats(wire: int, value: int | memoryview) -> list[float]:
    if wire == FIXED32 and isinstance(value, int):
        return [struct.unpack("<f", value.to_bytes(4, "little"))[0]]
    if wire == LENGTH and isinstance(value, memoryview) and len(value) % 4 == 0:
        return list(struct.unpack(f"<{len(value) // 4}f", value))
    raise WireError("bad repeated float field")


def _attribute(data: memoryview) -> tuple[str, object]:
    name = ""
    value: object = None
    ints: list[int] = []
    floats: list[float] = []
    for n, wire, v in fields(data):
        if n == ATTR_NAME:
            name = _text(v)
        elif n == ATTR_I and isinstance(v, int):
            value = _signed(v)
        elif n == ATTR_F and wire == FIXED32 and isinstance(v, int):
            value = struct.unpack("<f", v.to_bytes(4, "little"))[0]
        elif n == ATTR_S and isinstance(v, memoryview):
            value = bytes(v).decode("utf-8", "replace")
        elif n == ATTR_T and isinstance(v, memoryview):
            value = _tensor(v)[1]
        elif n == ATTR_INTS:
            ints.extend(_ints(wire, v))
        elif n == ATTR_FLOATS:
            floats.extend(_floats(wire, v))
    if value is None and ints:
        value = ints
    elif value is None and floats:
        value = floats
    return name, value


def _node(data: memoryview) -> Node:
    node = Node("", "")
    for n, wire, value in fields(data):
        if n == NODE_INPUT:
            node.inputs.append(_text(value))
        elif n == NODE_OUTPUT:
            node.outputs.append(_text(value))
        elif n == NODE_NAME:
            node.name = _text(value)
        elif n == NODE_OP_TYPE:
            node.op = _text(value)
        elif n == NODE_ATTRIBUTE and wire == LENGTH and isinstance(value, memoryview):
            key, attr = _attribute(value)
            node.attrs[key] = attr
    return node


@dataclass
class _Graph:
    """The top-level graph of a ModelProto: its default-domain opset, nodes, initializers, inputs, outputs."""

    opset: int = 0
    nodes: list[Node] = field(default_factory=list)
    initializers: dict[str, Value] = field(default_factory=dict)
    inputs: list[ValueInfo] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


def _read(blob: bytes | memoryview) -> _Graph:
    graph = _Graph()
    for n, wire, value in fields(blob):
        if n == MODEL_OPSET and isinstance(value, memoryview):
            domain, version = _opset(value)
            if domain in ("", "ai.onnx"):
                graph.opset = version
        elif n == MODEL_GRAPH and wire == LENGTH and isinstance(value, memoryview):
            for gn, gwire, gv in fields(value):
                if gwire != LENGTH or not isinstance(gv, memoryview):
                    continue
                if gn == GRAPH_NODE:
                    graph.nodes.append(_node(gv))
                elif gn == GRAPH_INITIALIZER:
                    name, tensor = _tensor(gv)
                    graph.initializers[name] = tensor
                elif gn == GRAPH_INPUT:
                    graph.inputs.append(_value_info(gv))
                elif gn == GRAPH_OUTPUT:
                    graph.outputs.append(_value_info(gv).name)
    return graph


def _topological(nodes: Sequence[Node]) -> list[Node]:
    """The nodes in an order where each comes after the nodes making its inputs (file order when it
    already is one); nodes in a cycle or fed by themselves are left out, as nothing can run them."""
    maker = {out: i for i, node in enumerate(nodes) for out in node.outputs if out}
    waiting = [
        sum(1 for name in set(node.inputs) if name in maker and maker[name] != i) for i, node in enumerate(nodes)
    ]
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in set(node.inputs):
            if name in maker and maker[name] != i:
                readers.setdefault(maker[name], []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]  # a heap: the earliest node in the file first
    order: list[Node] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for reader in readers.get(i, ()):
            waiting[reader] -= 1
            if waiting[reader] == 0:
                heapq.heappush(ready, reader)
    return order


# ---------------------------------------------------------------- shapes of the operators


def _broadcast(*shapes: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes if s is not None)
    out = []
    for axis in range(rank):
        dims = {s[axis - rank + len(s)] for s in shapes if s is not None and axis - rank + len(s) >= 0}
        dims.discard(1)
        if len(dims) > 1:
            return None
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def _axis(axis: int, rank: int) -> int:
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank:
        raise ValueError("axis out of range")
    return axis


def _ints_of(value: Value | None) -> list[int] | None:
    if value is None or value.data is None:
        return None
    return [int(v) for v in value.data.reshape(-1)]


def _window(node: Node, spatial: Sequence[int], kernel: Sequence[int], pool: bool) -> list[int]:
    rank = len(spatial)
    strides = list(node.attrs.get("strides") or [1] * rank)  # type: ignore[call-overload]
    dilations = list(node.attrs.get("dilations") or [1] * rank)  # type: ignore[call-overload]
    pads = list(node.attrs.get("pads") or [0] * (2 * rank))  # type: ignore[call-overload]
    auto = node.attrs.get("auto_pad", "NOTSET")
    ceil = bool(node.attrs.get("ceil_mode", 0)) if pool else False
    out = []
    for i, size in enumerate(spatial):
        span = dilations[i] * (kernel[i] - 1) + 1
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-size // strides[i]))
        elif auto == "VALID":
            out.append((size - span) // strides[i] + 1)
        else:
            total = size + pads[i] + pads[i + rank] - span
            out.append((-(-total // strides[i]) if ceil else total // strides[i]) + 1)
    return out


def _conv(node: Node, x: Value, w: Value | None, transpose: bool = False) -> tuple[int, ...] | None:
    if x.shape is None or len(x.shape) < 3:
        return None
    spatial = x.shape[2:]
    kernel = node.attrs.get("kernel_shape")
    if kernel is None:
        if w is None or w.shape is None:
            return None
        kernel = list(w.shape[2:])
    assert isinstance(kernel, list)
    if w is None or w.shape is None:
        return None
    if not transpose:
        return (x.shape[0], w.shape[0], *_window(node, spatial, kernel, pool=False))
    group = int(node.attrs.get("group", 1))  # type: ignore[call-overload]
    given = node.attrs.get("output_shape")
    if isinstance(given, list) and len(given) == len(spatial):
        return (x.shape[0], w.shape[1] * group, *given)
    rank = len(spatial)
    strides = list(node.attrs.get("strides") or [1] * rank)  # type: ignore[call-overload]
    dilations = list(node.attrs.get("dilations") or [1] * rank)  # type: ignore[call-overload]
    pads = list(node.attrs.get("pads") or [0] * (2 * rank))  # type: ignore[call-overload]
    extra = list(node.attrs.get("output_padding") or [0] * rank)  # type: ignore[call-overload]
    if node.attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        dims = [s * strides[i] for i, s in enumerate(spatial)]
    else:
        dims = [
            strides[i] * (s - 1) + extra[i] + dilations[i] * (kernel[i] - 1) + 1 - pads[i] - pads[i + rank]
            for i, s in enumerate(spatial)
        ]
    return (x.shape[0], w.shape[1] * group, *dims)


def _matmul(a: tuple[int, ...] | None, b: tuple[int, ...] | None) -> tuple[int, ...] | None:
    if a is None or b is None or not a or not b:
        return None
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    batch = _broadcast(a2[:-2], b2[:-2])
    if batch is None or a2[-1] != b2[-2]:
        return None
    out = [*batch, a2[-2], b2[-1]]
    if len(b) == 1:
        out.pop()
    if len(a) == 1:
        out.pop(-2 if len(b) > 1 else -1)
    return tuple(out)


def _einsum(equation: str, shapes: Sequence[tuple[int, ...] | None]) -> tuple[int, ...] | None:
    equation = equation.replace(" ", "")
    if "..." in equation or any(s is None for s in shapes):
        return None
    left, _, right = equation.partition("->")
    terms = left.split(",")
    if len(terms) != len(shapes):
        return None
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        assert shape is not None
        if len(term) != len(shape):
            return None
        for letter, size in zip(term, shape, strict=True):
            if sizes.setdefault(letter, size) != size and 1 not in (size, sizes[letter]):
                return None
            sizes[letter] = max(size, sizes[letter])
    if "->" not in equation:
        right = "".join(sorted(c for c in sizes if left.count(c) == 1))
    return tuple(sizes[c] for c in right) if all(c in sizes for c in right) else None


def _reduce(node: Node, x: Value, axes: list[int] | None, opset_axes_input: bool) -> tuple[int, ...] | None:
    if x.shape is None:
        return None
    keep = bool(node.attrs.get("keepdims", 1))
    if axes is None:
        if opset_axes_input and len(node.inputs) > 1 and node.inputs[1]:
            return None  # the axes come from a tensor the walk does not know
        if node.attrs.get("noop_with_empty_axes", 0):
            return x.shape
        axes = list(range(len(x.shape)))
    rank = len(x.shape)
    picked = {_axis(a, rank) for a in axes}
    if keep:
        return tuple(1 if i in picked else d for i, d in enumerate(x.shape))
    return tuple(d for i, d in enumerate(x.shape) if i not in picked)


def _reshape(x: Value, target: list[int] | None, allowzero: bool) -> tuple[int, ...] | None:
    if x.shape is None or target is None:
        return None
    out = [x.shape[i] if d == 0 and not allowzero and i < len(x.shape) else d for i, d in enumerate(target)]
    if out.count(-1) > 1 or any(d < -1 for d in out):
        return None
    if -1 in out:
        known = math.prod(d for d in out if d != -1)
        if known == 0:
            return None
        out[out.index(-1)] = math.prod(x.shape) // known
    return tuple(out) if math.prod(out) == math.prod(x.shape) else None


def _slice_dims(
    shape: tuple[int, ...], starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None
) -> tuple[tuple[int, ...], list[slice]]:
    rank = len(shape)
    axes = axes if axes is not None else list(range(len(starts)))
    steps = steps if steps is not None else [1] * len(starts)
    cuts = [slice(None)] * rank
    out = list(shape)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        if step == 0:
            raise ValueError("slice step 0")
        a = _axis(axis, rank)
        cuts[a] = slice(start, end, step)
        out[a] = len(range(*cuts[a].indices(shape[a])))
    return tuple(out), cuts


class _Walk:
    """The shapes known so far, by value name, and the operator rules that extend them node by node."""

    def __init__(self, graph: _Graph) -> None:
        self.opset = graph.opset
        self.values: dict[str, Value] = {}

    def get(self, node: Node, i: int) -> Value | None:
        """Input ``i`` of ``node``: None when absent (an empty name or past the end)."""
        if i >= len(node.inputs) or not node.inputs[i]:
            return None
        return self.values.get(node.inputs[i], UNKNOWN)

    def arg(self, node: Node, i: int, attr: str, since: int) -> list[int] | None:
        """An integer list given as an attribute before opset ``since`` and as input ``i`` from it."""
        if self.opset < since:
            value = node.attrs.get(attr)
            return list(value) if isinstance(value, list) else None
        return _ints_of(self.get(node, i))

    def infer(self, node: Node) -> list[Value]:
        rule = _RULES.get(node.op)
        if rule is None:
            return [UNKNOWN] * len(node.outputs)
        x = self.get(node, 0) or UNKNOWN
        try:
            with np.errstate(all="ignore"):
                out = rule(self, node, x)
        except (ValueError, IndexError, KeyError, TypeError, OverflowError, ZeroDivisionError, AssertionError):
            return [UNKNOWN] * len(node.outputs)
        out = [v if v.shape is None or all(d >= 0 for d in v.shape) else UNKNOWN for v in out]
        return out + [UNKNOWN] * (len(node.outputs) - len(out))


def _same(walk: _Walk, node: Node, x: Value) -> list[Value]:
    return [Value(x.shape, x.itemsize, _fold(node.op, [x]))]


def _fold(op: str, operands: Sequence[Value | None]) -> np.ndarray | None:
    """The values of an elementwise operator over small known integer operands (shape arithmetic)."""
    arrays = [v.data if v is not None else None for v in operands]
    if any(a is None for a in arrays):
        return None
    a = arrays[0]
    assert a is not None
    unary = {"Identity": lambda: a, "Neg": lambda: -a, "Abs": lambda: np.abs(a), "Not": lambda: ~a}
    if op in unary:
        return np.asarray(unary[op]())
    if len(arrays) < 2:
        return None
    b = arrays[1]
    assert b is not None
    binary: dict[str, Callable[[], np.ndarray]] = {
        "Add": lambda: a + b,
        "Sub": lambda: a - b,
        "Mul": lambda: a * b,
        "Div": lambda: (np.trunc(a / b).astype(a.dtype)) if a.dtype.kind in "iu" else a / b,
        "Equal": lambda: np.equal(a, b),
        "Greater": lambda: np.greater(a, b),
        "Less": lambda: np.less(a, b),
        "Min": lambda: np.minimum(a, b),
        "Max": lambda: np.maximum(a, b),
    }
    if op in binary:
        out = np.asarray(binary[op]())
        return out if out.size <= MAX_FOLDED else None
    if op == "Where" and len(arrays) == 3:
        c = arrays[2]
        assert c is not None
        return np.where(a, b, c)
    return None


def _elementwise(walk: _Walk, node: Node, x: Value) -> list[Value]:
    operands = [walk.get(node, i) for i in range(len(node.inputs))]
    present = [v for v in operands if v is not None]
    shape = _broadcast(*(v.shape for v in present))
    itemsize = 1 if node.op in ("Equal", "Greater", "Less", "And", "Or", "Not") else x.itemsize
    data = _fold(node.op, present) if shape is not None and math.prod(shape) <= MAX_FOLDED else None
    return [Value(shape, itemsize, data)]


def _first_same(walk: _Walk, node: Node, x: Value) -> list[Value]:
    return [Value(x.shape, x.itemsize)]


def _dropout(walk: _Walk, node: Node, x: Value) -> list[Value]:
    return [Value(x.shape, x.itemsize, x.data), Value(x.shape, 1)]


def _conv_rule(weight_input: int, transpose: bool = False, itemsize: int = 4) -> Callable[..., list[Value]]:
    def rule(walk: _Walk, node: Node, x: Value) -> list[Value]:
        return [Value(_conv(node, x, walk.get(node, weight_input), transpose), itemsize)]

    return rule


def _pool(walk: _Walk, node: Node, x: Value) -> list[Value]:
    kernel = node.attrs.get("kernel_shape")
    if x.shape is None or not isinstance(kernel, list):
        return [UNKNOWN]
    shape = (*x.shape[:2], *_window(node, x.shape[2:], kernel, pool=True))
    return [Value(shape, x.itemsize), Value(shape, 8)]


def _global_pool(walk: _Walk, node: Node, x: Value) -> list[Value]:
    return [Value((*x.shape[:2], *[1] * (len(x.shape) - 2)) if x.shape else None, x.itemsize)]


def _gemm(walk: _Walk, node: Node, x: Value) -> list[Value]:
    b = walk.get(node, 1)
    if x.shape is None or b is None or b.shape is None or len(x.shape) != 2 or len(b.shape) != 2:
        return [UNKNOWN]
    m = x.shape[1] if node.attrs.get("transA", 0) else x.shape[0]
    n = b.shape[0] if node.attrs.get("transB", 0) else b.shape[1]
    return [Value((m, n), x.itemsize)]


def _matmul_rule(second: int, itemsize: int) -> Callable[..., list[Value]]:
    def rule(walk: _Walk, node: Node, x: Value) -> list[Value]:
        b = walk.get(node, second)
        return [Value(_matmul(x.shape, b.shape if b else None), itemsize)]

    return rule


def _einsum_rule(walk: _Walk, node: Node, x: Value) -> list[Value]:
    operands = [walk.get(node, i) or UNKNOWN for i in range(len(node.inputs))]
    equation = node.attrs.get("equation")
    if not isinstance(equation, str):
        return [UNKNOWN]
    return [Value(_einsum(equation, [v.shape for v in operands]), x.itemsize)]


def _reduce_rule(since: int) -> Callable[..., list[Value]]:
    def rule(walk: _Walk, node: Node, x: Value) -> list[Value]:
        axes = walk.arg(node, 1, "axes", since)
        return [Value(_reduce(node, x, axes, walk.opset >= since), x.itemsize)]

    return rule


def _argmax(walk: _Walk, node: Node, x: Value) -> list[Value]:
    if x.shape is None:
        return [UNKNOWN]
    axis = _axis(int(node.attrs.get("axis", 0)), len(x.shape))  # type: ignore[call-overload]
    keep = bool(node.attrs.get("keepdims", 1))
    shape = tuple(1 if i == axis else d for i, d in enumerate(x.shape) if keep or i != axis)
    return [Value(shape, 8)]


def _flatten(walk: _Walk, node: Node, x: Value) -> list[Value]:
    if x.shape is None:
        return [UNKNOWN]
    rank = len(x.shape)
    axis = int(node.attrs.get("axis", 1))  # type: ignore[call-overload]
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis <= rank:
        return [UNKNOWN]
    return [Value((math.prod(x.shape[:axis]), math.prod(x.shape[axis:])), x.itemsize)]


def _reshape_rule(walk: _Walk, node: Node, x: Value) -> list[Value]:
    target = walk.arg(node, 1, "shape", 5)
    shape = _reshape(x, target, bool(node.attrs.get("allowzero", 0)))
    data = x.data.reshape(shape) if x.data is not None and shape is not None else None
    return [Value(shape, x.itemsize, data)]


def _transpose(walk: _Walk, node: Node, x: Value) -> list[Value]:
    if x.shape is None:
        return [UNKNOWN]
    perm = node.attrs.get("perm")
    order = list(perm) if isinstance(perm, list) else list(range(len(x.shape)))[::-1]
    if sorted(order) != list(range(len(x.shape))):
        return [UNKNOWN]
    data = np.transpose(x.data, order) if x.data is not None else None
    return [Value(tuple(x.shape[p] for p in order), x.itemsize, data)]


def _squeeze(walk: _Walk, node: Node, x: Value) -> list[Value]:
    axes = walk.arg(node, 1, "axes", 13)
    if x.shape is None:
        return [UNKNOWN]
    if axes is None:
        if walk.opset >= 13 and len(node.inputs) > 1 and node.inputs[1]:
            return [UNKNOWN]
        picked = {i for i, d in enumerate(x.shape) if d == 1}
    else:
        picked = {_axis(a, len(x.shape)) for a in axes}
    shape = tuple(d for i, d in enumerate(x.shape) if i not in picked)
    return [Value(shape, x.itemsize, x.data.reshape(shape) if x.data is not None else None)]


def _unsqueeze(walk: _Walk, node: Node, x: Value) -> list[Value]:
    axes = walk.arg(node, 1, "axes", 13)
    if x.shape is None or axes is None:
        return [UNKNOWN]
    rank = len(x.shape) + len(axes)
    picked = {_axis(a, rank) for a in axes}
    dims = iter(x.shape)
    shape = tuple(1 if i in picked else next(dims) for i in range(rank))
    return [Value(shape, x.itemsize, x.data.reshape(shape) if x.data is not None else None)]


def _concat(walk: _Walk, node: Node, x: Value) -> list[Value]:
    parts = [walk.get(node, i) for i in range(len(node.inputs))]
    shapes = [p.shape for p in parts if p is not None]
    if not shapes or any(s is None for s in shapes):
        return [UNKNOWN]
    rank = len(x.shape or ())
    axis = _axis(int(node.attrs.get("axis", 0)), rank)  # type: ignore[call-overload]
    if any(len(s) != rank for s in shapes if s is not None):
        return [UNKNOWN]
    shape = tuple(
        sum(s[axis] for s in shapes if s is not None) if i == axis else d for i, d in enumerate(shapes[0] or ())
    )
    arrays = [p.data for p in parts if p is not None]
    data: np.ndarray | None = None
    if all(a is not None for a in arrays) and math.prod(shape) <= MAX_FOLDED:
        data = np.concatenate(arrays, axis=axis)  # type: ignore[arg-type]
    return [Value(shape, x.itemsize, data)]


def _split(walk: _Walk, node: Node, x: Value) -> list[Value]:
    if x.shape is None:
        return [UNKNOWN] * len(node.outputs)
    axis = _axis(int(node.attrs.get("axis", 0)), len(x.shape))  # type: ignore[call-overload]
    parts = walk.arg(node, 1, "split", 13)
    size = x.shape[axis]
    count = len(node.outputs)
    if parts is None:
        if walk.opset >= 13 and len(node.inputs) > 1 and node.inputs[1]:
            return [UNKNOWN] * count
        each = -(-size // count)
        parts = [min(each, max(0, size - each * i)) for i in range(count)]
    return [Value(tuple(p if i == axis else d for i, d in enumerate(x.shape)), x.itemsize) for p in parts]


def _slice(walk: _Walk, node: Node, x: Value) -> list[Value]:
    if x.shape is None:
        return [UNKNOWN]
    if walk.opset < 10:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes"), None
        if not isinstance(starts, list) or not isinstance(ends, list):
            return [UNKNOWN]
    else:
        starts, ends = _ints_of(walk.get(node, 1)), _ints_of(walk.get(node, 2))
        axes, steps = _ints_of(walk.get(node, 3)), _ints_of(walk.get(node, 4))
        if starts is None or ends is None:
            return [UNKNOWN]
        if (walk.get(node, 3) and axes is None) or (walk.get(node, 4) and steps is None):
            return [UNKNOWN]
    shape, cuts = _slice_dims(x.shape, starts, ends, axes if isinstance(axes, list) else None, steps)
    data = x.data[tuple(cuts)] if x.data is not None else None
    return [Value(shape, x.itemsize, data)]


def _gather(walk: _Walk, node: Node, x: Value) -> list[Value]:
    indices = walk.get(node, 1)
    if x.shape is None or indices is None or indices.shape is None:
        return [UNKNOWN]
    axis = _axis(int(node.attrs.get("axis", 0)), len(x.shape))  # type: ignore[call-overload]
    shape = (*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])
    data: np.ndarray | None = None
    if x.data is not None and indices.data is not None and math.prod(shape) <= MAX_FOLDED:
        data = np.take(x.data, indices.data.astype(np.int64), axis=axis)
    return [Value(shape, x.itemsize, data)]


def _shape(walk: _Walk, node: Node, x: Value) -> list[Value]:
    if x.shape is None:
        return [Value(None, 8)]
    rank = len(x.shape)
    start = int(node.attrs.get("start", 0))  # type: ignore[call-overload]
    end = node.attrs.get("end")
    dims = list(x.shape)[slice(start, int(end) if isinstance(end, int) else rank)]
    return [Value((len(dims),), 8, np.array(dims, np.int64))]


def _size(walk: _Walk, node: Node, x: Value) -> list[Value]:
    return [Value((), 8, np.array(math.prod(x.shape), np.int64) if x.shape is not None else None)]


def _cast(walk: _Walk, node: Node, x: Value) -> list[Value]:
    to = node.attrs.get("to")
    kind = _NUMPY.get(to) if isinstance(to, int) else None
    data: np.ndarray | None = x.data.astype(kind) if x.data is not None and kind is not None else None
    return [Value(x.shape, ITEMSIZE.get(to, 8) if isinstance(to, int) else 8, data)]


def _constant(walk: _Walk, node: Node, x: Value) -> list[Value]:
    attrs = node.attrs
    if isinstance(attrs.get("value"), Value):
        return [attrs["value"]]  # type: ignore[list-item]
    if isinstance(attrs.get("value_int"), int):
        return [Value((), 8, np.array(attrs["value_int"], np.int64))]
    if isinstance(attrs.get("value_ints"), list):
        ints = attrs["value_ints"]
        assert isinstance(ints, list)
        return [Value((len(ints),), 8, np.array(ints, np.int64) if len(ints) <= MAX_FOLDED else None)]
    if isinstance(attrs.get("value_float"), float):
        return [Value((), 4)]
    if isinstance(attrs.get("value_floats"), list):
        return [Value((len(attrs["value_floats"]),), 4)]  # type: ignore[arg-type]
    return [UNKNOWN]


def _pad(walk: _Walk, node: Node, x: Value) -> list[Value]:
    pads = walk.arg(node, 1, "pads", 11)
    if walk.opset < 11 and pads is None:
        paddings = node.attrs.get("paddings")
        pads = list(paddings) if isinstance(paddings, list) else None
    if x.shape is None or pads is None:
        return [UNKNOWN]
    rank = len(x.shape)
    axes = _ints_of(walk.get(node, 3)) if walk.opset >= 18 and walk.get(node, 3) else list(range(rank))
    if axes is None or len(pads) != 2 * len(axes):
        return [UNKNOWN]
    out = list(x.shape)
    for i, a in enumerate(axes):
        out[_axis(a, rank)] += pads[i] + pads[i + len(axes)]
    return [Value(tuple(out), x.itemsize)]


def _expand(walk: _Walk, node: Node, x: Value) -> list[Value]:
    target = _ints_of(walk.get(node, 1))
    if x.shape is None or target is None:
        return [UNKNOWN]
    shape = _broadcast(x.shape, tuple(target))
    data: np.ndarray | None = None
    if shape is not None and x.data is not None and math.prod(shape) <= MAX_FOLDED:
        data = np.broadcast_to(x.data, shape).copy()
    return [Value(shape, x.itemsize, data)]


def _quantize(walk: _Walk, node: Node, x: Value) -> list[Value]:
    return [Value(x.shape, 1)]


def _dequantize(walk: _Walk, node: Node, x: Value) -> list[Value]:
    return [Value(x.shape, 4)]


def _dynamic_quantize(walk: _Walk, node: Node, x: Value) -> list[Value]:
    return [Value(x.shape, 1), Value((), 4), Value((), 1)]


def _layer_norm(walk: _Walk, node: Node, x: Value) -> list[Value]:
    return [Value(x.shape, x.itemsize)]


_RULES: dict[str, Callable[[_Walk, Node, Value], list[Value]]] = {
    **dict.fromkeys(
        [
            "Sqrt",
            "Reciprocal",
            "Exp",
            "Log",
            "Erf",
            "Relu",
            "LeakyRelu",
            "Elu",
            "Selu",
            "Celu",
            "Sigmoid",
            "HardSigmoid",
            "HardSwish",
            "Tanh",
            "Softplus",
            "Softsign",
            "Mish",
            "Gelu",
            "Clip",
            "Softmax",
            "LogSoftmax",
            "LRN",
            "InstanceNormalization",
            "GroupNormalization",
            "Floor",
            "Ceil",
            "Round",
            "Sign",
        ],
        _first_same,
    ),
    **dict.fromkeys(["Identity", "Neg", "Abs", "Not"], _same),
    **dict.fromkeys(
        ["Add", "Sub", "Mul", "Div", "Pow", "Min", "Max", "Sum", "Mean", "PRelu", "Equal", "Greater", "Less"],
        _elementwise,
    ),
    **dict.fromkeys(["And", "Or", "Where"], _elementwise),
    "BatchNormalization": _first_same,
    "LayerNormalization": _layer_norm,
    "Dropout": _dropout,
    "Conv": _conv_rule(1),
    "ConvTranspose": _conv_rule(1, transpose=True),
    "ConvInteger": _conv_rule(1, itemsize=4),
    "QLinearConv": _conv_rule(3, itemsize=1),
    "MaxPool": _pool,
    "AveragePool": _pool,
    "LpPool": _pool,
    "GlobalAveragePool": _global_pool,
    "GlobalMaxPool": _global_pool,
    "Gemm": _gemm,
    "MatMul": _matmul_rule(1, 4),
    "MatMulInteger": _matmul_rule(1, 4),
    "QLinearMatMul": _matmul_rule(3, 1),
    "Einsum": _einsum_rule,
    "ReduceMean": _reduce_rule(18),
    "ReduceSum": _reduce_rule(13),
    "ReduceMax": _reduce_rule(18),
    "ReduceMin": _reduce_rule(18),
    "ReduceL2": _reduce_rule(18),
    "ArgMax": _argmax,
    "Flatten": _flatten,
    "Reshape": _reshape_rule,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "Shape": _shape,
    "Size": _size,
    "Cast": _cast,
    "Constant": _constant,
    "Pad": _pad,
    "Expand": _expand,
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "DynamicQuantizeLinear": _dynamic_quantize,
}


# ---------------------------------------------------------------- the walk


def declared_input(info: ValueInfo, input_size: int | None, layout: str, batch: int = 1) -> tuple[int, ...] | None:
    """The shape the graph is fed: its own dims where they are numbers, else batch ``batch`` and the
    model's ``input_size`` (224 when not known) in ``layout``; None when the rank is not an image's."""
    if info.shape is None:
        return None
    side = input_size or DEFAULT_IMAGE
    dims = list(info.shape)
    if len(dims) == 4 and dims[3] == 3 and dims[1] != 3:
        layout = "NHWC"  # the graph says so, whatever the caller assumed
    image = (batch, 3, side, side) if layout == "NCHW" else (batch, side, side, 3)
    if len(dims) != 4 and not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    return tuple(d if isinstance(d, int) and d > 0 else image[i] for i, d in enumerate(dims))


def footprint(
    blob: bytes | memoryview,
    weights: Mapping[str, tuple[int, ...]] | None = None,
    input_size: int | None = None,
    layout: str = "NCHW",
    stop: Callable[[Node, Value, int, int], None] | None = None,
) -> Footprint:
    """Walk the graph ``blob`` at its declared input size and measure what it holds.

    ``weights`` are tensors stored beside the graph (a `.klaus` file's, float32); ``stop`` is called
    for each node with its largest output, the bytes alive after it and the weights' bytes, and may raise to end the walk.
    Raises :class:`klaus.onnxwire.WireError` for bytes that are not a graph.
    """
    graph = _read(blob)
    walk = _Walk(graph)
    walk.values.update(graph.initializers)
    weight_bytes = sum(v.nbytes for v in graph.initializers.values())
    for name, dims in (weights or {}).items():
        if name not in walk.values:
            walk.values[name] = Value(tuple(dims), 4)
            weight_bytes += math.prod(dims) * 4
    feeds = [v for v in graph.inputs if v.name not in walk.values]
    input_shape = declared_input(feeds[0], input_size, layout) if feeds else None
    for info in feeds:
        shape = declared_input(info, input_size, layout)
        walk.values[info.name] = Value(shape, ITEMSIZE.get(info.elem_type, 4))
    order = _topological(graph.nodes)
    last_read: dict[str, int] = {}
    for step, node in enumerate(order):
        for name in node.inputs:
            last_read[name] = step
    kept = set(graph.outputs)
    alive = {v.name: walk.values[v.name].nbytes for v in feeds}
    live = sum(alive.values())
    largest, largest_node, peak, peak_node, known = 0, "", live, "", 0
    for step, node in enumerate(order):
        outs = walk.infer(node)
        biggest = UNKNOWN
        for name, value in zip(node.outputs, outs, strict=False):
            if not name:
                continue
            walk.values[name] = value
            live += value.nbytes - alive.get(name, 0)
            alive[name] = value.nbytes
            if value.nbytes > biggest.nbytes:
                biggest = value
        known += any(v.shape is not None for v in outs)
        if biggest.nbytes > largest:
            largest, largest_node = biggest.nbytes, node.name or node.op
        if live > peak:
            peak, peak_node = live, node.name or node.op
        if stop is not None:
            stop(node, biggest, live, weight_bytes)
        for name in {*node.inputs, *node.outputs}:
            if name in alive and name not in kept and last_read.get(name, -1) <= step:
                live -= alive.pop(name)
    made = {name: walk.values[name].shape for node in order for name in node.outputs if name in walk.values}
    return Footprint(largest, largest_node, peak, peak_node, weight_bytes, input_shape, known, len(graph.nodes), made)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


def check(
    blob: bytes | memoryview,
    where: str,
    weights: Mapping[str, tuple[int, ...]] | None = None,
    input_size: int | None = None,
    layout: str = "NCHW",
) -> Footprint | None:
    """Refuse a graph whose activations at the declared input size break the bounds (the module's
    docstring); None when the files are trusted (nothing is checked)."""
    if limits.trusted():
        return None
    largest = max_activation_bytes()
    cap = limits.max_run_bytes()
    assert largest is not None
    hint = f"(set {limits.TRUST_ENV}=1 to load it anyway, if you trust the file)"

    def stop(node: Node, biggest: Value, live: int, weight_bytes: int) -> None:
        who = f"node {node.name!r} ({node.op})" if node.name else f"a {node.op} node"
        if biggest.nbytes > largest:
            dims = "x".join(map(str, biggest.shape or ()))
            raise KlausFormatError(
                f"{where}: {who} makes a {dims} tensor of {_mib(biggest.nbytes)}, more than the "
                f"{_mib(largest)} one activation may take (1/{ACTIVATION_SHARE} of {limits.MEMORY_ENV}) {hint}"
            )
        if live + weight_bytes > cap:
            raise KlausFormatError(
                f"{where}: at {who} the activations alive at once take {_mib(live)}, which with "
                f"{_mib(weight_bytes)} of weights is more than the {_mib(cap)} a run may use ({limits.MEMORY_ENV}) {hint}"
            )

    try:
        return footprint(blob, weights, input_size, layout, stop)
    except WireError as exc:
        raise KlausFormatError(f"{where}: graph is not a valid ONNX protobuf ({exc})") from None
