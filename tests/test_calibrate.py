"""Tests for klaus.compression.calibrate: activation statistics, bias correction, calibration sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from conftest import EXAMPLES, TINY_PREPROCESS, TINY_SIZE, make_tiny_onnx
from klaus import onnxgraph
from klaus.compression import calibrate, kmeans
from klaus.errors import KlausDataError
from klaus.labels import imagenet_label_rows
from klaus.onnxgraph import TensorRole

WEIGHTS = ("stem.weight", "dw.weight", "pw.weight", "fc.weight")


# ---------------------------------------------------------------- helpers


def _conv(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int = 1, pad: int = 0, group: int = 1
) -> np.ndarray:
    """Reference NCHW convolution in float64 (shift-and-add over kernel taps)."""
    x, w = x.astype(np.float64), w.astype(np.float64)
    n, _, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    out = np.zeros((n, o, ho, wo))
    per_group = o // group
    for g in range(group):
        xs = xp[:, g * cg : (g + 1) * cg]
        ws = w[g * per_group : (g + 1) * per_group]
        for i in range(kh):
            for j in range(kw):
                patch = xs[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
                out[:, g * per_group : (g + 1) * per_group] += np.einsum("ncxy,oc->noxy", patch, ws[:, :, i, j])
    return out if b is None else out + b.astype(np.float64)[None, :, None, None]


def _tiny_forward(weights: dict[str, np.ndarray], x: np.ndarray) -> dict[str, np.ndarray]:
    """The tiny model of conftest, by hand: every intermediate activation."""
    relu = lambda v: np.maximum(v, 0.0)  # noqa: E731
    s_act = relu(_conv(x, weights["stem.weight"], weights["stem.bias"], stride=2, pad=1))
    d_act = relu(_conv(s_act, weights["dw.weight"], weights["dw.bias"], pad=1, group=16))
    p_act = relu(_conv(d_act, weights["pw.weight"], weights["pw.bias"]))
    f = p_act.mean(axis=(2, 3))
    logits = f @ weights["fc.weight"].astype(np.float64).T + weights["fc.bias"]
    return {"input": x.astype(np.float64), "s_act": s_act, "d_act": d_act, "p_act": p_act, "f": f, "logits": logits}


def _channel_rows(a: np.ndarray) -> np.ndarray:
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """40 natural 32x32 inputs: the four example photos, ten crops each."""
    batch = calibrate.load_calibration([EXAMPLES], TINY_PREPROCESS, crops=10)
    assert batch is not None and batch.shape == (40, 3, TINY_SIZE, TINY_SIZE)
    return batch


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- input_statistics


def test_input_statistics_match_numpy(photos):
    model = make_tiny_onnx()
    _, weights = onnxgraph.split_weights(model)
    acts = _tiny_forward(weights, photos)
    # The hand-written forward pass is the model (sanity check against ORT).
    logits = _session(model).run(None, {"input": photos})[0]
    np.testing.assert_allclose(logits, acts["logits"], rtol=1e-4, atol=1e-5)

    names = ["input", "s_act", "d_act", "f"]
    stats = calibrate.input_statistics(model, photos, names, gram_for=["input", "d_act", "f"], chunk=7)
    assert set(stats) == set(names)
    for name in names:
        rows = _channel_rows(acts[name])
        s = stats[name]
        assert s.count == rows.shape[0]
        np.testing.assert_allclose(s.mean, rows.mean(axis=0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(s.total, rows.sum(axis=0), rtol=1e-4, atol=1e-4)
        if name == "s_act":
            assert s.gram is None  # not asked for
        else:
            np.testing.assert_allclose(s.sample_hessian, rows.T @ rows / rows.shape[0], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(s.hessian, s.hessian.T)
    assert stats["input"].count == photos.shape[0] * TINY_SIZE * TINY_SIZE
    assert stats["s_act"].count == photos.shape[0] * (TINY_SIZE // 2) ** 2
    assert stats["f"].count == photos.shape[0]


def test_input_statistics_independent_of_chunking(photos):
    model = make_tiny_onnx()
    a = calibrate.input_statistics(model, photos, ["d_act"], gram_for=["d_act"], chunk=40)
    b = calibrate.input_statistics(model, photos, ["d_act", "d_act", ""], gram_for=["d_act"], chunk=3)
    assert set(b) == {"d_act"}
    np.testing.assert_allclose(a["d_act"].mean, b["d_act"].mean, rtol=1e-5)
    np.testing.assert_allclose(a["d_act"].hessian, b["d_act"].hessian, rtol=1e-5, atol=1e-7)


def test_merged_statistics_equal_statistics_of_both_sets(photos):
    model = make_tiny_onnx()
    whole = calibrate.input_statistics(model, photos, ["d_act", "f"], gram_for=["f"])
    a = calibrate.input_statistics(model, photos[:7], ["d_act", "f"], gram_for=["f"])
    b = calibrate.input_statistics(model, photos[7:], ["d_act", "f"], gram_for=["f"])
    for name in ("d_act", "f"):
        m = a[name].merged(b[name])
        assert m.count == whole[name].count
        np.testing.assert_allclose(m.mean, whole[name].mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(m.energy, whole[name].energy, rtol=1e-5, atol=1e-7)
    assert a["d_act"].merged(b["d_act"]).gram is None
    np.testing.assert_allclose(a["f"].merged(b["f"]).hessian, whole["f"].hessian, rtol=1e-5, atol=1e-7)


def test_hessian_shrinks_towards_its_diagonal_with_few_rows():
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((8, 8))
    for rows in (4, 16, 4096):
        x = rng.standard_normal((rows, 8)) @ mix
        s = calibrate.InputStats(x.sum(0), (x * x).sum(0), x.T @ x, rows)
        sample = x.T @ x / rows
        np.testing.assert_allclose(s.sample_hessian, sample)
        rho = 8 / (8 + rows)
        np.testing.assert_allclose(np.diag(s.hessian), np.diag(sample))  # the diagonal is kept
        off = ~np.eye(8, dtype=bool)
        np.testing.assert_allclose(s.hessian[off], (1 - rho) * sample[off])
        if rows < 8:  # rank-deficient sample Hessian, positive definite shrunk one
            assert np.linalg.matrix_rank(sample) < 8
            assert np.linalg.eigvalsh(s.hessian).min() > 0


def test_input_statistics_of_an_existing_output(photos):
    model = make_tiny_onnx()
    stats = calibrate.input_statistics(model, photos, ["logits"])
    logits = _session(model).run(None, {"input": photos})[0]
    np.testing.assert_allclose(stats["logits"].mean, logits.astype(np.float64).mean(axis=0), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- output_shift


def _run_single(node: onnx.NodeProto, weight: np.ndarray, x: np.ndarray, out_rank: int) -> np.ndarray:
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * out_rank)],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _session(model).run(None, {"x": x.astype(np.float32)})[0].astype(np.float64)


def _mean_conv_difference(weight, delta, x, group) -> np.ndarray:
    node = helper.make_node("Conv", ["x", "w"], ["y"], group=group)
    before = _run_single(node, weight, x, 4)
    after = _run_single(node, weight + delta, x, 4)
    return (after - before).mean(axis=(0, 2, 3))


def _conv_role(group: int) -> TensorRole:
    return TensorRole("depthwise" if group > 1 else "conv", 0, "n", op="Conv", activation="x", group=group)


def test_output_shift_1x1_conv():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 5, 1, 1)).astype(np.float32)
    delta = (rng.standard_normal(w.shape) * 0.1).astype(np.float32)
    x = rng.standard_normal((8, 5, 7, 7)) + rng.uniform(-2, 2, 5)[None, :, None, None]
    x = x.astype(np.float32)
    mean_in = x.astype(np.float64).mean(axis=(0, 2, 3))
    shift = calibrate.output_shift(delta.astype(np.float64), _conv_role(1), mean_in)
    np.testing.assert_allclose(shift, _mean_conv_difference(w, delta, x, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "out_ch,in_ch,group",
    [(6, 4, 1), (8, 8, 8), (16, 8, 8), (4, 6, 2)],  # plain 3x3, depthwise, depthwise x2 multiplier, grouped
)
def test_output_shift_3x3_conv_constant_inputs(out_ch, in_ch, group):
    """Inputs constant over space make the no-padding mean output shift exact for any kernel."""
    rng = np.random.default_rng(out_ch * 10 + group)
    w = rng.standard_normal((out_ch, in_ch // group, 3, 3)).astype(np.float32)
    delta = (rng.standard_normal(w.shape) * 0.1).astype(np.float32)
    levels = rng.standard_normal((12, in_ch)) + rng.uniform(-2, 2, in_ch)
    x = np.broadcast_to(levels[:, :, None, None], (12, in_ch, 6, 6)).astype(np.float32)
    mean_in = levels.astype(np.float32).astype(np.float64).mean(axis=0)
    shift = calibrate.output_shift(delta.astype(np.float64), _conv_role(group), mean_in)
    assert shift.shape == (out_ch,)
    np.testing.assert_allclose(shift, _mean_conv_difference(w, delta, x, group), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("out_axis", [0, 1])
def test_output_shift_gemm(out_axis):
    rng = np.random.default_rng(out_axis)
    n_in, n_out = 7, 5
    w = rng.standard_normal((n_out, n_in) if out_axis == 0 else (n_in, n_out)).astype(np.float32)
    delta = (rng.standard_normal(w.shape) * 0.1).astype(np.float32)
    x = (rng.standard_normal((50, n_in)) + rng.uniform(-1, 3, n_in)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1 if out_axis == 0 else 0)
    brute = (_run_single(node, w + delta, x, 2) - _run_single(node, w, x, 2)).mean(axis=0)
    role = TensorRole("fc", out_axis, "n", op="Gemm", activation="x")
    shift = calibrate.output_shift(delta.astype(np.float64), role, x.astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(shift, brute, rtol=1e-4, atol=1e-5)


def test_output_shift_unsupported_cases():
    delta = np.ones((4, 3, 1, 1))
    assert calibrate.output_shift(delta, _conv_role(1), np.ones(5)) is None  # wrong channel count
    gemm = TensorRole("fc", 0, "n", op="Gemm")
    assert calibrate.output_shift(np.ones((4, 3)), gemm, np.ones(5)) is None
    matmul = TensorRole("fc", 1, "n", op="MatMul")
    assert calibrate.output_shift(np.ones((3, 4)), matmul, np.ones(3)) is None


# ---------------------------------------------------------------- correct_biases


def _logits(
    model: onnx.ModelProto, skeleton: onnx.ModelProto, weights: dict[str, np.ndarray], x: np.ndarray
) -> np.ndarray:
    return _session(onnxgraph.join_weights(skeleton, weights)).run(None, {"input": x})[0].astype(np.float64)


def _bias_correction_inputs(model, photos, names, bits):
    skeleton, weights = onnxgraph.split_weights(model)
    roles = onnxgraph.tensor_roles(model)
    readings = {n: calibrate.Reading(roles[n].activation, roles[n].in_axis) for n in names}
    stats = calibrate.layer_statistics(model, photos, readings)
    decoded = {n: kmeans.palettize(weights[n], bits).decode() for n in names}
    means = {k: s.mean for k, s in stats.items()}  # by layer
    biases = {roles[n].bias: weights[roles[n].bias] for n in names}
    return skeleton, weights, roles, decoded, means, biases


def test_correct_biases_cancels_fc_shift_exactly(photos):
    """Only the last layer palettized: its inputs are the float ones, so the mean logit error vanishes."""
    model = make_tiny_onnx()
    skeleton, weights, roles, decoded, means, biases = _bias_correction_inputs(model, photos, ["fc.weight"], 2)
    corrected = calibrate.correct_biases(weights, decoded, roles, means, biases)
    assert set(corrected) == {"fc.bias"}
    assert corrected["fc.bias"].dtype == np.float32 and corrected["fc.bias"].shape == weights["fc.bias"].shape
    ref = _logits(model, skeleton, weights, photos)
    plain = _logits(model, skeleton, {**weights, **decoded}, photos)
    fixed = _logits(model, skeleton, {**weights, **decoded, **corrected}, photos)
    before = np.abs((plain - ref).mean(axis=0))
    after = np.abs((fixed - ref).mean(axis=0))
    assert before.max() > 1e-3
    assert after.max() < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_correct_biases_reduces_mean_output_error(photos, bits):
    model = make_tiny_onnx()
    skeleton, weights, roles, decoded, means, biases = _bias_correction_inputs(model, photos, list(WEIGHTS), bits)
    corrected = calibrate.correct_biases(weights, decoded, roles, means, biases)
    assert set(corrected) == {"stem.bias", "dw.bias", "pw.bias", "fc.bias"}
    ref = _logits(model, skeleton, weights, photos)
    plain = _logits(model, skeleton, {**weights, **decoded}, photos)
    fixed = _logits(model, skeleton, {**weights, **decoded, **corrected}, photos)
    before = np.abs((plain - ref).mean(axis=0)).mean()
    after = np.abs((fixed - ref).mean(axis=0)).mean()
    assert after < 0.7 * before


def test_correct_biases_skips_layers_without_bias_or_stats():
    roles = {
        "a": TensorRole("fc", 0, "n", op="Gemm", activation="x", bias=""),
        "b": TensorRole("fc", 0, "n", op="Gemm", activation="x", bias="b.bias"),  # no mean measured for b
        "c": TensorRole("fc", 0, "n", op="Gemm", activation="x", bias="c.bias"),
    }
    w = np.ones((2, 3))
    decoded = {k: w + 0.5 for k in roles}
    mean = np.array([1.0, 2.0, 3.0])
    out = calibrate.correct_biases(
        {k: w for k in roles}, decoded, roles, {"a": mean, "c": mean}, {"b.bias": np.zeros(2), "c.bias": np.zeros(2)}
    )
    assert set(out) == {"c.bias"}
    np.testing.assert_allclose(out["c.bias"], [-3.0, -3.0])  # 0.5 * (1 + 2 + 3) removed


# ---------------------------------------------------------------- calibration sets


WNIDS = {row.wnid: row.index for row in imagenet_label_rows()}


def test_split_files_by_wnid_parity():
    assert WNIDS["n01440764"] == 0 and WNIDS["n01443537"] == 1
    files = [
        Path("d/n01440764_tench.jpg"),  # class 0: even
        Path("d/n01443537_goldfish.JPEG"),  # class 1: odd
        Path("d/n01484850/any.jpg"),  # class 2 by folder: even
        Path("d/n01491361/other.png"),  # class 3 by folder: odd
        Path("d/n01443537/n01440764_x.jpg"),  # file prefix wins over the folder: even
        Path("d/unknown/photo.jpg"),  # no class: dropped from both halves
        Path("d/n99999999_fake.jpg"),
    ]
    even = calibrate.split_files(files, "even", WNIDS)
    odd = calibrate.split_files(files, "odd", WNIDS)
    assert even == [files[0], files[2], files[4]]
    assert odd == [files[1], files[3]]
    assert calibrate.split_files(files, "all", WNIDS) == files


def _photo(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def test_load_calibration_errors(tmp_path):
    assert calibrate.load_calibration([], TINY_PREPROCESS) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KlausDataError, match="no calibration images"):
        calibrate.load_calibration([empty], TINY_PREPROCESS)
    with pytest.raises(KlausDataError, match="no such"):
        calibrate.load_calibration([tmp_path / "missing"], TINY_PREPROCESS)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(KlausDataError, match="no readable"):
        calibrate.load_calibration([bad], TINY_PREPROCESS)
    # The split can leave nothing even if the folder has photos.
    even_only = tmp_path / "even"
    _photo(even_only / "n01440764_a.jpg")
    with pytest.raises(KlausDataError):
        calibrate.load_calibration([even_only], TINY_PREPROCESS, split="odd", wnid_index=WNIDS)


def test_load_calibration_batch(tmp_path):
    folder = tmp_path / "cal"
    _photo(folder / "n01440764_a.jpg", 1)
    _photo(folder / "n01443537_b.png", 2)
    _photo(folder / "sub" / "n01484850_c.jpg", 3)
    (folder / "zz_broken.jpg").write_bytes(b"\xff\xd8 truncated")  # skipped, does not stop the build
    (folder / "notes.txt").write_text("not an image")  # not an image suffix: ignored
    batch = calibrate.load_calibration([folder], TINY_PREPROCESS)
    assert batch.shape == (3, 3, TINY_SIZE, TINY_SIZE) and batch.dtype == np.float32
    ten = calibrate.load_calibration([folder], TINY_PREPROCESS, crops=10)
    assert ten.shape == (30, 3, TINY_SIZE, TINY_SIZE)
    assert calibrate.load_calibration([folder], TINY_PREPROCESS, limit=2).shape[0] == 2
    even = calibrate.load_calibration([folder], TINY_PREPROCESS, split="even", wnid_index=WNIDS)
    assert even.shape[0] == 2
    # Deterministic: the same folder always gives the same batch, and single files work too.
    np.testing.assert_array_equal(batch, calibrate.load_calibration([folder], TINY_PREPROCESS))
    single = calibrate.load_calibration([folder / "n01443537_b.png"], TINY_PREPROCESS)
    assert single.shape[0] == 1
    assert any(np.array_equal(single[0], row) for row in batch)


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (2.0, 0.5)])
def test_correct_biases_respects_gemm_alpha_beta(photos, alpha, beta):
    """Gemm computes alpha * A @ B + beta * C: the shift scales with alpha, the bias with beta."""
    model = make_tiny_onnx()
    model.graph.node[-1].attribute.extend([helper.make_attribute("alpha", alpha), helper.make_attribute("beta", beta)])
    skeleton, weights, roles, decoded, means, biases = _bias_correction_inputs(model, photos, ["fc.weight"], 2)
    corrected = calibrate.correct_biases(weights, decoded, roles, means, biases)
    ref = _logits(model, skeleton, weights, photos)
    plain = _logits(model, skeleton, {**weights, **decoded}, photos)
    fixed = _logits(model, skeleton, {**weights, **decoded, **corrected}, photos)
    assert np.abs((plain - ref).mean(axis=0)).max() > 1e-3
    assert np.abs((fixed - ref).mean(axis=0)).max() < 1e-5


def test_split_files_reads_wnid_prefixes_like_eval(tmp_path):
    """`klaus eval` takes n01440764.jpg and n01440764-2.jpg as class 0; the calibration split should agree."""
    from klaus.evaluate import load_dataset, split_classes

    names = ["n01440764.jpg", "n01440764-2.jpg", "n01440764_3.jpg", "n01443537.png", "n01443537-b.png"]
    files = [_photo(tmp_path / n) for n in names]
    samples = load_dataset(tmp_path, imagenet_label_rows())
    assert sorted(Path(s.path).name for s in samples) == sorted(names)  # eval reads every one of them
    for parity in ("even", "odd"):
        expected = sorted(Path(s.path).name for s in split_classes(samples, parity))
        assert sorted(f.name for f in calibrate.split_files(files, parity, WNIDS)) == expected


# ---------------------------------------------------------------- depthwise windows


@pytest.mark.parametrize("stride,pads,dilation", [(1, (1, 1, 1, 1), 1), (2, (0, 1, 2, 0), 1), (1, (2, 2, 2, 2), 2)])
def test_window_patches_are_the_convolution_inputs(stride, pads, dilation):
    """Each output of a depthwise convolution is its filter dotted with one window."""
    rng = np.random.default_rng(stride)
    x = rng.standard_normal((2, 5, 9, 8)).astype(np.float32)
    w = rng.standard_normal((5, 1, 3, 3)).astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], group=5, strides=[stride] * 2, pads=list(pads), dilations=[dilation] * 2
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    y = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])).run(None, {"x": x})[0]
    window = calibrate.Window((3, 3), (stride, stride), pads, (dilation, dilation))
    patches = window.patches(x)  # (N, C, 9, Ho*Wo)
    expected = y.reshape(2, 5, -1)
    np.testing.assert_allclose(np.einsum("ck,nckp->ncp", w.reshape(5, 9), patches), expected, rtol=1e-5, atol=1e-5)
    thinned = window.patches(x, positions=4)
    assert thinned.shape[3] <= 4 < patches.shape[3]
    assert set(map(tuple, thinned[1, 2].T)) <= set(map(tuple, patches[1, 2].T))


def test_patch_hessian_gives_the_depthwise_output_error(photos):
    """sum_c d_c^T H_c d_c is the mean squared output change of a depthwise layer whose weights moved by d
    (at the regular subgrid of output positions the statistics sample)."""
    model = make_tiny_onnx()
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    window = calibrate.Window((3, 3), (1, 1), (1, 1, 1, 1))
    stats = calibrate.input_statistics(model, photos, ["s_act"], windows={"s_act": window}, chunk=7)["s_act"]
    d_act = _tiny_forward(weights, photos)["s_act"]
    thin = int(np.ceil(np.sqrt(d_act.shape[2] * d_act.shape[3] / calibrate.WINDOW_POSITIONS)))
    assert stats.patch_count == d_act.shape[0] * -(-d_act.shape[2] // thin) * -(-d_act.shape[3] // thin)
    delta = np.random.default_rng(0).standard_normal(weights["dw.weight"].shape) * 0.01
    change = _conv(d_act, delta, None, pad=1, group=16)  # the output moves linearly with the weights
    measured = float(np.sum(change[:, :, ::thin, ::thin] ** 2)) / stats.patch_count  # where windows were taken
    predicted = float(np.einsum("ci,cij,cj->", delta.reshape(16, 9), stats.patch_hessian, delta.reshape(16, 9)))
    assert predicted == pytest.approx(measured, rel=1e-4)
    both = stats.merged(stats)
    np.testing.assert_allclose(both.patch_hessian, stats.patch_hessian)
    assert both.patch_count == 2 * stats.patch_count


def _fixed_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return model


@pytest.mark.parametrize("batch", [1, 3])
def test_input_statistics_of_a_fixed_batch_graph(photos, batch):
    """A graph exported with its batch fixed takes exactly that many rows per run: statistics come
    out as for the free graph (40 inputs in runs of 3: the last run padded, padding not counted)."""
    names = ["input", "d_act", "f"]
    free = calibrate.input_statistics(make_tiny_onnx(), photos, names, gram_for=names)
    fixed = calibrate.input_statistics(_fixed_batch(make_tiny_onnx(), batch), photos, names, gram_for=names)
    for name in names:
        assert fixed[name].count == free[name].count
        np.testing.assert_allclose(fixed[name].mean, free[name].mean, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(fixed[name].hessian, free[name].hessian, rtol=1e-5, atol=1e-7)
