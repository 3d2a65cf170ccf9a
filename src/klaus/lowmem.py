"""Low-memory mode: run a `.klaus` model with its weights still palettized in memory.

The default runtime decodes every weight to float32 and hands ONNX Runtime a
plain graph: 4 bytes per weight for as long as the session lives (plus the
copies ONNX Runtime pre-packs for its GEMM kernels). Here each ``palette-png``
tensor instead becomes

* a ``uint8`` initializer holding its indices (1 byte per weight, shape = the
  tensor's dims),
* a float32 palette initializer (at most 256 values), and, when the tensor has
  per-channel scales, a float32 scale initializer shaped to broadcast along
  ``scale_axis``,
* ``Cast(indices → int32) → Reshape(-1) → GatherElements(palette, ·) →
  Reshape(dims) [→ Mul(·, scales)]`` feeding the original consumer,

so the float weight exists only while the layer that needs it runs.
(``GatherElements`` on the flattened indices is the same palette lookup as
``Gather``, but ONNX Runtime 1.32's CPU ``Gather`` copies one 4-byte block per
index: about 24 ns per weight against 5 ns for ``GatherElements`` with random
8-bit indices on 2 threads, which made batch-1 inference of the AlexNet-shaped
benchmark network 1.4 s instead of 0.27 s.) ONNX
Runtime would undo this at load time — constant folding evaluates the decode
nodes once (their inputs are all initializers) and stores float32 results, and
weight pre-packing keeps extra copies of constant GEMM inputs — so the session
is created with the ``ConstantFolding`` optimizer disabled and
``session.disable_prepacking`` set (:func:`make_session`).

Large weights of single Gemm, MatMul or (non-grouped) Conv consumers are split
along their output axis into chunks of at most ``chunk_elements`` weights: each
chunk is decoded and multiplied on its own and the partial outputs are
concatenated, so the float32 scratch a layer needs is one chunk (plus its int32
indices), not the whole layer. Outputs equal the default mode's up to float
summation order.

:func:`session` hands the uint8 arrays to ONNX Runtime as external
initializers (``SessionOptions.add_external_initializers``) instead of inside
the serialized graph, so loading holds two copies of the indices at most, not
four; it turns off ONNX Runtime's memory pattern (which would pre-allocate
room for every decoded weight at once) and trims the C heap afterwards.

4-bit indices are stored one per byte here: two per byte would halve the
resident indices again but needs an unpack (BitShift/BitwiseAnd + interleave)
that materializes the full-size uint8 map per run anyway, and the embedded
model has no tensor under 5 bits (in ``fc4-rest8`` only the FC layer is 4-bit:
0.61 MiB to gain; see BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import codecs, onnxgraph
from .errors import KlausFormatError, KlausModelError, first_line
from .format import KlausModel, TensorRecord
from .memory import release_free_heap

DEFAULT_CHUNK_ELEMENTS = 1 << 20
# The ONNX Runtime optimizers that would turn the decode nodes back into float32 constants.
DISABLED_OPTIMIZERS = ("ConstantFolding",)


@dataclass(frozen=True)
class LowMemStats:
    """What the low-memory graph keeps resident, for reports and tests."""

    palettized: int  # tensors kept as indices
    chunked: int  # of those, split into per-chunk decodes
    index_bytes: int  # uint8 index initializers
    float_bytes: int  # float32 initializers (raw tensors, palettes, scales)


def to_lowmem_onnx(model: KlausModel, chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS) -> onnx.ModelProto:
    """The model as a self-contained ONNX graph whose palettized weights stay uint8 indices + palette."""
    return build(model, chunk_elements)[0]


def build(
    model: KlausModel, chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS, external: bool = False
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], LowMemStats]:
    """(graph, index arrays kept out of the graph, stats).

    With ``external`` the uint8 index initializers are placeholders marked as
    external data and their values are returned as arrays, for
    :func:`make_session` to hand to ONNX Runtime directly (no protobuf copies).
    """
    where = model.source_path or model.name
    skeleton = onnx.ModelProto()
    try:
        skeleton.ParseFromString(model.graph)
    except Exception as exc:  # protobuf DecodeError
        raise KlausFormatError(f"{where}: graph is not a valid ONNX protobuf ({exc})") from None
    onnxgraph.validate_skeleton(skeleton, where)
    graph = skeleton.graph
    used = _names_in_use(graph)
    consumers = _consumers(graph.node)
    raw: dict[str, np.ndarray] = {}
    for t in model.tensors:
        if t.codec not in codecs.PALETTE_CODECS:
            try:
                raw[t.name] = t.decode()
            except KlausFormatError as exc:
                raise KlausFormatError(f"{where}: tensor {t.name!r}: {exc}") from None
    out = _Builder(external)
    replaced: dict[int, list[onnx.NodeProto]] = {}  # node position -> the nodes that stand in for it
    palettized = chunked = 0
    for t in model.tensors:
        if t.codec not in codecs.PALETTE_CODECS:
            continue
        palettized += 1
        try:
            indices = t.indices()
        except KlausFormatError as exc:
            raise KlausFormatError(f"{where}: tensor {t.name!r}: {exc}") from None
        values = t.palette_values()
        if values is None:
            raise KlausFormatError(f"{where}: tensor {t.name!r}: codec {t.codec} without a palette")
        palette = values.astype(np.float32)
        if int(indices.max(initial=0)) >= len(palette):
            raise KlausFormatError(
                f"{where}: tensor {t.name!r}: index map refers past its {len(palette)}-entry palette"
            )
        fresh = _Namer(used, t.name)
        pal_name = out.constant(fresh("palette"), palette)
        plan = _chunk_plan(t, consumers.get(t.name, []), graph.node, raw, chunk_elements)
        if plan is None:
            out.nodes += _decode(out, t, indices, pal_name, t.name, fresh)
            continue
        chunked += 1
        position, axis, bias, concat_axis = plan
        node = graph.node[position]
        pieces, outputs = [], []
        step = max(1, (chunk_elements or t.size) // max(1, t.size // t.dims[axis]))
        for start in range(0, t.dims[axis], step):
            part = slice(start, min(start + step, t.dims[axis]))
            weight = fresh(f"w{start}")
            pieces += _decode(out, t, indices, pal_name, weight, fresh, axis, part)
            inputs = [node.input[0], weight]
            if bias:
                inputs.append(out.constant(fresh(f"b{start}"), raw[bias][part]))
            outputs.append(fresh(f"y{start}"))
            piece = helper.make_node(
                node.op_type, inputs, [outputs[-1]], name=fresh(f"{node.op_type}{start}"), domain=node.domain
            )
            piece.attribute.extend(node.attribute)
            pieces.append(piece)
        pieces.append(helper.make_node("Concat", outputs, [node.output[0]], name=fresh("concat"), axis=concat_axis))
        replaced[position] = pieces
        if bias and _only_consumer(consumers, bias, position):
            del raw[bias]  # only the per-chunk slices are needed
        del indices
    nodes = list(out.nodes)
    for position, node in enumerate(graph.node):
        nodes += replaced.get(position, [node])
    del graph.node[:]
    # The decode nodes depend on initializers only; ONNX Runtime schedules them by data flow.
    graph.node.extend(nodes)
    graph.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(a, np.float32), n) for n, a in raw.items())
    graph.initializer.extend(out.initializers)
    if not external:
        onnxgraph.check_model(skeleton, where)
    index_bytes = sum(a.nbytes for a in out.arrays.values()) + sum(
        len(i.raw_data) for i in out.initializers if i.data_type == TensorProto.UINT8
    )
    float_bytes = sum(len(i.raw_data) for i in graph.initializer if i.data_type == TensorProto.FLOAT)
    return skeleton, out.arrays, LowMemStats(palettized, chunked, index_bytes, float_bytes)


class _Builder:
    """Collects decode nodes, initializers and (in external mode) the index arrays."""

    def __init__(self, external: bool) -> None:
        self.external = external
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.arrays: dict[str, np.ndarray] = {}

    def constant(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def indices(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.uint8)
        if not self.external:
            return self.constant(name, array)
        self.initializers.append(onnxgraph.external_placeholder(name, array))
        self.arrays[name] = array
        return name


class _Namer:
    """Unique value names derived from a tensor's name."""

    def __init__(self, used: set[str], base: str) -> None:
        self.used, self.base = used, base

    def __call__(self, suffix: str) -> str:
        name, n = f"{self.base}/klaus_{suffix}", 0
        while name in self.used:
            n += 1
            name = f"{self.base}/klaus_{suffix}_{n}"
        self.used.add(name)
        return name


