"""klaus.shapes: the static shape walk agrees with ONNX's own shape inference on the operators
classifiers use, measures what a graph holds, and refuses graphs whose activations break the bounds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper, shape_inference

from klaus import onnxwire, shapes
from klaus.errors import KlausFormatError
from klaus.format import read_model
from klaus.runtime import default_model_path


def _const(name: str, values, dtype=np.int64) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, dtype), name))


def _model(nodes, inits=(), opset: int = 17, size: int = 32, batch: str | int = "N") -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        list(inits),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _weight(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(np.zeros(shape, np.float32), name)


def _reference(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """ONNX's own inference (with data propagation) at batch 1: every tensor it knows fully."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for dim in fixed.graph.input[0].type.tensor_type.shape.dim:
        if not dim.dim_value:
            dim.dim_value = 1
    inferred = shape_inference.infer_shapes(fixed, data_prop=True)
    out = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            out[info.name] = tuple(d.dim_value for d in dims)
    return out


def _agrees(model: onnx.ModelProto) -> shapes.Footprint:
    footprint = shapes.footprint(model.SerializeToString())
    reference = _reference(model)
    made = {name for node in model.graph.node for name in node.output}
    assert made <= set(footprint.shapes)
    for name in made:
        assert footprint.shapes[name] is not None, f"{name} unknown"
        if name in reference:
            assert footprint.shapes[name] == reference[name], name
    return footprint


