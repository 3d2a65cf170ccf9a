"""ONNX graph surgery (klaus.onnxgraph): split/join weights, tensor roles, skeleton
validation, simplification and weight renaming."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import TINY_CLASSES, TINY_SIZE, make_tiny_onnx
from klaus import onnxgraph
from klaus.errors import KlausFormatError, KlausModelError
from klaus.onnxgraph import TensorRole
from klaus.runtime import run_batches

TINY_WEIGHTS = ["stem.weight", "stem.bias", "dw.weight", "dw.bias", "pw.weight", "pw.bias", "fc.weight", "fc.bias"]


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def probe(n: int = 3) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)


def copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def single_node_model(
    op: str, weight: np.ndarray, x_shape, y_shape, bias: np.ndarray | None = None, **attrs
) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(weight, "W")]
    inputs = ["X", "W"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "B"))
        inputs.append("B")
    node = helper.make_node(op, inputs, ["Y"], name=f"/layer/{op}", **attrs)
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def with_reshape(model: onnx.ModelProto) -> onnx.ModelProto:
    """The tiny model with Flatten replaced by Reshape, whose shape is an int64 initializer."""
    model = copy(model)
    for i, node in enumerate(model.graph.node):
        if node.op_type == "Flatten":
            model.graph.node.remove(node)
            model.graph.node.insert(i, helper.make_node("Reshape", ["g", "shape"], ["f"], name="/flatten/Reshape"))
            break
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "shape"))
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------- split / join


def test_split_weights_removes_every_float_initializer(tiny_onnx):
    skeleton, weights = onnxgraph.split_weights(tiny_onnx)
    assert list(weights) == TINY_WEIGHTS  # graph order
    assert len(skeleton.graph.initializer) == 0
    assert len(tiny_onnx.graph.initializer) == len(TINY_WEIGHTS)  # the input is not modified
    for init in tiny_onnx.graph.initializer:
        array = numpy_helper.to_array(init)
        assert weights[init.name].dtype == np.float32
        assert np.array_equal(weights[init.name], array)
    # everything except the initializers is unchanged
    stripped = copy(tiny_onnx)
    del stripped.graph.initializer[:]
    assert skeleton.SerializeToString(deterministic=True) == stripped.SerializeToString(deterministic=True)
    assert len(skeleton.SerializeToString()) < 1000 < len(tiny_onnx.SerializeToString())


def test_split_weights_keeps_non_float_initializers(tiny_onnx):
    model = with_reshape(tiny_onnx)
    skeleton, weights = onnxgraph.split_weights(model)
    assert [t.name for t in skeleton.graph.initializer] == ["shape"]
    assert skeleton.graph.initializer[0].data_type == TensorProto.INT64
    assert "shape" not in weights and list(weights) == TINY_WEIGHTS


@pytest.mark.parametrize("reshape", [False, True])
def test_join_weights_round_trip(tiny_onnx, reshape):
    model = with_reshape(tiny_onnx) if reshape else tiny_onnx
    skeleton, weights = onnxgraph.split_weights(model)
    joined = onnxgraph.join_weights(skeleton, weights)
    onnx.checker.check_model(joined)
    assert len(skeleton.graph.initializer) == (1 if reshape else 0)  # the skeleton is not modified
    names = [t.name for t in joined.graph.initializer]
    assert sorted(names) == sorted(t.name for t in model.graph.initializer)
    for init in joined.graph.initializer:
        original = next(t for t in model.graph.initializer if t.name == init.name)
        assert init.data_type == original.data_type
        assert np.array_equal(numpy_helper.to_array(init), numpy_helper.to_array(original))
    x = probe()
    assert np.array_equal(run(joined, x), run(model, x))


def test_join_weights_is_byte_identical_for_a_float_only_model(tiny_onnx):
    skeleton, weights = onnxgraph.split_weights(tiny_onnx)
    joined = onnxgraph.join_weights(skeleton, weights)
    assert joined.SerializeToString(deterministic=True) == tiny_onnx.SerializeToString(deterministic=True)


def test_join_weights_converts_to_float32_and_keeps_order(tiny_onnx):
    skeleton, weights = onnxgraph.split_weights(tiny_onnx)
    reordered = {name: weights[name].astype(np.float64) for name in reversed(TINY_WEIGHTS)}
    joined = onnxgraph.join_weights(skeleton, reordered)
    assert [t.name for t in joined.graph.initializer] == list(reversed(TINY_WEIGHTS))
    assert all(t.data_type == TensorProto.FLOAT for t in joined.graph.initializer)
    x = probe()
    assert np.array_equal(run(joined, x), run(tiny_onnx, x))


def test_split_of_a_non_float32_float_initializer_is_kept(tiny_onnx):
    model = copy(tiny_onnx)
    model.graph.initializer.append(numpy_helper.from_array(np.ones(3, np.float16), "half"))
    skeleton, weights = onnxgraph.split_weights(model)
    assert "half" not in weights
    assert [t.name for t in skeleton.graph.initializer] == ["half"]
    assert [t.name for t in onnxgraph.float_initializers(model)] == TINY_WEIGHTS


# ---------------------------------------------------------------- tensor roles


def test_tensor_roles_of_the_tiny_model(tiny_onnx):
    roles = onnxgraph.tensor_roles(tiny_onnx)
    assert set(roles) == set(TINY_WEIGHTS)
    assert roles["stem.weight"] == TensorRole(
        "conv", 0, "/stem/Conv", op="Conv", activation="input", output="s", bias="stem.bias", group=1
    )
    assert roles["dw.weight"] == TensorRole(
        "depthwise", 0, "/dw/Conv", op="Conv", activation="s_act", output="d", bias="dw.bias", group=16
    )
    assert roles["pw.weight"] == TensorRole(
        "conv", 0, "/pw/Conv", op="Conv", activation="d_act", output="p", bias="pw.bias", group=1
    )
    # Gemm with transB=1: weight is (classes, in), output channels on axis 0
    assert roles["fc.weight"] == TensorRole(
        "fc", 0, "/fc/Gemm", op="Gemm", activation="f", output="logits", bias="fc.bias"
    )
    for bias in ("stem.bias", "dw.bias", "pw.bias", "fc.bias"):
        assert roles[bias] == TensorRole("other", 0, "")


def test_gemm_without_transpose_has_output_channels_on_axis_1():
    w = np.ones((64, TINY_CLASSES), np.float32)
    model = single_node_model("Gemm", w, [1, 64], [1, TINY_CLASSES], bias=np.zeros(TINY_CLASSES, np.float32))
    roles = onnxgraph.tensor_roles(model)
    assert roles["W"] == TensorRole("fc", 1, "/layer/Gemm", op="Gemm", activation="X", output="Y", bias="B")
    assert roles["B"].kind == "other"


@pytest.mark.parametrize(("trans_b", "shape", "axis"), [(0, (64, 10), 1), (1, (10, 64), 0)])
def test_gemm_out_axis_indexes_output_channels(trans_b, shape, axis):
    model = single_node_model("Gemm", np.ones(shape, np.float32), [1, 64], [1, 10], transB=trans_b)
    role = onnxgraph.tensor_roles(model)["W"]
    assert role.kind == "fc" and role.out_axis == axis
    assert shape[role.out_axis] == 10  # the axis really is the output width


def test_gemm_with_transposed_input_contracts_its_axis_0():
    model = single_node_model("Gemm", np.ones((64, 10), np.float32), [64, 1], [1, 10], transA=1)
    role = onnxgraph.tensor_roles(model)["W"]
    assert (role.kind, role.out_axis, role.in_axis, role.activation) == ("fc", 1, 0, "X")


def weight_first_model(op: str, weight: np.ndarray, x_shape, y_shape, **attrs) -> onnx.ModelProto:
    """One node computing ``op(W, X)``: the weight is the first operand."""
    node = helper.make_node(op, ["W", "X"], ["Y"], name=f"/layer/{op}", **attrs)
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize(
    ("op", "w_shape", "x_shape", "y_shape", "attrs", "out_axis", "in_axis"),
    [
        ("MatMul", (10, 64), [2, 64, 7], [2, 10, 7], {}, 0, -2),
        ("Gemm", (10, 64), [64, 3], [10, 3], {}, 0, 0),
        ("Gemm", (64, 10), [3, 64], [10, 3], {"transA": 1, "transB": 1}, 1, 1),
    ],
)
def test_weight_as_the_first_operand(op, w_shape, x_shape, y_shape, attrs, out_axis, in_axis):
    """Y = W X: the role names the data input X and the axis of X the weight contracts; ONNX Runtime agrees
    on the shapes (the weight's output axis is Y's channel count, its other axis X's ``in_axis``)."""
    rng = np.random.default_rng(0)
    model = weight_first_model(op, rng.standard_normal(w_shape).astype(np.float32), x_shape, y_shape, **attrs)
    role = onnxgraph.tensor_roles(model)["W"]
    assert (role.kind, role.activation, role.out_axis, role.in_axis) == ("fc", "X", out_axis, in_axis)
    x = rng.standard_normal(x_shape).astype(np.float32)
    y = run(model, x)
    assert w_shape[out_axis] == 10 and w_shape[1 - out_axis] == x.shape[in_axis] == 64
    assert y.shape == tuple(y_shape)


def test_matmul_on_tokens_contracts_the_last_axis():
    model = single_node_model("MatMul", np.ones((64, 10), np.float32), [1, 5, 64], [1, 5, 10])
    role = onnxgraph.tensor_roles(model)["W"]
    assert (role.out_axis, role.in_axis) == (1, -1)


def test_matmul_weight_is_fc_on_axis_1():
    model = single_node_model("MatMul", np.ones((64, 10), np.float32), [1, 64], [1, 10])
    role = onnxgraph.tensor_roles(model)["W"]
    assert role == TensorRole("fc", 1, "/layer/MatMul", op="MatMul", activation="X", output="Y", bias="", in_axis=-1)


def test_conv_transpose_has_output_channels_on_axis_1():
    model = single_node_model("ConvTranspose", np.ones((8, 4, 3, 3), np.float32), [1, 8, 5, 5], [1, 4, 7, 7])
    role = onnxgraph.tensor_roles(model)["W"]
    assert role.kind == "conv" and role.out_axis == 1 and role.op == "ConvTranspose"


def test_grouped_conv_that_is_not_depthwise():
    model = single_node_model("Conv", np.ones((8, 2, 3, 3), np.float32), [1, 8, 5, 5], [1, 8, 3, 3], group=4)
    role = onnxgraph.tensor_roles(model)["W"]
    assert role.kind == "conv" and role.group == 4


def test_conv1d_weight_is_conv():
    model = single_node_model("Conv", np.ones((6, 3, 5), np.float32), [1, 3, 9], [1, 6, 5])
    assert onnxgraph.tensor_roles(model)["W"].kind == "conv"


def test_weight_used_by_other_ops_is_other():
    model = single_node_model("Mul", np.ones((1, 4), np.float32), [1, 4], [1, 4])
    assert onnxgraph.tensor_roles(model)["W"] == TensorRole("other", 0, "")


def test_first_consumer_decides_the_role(tiny_onnx):
    model = copy(tiny_onnx)
    # a later Mul also reads fc.weight: the Gemm (earlier) still decides
    model.graph.node.append(helper.make_node("Mul", ["fc.weight", "fc.weight"], ["unused"], name="/extra/Mul"))
    assert onnxgraph.tensor_roles(model)["fc.weight"].op == "Gemm"


def test_roles_link_layers_in_a_chain(tiny_onnx):
    """Each layer's activation is produced by the previous node: the chain calibration needs."""
    roles = onnxgraph.tensor_roles(tiny_onnx)
    producers = {out: node for node in tiny_onnx.graph.node for out in node.output}
    assert roles["stem.weight"].activation == tiny_onnx.graph.input[0].name
    for name in ("dw.weight", "pw.weight", "fc.weight"):
        assert roles[name].activation in producers
    for name in ("stem.weight", "dw.weight", "pw.weight", "fc.weight"):
        role = roles[name]
        node = next(n for n in tiny_onnx.graph.node if n.name == role.node)
        assert list(node.input[:2]) == [role.activation, name]
        assert node.output[0] == role.output
        assert node.input[2] == role.bias


# ---------------------------------------------------------------- validate_skeleton


def test_valid_skeleton_passes(tiny_onnx):
    onnxgraph.validate_skeleton(tiny_onnx, "tiny")
    skeleton, _ = onnxgraph.split_weights(tiny_onnx)
    onnxgraph.validate_skeleton(skeleton, "tiny")


@pytest.mark.parametrize("version", [onnxgraph.MIN_OPSET, onnxgraph.MAX_OPSET])
def test_opset_range_bounds_are_accepted(tiny_onnx, version):
    model = copy(tiny_onnx)
    model.opset_import[0].version = version
    onnxgraph.validate_skeleton(model, "m")


def test_ai_onnx_domain_name_is_accepted(tiny_onnx):
    model = copy(tiny_onnx)
    model.opset_import.append(helper.make_opsetid("ai.onnx", 17))
    onnxgraph.validate_skeleton(model, "m")


@pytest.mark.parametrize("domain", ["com.microsoft", "ai.onnx.ml", "ai.onnx.contrib", "my.custom"])
def test_custom_domain_import_is_rejected(tiny_onnx, domain):
    model = copy(tiny_onnx)
    model.opset_import.append(helper.make_opsetid(domain, 1))
    with pytest.raises(KlausFormatError, match=f"where.klaus: graph imports operator domain '{domain}'"):
        onnxgraph.validate_skeleton(model, "where.klaus")


def test_custom_domain_node_is_rejected(tiny_onnx):
    model = copy(tiny_onnx)
    model.graph.node[1].domain = "com.microsoft"  # no matching opset import
    with pytest.raises(KlausFormatError, match=r"node '/stem/Relu' uses operator domain 'com\.microsoft'"):
        onnxgraph.validate_skeleton(model, "m")


def test_custom_domain_node_inside_a_subgraph_is_rejected():
    inner = helper.make_graph(
        [helper.make_node("FusedGemm", ["a", "a"], ["o"], name="inner", domain="com.microsoft")],
        "then",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["o2"], name="ok")],
        "else",
        [],
        [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [1])],
    )
    node = helper.make_node("If", ["c"], ["y"], name="/if", then_branch=inner, else_branch=other)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(KlausFormatError, match=r"node 'inner' uses operator domain 'com\.microsoft'"):
        onnxgraph.validate_skeleton(model, "m")
    # the same If with a standard then-branch is fine
    then = next(a.g for a in model.graph.node[0].attribute if a.name == "then_branch")
    then.node[0].domain = ""
    then.node[0].op_type = "Add"
    onnxgraph.validate_skeleton(model, "m")


