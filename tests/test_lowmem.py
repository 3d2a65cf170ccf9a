"""Low-memory mode: palettized weights stay uint8 indices in ONNX Runtime, outputs unchanged."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import EXAMPLES, TINY_RECIPE, TINY_SIZE, tiny_klaus
from klaus import compression, lowmem, onnxgraph, runtime
from klaus.cli import main
from klaus.codecs import PALETTE_CODECS
from klaus.errors import KlausModelError
from klaus.labels import plain_label_rows
from klaus.preprocess import Preprocess
from klaus.runtime import Classifier

CAT = str(EXAMPLES / "cat.jpg")


def batch(n: int = 3, size: int = TINY_SIZE) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((n, 3, size, size)).astype(np.float32)


def default_logits(model, x: np.ndarray) -> np.ndarray:
    return runtime.make_session(onnxgraph.to_onnx(model)).run(None, {"input": x})[0]


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("chunk", [None, 100, lowmem.DEFAULT_CHUNK_ELEMENTS])
def test_logits_equal_default_mode(granularity, chunk):
    model = tiny_klaus(TINY_RECIPE.with_bits(None, granularity=granularity))
    x = batch()
    low = lowmem.session(model, chunk_elements=chunk).run(None, {"input": x})[0]
    np.testing.assert_allclose(low, default_logits(model, x), atol=1e-4, rtol=0)


def test_self_contained_graph_matches_too():
    model = tiny_klaus()
    x = batch()
    low = lowmem.make_session(lowmem.to_lowmem_onnx(model, chunk_elements=100)).run(None, {"input": x})[0]
    np.testing.assert_allclose(low, default_logits(model, x), atol=1e-4, rtol=0)


def test_graph_keeps_indices_as_uint8_and_no_float_copy(tmp_path):
    model = tiny_klaus()
    palettized = {t.name: t for t in model.tensors if t.codec in PALETTE_CODECS}
    assert len(palettized) == 4
    graph, arrays, stats = lowmem.build(model, chunk_elements=None)
    assert arrays == {} and stats.chunked == 0
    inits = {t.name: t for t in graph.graph.initializer}
    uint8 = [t for t in inits.values() if t.data_type == TensorProto.UINT8]
    assert sum(int(np.prod(t.dims)) for t in uint8) == sum(t.size for t in palettized.values()) == stats.index_bytes
    assert not set(palettized) & set(inits)  # the weights themselves are node outputs now
    largest_float = max(int(np.prod(t.dims)) for t in inits.values() if t.data_type == TensorProto.FLOAT)
    assert largest_float < min(t.size for t in palettized.values())

    # ...and ONNX Runtime does not fold the decode nodes back into float32 constants.
    optimized = tmp_path / "optimized.onnx"
    lowmem.make_session(graph, optimized_model_path=str(optimized))
    ran = onnx.load(str(optimized))
    kinds = {n.op_type for n in ran.graph.node}
    assert {"Cast", "GatherElements"} <= kinds
    ran_inits = list(ran.graph.initializer)
    assert sum(int(np.prod(t.dims)) for t in ran_inits if t.data_type == TensorProto.UINT8) == stats.index_bytes
    assert max(int(np.prod(t.dims)) for t in ran_inits if t.data_type != TensorProto.UINT8) < min(
        t.size for t in palettized.values()
    )


def test_external_indices_are_handed_over_without_copies_in_the_graph():
    model = tiny_klaus()
    graph, arrays, stats = lowmem.build(model, chunk_elements=None, external=True)
    assert arrays and all(a.dtype == np.uint8 for a in arrays.values())
    assert sum(a.nbytes for a in arrays.values()) == stats.index_bytes
    placeholders = [t for t in graph.graph.initializer if t.name in arrays]
    assert all(t.data_location == TensorProto.EXTERNAL and not t.raw_data for t in placeholders)


def test_chunked_gemm_without_transb_and_matmul():
    """Weights (in, out) are split along axis 1 and the partial outputs concatenated."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((192, 40)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((40, 10)) * 0.3).astype(np.float32)
    b1 = (rng.standard_normal(40) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["input"], ["f"], name="/flatten"),
        helper.make_node("Gemm", ["f", "fc1.weight", "fc1.bias"], ["h"], name="/fc1/Gemm"),
        helper.make_node("Relu", ["h"], ["r"], name="/relu"),
        helper.make_node("MatMul", ["r", "fc2.weight"], ["logits"], name="/fc2/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [
            numpy_helper.from_array(w1, "fc1.weight"),
            numpy_helper.from_array(b1, "fc1.bias"),
            numpy_helper.from_array(w2, "fc2.weight"),
        ],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    card = compression.ModelCard("mlp")
    model = compression.compress_onnx(
        onnx_model,
        TINY_RECIPE.with_bits(None, granularity="channel"),
        preprocess=Preprocess(input_size=8),
        labels=plain_label_rows([str(i) for i in range(10)]),
        card=card,
    )
    _, _, stats = lowmem.build(model, chunk_elements=300)
    assert stats.chunked == 2
    x = batch(2, 8)
    low = lowmem.session(model, chunk_elements=300).run(None, {"input": x})[0]
    np.testing.assert_allclose(low, default_logits(model, x), atol=1e-4, rtol=0)


def test_classifier_memory_modes(tiny_klaus_path, tiny_onnx_path):
    default = Classifier(tiny_klaus_path).probabilities([CAT], crops=10)
    low = Classifier(tiny_klaus_path, memory="low").probabilities([CAT], crops=10)
    np.testing.assert_allclose(low, default, atol=1e-5)
    with pytest.raises(ValueError, match="memory"):
        Classifier(tiny_klaus_path, memory="tiny")
    with pytest.raises(KlausModelError, match=r"low-memory mode needs a \.klaus model"):
        Classifier(tiny_onnx_path, memory="low")


def test_cli_classify_and_eval_low_memory(tiny_klaus_path, tmp_path):
    runner = CliRunner()
    low = runner.invoke(
        main, ["classify", "--json", "--low-memory", "--model", str(tiny_klaus_path), CAT], prog_name="klaus"
    )
    default = runner.invoke(main, ["classify", "--json", "--model", str(tiny_klaus_path), CAT], prog_name="klaus")
    assert low.exit_code == 0 and default.exit_code == 0, low.output + default.output
    a, b = json.loads(low.stdout), json.loads(default.stdout)
    assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
    assert a["predictions"][0]["probability"] == pytest.approx(b["predictions"][0]["probability"], abs=1e-5)

    listing = tmp_path / "list.txt"
    listing.write_text(f"{CAT} 3\n")
    result = runner.invoke(
        main, ["eval", "--json", "--low-memory", "--model", str(tiny_klaus_path), str(listing)], prog_name="klaus"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["n"] == 1


def test_cli_low_memory_refuses_onnx(tiny_onnx_path):
    result = CliRunner().invoke(
        main, ["classify", "--low-memory", "--model", str(tiny_onnx_path), CAT], prog_name="klaus"
    )
    assert result.exit_code == 1
    assert "low-memory mode needs a .klaus model" in result.stderr