def _names_in_use(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _consumers(nodes: Iterable[onnx.NodeProto]) -> dict[str, list[tuple[int, int]]]:
    """{value name: [(node position, input slot)]} in the top-level graph; subgraph uses count as (-1, -1)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for position, node in enumerate(nodes):
        for slot, name in enumerate(node.input):
            out.setdefault(name, []).append((position, slot))
        for attr in node.attribute:
            for g in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []) + list(attr.graphs):
                for inner in g.node:
                    for name in inner.input:
                        out.setdefault(name, []).append((-1, -1))
    return out


def _only_consumer(consumers: dict[str, list[tuple[int, int]]], name: str, position: int) -> bool:
    return [p for p, _ in consumers.get(name, [])] == [position]


def _chunk_plan(
    t: TensorRecord,
    uses: list[tuple[int, int]],
    nodes,
    raw: dict[str, np.ndarray],
    chunk_elements: int | None,
) -> tuple[int, int, str, int] | None:
    """(node position, weight axis to split, bias name, output concat axis), or None to decode whole."""
    if not chunk_elements or t.size <= chunk_elements or len(uses) != 1 or uses[0][1] != 1:
        return None
    position = uses[0][0]
    node = nodes[position]
    if node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    bias = node.input[2] if len(node.input) > 2 else ""
    attrs = onnxgraph.attributes(node)
    if node.op_type == "Gemm" and len(t.dims) == 2 and not attrs.get("transA", 0):
        plan = (position, 0 if attrs.get("transB", 0) else 1, bias, 1)
    elif node.op_type == "MatMul" and len(t.dims) == 2:
        plan = (position, 1, "", -1)
    elif node.op_type == "Conv" and len(t.dims) >= 3 and attrs.get("group", 1) == 1:
        plan = (position, 0, bias, 1)
    else:
        return None
    if bias and (bias not in raw or raw[bias].shape != (t.dims[plan[1]],)):
        return None  # the bias must be a per-output vector we can slice alongside the weight
    return plan


def _decode(
    out: _Builder,
    t: TensorRecord,
    indices: np.ndarray,
    palette_name: str,
    output: str,
    fresh: _Namer,
    axis: int = 0,
    part: slice = slice(None),
) -> list[onnx.NodeProto]:
    """Nodes computing ``palette[indices] (* scales)`` for ``part`` of ``axis`` into ``output``."""
    where = [slice(None)] * len(t.dims)
    where[axis] = part
    chunk = indices[tuple(where)]
    idx_name = out.indices(fresh("indices"), chunk)
    flat = out.constant(fresh("flat"), np.array([-1], np.int64))
    shape = out.constant(fresh("shape"), np.array(chunk.shape, np.int64))
    idx32, flat32, values = fresh("indices_i32"), fresh("indices_flat"), fresh("values_flat")
    scales = t.scale_values()
    shaped = fresh("values") if scales is not None else output
    nodes = [
        helper.make_node("Cast", [idx_name], [idx32], name=fresh("cast"), to=TensorProto.INT32),
        helper.make_node("Reshape", [idx32, flat], [flat32], name=fresh("flatten")),
        helper.make_node("GatherElements", [palette_name, flat32], [values], name=fresh("lookup"), axis=0),
        helper.make_node("Reshape", [values, shape], [shaped], name=fresh("reshape")),
    ]
    if scales is not None:
        axis_s = t.scale_axis or 0
        broadcast = [1] * len(t.dims)
        broadcast[axis_s] = -1
        s = scales.astype(np.float32)
        if axis_s == axis:
            s = s[part]
        scale_name = out.constant(fresh("scales"), s.reshape(broadcast))
        nodes.append(helper.make_node("Mul", [shaped, scale_name], [output], name=fresh("scale")))
    return nodes


def make_session(
    model: onnx.ModelProto | bytes,
    threads: int | None = None,
    arrays: dict[str, np.ndarray] | None = None,
    optimized_model_path: str | None = None,
):
    """An ONNX Runtime CPU session that keeps the decode nodes (no folding, no pre-packing).

    ``arrays`` supplies the values of external placeholder initializers (see :func:`build`);
    ONNX Runtime copies them once, so the caller may drop them afterwards.
    ``optimized_model_path`` saves the graph as ONNX Runtime will run it (for tests).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4
    options.add_session_config_entry("session.disable_prepacking", "1")
    # A memory pattern pre-allocates one block for every planned intermediate, the decoded
    # weights included; without it each decode buffer is reused from the arena as it frees.
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if arrays:
        options.add_external_initializers(list(arrays), [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()])
    blob = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(
            blob,
            sess_options=options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(DISABLED_OPTIMIZERS),
        )
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise KlausModelError(f"ONNX Runtime cannot load the model ({first_line(exc)})") from None


def session(model: KlausModel, threads: int | None = None, chunk_elements: int | None = DEFAULT_CHUNK_ELEMENTS):
    """The low-memory session for a model: indices go to ONNX Runtime without protobuf copies."""
    graph, arrays, _ = build(model, chunk_elements, external=True)
    blob = graph.SerializeToString()
    del graph
    result = make_session(blob, threads, arrays)
    del blob, arrays
    release_free_heap()
    return result