def test_custom_domain_node_inside_a_graphs_attribute_is_rejected():
    bad = helper.make_graph(
        [helper.make_node("Evil", ["a"], ["o"], name="deep", domain="evil")],
        "b",
        [],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1])],
    )
    node = helper.make_node("Identity", ["a"], ["y"], name="/holder")
    node.attribute.append(helper.make_attribute("branches", [bad]))
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert node.attribute[0].type == onnx.AttributeProto.GRAPHS
    with pytest.raises(KlausFormatError, match="node 'deep'"):
        onnxgraph.validate_skeleton(model, "m")


@pytest.mark.parametrize("version", [1, onnxgraph.MIN_OPSET - 1, onnxgraph.MAX_OPSET + 1, 1000])
def test_out_of_range_opset_is_rejected(tiny_onnx, version):
    model = copy(tiny_onnx)
    model.opset_import[0].version = version
    with pytest.raises(
        KlausFormatError, match=f"opset {version}, supported {onnxgraph.MIN_OPSET}..{onnxgraph.MAX_OPSET}"
    ):
        onnxgraph.validate_skeleton(model, "m")


def test_local_functions_are_rejected(tiny_onnx):
    model = copy(tiny_onnx)
    function = helper.make_function(
        "local.fns", "Twice", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])], [helper.make_opsetid("", 17)]
    )
    model.functions.append(function)
    with pytest.raises(KlausFormatError, match="m: graph defines local functions"):
        onnxgraph.validate_skeleton(model, "m")


