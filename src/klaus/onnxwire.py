"""The ONNX protobuf read and written at the wire level, without the `onnx` package.

Running a `.klaus` model needs only three things from its graph: proof that it is safe
to hand to ONNX Runtime (standard operators only, nothing stored outside the file),
the names and shapes of its inputs, and a way to add the decoded weights. All three
work on the serialized bytes directly, so the classify path never imports `onnx`
(whose import, with `ml_dtypes` and the protobuf runtime, costs more than the whole
rest of a classification) and never holds a second, parsed copy of the graph.

The protobuf wire format is small: every field is a key varint (field number << 3 |
wire type) followed by a varint, 8 or 4 fixed bytes, or a length-prefixed run of bytes.
Unknown fields are skipped, as protobuf itself does; the deprecated group wire types
are refused. Field numbers are those of onnx/onnx.proto3.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from .errors import KlausFormatError

# Operator domains a `.klaus` graph may use: the standard ONNX sets only, so a
# model file can never ask the runtime to load custom (native) operator code.
ALLOWED_DOMAINS = ("", "ai.onnx")
MIN_OPSET, MAX_OPSET = 7, 23
MAX_SUBGRAPH_DEPTH = 16
# The operators image classifiers are made of (convolutions, matrix products, pooling, normalization,
# activations and the shape plumbing exporters emit around them). Everything else, and in particular
# control flow (Loop, If, Scan) and operators whose output size comes from data (ConstantOfShape,
# Range, Tile, Resize, NonZero, ...), is refused at load unless the user trusts the file
# (klaus.limits): those can make a file ask for unbounded time or memory.
CLASSIFIER_OPS = frozenset(
    [
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "Einsum",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Sqrt",
        "Reciprocal",
        "Neg",
        "Abs",
        "Exp",
        "Log",
        "Erf",
        "Min",
        "Max",
        "Sum",
        "Mean",
        "Relu",
        "LeakyRelu",
        "PRelu",
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
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "LpPool",
        "LRN",
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "Dropout",
        "Identity",
        "ReduceMean",
        "ReduceSum",
        "ReduceMax",
        "ReduceMin",
        "ReduceL2",
        "ArgMax",
        "Flatten",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Split",
        "Slice",
        "Gather",
        "Shape",
        "Size",
        "Cast",
        "Constant",
        "Pad",
        "Expand",
        "Equal",
        "Where",
        "Not",
        "And",
        "Or",
        "Greater",
        "Less",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        # int8 classifiers (ONNX Runtime's quantize_dynamic / quantize_static): fixed-size per-tensor arithmetic
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
    ]
)
# Convolution and pooling attributes larger than any image Klaus feeds (klaus.preprocess.MAX_INPUT_SIZE)
# only serve to make outputs huge.
MAX_WINDOW = 4096
WINDOW_OPS = frozenset({"Conv", "ConvTranspose", "MaxPool", "AveragePool", "LpPool"})
WINDOW_ATTRS = frozenset({"pads", "strides", "dilations", "kernel_shape", "output_padding", "output_shape"})
# Placeholder initializers name this location; ONNX Runtime takes their values from
# SessionOptions.add_external_initializers and never opens it.
EXTERNAL_LOCATION = "klaus-session-initializer"

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
FLOAT, INT64 = 1, 7  # TensorProto.DataType

# ModelProto, GraphProto, NodeProto, AttributeProto, TensorProto, ValueInfoProto field numbers.
MODEL_OPSET, MODEL_GRAPH, MODEL_FUNCTIONS = 8, 7, 25
OPSET_DOMAIN, OPSET_VERSION = 1, 2
GRAPH_NODE, GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_SPARSE_INITIALIZER = 1, 5, 11, 12, 15
NODE_NAME, NODE_OP_TYPE, NODE_ATTRIBUTE, NODE_DOMAIN = 3, 4, 5, 7
NODE_OUTPUT = 2
ATTR_NAME, ATTR_I, ATTR_INTS = 1, 3, 8
ATTR_T, ATTR_G, ATTR_TENSORS, ATTR_GRAPHS, ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS = 5, 6, 10, 11, 22, 23
TENSOR_DIMS, TENSOR_DATA_TYPE, TENSOR_NAME, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 1, 2, 8, 13, 14
SPARSE_VALUES, SPARSE_INDICES = 1, 2
ENTRY_KEY, ENTRY_VALUE = 1, 2
VALUE_NAME, VALUE_TYPE = 1, 2
TYPE_TENSOR, TENSOR_TYPE_ELEM, TENSOR_TYPE_SHAPE, SHAPE_DIM = 1, 1, 2, 1
DIM_VALUE, DIM_PARAM = 1, 2
DATA_LOCATION_EXTERNAL = 1


class WireError(ValueError):
    """The bytes are not well-formed protobuf."""


def _varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def fields(data: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) for each field of one message: ints for varint and
    fixed fields, a view of the bytes for length-delimited ones (nested messages, strings, packed).

    Keys, small integers and short lengths are one byte; that case is read inline, as the reader
    walks every field of every node of a graph while a model loads."""
    view = memoryview(data)
    end = len(view)
    pos = 0
    while pos < end:
        key = view[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(view, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire in (LENGTH, VARINT):
            if pos < end and view[pos] < 0x80:
                value = view[pos]
                pos += 1
            else:
                value, pos = _varint(view, pos)
            if wire == VARINT:
                yield number, wire, value
                continue
            if pos + value > end:
                raise WireError("length-delimited field runs past the end")
            yield number, wire, view[pos : pos + value]
            pos += value
        elif wire in (FIXED64, FIXED32):
            width = 8 if wire == FIXED64 else 4
            if pos + width > end:
                raise WireError("truncated fixed-width field")
            yield number, wire, int.from_bytes(view[pos : pos + width], "little")
            pos += width
        else:
            raise WireError(f"unsupported wire type {wire}")


def _messages(data: bytes | memoryview, number: int) -> Iterator[memoryview]:
    for n, wire, value in fields(data):
        if n == number and wire == LENGTH:
            assert isinstance(value, memoryview)
            yield value


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise WireError("expected a string")
    try:
        return str(value, "utf-8")  # decoded from the view, without copying it to bytes first
    except UnicodeDecodeError:
        raise WireError("a string is not valid UTF-8") from None


def _signed(value: int) -> int:
    """int64 fields are two's complement in a 64-bit varint."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _ints(wire: int, value: int | memoryview) -> list[int]:
    """A repeated int64 field's entries: one unpacked value, or a packed run of varints."""
    if wire == VARINT:
        assert isinstance(value, int)
        return [_signed(value)]
    if wire != LENGTH or not isinstance(value, memoryview):
        raise WireError("bad repeated integer field")
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(_signed(v))
    return out


class ValueInfo(NamedTuple):
    """A graph input or output: name, element type and dims (int, a symbolic name, or None)."""

    name: str
    elem_type: int = 0
    shape: tuple[int | str | None, ...] | None = None


class Skeleton(NamedTuple):
    """What the runtime needs to know about a graph, read from its bytes."""

    opsets: dict[str, int]
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]
    initializers: frozenset[str]
    op_types: frozenset[str]
    nodes: int
    producers: dict[str, str]  # top-level value name -> the operator making it

    def output_op(self) -> str:
        """The operator that makes the first graph output ('' if none does, e.g. an input passed through)."""
        return self.producers.get(self.outputs[0].name, "") if self.outputs else ""

    @property
    def data_inputs(self) -> tuple[ValueInfo, ...]:
        """Graph inputs that are not initializers: what a caller feeds."""
        return tuple(v for v in self.inputs if v.name not in self.initializers)


def _value_info(data: memoryview) -> ValueInfo:
    name, elem, shape = "", 0, None
    for n, _, value in fields(data):
        if n == VALUE_NAME:
            name = _text(value)
        elif n == VALUE_TYPE and isinstance(value, memoryview):
            for tensor in _messages(value, TYPE_TENSOR):
                for tn, _, tv in fields(tensor):
                    if tn == TENSOR_TYPE_ELEM and isinstance(tv, int):
                        elem = tv
                    elif tn == TENSOR_TYPE_SHAPE and isinstance(tv, memoryview):
                        shape = tuple(_dim(d) for d in _messages(tv, SHAPE_DIM))
    return ValueInfo(name, elem, shape)


def _dim(data: memoryview) -> int | str | None:
    for n, _, value in fields(data):
        if n == DIM_VALUE and isinstance(value, int):
            return _signed(value)
        if n == DIM_PARAM:
            return _text(value)
    return None


class _Walk:
    """One pass over a GraphProto and its subgraphs, checking what a `.klaus` graph may hold."""

    def __init__(self, where: str, allowed: frozenset[str] | None) -> None:
        self.where = where
        self.allowed = allowed  # None: any standard operator
        self.op_types: set[str] = set()
        self.nodes = 0
        self.producers: dict[str, str] = {}

    def fail(self, problem: str) -> KlausFormatError:
        return KlausFormatError(f"{self.where}: {problem}")

    def graph(self, data: memoryview, depth: int) -> tuple[list[ValueInfo], list[ValueInfo], set[str]]:
        if depth > MAX_SUBGRAPH_DEPTH:
            raise self.fail(f"graph nests subgraphs more than {MAX_SUBGRAPH_DEPTH} deep")
        inputs: list[ValueInfo] = []
        outputs: list[ValueInfo] = []
        initializers: set[str] = set()
        for n, wire, value in fields(data):
            if wire != LENGTH:
                continue
            assert isinstance(value, memoryview)
            if n == GRAPH_NODE:
                self.node(value, depth)
            elif n == GRAPH_INITIALIZER:
                initializers.add(self.tensor(value))
            elif n == GRAPH_SPARSE_INITIALIZER:
                self.sparse(value)
            elif n == GRAPH_INPUT:
                inputs.append(_value_info(value))
            elif n == GRAPH_OUTPUT:
                outputs.append(_value_info(value))
        return inputs, outputs, initializers

    def node(self, data: memoryview, depth: int) -> None:
        self.nodes += 1
        name, op, domain = "", "", ""
        outputs: list[str] = []
        attributes: list[memoryview] = []
        for n, wire, value in fields(data):
            if n == NODE_NAME:
                name = _text(value)
            elif n == NODE_OP_TYPE:
                op = _text(value)
            elif n == NODE_DOMAIN:
                domain = _text(value)
            elif n == NODE_OUTPUT:
                outputs.append(_text(value))
            elif n == NODE_ATTRIBUTE and wire == LENGTH:
                assert isinstance(value, memoryview)
                attributes.append(value)
        if domain not in ALLOWED_DOMAINS:
            raise self.fail(
                f"node {name!r} uses operator domain {domain!r} (operator {op}); only standard ONNX is allowed"
            )
        if self.allowed is not None and op not in self.allowed:
            raise self.fail(
                f"node {name!r} uses {op}, which is not among the operators image classifiers use "
                "(set KLAUS_TRUST_MODEL=1 to load it anyway, if you trust the file)"
            )
        for attribute in attributes:
            self.attribute(attribute, depth, op if self.allowed is not None else "")
        self.op_types.add(op)
        if depth == 0:
            self.producers.update((out, op) for out in outputs)

    def attribute(self, data: memoryview, depth: int, op: str) -> None:
        name, numbers = "", []
        for n, wire, value in fields(data):
            if n == ATTR_NAME:
                name = _text(value)
            elif n in (ATTR_I, ATTR_INTS):
                numbers.extend(_ints(wire, value))
            elif n in (ATTR_G, ATTR_GRAPHS) and isinstance(value, memoryview):
                self.graph(value, depth + 1)
            elif n in (ATTR_T, ATTR_TENSORS) and isinstance(value, memoryview):
                self.tensor(value)
            elif n in (ATTR_SPARSE_TENSOR, ATTR_SPARSE_TENSORS) and isinstance(value, memoryview):
                self.sparse(value)
        if op in WINDOW_OPS and name in WINDOW_ATTRS and any(not 0 <= v <= MAX_WINDOW for v in numbers):
            raise self.fail(f"a {op} node's {name} are outside 0..{MAX_WINDOW}")

    def tensor(self, data: memoryview) -> str:
        name = ""
        for n, _, value in fields(data):
            if n == TENSOR_NAME:
                name = _text(value)
            elif n == TENSOR_EXTERNAL_DATA or (n == TENSOR_DATA_LOCATION and value == DATA_LOCATION_EXTERNAL):
                raise self.fail("graph refers to external tensor data")
        return name

    def sparse(self, data: memoryview) -> None:
        for n, _, value in fields(data):
            if n in (SPARSE_VALUES, SPARSE_INDICES) and isinstance(value, memoryview):
                self.tensor(value)


def _opset(data: memoryview) -> tuple[str, int]:
    domain, version = "", 0
    for n, _, value in fields(data):
        if n == OPSET_DOMAIN:
            domain = _text(value)
        elif n == OPSET_VERSION and isinstance(value, int):
            version = _signed(value)
    return domain, version


def read_skeleton(blob: bytes | memoryview, where: str, allowed: frozenset[str] | None = None) -> Skeleton:
    """Parse and check a `.klaus` graph: standard operator domains and opsets only, no local
    functions, no external tensor data anywhere (subgraphs included), at least one node; with
    ``allowed``, only those operators, and convolution and pooling windows within bounds.

    Any problem is one :class:`KlausFormatError` naming ``where``.
    """
    walk = _Walk(where, allowed)
    opsets: dict[str, int] = {}
    graph: tuple[list[ValueInfo], list[ValueInfo], set[str]] | None = None
    try:
        top = list(fields(blob))
        for n, _, value in top:  # the opsets first: they say most plainly what a foreign graph is
            if n == MODEL_OPSET and isinstance(value, memoryview):
                domain, version = _opset(value)
                if domain not in ALLOWED_DOMAINS:
                    raise walk.fail(f"graph imports operator domain {domain!r}; only standard ONNX is allowed")
                if not MIN_OPSET <= version <= MAX_OPSET:
                    raise walk.fail(f"graph uses opset {version}, supported {MIN_OPSET}..{MAX_OPSET}")
                opsets[domain or "ai.onnx"] = version
        if any(n == MODEL_FUNCTIONS for n, _, _ in top):
            raise walk.fail("graph defines local functions, which Klaus does not allow")
        for n, wire, value in top:
            if n == MODEL_GRAPH and wire == LENGTH and isinstance(value, memoryview):
                graph = walk.graph(value, 0)  # a repeated message field merges; Klaus writes one
    except WireError as exc:
        raise walk.fail(f"graph is not a valid ONNX protobuf ({exc})") from None
    if graph is None or walk.nodes == 0:
        raise walk.fail("graph holds no nodes")
    inputs, outputs, initializers = graph
    return Skeleton(
        opsets=opsets,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        initializers=frozenset(initializers),
        op_types=frozenset(walk.op_types),
        nodes=walk.nodes,
        producers=walk.producers,
    )


# ---------------------------------------------------------------- writing


@functools.cache
def _key(number: int, wire: int) -> bytes:
    return encode_varint(number << 3 | wire)


def encode_varint(value: int) -> bytes:
    if 0 <= value < 0x80:  # most keys, dims and lengths: one byte
        return bytes((value,))
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_field(number: int, payload: bytes) -> bytes:
    return _key(number, LENGTH) + encode_varint(len(payload)) + payload


def placeholder_tensor(name: str, dims: Sequence[int], data_type: int = FLOAT) -> bytes:
    """A serialized TensorProto whose value ONNX Runtime takes from ``add_external_initializers``.

    The placeholder carries name, type and shape only, so the serialized graph stays the size of
    the skeleton and no weight exists in protobuf form.
    """
    return external_tensor(name, dims, EXTERNAL_LOCATION, 0, data_type)


def external_tensor(name: str, dims: Sequence[int], location: str, offset: int, data_type: int = FLOAT) -> bytes:
    """A serialized float32 TensorProto whose values ONNX Runtime reads from the file ``location``
    (relative to the model file) at byte ``offset``: name, type, shape and where, no data."""
    out = bytearray()
    dim_key = _key(TENSOR_DIMS, VARINT)
    for d in dims:
        out += dim_key + encode_varint(int(d))
    out += _key(TENSOR_DATA_TYPE, VARINT) + encode_varint(data_type)
    out += _length_field(TENSOR_NAME, name.encode("utf-8"))
    size = 4 * _product(dims)
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(size))):
        entry = _entry_key(key) + _length_field(ENTRY_VALUE, value.encode())
        out += _length_field(TENSOR_EXTERNAL_DATA, entry)
    out += _key(TENSOR_DATA_LOCATION, VARINT) + encode_varint(DATA_LOCATION_EXTERNAL)
    return bytes(out)