def test_convolutions_pooling_and_matrix_products_agree_with_onnx():
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], auto_pad="SAME_UPPER", strides=[2, 2], group=8),
        helper.make_node(
            "ConvTranspose", ["c2", "wt"], ["ct"], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]
        ),
        helper.make_node("MaxPool", ["ct"], ["p1"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        helper.make_node("AveragePool", ["p1"], ["p2"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("BatchNormalization", ["p2", "s", "b", "b", "s"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc"], ["logits0"], transB=1),
        helper.make_node("MatMul", ["logits0", "m"], ["mm"]),
        helper.make_node("Einsum", ["mm", "e"], ["es"], equation="bi,ij->bj"),
        helper.make_node("ReduceMean", ["es"], ["rm"], axes=[1], keepdims=1),
        helper.make_node("Softmax", ["rm"], ["out"]),
    ]
    inits = [
        _weight("w1", 8, 3, 3, 3),
        _weight("w2", 8, 1, 3, 3),
        _weight("wt", 8, 4, 3, 3),
        _weight("s", 4),
        _weight("b", 4),
        _weight("fc", 10, 4),
        _weight("m", 10, 6),
        _weight("e", 6, 5),
    ]
    footprint = _agrees(_model(nodes, inits, opset=17))
    assert footprint.input_shape == (1, 3, 32, 32)
    assert footprint.known == len(nodes)


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_shape_arithmetic_is_followed_into_reshape_pad_expand_and_slice(opset):
    axes_as_input = opset >= 13
    unsqueeze = (
        helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"])
        if axes_as_input
        else helper.make_node("Unsqueeze", ["n"], ["n1"], axes=[0])
    )
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        _const("zero", 0),
        _const("ax0", [0]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        unsqueeze,
        _const("minus1", [-1]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        _const("pads", [0, 2, 0, 3]),
        helper.make_node("Pad", ["flat", "pads"], ["padded"]),
        _const("starts", [1]),
        _const("ends", [1000]),
        _const("axes", [1]),
        _const("steps", [2]),
        helper.make_node("Slice", ["padded", "starts", "ends", "axes", "steps"], ["sliced"]),
        _const("big", [4, 1, 1]),
        helper.make_node("Expand", ["sliced", "big"], ["expanded"]),
        helper.make_node("Transpose", ["expanded"], ["out"], perm=[2, 0, 1]),
    ]
    footprint = _agrees(_model(nodes, opset=opset))
    assert footprint.shapes["flat"] == (1, 3 * 32 * 32)
    assert footprint.shapes["padded"] == (1, 3 * 32 * 32 + 5)
    assert footprint.shapes["out"] == (500, 4, 1)  # items 1, 3, .., 999 of the padded row


def test_the_embedded_model_is_known_throughout_and_small():
    model = read_model(default_model_path())
    footprint = shapes.footprint(
        model.graph, {t.name: t.dims for t in model.tensors}, model.preprocess.input_size, model.preprocess.layout
    )
    assert footprint.known == footprint.nodes
    assert footprint.input_shape == (1, 3, 224, 224)
    assert footprint.shapes["logits"] == (1, 1000)
    assert footprint.largest == 96 * 112 * 112 * 4  # the first expanded block: 96 channels at 112 px
    assert footprint.weights == 4 * sum(t.size for t in model.tensors) + 2 * 8  # and the Reshape target (2 int64)
    assert footprint.peak < 64 << 20


def _pad_bomb() -> bytes:
    nodes = [
        _const("pads", [0, 0, 100_000, 100_000, 0, 0, 100_000, 100_000]),
        helper.make_node("Pad", ["x", "pads"], ["out"], name="pad"),
    ]
    return _model(nodes, opset=17).SerializeToString()


def _many_alive(count: int, side: int) -> bytes:
    """``count`` Expand outputs of side x side floats, all alive until one Sum reads them."""
    nodes = [_const("one", [1.0], np.float32), _const("shape", [side, side])]
    nodes += [helper.make_node("Expand", ["one", "shape"], [f"e{i}"], name=f"e{i}") for i in range(count)]
    nodes.append(helper.make_node("Sum", [f"e{i}" for i in range(count)], ["out"], name="sum"))
    return _model(nodes, opset=17).SerializeToString()


def test_one_huge_tensor_is_refused_naming_the_node_and_the_size():
    with pytest.raises(KlausFormatError) as caught:
        shapes.check(_pad_bomb(), "bomb.klaus")
    message = str(caught.value)
    assert message.startswith("bomb.klaus: node 'pad' (Pad) makes a 1x3x200032x200032 tensor of 457,910 MiB")
    assert "256 MiB" in message and "KLAUS_TRUST_MODEL=1" in message and "\n" not in message


def test_many_tensors_alive_at_once_are_refused_at_the_node_where_they_add_up():
    side = 7000  # 187 MiB each: under the 256 MiB one tensor may take
    assert shapes.footprint(_many_alive(3, side)).peak == 4 * (4 * side * side) + 4 * (3 * 32 * 32)  # and the image
    shapes.check(_many_alive(3, side), "ok.klaus")
    with pytest.raises(KlausFormatError, match=r"^many\.klaus: at node 'e5' \(Expand\) the activations alive at once"):
        shapes.check(_many_alive(8, side), "many.klaus")


def test_the_bounds_follow_the_memory_cap_and_trust_lifts_them(monkeypatch):
    monkeypatch.setenv("KLAUS_MAX_MEMORY_MB", "8192")
    shapes.check(_many_alive(8, 7000), "many.klaus")
    assert shapes.max_activation_bytes() == 2 << 30
    monkeypatch.setenv("KLAUS_MAX_MEMORY_MB", "256")
    with pytest.raises(KlausFormatError, match="64 MiB one activation"):
        shapes.check(_many_alive(1, 7000), "one.klaus")
    monkeypatch.setenv("KLAUS_TRUST_MODEL", "1")
    assert shapes.check(_pad_bomb(), "bomb.klaus") is None
    assert shapes.max_activation_bytes() is None


def test_sizes_that_come_from_the_image_are_left_unknown_not_refused():
    nodes = [
        helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
        helper.make_node("Cast", ["m"], ["n"], to=TensorProto.INT64),
        _const("ax", [0]),
        helper.make_node("Unsqueeze", ["n", "ax"], ["shape"]),
        helper.make_node("Expand", ["x", "shape"], ["out"], name="expand"),
    ]
    footprint = shapes.check(_model(nodes, opset=17).SerializeToString(), "data.klaus")
    assert footprint is not None and footprint.shapes["out"] is None


def test_bytes_that_are_not_a_graph_are_one_error():
    with pytest.raises(KlausFormatError, match=r"^x\.klaus: graph is not a valid ONNX protobuf"):
        shapes.check(b"\xff\xff\xff", "x.klaus")


def test_every_operator_the_policy_allows_has_a_shape_rule():
    """The walk and the operator policy name the same operators: one the policy lets in without a
    rule would go uncounted, one with a rule the policy refuses is dead code."""
    assert set(shapes._RULES) == set(onnxwire.CLASSIFIER_OPS)
