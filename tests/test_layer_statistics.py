"""Calibration statistics belong to the layer that reads an activation, not to the activation.

One small graph holds the shapes that broke per-tensor statistics: a 1x1, a 3x3 and a depthwise
convolution reading one tensor (ResNet's downsampling blocks, SqueezeNet's Fire, Inception's
branches), a Concat read by a grouped convolution, a MatMul whose weight is the first operand
(contracting axis -2) and one contracting the last axis of (batch, tokens, channels) values.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import classifier_model
from klaus import compression, onnxgraph
from klaus.compression import calibrate
from klaus.compression.budget import merged_stats
from klaus.compression.plan import calibration_stats, layer_readings
from klaus.compression.recipe import DEFAULT, Recipe
from klaus.labels import plain_label_rows
from klaus.preprocess import Preprocess

SIZE = 8
CLASSES = 10


def _classifier(nodes: list, inits: list, name: str) -> onnx.ModelProto:
    """A checked model of ``nodes``: image input (batch, 3, SIZE, SIZE), logits (batch, CLASSES)."""
    return classifier_model(nodes, inits, name, SIZE, CLASSES)


def shared_input_model(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.3) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("stem.weight", 8, 3, 3, 3),
        init("stem.bias", 8, scale=0.1),
        init("pw.weight", 16, 8, 1, 1),
        init("pw.bias", 16, scale=0.1),
        init("full.weight", 8, 8, 3, 3),
        init("full.bias", 8, scale=0.1),
        init("dw.weight", 8, 1, 3, 3),
        init("dw.bias", 8, scale=0.1),
        init("grp.weight", 32, 8, 1, 1),
        init("grp.bias", 32, scale=0.1),
        init("mm1.weight", 16, 32, scale=0.2),
        init("mm2.weight", 16, CLASSES, scale=0.2),
        numpy_helper.from_array(np.array([0, 32, SIZE * SIZE], np.int64), "tokens_shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "stem.weight", "stem.bias"], ["s"], name="/stem/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["s"], ["a"], name="/stem/Relu"),
        helper.make_node("Conv", ["a", "pw.weight", "pw.bias"], ["p"], name="/pw/Conv"),
        helper.make_node("Conv", ["a", "full.weight", "full.bias"], ["q"], name="/full/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["a", "dw.weight", "dw.bias"], ["d"], name="/dw/Conv", pads=[1, 1, 1, 1], group=8),
        helper.make_node("Concat", ["p", "q", "d"], ["c"], name="/cat/Concat", axis=1),
        helper.make_node("Conv", ["c", "grp.weight", "grp.bias"], ["g0"], name="/grp/Conv", group=4),
        helper.make_node("Relu", ["g0"], ["g"], name="/grp/Relu"),
        helper.make_node("Reshape", ["g", "tokens_shape"], ["t"], name="/tokens/Reshape"),
        helper.make_node("MatMul", ["mm1.weight", "t"], ["u"], name="/mm1/MatMul"),  # (16, 32) @ (N, 32, 64)
        helper.make_node("Transpose", ["u"], ["v"], name="/mm1/Transpose", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["v", "mm2.weight"], ["m"], name="/mm2/MatMul"),  # (N, 64, 16) @ (16, 10)
        helper.make_node("ReduceMean", ["m"], ["logits"], name="/pool/ReduceMean", axes=[1], keepdims=0),
    ]
    return _classifier(nodes, inits, "shared")


LAYERS = ("stem.weight", "pw.weight", "full.weight", "dw.weight", "grp.weight", "mm1.weight", "mm2.weight")
GPTQ_ALL = replace(DEFAULT, name="t", min_elements=1)


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((12, 3, SIZE, SIZE)).astype(np.float32)


def activations(model: onnx.ModelProto, batch: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    probe = onnxgraph.with_outputs(model, names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(names, session.run(names, {"input": batch}), strict=True))


def test_each_layer_gets_statistics_of_its_own_shape(batch):
    model = shared_input_model()
    _, weights = onnxgraph.split_weights(model)
    roles = onnxgraph.tensor_roles(model)
    stats = calibration_stats(model, weights, roles, GPTQ_ALL, batch)
    assert set(stats) == set(LAYERS)
    # three layers read "a": the 1x1 gets a Gram matrix, the 3x3 none, the depthwise its 3x3 windows
    assert stats["pw.weight"].gram.shape == (8, 8)
    assert stats["full.weight"].gram is None
    assert stats["dw.weight"].fits_windows(weights["dw.weight"].shape) and stats["dw.weight"].gram is None
    assert stats["grp.weight"].gram is None  # grouped: weighted rounding, its importance per group
    assert stats["mm1.weight"].gram.shape == (32, 32)  # contracts axis -2 of (N, 32, 64)
    assert stats["mm2.weight"].gram.shape == (16, 16)  # contracts the last axis of (N, 64, 16)
    acts = activations(model, batch, ["a", "c", "t", "v"])
    n = len(batch)
    assert stats["pw.weight"].count == stats["full.weight"].count == n * SIZE * SIZE
    assert stats["mm1.weight"].count == stats["mm2.weight"].count == n * SIZE * SIZE
    rows = {
        "pw.weight": np.moveaxis(acts["a"], 1, -1).reshape(-1, 8),
        "grp.weight": np.moveaxis(acts["c"], 1, -1).reshape(-1, 32),  # the Concat's 32 channels
        "mm1.weight": np.moveaxis(acts["t"], -2, -1).reshape(-1, 32),
        "mm2.weight": acts["v"].reshape(-1, 16),
    }
    for name, x in rows.items():
        x = x.astype(np.float64)
        np.testing.assert_allclose(stats[name].mean, x.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[name].energy, (x * x).mean(axis=0), rtol=1e-5, atol=1e-6)
        if stats[name].gram is not None:
            np.testing.assert_allclose(stats[name].sample_hessian, x.T @ x / len(x), rtol=1e-4, atol=1e-5)


def test_layers_that_read_alike_share_one_set_of_sums(batch):
    model = shared_input_model()
    roles = onnxgraph.tensor_roles(model)
    readings = {
        "pw.weight": calibrate.Reading("a", 1, gram=True),
        "also.pw": calibrate.Reading("a", 1, gram=True),
        "full.weight": calibrate.Reading("a", 1),
    }
    stats = calibrate.layer_statistics(model, batch, readings)
    assert stats["pw.weight"] is stats["also.pw"] and stats["full.weight"] is not stats["pw.weight"]
    merged = merged_stats(stats, calibrate.layer_statistics(model, batch[:3], readings))
    assert merged["pw.weight"] is merged["also.pw"]
    assert merged["pw.weight"].count == (len(batch) + 3) * SIZE * SIZE
    assert roles["full.weight"].activation == roles["pw.weight"].activation == "a"


def test_readings_follow_the_layer(batch):
    model = shared_input_model()
    _, weights = onnxgraph.split_weights(model)
    roles = onnxgraph.tensor_roles(model)
    readings = layer_readings(model, weights, roles, GPTQ_ALL, list(LAYERS))
    assert readings["mm1.weight"] == calibrate.Reading("t", -2, gram=True)
    assert readings["mm2.weight"] == calibrate.Reading("v", -1, gram=True)
    assert readings["full.weight"] == calibrate.Reading("a", 1, gram=False)
    assert readings["dw.weight"].window == calibrate.Window((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    plain = layer_readings(model, weights, roles, replace(GPTQ_ALL, method="kmeans"), list(LAYERS))
    assert not any(r.gram or r.window for r in plain.values())


@pytest.mark.parametrize("recipe", [GPTQ_ALL, replace(GPTQ_ALL, method="kmeans", weighted=True, granularity="tensor")])
def test_calibrated_build_of_shared_inputs(batch, recipe):
    """GPTQ and weighted k-means build every layer from its own statistics; the decoded graph stays
    close to the float one."""
    model = shared_input_model()
    card = compression.ModelCard("shared", "tests", "CC0-1.0", "klaus tests")
    built = compression.compress_onnx(
        model,
        recipe,
        preprocess=Preprocess(input_size=SIZE),
        labels=plain_label_rows([str(i) for i in range(CLASSES)]),
        card=card,
        calibration=batch,
    )
    palettized = {t.name for t in built.tensors if t.codec == "palette-png"}
    assert set(LAYERS) <= palettized
    ref = activations(model, batch, ["logits"])["logits"]
    decoded = onnxgraph.to_onnx(built)
    out = ort.InferenceSession(decoded.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input": batch}
    )[0]
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_gptq_refuses_no_hessian_of_another_shape():
    """A Gram matrix that does not fit the weight (handed over by mistake) means k-means, not a traceback."""
    from klaus.compression.quantize import quantize_tensor

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    stats = calibrate.InputStats.empty(8, with_gram=True)
    stats.add(rng.standard_normal((4, 8, 5, 5)).astype(np.float32))
    role = onnxgraph.TensorRole("conv", 0, "n", op="Conv", activation="a")
    q = quantize_tensor(w, role, 4, Recipe(method="gptq"), stats)
    assert q.decode().shape == w.shape


def padded_window_model(seed: int = 0) -> onnx.ModelProto:
    """A 7x7 depthwise convolution over a 2x2 map (ConvNeXt's last stage at a small input): most of its
    taps only ever read padding."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 3, 4, 4)) * 0.3).astype(np.float32), "stem.weight"),
        numpy_helper.from_array((rng.standard_normal((16, 1, 7, 7)) * 0.3).astype(np.float32), "dw.weight"),
        numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "dw.bias"),
        numpy_helper.from_array((rng.standard_normal((CLASSES, 16)) * 0.3).astype(np.float32), "fc.weight"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "stem.weight"], ["s"], name="/stem/Conv", strides=[4, 4]),
        helper.make_node("Conv", ["s", "dw.weight", "dw.bias"], ["d"], name="/dw/Conv", pads=[3, 3, 3, 3], group=16),
        helper.make_node("GlobalAveragePool", ["d"], ["g"], name="/pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="/flatten"),
        helper.make_node("Gemm", ["f", "fc.weight"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    return _classifier(nodes, inits, "padded")


def test_taps_that_read_only_padding_do_not_move_the_bias(batch):
    """GPTQ zeroes a depthwise tap that never sees data (it moves no output); bias correction must not
    count that change against the channel's mean input."""
    model = padded_window_model()
    card = compression.ModelCard("padded", "tests", "CC0-1.0", "klaus tests")
    recipe = Recipe(name="t", fc_bits=None, conv_bits=None, depthwise_bits=8, min_elements=1, method="gptq")
    built = compression.compress_onnx(
        model,
        recipe,
        preprocess=Preprocess(input_size=SIZE),
        labels=plain_label_rows([str(i) for i in range(CLASSES)]),
        card=card,
        calibration=batch,
    )
    decoded = {t.name: t for t in onnxgraph.to_onnx(built).graph.initializer}
    original = {t.name: t for t in model.graph.initializer}
    dw = numpy_helper.to_array(decoded["dw.weight"])
    assert np.abs(dw[:, :, 0, :]).max() < 0.01 * np.abs(dw).max()  # the top row reads padding only: zeroed
    bias_change = numpy_helper.to_array(decoded["dw.bias"]) - numpy_helper.to_array(original["dw.bias"])
    assert np.abs(bias_change).max() < 0.01 * np.abs(numpy_helper.to_array(original["dw.bias"])).max()