@functools.cache
def _entry_key(key: str) -> bytes:
    """A StringStringEntryProto's key field (three keys describe every tensor's external data)."""
    return _length_field(ENTRY_KEY, key.encode())


def _product(dims: Sequence[int]) -> int:
    total = 1
    for d in dims:
        total *= int(d)
    return total


def with_initializers(model: bytes, tensors: Sequence[bytes]) -> bytes:
    """``model`` (a serialized ModelProto) with the serialized TensorProtos ``tensors`` added as
    graph initializers.

    Protobuf parsers merge a repeated occurrence of a message field into the first, appending
    its repeated fields, so appending one more ``graph`` field that holds only initializers adds
    them to the graph without re-serializing (or even parsing) the rest of the model.
    """
    graph = b"".join(_length_field(GRAPH_INITIALIZER, t) for t in tensors)
    return bytes(model) + _length_field(MODEL_GRAPH, graph)


# ---------------------------------------------------------------- feeding


def batches(inputs: np.ndarray, size: int, fixed: int | None) -> Iterator[tuple[np.ndarray, int]]:
    """(batch, rows that are real) over ``inputs``: ``size`` rows at a time, or, for a graph whose
    batch is ``fixed``, exactly that many, the last batch padded by repeating its last row."""
    step = fixed or size
    for start in range(0, len(inputs), step):
        part = inputs[start : start + step]
        real = len(part)
        if fixed and real < fixed:
            part = np.concatenate([part, np.repeat(part[-1:], fixed - real, axis=0)])
        yield part, real
