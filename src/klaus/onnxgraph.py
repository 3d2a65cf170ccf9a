"""ONNX graph surgery: take weights out, put them back, and say what each one is.

The `.klaus` container keeps the network as an ONNX graph with its float
initializers removed (the "skeleton"); the tensor table holds them, encoded.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import KlausFormatError, KlausModelError, KlausWriteError, first_line
from .format import KlausModel, LabelRow, read_model, write_atomic
from .labels import labels_for
from .onnxwire import ALLOWED_DOMAINS as ALLOWED_DOMAINS
from .onnxwire import EXTERNAL_LOCATION, read_skeleton
from .onnxwire import MAX_OPSET as MAX_OPSET
from .onnxwire import MIN_OPSET as MIN_OPSET
from .onnxwire import batches as batches
from .preprocess import Preprocess, preprocess_for_input

LayerKind = Literal["fc", "conv", "depthwise", "other"]  # what a weight tensor is, for recipes


@dataclass(frozen=True)
class TensorRole:
    """How a weight is used: the layer kind and which axis indexes output channels."""

    kind: LayerKind
    out_axis: int
    node: str
    op: str = ""
    activation: str = ""  # the data input the weight multiplies
    output: str = ""  # the node output the weight produces
    bias: str = ""  # the bias initializer added to its output, if any
    group: int = 1
    alpha: float = 1.0  # Gemm: output = alpha * A B + beta * C
    beta: float = 1.0
    in_axis: int = 1  # the axis of ``activation`` that holds the channels the weight contracts


def load_onnx(path: str) -> onnx.ModelProto:
    try:
        model = onnx.load(path, load_external_data=False)
    except FileNotFoundError:
        raise KlausModelError(f"{path}: no such file") from None
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise KlausModelError(f"{path}: not a readable ONNX model ({exc})") from None
    if not model.graph.node:  # protobuf parses an empty (or nearly any short) file as an empty model
        raise KlausModelError(
            f"{path}: not an ONNX model (empty file)"
            if not model.ByteSize()
            else f"{path}: ONNX model holds no graph nodes"
        )
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise KlausModelError(f"{path}: external-data ONNX models are not supported; merge the weights first")
    return model


def data_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs a caller feeds (ONNX before IR 4 also lists the initializers as inputs)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def input_dims(model: onnx.ModelProto) -> list[int | str | None] | None:
    """The first data input's dims as ONNX Runtime reports them (int, symbol or None); None if no rank."""
    inputs = data_inputs(model)
    if not inputs or not inputs[0].type.tensor_type.HasField("shape"):
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


def onnx_preprocess(model: onnx.ModelProto, where: str) -> Preprocess:
    """The default preprocessing at the input size ``model`` declares (:func:`klaus.preprocess.preprocess_for_input`)."""
    return preprocess_for_input(input_dims(model), where)


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


def float_initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]


def attributes(node: onnx.NodeProto) -> dict[str, object]:
    """A node's attributes by name, as Python values."""
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the named intermediate values (ONNX Runtime fetches any output)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output} | {i.name for i in probe.graph.input}
    for name in dict.fromkeys(names):
        if name not in present:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return probe


def fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the graph's (first) data input fixes, or None when its batch dimension is free.

    ``torch.onnx.export`` without ``dynamic_axes`` fixes it (usually at 1). Such a
    graph may also bake that size into Reshape shapes, so it is run as it is, in
    batches of exactly that size (:func:`batches`), never with the dimension freed.
    """
    weights = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in weights:
            continue
        dims = value.type.tensor_type.shape.dim
        return int(dims[0].dim_value) if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
    return None


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Return (skeleton without float initializers, {name: float32 array}) in graph order."""
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    weights: dict[str, np.ndarray] = {}
    kept = []
    for init in skeleton.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            weights[init.name] = numpy_helper.to_array(init).astype(np.float32)
        else:
            kept.append(init)
    del skeleton.graph.initializer[:]
    skeleton.graph.initializer.extend(kept)
    return skeleton, weights


def join_weights(skeleton: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """Put decoded weights back as initializers, in the order given."""
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    model.graph.initializer.extend(
        numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name) for name, array in weights.items()
    )
    return model