def test_external_data_is_rejected(tiny_onnx):
    model = copy(tiny_onnx)
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    init.external_data.add(key="location", value="../../etc/passwd")
    with pytest.raises(KlausFormatError, match="m: graph refers to external tensor data"):
        onnxgraph.validate_skeleton(model, "m")


def test_check_model_turns_checker_errors_into_format_errors(tiny_onnx):
    skeleton, _ = onnxgraph.split_weights(tiny_onnx)  # weights missing: invalid graph
    with pytest.raises(KlausFormatError, match=r"f\.klaus: ONNX graph is invalid"):
        onnxgraph.check_model(skeleton, "f.klaus")
    onnxgraph.check_model(tiny_onnx, "f.klaus")  # and a valid model passes


# ---------------------------------------------------------------- simplify


def foldable_model() -> onnx.ModelProto:
    """The tiny model plus constant arithmetic, an Identity and unused opset imports."""
    model = make_tiny_onnx()
    graph = model.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(2.0, np.float32), "two"),
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
        ]
    )
    graph.node[-1].output[0] = "raw_logits"
    graph.node.extend(
        [
            helper.make_node("Mul", ["two", "half"], ["one"], name="/const/Mul"),
            helper.make_node("Identity", ["raw_logits"], ["same"], name="/id"),
            helper.make_node("Mul", ["same", "one"], ["logits"], name="/scale/Mul"),
        ]
    )
    model.opset_import.extend([helper.make_opsetid("ai.onnx.ml", 3), helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    return model


def test_simplify_keeps_outputs_and_folds_constants():
    model = foldable_model()
    simple = onnxgraph.simplify(model)
    ops = [n.op_type for n in simple.graph.node]
    assert "Identity" not in ops
    assert ops.count("Mul") <= 1  # the constant Mul is folded away
    assert len(simple.graph.node) < len(model.graph.node)
    x = probe(4)
    want, got = run(model, x), run(simple, x)
    assert got.shape == want.shape == (4, TINY_CLASSES)
    assert np.max(np.abs(got - want)) < 1e-5


def test_simplify_drops_unused_opset_imports():
    model = foldable_model()
    assert {o.domain for o in model.opset_import} == {"", "ai.onnx.ml", "com.microsoft"}
    simple = onnxgraph.simplify(model)
    used = {n.domain for n in simple.graph.node} | {""}
    assert {o.domain for o in simple.opset_import} <= used
    assert {o.domain for o in simple.opset_import} == {""}
    onnxgraph.validate_skeleton(simple, "simplified")  # standard ONNX only
    onnx.checker.check_model(simple)


def test_simplify_keeps_the_tiny_model_intact(tiny_onnx):
    simple = onnxgraph.simplify(tiny_onnx)
    x = probe(2)
    assert np.max(np.abs(run(simple, x) - run(tiny_onnx, x))) < 1e-5
    assert {t.name for t in simple.graph.initializer} == set(TINY_WEIGHTS)
    roles = onnxgraph.tensor_roles(simple)
    assert [roles[n].kind for n in ("stem.weight", "dw.weight", "pw.weight", "fc.weight")] == [
        "conv",
        "depthwise",
        "conv",
        "fc",
    ]


# ---------------------------------------------------------------- rename_weights


def exporter_named_model() -> onnx.ModelProto:
    """The tiny model with exporter-style weight names (``onnx::Conv_911``)."""
    model = make_tiny_onnx()
    renames = {name: f"onnx::{i}_{900 + i}" for i, name in enumerate(TINY_WEIGHTS)}
    for t in model.graph.initializer:
        t.name = renames[t.name]
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
    onnx.checker.check_model(model)
    return model


def test_rename_weights_names_weights_after_their_layer():
    model = exporter_named_model()
    assert "stem.weight" not in {t.name for t in model.graph.initializer}
    x = probe()
    before = run(model, x)
    renamed = onnxgraph.rename_weights(copy(model))
    assert [t.name for t in renamed.graph.initializer] == TINY_WEIGHTS  # "/stem/Conv" -> stem.weight, stem.bias
    onnx.checker.check_model(renamed)
    assert np.array_equal(run(renamed, x), before)
    conv = next(n for n in renamed.graph.node if n.name == "/stem/Conv")
    assert list(conv.input) == ["input", "stem.weight", "stem.bias"]
    gemm = next(n for n in renamed.graph.node if n.name == "/fc/Gemm")
    assert list(gemm.input) == ["f", "fc.weight", "fc.bias"]


def test_rename_weights_uses_nested_layer_paths_and_plain_node_names():
    model = exporter_named_model()
    nodes = {n.name: n for n in model.graph.node}
    nodes["/stem/Conv"].name = "/features/0/conv/Conv"
    nodes["/fc/Gemm"].name = "classifier"
    renamed = onnxgraph.rename_weights(copy(model))
    names = [t.name for t in renamed.graph.initializer]
    assert names[:2] == ["features.0.conv.weight", "features.0.conv.bias"]
    assert names[-2:] == ["classifier.weight", "classifier.bias"]
    x = probe()
    assert np.array_equal(run(renamed, x), run(model, x))


def test_rename_weights_skips_unnamed_nodes():
    model = exporter_named_model()
    next(n for n in model.graph.node if n.name == "/pw/Conv").name = ""
    renamed = onnxgraph.rename_weights(copy(model))
    names = [t.name for t in renamed.graph.initializer]
    assert names[4:6] == ["onnx::4_904", "onnx::5_905"]
    assert names[:4] == TINY_WEIGHTS[:4]


def test_rename_weights_keeps_names_when_layers_are_ambiguous():
    model = exporter_named_model()
    nodes = {n.name: n for n in model.graph.node}
    nodes["/stem/Conv"].name = "/block/Conv"  # both would be "block.weight"
    nodes["/dw/Conv"].name = "/block/Conv_1"
    assert len({n.name for n in model.graph.node}) == len(model.graph.node)
    before = [t.name for t in model.graph.initializer]
    renamed = onnxgraph.rename_weights(copy(model))
    assert [t.name for t in renamed.graph.initializer] == before[:4] + TINY_WEIGHTS[4:]  # the others are named


def test_rename_weights_keeps_names_that_would_collide():
    model = exporter_named_model()
    # an unrelated, unused initializer already owns the name the stem weight would get
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "stem.weight"))
    before = [t.name for t in model.graph.initializer]
    renamed = onnxgraph.rename_weights(copy(model))
    assert [t.name for t in renamed.graph.initializer] == [before[0], *TINY_WEIGHTS[1:], "stem.weight"]
    onnx.checker.check_model(renamed)


