"""Shared fixtures: a tiny real ONNX classifier built in code, and paths to project data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from klaus import compression
from klaus.compression.recipe import LOSSLESS, Recipe
from klaus.labels import plain_label_rows
from klaus.preprocess import Preprocess
from klaus.staging import CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SHARED_DATA = ROOT.parent / "shared" / "data"
IMAGENET_SAMPLE = SHARED_DATA / "imagenet-sample"
TINY_CLASSES = 10
TINY_SIZE = 32


def make_tiny_onnx(seed: int = 0, classes: int = TINY_CLASSES) -> onnx.ModelProto:
    """Conv3x3(3->16) + ReLU + depthwise 3x3 + ReLU + Conv1x1(16->64) + ReLU + GAP + Gemm(64->classes).

    Big enough that every layer kind is palettized with a small ``min_elements``.
    """
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.3) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("stem.weight", 16, 3, 3, 3),
        init("stem.bias", 16, scale=0.1),
        init("dw.weight", 16, 1, 3, 3),
        init("dw.bias", 16, scale=0.1),
        init("pw.weight", 64, 16, 1, 1),
        init("pw.bias", 64, scale=0.1),
        init("fc.weight", classes, 64, scale=0.2),
        init("fc.bias", classes, scale=0.1),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["input", "stem.weight", "stem.bias"], ["s"], name="/stem/Conv", pads=[1, 1, 1, 1], strides=[2, 2]
        ),
        helper.make_node("Relu", ["s"], ["s_act"], name="/stem/Relu"),
        helper.make_node(
            "Conv", ["s_act", "dw.weight", "dw.bias"], ["d"], name="/dw/Conv", pads=[1, 1, 1, 1], group=16
        ),
        helper.make_node("Relu", ["d"], ["d_act"], name="/dw/Relu"),
        helper.make_node("Conv", ["d_act", "pw.weight", "pw.bias"], ["p"], name="/pw/Conv"),
        helper.make_node("Relu", ["p"], ["p_act"], name="/pw/Relu"),
        helper.make_node("GlobalAveragePool", ["p_act"], ["g"], name="/pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="/flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="/fc/Gemm", transB=1),
    ]
    return classifier_model(nodes, inits, "tiny", TINY_SIZE, classes)


def classifier_model(nodes: list, inits: list, name: str, size: int, classes: int) -> onnx.ModelProto:
    """A checked opset-17 model of ``nodes``: image input (batch, 3, size, size), logits (batch, classes)."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="klaus-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def feature_map_output(model: onnx.ModelProto) -> None:
    """Break a tiny model: the feature map (N, 64, 16, 16) as its only output, so it is not a classifier."""
    del model.graph.node[6:]
    del model.graph.initializer[6:]
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("p_act", TensorProto.FLOAT, ["batch", 64, 16, 16]))


def string_input(model: onnx.ModelProto) -> None:
    """Break a tiny model: its image input becomes a string tensor."""
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.STRING


TINY_PREPROCESS = Preprocess(input_size=TINY_SIZE, crop_ratio=0.875)
TINY_RECIPE = Recipe(name="tiny", fc_bits=4, conv_bits=6, depthwise_bits=6, min_elements=64)


def tiny_klaus(recipe: Recipe = TINY_RECIPE, calibration: np.ndarray | None = None):
    model = make_tiny_onnx()
    names = [f"class {i}" for i in range(TINY_CLASSES)]
    card = compression.ModelCard("tiny", "tests/conftest.py", "CC0-1.0", "klaus tests")
    return compression.compress_onnx(
        model, recipe, preprocess=TINY_PREPROCESS, labels=plain_label_rows(names), card=card, calibration=calibration
    )


@pytest.fixture(autouse=True, scope="session")
def _weights_cache_of_the_test_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The test run's own weights cache (:mod:`klaus.staging`), never the user's; the klaus commands
    the tests start inherit it."""
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("weights-cache"))


@pytest.fixture
def tiny_onnx() -> onnx.ModelProto:
    return make_tiny_onnx()


@pytest.fixture
def tiny_onnx_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(make_tiny_onnx(), path)
    return path


@pytest.fixture
def tiny_klaus_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.klaus"
    compression.write(tiny_klaus(), path)
    return path


@pytest.fixture
def tiny_lossless_path(tmp_path: Path) -> Path:
    path = tmp_path / "tiny-lossless.klaus"
    compression.write(tiny_klaus(LOSSLESS), path)
    return path


@pytest.fixture
def imagenet_sample() -> Path:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"development data not present ({IMAGENET_SAMPLE}); CI has it")
    return IMAGENET_SAMPLE


def save_image(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    """``img`` written to ``path`` (format from the suffix unless ``fmt``); the path."""
    img.save(path, fmt, **kw)
    return path


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A seeded RGB noise image: resampling differences show in every pixel."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