def external_placeholder(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer whose value is handed to ONNX Runtime separately (add_external_initializers).

    This keeps the serialized graph small and avoids extra copies of every weight
    (decoded array, protobuf tensor, serialized bytes, ONNX Runtime's parse) at load.
    """
    placeholder = onnx.TensorProto(
        name=name,
        data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
        dims=array.shape,
        data_location=onnx.TensorProto.EXTERNAL,
    )
    for key, value in (("location", EXTERNAL_LOCATION), ("offset", "0"), ("length", str(array.nbytes))):
        entry = placeholder.external_data.add()
        entry.key, entry.value = key, value
    return placeholder


def join_external(
    skeleton: onnx.ModelProto, weights: dict[str, np.ndarray]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """Like join_weights, but with placeholders; returns the graph and the arrays to hand over."""
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    arrays = {name: np.ascontiguousarray(a, dtype=np.float32) for name, a in weights.items()}
    model.graph.initializer.extend(external_placeholder(name, a) for name, a in arrays.items())
    return model, arrays


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _float_attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for a in node.attribute:
        if a.name == name:
            return float(a.f)
    return default


def tensor_roles(model: onnx.ModelProto) -> dict[str, TensorRole]:
    """Classify every float initializer by the first op that consumes it as a weight.

    Conv and ConvTranspose weights are their second input. Gemm and MatMul take the weight on
    either side: a 2-D initializer multiplying a data input, with ``in_axis`` naming the axis
    of that input it contracts (Gemm's ``transA``/``transB`` decide both), so calibration
    statistics of each layer are taken over the right channels.
    """
    shapes = {t.name: tuple(t.dims) for t in float_initializers(model)}
    roles: dict[str, TensorRole] = {}
    for node in model.graph.node:
        role = _weight_role(node, shapes)
        if role is not None and role[0] not in roles:
            roles[role[0]] = role[1]
    for name in shapes:
        roles.setdefault(name, TensorRole("other", 0, ""))
    return roles


def _weight_role(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> tuple[str, TensorRole] | None:
    """(weight name, role) if ``node`` multiplies a data input by a float initializer."""
    if len(node.input) < 2 or not node.output:
        return None
    first, second = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] in shapes else ""
    common: dict[str, Any] = {"node": node.name, "op": node.op_type, "output": node.output[0], "bias": bias}
    if node.op_type in ("Conv", "ConvTranspose") and second in shapes and len(shapes[second]) >= 3:
        group = _attr(node, "group", 1)
        depthwise = group > 1 and shapes[second][1] == 1 and node.op_type == "Conv"
        axis = 0 if node.op_type == "Conv" else 1
        return second, TensorRole("depthwise" if depthwise else "conv", axis, group=group, activation=first, **common)
    if node.op_type == "Gemm":
        scale: dict[str, Any] = {"alpha": _float_attr(node, "alpha", 1.0), "beta": _float_attr(node, "beta", 1.0)}
        trans_a, trans_b = _attr(node, "transA", 0), _attr(node, "transB", 0)
        if second in shapes and len(shapes[second]) == 2 and first not in shapes:  # Y = A' W'
            out_axis, in_axis = (0 if trans_b else 1), (0 if trans_a else 1)
            return second, TensorRole("fc", out_axis, activation=first, in_axis=in_axis, **common, **scale)
        if first in shapes and len(shapes[first]) == 2 and second not in shapes:  # Y = W' B'
            out_axis, in_axis = (1 if trans_a else 0), (1 if trans_b else 0)
            return first, TensorRole("fc", out_axis, activation=second, in_axis=in_axis, **common, **scale)
        return None
    if node.op_type == "MatMul":
        if second in shapes and len(shapes[second]) == 2 and first not in shapes:  # (..., K) @ (K, N)
            return second, TensorRole("fc", 1, activation=first, in_axis=-1, **common)
        if first in shapes and len(shapes[first]) == 2 and second not in shapes:  # (M, K) @ (..., K, N)
            return first, TensorRole("fc", 0, activation=second, in_axis=-2, **common)
    return None


def parse_skeleton(blob: bytes, where: str) -> onnx.ModelProto:
    skeleton = onnx.ModelProto()
    try:
        skeleton.ParseFromString(blob)
    except Exception as exc:  # protobuf DecodeError
        raise KlausFormatError(f"{where}: graph is not a valid ONNX protobuf ({exc})") from None
    if not skeleton.graph.node:
        raise KlausFormatError(f"{where}: graph holds no nodes")
    return skeleton


def validate_skeleton(model: onnx.ModelProto, where: str) -> None:
    """Refuse graphs that could load native code or reach outside the file (:func:`klaus.onnxwire.read_skeleton`)."""
    read_skeleton(model.SerializeToString(), where)


def check_model(model: onnx.ModelProto, where: str) -> None:
    try:
        onnx.checker.check_model(model)
    except UnicodeDecodeError:  # the checker's message quotes a name that is not UTF-8
        raise KlausFormatError(f"{where}: ONNX graph is invalid (a name or string in it is not UTF-8)") from None
    except onnx.checker.ValidationError as exc:
        detail = " ".join(str(exc).split()) or "invalid graph"  # the checker's message spans lines
        if len(detail) > 300:
            detail = detail[:297] + "..."
        raise KlausFormatError(f"{where}: ONNX graph is invalid ({detail})") from None


def simplify(model: onnx.ModelProto, where: str | None = None) -> onnx.ModelProto:
    """Constant-fold and fuse with ONNX Runtime's portable (basic) optimizations.

    Exporters leave shape arithmetic and Pad nodes around ("same" padding); the
    basic level folds them into Conv attributes and keeps to standard operators.
    A graph ONNX Runtime cannot load is one :class:`KlausModelError` naming ``where``;
    failing to write the optimized graph to a temporary file (disk full, a file size
    limit) is a :class:`KlausWriteError` naming the temporary folder, not the model.
    """
    import onnxruntime as ort

    blob = model.SerializeToString()
    with _temporary_folder() as tmp:
        out = f"{tmp}/simplified.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = out
        options.log_severity_level = 4
        try:
            ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's InvalidArgument/Fail/InvalidGraph types
            if _loads(blob):  # so it was writing `out` that failed (ONNX Runtime says INVALID_PROTOBUF)
                _temporary_write_failed(tmp, len(blob), exc)
            raise KlausModelError(
                f"{where + ': ' if where else ''}ONNX Runtime cannot load the model ({first_line(exc)})"
            ) from None
        try:
            simplified = onnx.load(out)
        except Exception as exc:  # a truncated file: the write failed without ONNX Runtime saying so
            _temporary_write_failed(tmp, len(blob), exc)
    used = {node.domain for node in simplified.graph.node} | {""}
    kept = [o for o in simplified.opset_import if o.domain in used]
    del simplified.opset_import[:]
    simplified.opset_import.extend(kept)
    return simplified


@contextlib.contextmanager
def _temporary_folder() -> Iterator[str]:
    """A private temporary folder; failing to create it is a :class:`KlausWriteError` naming TMPDIR."""
    import tempfile

    try:
        folder = tempfile.TemporaryDirectory(prefix="klaus-")
    except OSError as exc:
        raise KlausWriteError(
            f"cannot write a temporary file in {tempfile.gettempdir()} ({exc.strerror or exc})"
        ) from None
    with folder as tmp:
        yield tmp


def _loads(blob: bytes) -> bool:
    """Whether ONNX Runtime loads the serialized model (basic optimizations, nothing written)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 4
    try:
        ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def _temporary_write_failed(folder: str, size: int, exc: BaseException) -> NoReturn:
    """A :class:`KlausWriteError` for a temporary file of about ``size`` bytes that could not be written
    in ``folder``, with the system's reason (found by writing as much again: disk full, a file size limit)."""
    import tempfile

    reason = f"ONNX Runtime: {first_line(exc)}"
    try:
        with tempfile.TemporaryFile(dir=folder) as f:
            chunk = b"\0" * (1 << 16)
            for _ in range(0, 2 * size + len(chunk), len(chunk)):
                f.write(chunk)
            f.flush()
    except OSError as error:
        reason = error.strerror or str(error)
    raise KlausWriteError(f"cannot write a temporary file in {tempfile.gettempdir()} ({reason})") from None


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Initializer names an exporter makes up: ``onnx::Conv_911`` (torch.onnx, batch norm folded), ``val_13`` /
# ``_val_13`` (torch.onnx dynamo, onnxscript), plain numbers, and outputs of folded nodes (``/Constant_output_0``).
_INVENTED = re.compile(r"^(onnx::.*|/.*|_?val_\d+|\d+|.*_output_\d+)$")


def invented_name(name: str) -> bool:
    """Whether an initializer name was made up by an exporter rather than given by the model's author."""
    return not name or bool(_INVENTED.match(name))


def rename_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name layer weights as the model's author knows them: ``layer1.0.downsample.0.weight``.

    A weight or bias keeps the initializer name its exporter gave it unless that name is made up
    (:func:`invented_name`, or ``<weight>_bias`` for a bias onnxscript folded from batch norm). A
    made-up name becomes the layer's module path plus ``.weight``/``.bias``, the path taken, in
    this order, from the layer's own named bias (``encoder.layers.0.mlp.0.bias`` names the MatMul
    its Add follows), its named weight, the dynamo exporter's scope metadata, or the node name
    (``/layer1/layer1.0/conv1/Conv``: each scope repeats its parent's path, which is kept once).
    A name two tensors would get, or that another initializer holds, is not given.
    """
    initializers = {t.name for t in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    wanted: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in WEIGHTED_OPS:
            continue
        weight, bias = _layer_tensors(node, initializers, consumers)
        if not weight or weight in wanted:
            continue  # a weight several layers use is named by the first
        layer = _layer_path(node, weight, bias)
        if not layer:
            continue
        wanted[weight] = f"{layer}.weight" if invented_name(weight) else weight
        if bias and bias not in wanted:
            wanted[bias] = f"{layer}.bias" if invented_name(bias) or bias == f"{weight}_bias" else bias
    claims: dict[str, int] = {}
    for new in wanted.values():
        claims[new] = claims.get(new, 0) + 1
    renames = {old: new for old, new in wanted.items() if new != old and claims[new] == 1}
    while True:  # a name another initializer keeps is not given (which may leave that one's old name in use)
        kept = initializers - set(renames)
        blocked = [old for old, new in renames.items() if new in kept]
        if not blocked:
            break
        for old in blocked:
            del renames[old]
    if not renames:
        return model
    for t in model.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for value in model.graph.input:  # models before IR 4 list their initializers as inputs too
        value.name = renames.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
    return model


def _layer_tensors(
    node: onnx.NodeProto, initializers: set[str], consumers: dict[str, list[onnx.NodeProto]]
) -> tuple[str, str]:
    """(weight, bias) initializer names of a layer node ("" where it has none). A MatMul's bias is the
    initializer of the one Add its output feeds, as exporters write a Linear layer."""
    inputs = list(node.input)
    if node.op_type in ("Conv", "ConvTranspose"):
        weight = inputs[1] if len(inputs) > 1 and inputs[1] in initializers else ""
    else:
        weight = next((n for n in inputs[:2] if n in initializers), "")
    bias = inputs[2] if len(inputs) > 2 and inputs[2] in initializers else ""
    if node.op_type == "MatMul" and node.output:
        after = consumers.get(node.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add":
            bias = next((n for n in after[0].input if n in initializers), "")
    return weight, bias


def _layer_path(node: onnx.NodeProto, weight: str, bias: str) -> str:
    """The module path of a layer (see :func:`rename_weights`), or "" when nothing names it."""
    if bias and not invented_name(bias) and bias.endswith(".bias"):
        return bias[: -len(".bias")]
    if not invented_name(weight) and weight.endswith(".weight"):
        return weight[: -len(".weight")]
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    if scopes:
        scoped = _scope_path(scopes)
        if scoped:
            return scoped
    name = node.name.strip("/")
    if "/" not in name:
        return name
    path: list[str] = []
    for part in name.split("/")[:-1]:  # the last part names the operator ("Conv", "MatMul_1")
        path += _new_segments(path, part.split("."))
    return ".".join(path)


def _new_segments(path: list[str], scope: list[str]) -> list[str]:
    """The segments a scope name adds to ``path``: torch.onnx names a Sequential's child by the
    container and the index (``downsample.0`` under ``layer2.0.downsample``), so the longest head of
    ``scope`` that repeats the tail of ``path`` is dropped (but at least one segment is added)."""
    for k in range(min(len(path), len(scope) - 1), 0, -1):
        if path[-k:] == scope[:k]:
            return scope[k:]
    return scope


def _scope_path(scopes: str) -> str:
    """The innermost module path of the dynamo exporter's ``pkg.torch.onnx.name_scopes`` list
    (``['', 'features', 'features.1', 'features.1.fc1', 'conv2d_2']``: the last entry is the operator)."""
    import ast

    try:
        entries = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return ""
    if not isinstance(entries, list) or len(entries) < 2 or not all(isinstance(e, str) for e in entries):
        return ""
    return entries[-2]


def to_onnx(model: KlausModel, weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Rebuild a self-contained ONNX model from ``model`` and its decoded ``weights`` (decoded here if not given)."""
    where = model.source_path or model.name
    skeleton = parse_skeleton(model.graph, where)
    validate_skeleton(skeleton, where)
    full = join_weights(skeleton, model.decoded_weights() if weights is None else weights)
    check_model(full, where)
    return full


def save(model: onnx.ModelProto, out: str) -> int:
    """Write ``model`` as onnx.save would (protobuf, or the text format a .txt/.json name asks for), but
    through a temporary file and a rename, missing folders created; returns the bytes written."""
    from onnx import serialization

    fmt = serialization.registry.get_format_from_file_extension(os.path.splitext(out)[1]) or "protobuf"
    data = serialization.registry.get(fmt).serialize_proto(model)
    return write_atomic(data.encode("utf-8") if isinstance(data, str) else data, out)


def export(model_path: str, out: str) -> int:
    """`klaus export -o`: the `.klaus` file at ``model_path`` decoded into a plain ONNX file ``out``."""
    return save(to_onnx(read_model(model_path)), out)