@pytest.mark.parametrize(
    ("node_name", "layer"),
    [
        ("/layer2/layer2.0/downsample/downsample.0/Conv", "layer2.0.downsample.0"),  # torch.onnx scopes
        ("/features/features.1/block/block.0/block.0.0/Conv", "features.1.block.0.0"),
        ("/stem/stem.0/Conv", "stem.0"),
        ("/classifier/classifier.3/Gemm", "classifier.3"),
        ("/_blocks.3/_expand_conv/Conv", "_blocks.3._expand_conv"),  # EfficientNet-Lite's
        ("/block/block/Conv", "block.block"),  # a child named as its parent is kept
        ("/features/0/conv/Conv", "features.0.conv"),
    ],
)
def test_rename_weights_gives_module_paths_once(node_name, layer):
    model = exporter_named_model()
    next(n for n in model.graph.node if n.name == "/stem/Conv").name = node_name
    renamed = onnxgraph.rename_weights(copy(model))
    assert [t.name for t in renamed.graph.initializer][:2] == [f"{layer}.weight", f"{layer}.bias"]


def test_rename_weights_keeps_meaningful_names():
    """Names the exporter took from the model (``head.weight``) stay, even if the node name says otherwise."""
    model = make_tiny_onnx()
    for node in model.graph.node:
        node.name = f"/elsewhere{node.name}"
    renamed = onnxgraph.rename_weights(copy(model))
    assert [t.name for t in renamed.graph.initializer] == TINY_WEIGHTS


