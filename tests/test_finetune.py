"""Palette fine-tuning: the torch interpreter matches ONNX Runtime, and distillation helps without moving indices."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import TINY_SIZE, make_tiny_onnx
from klaus import compression, onnxgraph
from klaus.compression.kmeans import palettize
from klaus.errors import KlausModelError
from klaus.labels import plain_label_rows
from klaus.runtime import run_batches

torch = pytest.importorskip("torch", reason="fine-tuning needs the convert extra (torch)")
from klaus.compression import finetune  # noqa: E402  (after the torch check)


def _inputs(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)


def _palettized(model: onnx.ModelProto, bits: int):
    _, weights = onnxgraph.split_weights(model)
    roles = onnxgraph.tensor_roles(model)
    quantized = {
        n: palettize(w, bits, granularity="channel", axis=roles[n].out_axis)
        for n, w in weights.items()
        if roles[n].kind != "other"
    }
    return weights, roles, quantized


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = torch.log_softmax(torch.from_numpy(p_logits), 1)
    q = torch.log_softmax(torch.from_numpy(q_logits), 1)
    return float((p.exp() * (p - q)).sum(1).mean())


def test_interpreter_matches_onnxruntime() -> None:
    model = make_tiny_onnx()
    _, weights = onnxgraph.split_weights(model)
    x = _inputs(4)
    student = finetune._Student(torch, model, weights, {}, [], 0, "input")
    with torch.no_grad():
        ours = student(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, run_batches(model, x), rtol=1e-4, atol=1e-4)


def test_graph_cuts_are_single_live_values() -> None:
    cuts = [value for _, value in finetune.graph_cuts(make_tiny_onnx())]
    assert cuts == ["s", "s_act", "d", "d_act", "p", "p_act", "g", "f"]


def test_choose_cut_is_the_latest_with_the_requested_tail_share() -> None:
    model = make_tiny_onnx()
    _, _, quantized = _palettized(model, 4)
    first_use = {n: min(i for i, node in enumerate(model.graph.node) if n in node.input) for n in quantized}
    total = sum(q.indices.size for q in quantized.values())

    def share(position: int) -> float:
        return sum(q.indices.size for n, q in quantized.items() if first_use[n] > position) / total

    for wanted in (0.2, 0.5, 0.8):
        cut = finetune.choose_cut(model, quantized, wanted)
        assert cut is not None
        position, _ = cut
        assert share(position) >= wanted
        later = [p for p, _ in finetune.graph_cuts(model) if p > position]
        assert all(share(p) < wanted for p in later)
    assert finetune.choose_cut(model, quantized, 0.9) is None  # the stem holds 19 %: train from the input


def test_finetune_lowers_held_out_kl_and_keeps_indices() -> None:
    model = make_tiny_onnx()
    weights, roles, quantized = _palettized(model, 2)
    calibration = _inputs(40)
    options = finetune.FinetuneOptions(steps=60, batch=16, copies=1, tail_share=0.0, check_every=10)
    result = finetune.finetune(model, weights, quantized, roles, calibration, options)
    assert result.kl_after < result.kl_before
    for name, q in quantized.items():
        assert np.array_equal(result.quantized[name].indices, q.indices)
        assert result.quantized[name].palette.dtype == np.float16
        assert len(result.quantized[name].palette) == len(q.palette)
    fresh = _inputs(64, seed=7)
    skeleton, _ = onnxgraph.split_weights(model)
    reference = run_batches(model, fresh)

    def logits(qs, biases):
        ws = {**weights, **biases, **{n: q.decode() for n, q in qs.items()}}
        return run_batches(onnxgraph.join_weights(skeleton, ws), fresh)

    assert _kl(reference, logits(result.quantized, result.biases)) < _kl(reference, logits(quantized, {}))


def test_finetune_is_deterministic() -> None:
    model = make_tiny_onnx()
    weights, roles, quantized = _palettized(model, 3)
    options = finetune.FinetuneOptions(steps=20, batch=8, copies=1, check_every=5)
    a = finetune.finetune(model, weights, quantized, roles, _inputs(20), options)
    b = finetune.finetune(model, weights, quantized, roles, _inputs(20), options)
    for name in quantized:
        assert a.quantized[name].palette.tobytes() == b.quantized[name].palette.tobytes()
    assert all(np.array_equal(a.biases[n], b.biases[n]) for n in a.biases)


def test_unsupported_operator_is_a_clear_error() -> None:
    model = make_tiny_onnx()
    node = helper.make_node("Erf", ["f"], ["f2"], name="/erf")
    model.graph.node.insert(len(model.graph.node) - 1, node)
    model.graph.node[-1].input[0] = "f2"
    weights, roles, quantized = _palettized(model, 4)
    with pytest.raises(KlausModelError, match="Erf"):
        finetune.finetune(model, weights, quantized, roles, _inputs(5), finetune.FinetuneOptions(steps=1))


def test_compress_with_finetune_steps_writes_the_tuned_model() -> None:
    from conftest import TINY_PREPROCESS, TINY_RECIPE

    model = make_tiny_onnx()
    card = compression.ModelCard("tiny", "tests", "CC0-1.0", "klaus tests")
    labels = plain_label_rows([f"c{i}" for i in range(model.graph.output[0].type.tensor_type.shape.dim[1].dim_value)])
    recipe = replace(TINY_RECIPE, fc_bits=2, conv_bits=3, depthwise_bits=3, granularity="channel")
    calibration = _inputs(30)
    kwargs: dict[str, Any] = dict(preprocess=TINY_PREPROCESS, labels=labels, card=card, calibration=calibration)
    plain = compression.compress_onnx(model, recipe, **kwargs)
    tuned = compression.compress_onnx(model, replace(recipe, finetune_steps=30), **kwargs)
    assert '"finetune_steps":30' in tuned.meta["recipe"]
    plain_t = {t.name: t for t in plain.tensors}
    for t in tuned.tensors:
        if t.codec == "palette-png":
            assert t.payload == plain_t[t.name].payload  # same indices, same bytes
    assert any(t.palette != plain_t[t.name].palette for t in tuned.tensors if t.codec == "palette-png")


def test_reshape_and_constant_nodes() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 36])
    shape = numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape")
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(0.5, dtype=np.float32))),
        helper.make_node("Mul", ["x", "c"], ["m"]),
        helper.make_node("Sigmoid", ["m"], ["k"]),
        helper.make_node("Reshape", ["k", "shape"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [shape]), opset_imports=[helper.make_opsetid("", 17)]
    )
    data = np.random.default_rng(0).standard_normal((2, 4, 3, 3)).astype(np.float32)
    student = finetune._Student(torch, model, {}, {}, [], 0, "x")
    with torch.no_grad():
        ours = student(torch.from_numpy(data)).numpy()
    np.testing.assert_allclose(ours, run_batches(model, data), rtol=1e-5, atol=1e-6)


def test_cli_finetune_steps(tmp_path, tiny_onnx_path) -> None:
    from click.testing import CliRunner

    from conftest import EXAMPLES, TINY_CLASSES
    from klaus import format as kf
    from klaus.cli import main

    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"c{i}" for i in range(TINY_CLASSES)))
    args = [
        "compress",
        str(tiny_onnx_path),
        "--labels",
        str(names),
        "--input-size",
        str(TINY_SIZE),
        "--bits",
        "3",
        "--min-elements",
        "64",
        "--finetune-steps",
        "10",
    ]
    missing = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a.klaus")], prog_name="klaus")
    assert missing.exit_code == 1 and "--calib" in missing.stderr
    out = tmp_path / "b.klaus"
    ok = CliRunner().invoke(
        main, [*args, "-o", str(out), "--calib", str(EXAMPLES), "--calib-crops", "10"], prog_name="klaus"
    )
    assert ok.exit_code == 0, ok.output
    assert '"finetune_steps":10' in kf.read_model(out).meta["recipe"]