def test_rename_weights_names_a_matmul_after_the_bias_of_its_add():
    """torch.onnx writes Linear on 3-D values as MatMul (an invented, transposed weight) + Add (the named bias)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["X", "onnx::MatMul_215"], ["m"], name="/layers/layers.0/qkv/MatMul"),
        helper.make_node("Add", ["encoder.layers.0.qkv.bias", "m"], ["Y"], name="/layers/layers.0/qkv/Add"),
    ]
    graph = helper.make_graph(
        nodes,
        "vit",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 5, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 5, 6])],
        [
            numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "onnx::MatMul_215"),
            numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "encoder.layers.0.qkv.bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    renamed = onnxgraph.rename_weights(copy(model))
    assert [t.name for t in renamed.graph.initializer] == ["encoder.layers.0.qkv.weight", "encoder.layers.0.qkv.bias"]
    onnx.checker.check_model(renamed)


def test_rename_weights_reads_the_dynamo_exporters_names():
    """torch.onnx's dynamo exporter keeps parameter names, folds batch norm into ``<weight>_bias``, and
    names invented tensors ``val_N`` on nodes whose scope metadata holds the module path."""
    model = make_tiny_onnx()
    renames = {"stem.bias": "stem.weight_bias", "pw.weight": "val_13", "pw.bias": "val_14"}
    for t in model.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.name = f"node_{node.op_type}_{len(node.name)}"
    pw = next(n for n in model.graph.node if "val_13" in n.input)
    pw.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'features', 'features.pw', 'conv2d_3']")
    renamed = onnxgraph.rename_weights(copy(model))
    names = [t.name for t in renamed.graph.initializer]
    assert names[:2] == ["stem.weight", "stem.bias"]
    assert names[4:6] == ["features.pw.weight", "features.pw.bias"]


def test_invented_names():
    for name in ("onnx::Conv_911", "val_13", "_val_2", "123", "/features/Constant_output_0", ""):
        assert onnxgraph.invented_name(name), name
    for name in ("layer1.0.conv1.weight", "_fc.weight", "classifier.3.bias", "conv/kernel:0"):
        assert not onnxgraph.invented_name(name), name


def test_rename_weights_is_idempotent_on_good_names(tiny_onnx):
    before = tiny_onnx.SerializeToString(deterministic=True)
    renamed = onnxgraph.rename_weights(copy(tiny_onnx))
    assert renamed.SerializeToString(deterministic=True) == before


# ---------------------------------------------------------------- load_onnx


def test_load_onnx_reads_a_model(tiny_onnx_path, tiny_onnx):
    model = onnxgraph.load_onnx(str(tiny_onnx_path))
    assert model.SerializeToString(deterministic=True) == tiny_onnx.SerializeToString(deterministic=True)


def test_load_onnx_missing_file(tmp_path):
    path = tmp_path / "missing.onnx"
    with pytest.raises(KlausModelError, match=r"missing\.onnx: no such file"):
        onnxgraph.load_onnx(str(path))


@pytest.mark.parametrize("content", [b"\xff" * 64, b"this is not a protobuf\n" * 10, b"\x08"])
def test_load_onnx_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(content)
    with pytest.raises(KlausModelError, match=r"garbage\.onnx: not a readable ONNX model"):
        onnxgraph.load_onnx(str(path))


def test_load_onnx_directory(tmp_path):
    with pytest.raises(KlausModelError):
        onnxgraph.load_onnx(str(tmp_path))


def test_load_onnx_refuses_external_data(tmp_path, tiny_onnx):
    path = tmp_path / "ext.onnx"
    onnx.save_model(
        copy(tiny_onnx),
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.bin",
        size_threshold=0,
    )
    assert (tmp_path / "ext.bin").exists()
    with pytest.raises(KlausModelError, match="external-data ONNX models are not supported"):
        onnxgraph.load_onnx(str(path))


def test_load_onnx_refuses_an_empty_file(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(KlausModelError, match=f"^{empty}: not an ONNX model \\(empty file\\)$"):
        onnxgraph.load_onnx(str(empty))
    nodeless = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    path = tmp_path / "nodeless.onnx"
    onnx.save(nodeless, path)
    with pytest.raises(KlausModelError, match="holds no graph nodes"):
        onnxgraph.load_onnx(str(path))


def test_simplify_names_the_model_when_onnxruntime_refuses_it():
    model = make_tiny_onnx()
    model.graph.node[1].input[0] = "nowhere"  # reads a value nothing produces
    with pytest.raises(KlausModelError) as info:
        onnxgraph.simplify(model, "broken.onnx")
    message = str(info.value)
    assert message.startswith("broken.onnx: ONNX Runtime cannot load the model (") and "nowhere" in message
    assert "\n" not in message


def test_check_model_message_is_one_line():
    model = make_tiny_onnx()
    model.graph.node[1].input[0] = "nowhere"
    with pytest.raises(KlausFormatError) as info:
        onnxgraph.check_model(model, "m.onnx")
    message = str(info.value)
    assert message.startswith("m.onnx: ONNX graph is invalid (") and "'nowhere'" in message and "/stem/Relu" in message
    assert "\n" not in message


# ---------------------------------------------------------------- fixed batch size


def _with_batch(model: onnx.ModelProto, batch: int | str) -> onnx.ModelProto:
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        if isinstance(batch, int):
            dim.dim_value = batch
        else:
            dim.dim_param = batch
    return model


def test_fixed_batch(tiny_onnx):
    assert onnxgraph.fixed_batch(tiny_onnx) is None  # symbolic "batch"
    assert onnxgraph.fixed_batch(_with_batch(make_tiny_onnx(), 1)) == 1
    assert onnxgraph.fixed_batch(_with_batch(make_tiny_onnx(), 4)) == 4
    old_ir = _with_batch(make_tiny_onnx(), 2)  # before IR 4, initializers are listed as inputs too
    old_ir.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in old_ir.graph.initializer
    )
    old_ir.graph.input.insert(0, old_ir.graph.input.pop())  # even listed first
    assert onnxgraph.fixed_batch(old_ir) == 2


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("output", [None, "d_act"])
def test_run_batches_of_a_fixed_batch_graph(batch, output):
    """ONNX Runtime refuses any other batch size; the rows come back as the free graph gives them."""
    x = np.random.default_rng(0).standard_normal((7, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    fixed = _with_batch(make_tiny_onnx(), batch)
    with pytest.raises(Exception, match=r"[Ii]nvalid dimensions"):
        ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})
    expected = run_batches(make_tiny_onnx(), x, output)
    got = run_batches(fixed, x, output, chunk=64)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_batches_pads_the_last_batch_of_a_fixed_size():
    x = np.arange(7)[:, None] * np.ones((1, 2))
    parts = list(onnxgraph.batches(x, 64, 3))
    assert [(len(p), real) for p, real in parts] == [(3, 3), (3, 3), (3, 1)]
    np.testing.assert_array_equal(parts[-1][0], x[[6, 6, 6]])
    assert [(len(p), real) for p, real in onnxgraph.batches(x, 4, None)] == [(4, 4), (3, 3)]


def test_simplify_write_failure_is_a_write_error_not_a_bad_model(tiny_onnx, monkeypatch):
    """ONNX Runtime reports a failed write of the optimized graph as INVALID_PROTOBUF."""
    import onnxruntime

    from klaus.errors import KlausWriteError

    real = onnxruntime.InferenceSession

    def failing(blob, options=None, *args, **kwargs):
        if options is not None and options.optimized_model_filepath:
            raise RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Protobuf serialization failed.")
        return real(blob, options, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", failing)
    with pytest.raises(
        KlausWriteError, match=r"^cannot write a temporary file in .*\(ONNX Runtime: .*INVALID_PROTOBUF"
    ):
        onnxgraph.simplify(tiny_onnx, "tiny.onnx")
    broken = make_tiny_onnx()
    broken.graph.node[1].input[0] = "nowhere"  # a model ONNX Runtime cannot load is still the model's fault
    with pytest.raises(KlausModelError, match=r"^broken\.onnx: ONNX Runtime cannot load the model"):
        onnxgraph.simplify(broken, "broken.onnx")
