"""Tests for klaus.compression.kmeans, .gptq and .recipe: 1-D k-means, ECSQ, palettization, recipes, GPTQ rounding."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from klaus import codecs
from klaus.compression import gptq, kmeans
from klaus.compression import recipe as recipes
from klaus.compression.kmeans import Codebook
from klaus.compression.recipe import LayerRule, Recipe
from klaus.compression.write import encode_tensor


def _mse(values: np.ndarray, book: Codebook) -> float:
    """Mean squared error of nearest-cell assignment (the codebook's own edges)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    recon = book.levels[kmeans.assign(x, book.levels, book.edges())]
    return float(np.mean((x - recon) ** 2))


def _entropy_bits(indices: np.ndarray) -> float:
    counts = np.bincount(indices.reshape(-1).astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _nearest(values: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Distance of every value to its nearest palette entry (brute force)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    return np.min(np.abs(v - palette.astype(np.float64)[None, :]), axis=1)


# ---------------------------------------------------------------- kmeans_1d


def test_kmeans_is_deterministic():
    x = np.random.default_rng(0).standard_normal(5000)
    a = kmeans.kmeans_1d(x, 16)
    b = kmeans.kmeans_1d(x.copy(), 16)
    np.testing.assert_array_equal(a.levels, b.levels)
    np.testing.assert_array_equal(a.counts, b.counts)
    # Input order does not matter either (the data are sorted first).
    c = kmeans.kmeans_1d(x[::-1].copy(), 16)
    np.testing.assert_array_equal(a.levels, c.levels)


@pytest.mark.parametrize("k", [1, 2, 7, 16, 256])
def test_kmeans_levels_sorted_and_at_most_k(k):
    x = np.random.default_rng(k).laplace(size=3000)
    book = kmeans.kmeans_1d(x, k)
    assert 1 <= book.levels.size <= k
    assert np.all(np.diff(book.levels) > 0)
    assert book.counts.shape == book.levels.shape
    assert book.counts.sum() == x.size
    assert book.levels.min() >= x.min() and book.levels.max() <= x.max()


def test_kmeans_exact_when_few_unique_values():
    rng = np.random.default_rng(3)
    values = np.array([-1.5, -0.25, 0.0, 0.75, 3.0])
    x = rng.choice(values, size=1000)
    book = kmeans.kmeans_1d(x, 8)
    np.testing.assert_array_equal(book.levels, np.unique(x))
    assert _mse(x, book) == 0.0
    # Exactly k unique values: still exact.
    book5 = kmeans.kmeans_1d(x, 5)
    np.testing.assert_array_equal(book5.levels, values)
    assert _mse(x, book5) == 0.0
    np.testing.assert_array_equal(book5.counts, [np.sum(x == v) for v in values])


def test_kmeans_single_level_is_mean_and_empty_input_rejected():
    x = np.array([0.0, 1.0, 2.0, 10.0])
    book = kmeans.kmeans_1d(x, 1)
    np.testing.assert_allclose(book.levels, [x.mean()])
    with pytest.raises(ValueError):
        kmeans.kmeans_1d(np.array([]), 4)


def test_weighted_kmeans_pulls_levels_toward_heavy_weights():
    x = np.linspace(-1.0, 1.0, 2001)
    plain = kmeans.kmeans_1d(x, 4)
    heavy_right = np.where(x > 0.5, 50.0, 1.0)
    weighted = kmeans.kmeans_1d(x, 4, weights=heavy_right)
    # More levels land in the heavily weighted region, and the top level moves up to it.
    assert np.sum(weighted.levels > 0.5) > np.sum(plain.levels > 0.5)
    assert weighted.levels[-1] > plain.levels[-1]
    # k = 1: the level is exactly the weighted mean.
    w = np.random.default_rng(0).uniform(0.1, 5.0, x.size)
    np.testing.assert_allclose(kmeans.kmeans_1d(x, 1, weights=w).levels, [np.average(x, weights=w)])


def test_mse_decreases_with_more_bits():
    x = np.random.default_rng(0).laplace(size=20000)
    errors = [_mse(x, kmeans.kmeans_1d(x, 1 << bits)) for bits in range(1, 9)]
    assert all(b < a for a, b in pairwise(errors)), errors
    # One more bit should buy a real improvement at low rates (~4x at high rate).
    assert errors[3] < errors[2] / 2.5


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7])
def test_companded_init_beats_quantile_init_on_laplacian(bits):
    rng = np.random.default_rng(bits)
    x = np.sort(rng.laplace(size=20000))
    w = np.ones_like(x)
    k = 1 << bits
    companded = kmeans.kmeans_1d(x, k, iterations=100)
    quantile_start = Codebook(np.quantile(x, (np.arange(k) + 0.5) / k), np.ones(k))
    plain = kmeans._lloyd(x, w, quantile_start, 100, 1e-9)
    assert _mse(x, companded) <= _mse(x, plain) * (1 + 1e-9)


def test_ecsq_lowers_index_entropy():
    x = np.random.default_rng(0).standard_normal(20000)
    plain = kmeans.kmeans_1d(x, 16)
    ecsq = kmeans.kmeans_1d(x, 16, rate_penalty=1.0)
    h_plain = _entropy_bits(kmeans.assign(x, plain.levels, plain.edges()))
    h_ecsq = _entropy_bits(kmeans.assign(x, ecsq.levels, ecsq.edges()))
    assert h_ecsq < h_plain - 0.1
    # ... paid for with distortion, never with more levels.
    assert ecsq.levels.size <= 16
    assert _mse(x, ecsq) > _mse(x, plain)
    assert ecsq.rate_penalty > 0 and plain.rate_penalty == 0


def test_cell_edges_are_midpoints_without_rate_penalty():
    levels = np.array([-2.0, -0.5, 0.1, 3.0])
    lengths = np.array([5.0, 1.0, 1.0, 7.0])
    np.testing.assert_array_equal(kmeans.cell_edges(levels, lengths, 0.0), [-1.25, -0.2, 1.55])
    # A positive penalty widens the cells of cheap (frequent) levels.
    edges = kmeans.cell_edges(levels, lengths, 0.5)
    assert edges[0] < -1.25  # level 1 is cheaper than level 0: its cell grows left
    assert edges[2] > 1.55  # level 2 is cheaper than level 3: its cell grows right
    assert np.all(np.diff(edges) >= 0)
    assert np.all(edges >= levels[:-1]) and np.all(edges <= levels[1:])


def test_assign_uses_edges():
    levels = np.array([0.0, 1.0, 2.0])
    edges = kmeans.cell_edges(levels, np.zeros(3), 0.0)
    idx = kmeans.assign(np.array([-5.0, 0.4, 0.6, 1.49, 1.51, 9.0]), levels, edges)
    np.testing.assert_array_equal(idx, [0, 0, 1, 1, 2, 2])
    assert idx.dtype == np.uint8


# ---------------------------------------------------------------- palettize


@pytest.mark.parametrize("bits", [1, 2, 4, 6, 8])
def test_palettize_tensor_granularity(bits):
    w = (np.random.default_rng(bits).standard_normal((32, 16, 3, 3)) * 0.2).astype(np.float32)
    p = kmeans.palettize(w, bits)
    assert p.bits == bits
    assert p.indices.shape == w.shape and p.indices.dtype == np.uint8
    assert int(p.indices.max()) < 2**bits
    assert p.palette.dtype == np.float16 and p.palette.size <= 2**bits
    assert int(p.indices.max()) < p.palette.size
    assert p.scales is None
    decoded = p.decode()
    assert decoded.shape == w.shape and decoded.dtype == np.float32
    # Every value is decoded to its nearest stored (fp16) palette entry.
    err = np.abs(decoded.astype(np.float64) - w).reshape(-1)
    np.testing.assert_allclose(err, _nearest(w, p.palette), rtol=0, atol=1e-7)
    # ... so the error is bounded by half the widest gap (or the distance past an end level).
    pal = np.sort(p.palette.astype(np.float64))
    bound = max(np.max(np.diff(pal), initial=0) / 2, pal[0] - w.min(), w.max() - pal[-1])
    assert err.max() <= bound + 1e-7


def test_palettize_error_shrinks_with_bits():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    errs = [float(np.mean((kmeans.palettize(w, b).decode() - w) ** 2)) for b in (2, 4, 6, 8)]
    assert all(b < a for a, b in pairwise(errs)), errs


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_palettize_rejects_bad_bits(bits):
    with pytest.raises(ValueError):
        kmeans.palettize(np.ones((4, 4), np.float32), bits)


@pytest.mark.parametrize("axis", [0, 1])
def test_palettize_channel_granularity_scales_along_axis(axis):
    rng = np.random.default_rng(axis)
    # Channels along `axis` differ in magnitude by orders of magnitude.
    shape = (12, 20)
    magnitudes = np.logspace(-3, 0, shape[axis])
    w = rng.standard_normal(shape) * (magnitudes[:, None] if axis == 0 else magnitudes[None, :])
    w = w.astype(np.float32)
    p = kmeans.palettize(w, 4, granularity="channel", axis=axis)
    assert p.scales is not None and p.scales.dtype == np.float16
    assert p.scales.shape == (shape[axis],)
    assert p.scale_axis == axis
    rms = np.sqrt(np.mean(np.moveaxis(w.astype(np.float64), axis, 0).reshape(shape[axis], -1) ** 2, axis=1))
    np.testing.assert_allclose(p.scales.astype(np.float64), rms, rtol=1e-3)
    decoded = p.decode()
    expected = p.palette.astype(np.float32)[p.indices] * (
        p.scales.astype(np.float32)[:, None] if axis == 0 else p.scales.astype(np.float32)[None, :]
    )
    np.testing.assert_array_equal(decoded, expected)
    # Per-channel scaling keeps the small channels' relative error small, unlike one shared palette.
    per_tensor = kmeans.palettize(w, 4).decode()
    small = (slice(0, 3), slice(None)) if axis == 0 else (slice(None), slice(0, 3))
    rel_channel = np.linalg.norm(decoded[small] - w[small]) / np.linalg.norm(w[small])
    rel_tensor = np.linalg.norm(per_tensor[small] - w[small]) / np.linalg.norm(w[small])
    assert rel_channel < 0.3 < rel_tensor


def test_palettize_4d_channel_axis0():
    w = (np.random.default_rng(5).standard_normal((8, 4, 3, 3)) * np.arange(1, 9)[:, None, None, None]).astype(
        np.float32
    )
    p = kmeans.palettize(w, 5, granularity="channel", axis=0)
    assert p.scales.shape == (8,)
    np.testing.assert_array_equal(
        p.decode(), p.palette.astype(np.float32)[p.indices] * p.scales.astype(np.float32)[:, None, None, None]
    )


def test_channel_scales_handle_zero_channels():
    w = np.zeros((3, 5), np.float32)
    w[1] = 2.0
    s = kmeans.channel_scales(w, 0)
    np.testing.assert_array_equal(s, np.array([1.0, 2.0, 1.0], np.float16))
    p = kmeans.palettize(w, 2, granularity="channel")
    np.testing.assert_array_equal(p.decode(), w)


@pytest.mark.parametrize("granularity,axis", [("tensor", 0), ("channel", 0), ("channel", 1)])
def test_decode_reproduces_stored_values(granularity, axis):
    """What palettize measured is bit-for-bit what the file will decode."""
    w = (np.random.default_rng(7).standard_normal((24, 40)) * 0.05).astype(np.float32)
    p = kmeans.palettize(w, 5, granularity=granularity, axis=axis)
    record = encode_tensor("t", w, p, Recipe(), codecs.PngOptions())
    np.testing.assert_array_equal(record.decode(), p.decode())
    np.testing.assert_array_equal(record.indices(), p.indices)
    np.testing.assert_array_equal(record.palette_values(), p.palette)
    # The levels indices were assigned against are the fp16 ones: re-assigning
    # the original values to the stored palette gives the same indices.
    if granularity == "tensor":
        pal = p.palette.astype(np.float64)
        again = kmeans.assign(w.reshape(-1), pal, kmeans.cell_edges(pal, np.zeros(pal.size), 0.0)).reshape(w.shape)
        np.testing.assert_array_equal(again, p.indices)


def test_palettize_with_rate_penalty_lowers_entropy():
    w = np.random.default_rng(0).standard_normal((128, 128)).astype(np.float32)
    plain = kmeans.palettize(w, 4)
    ecsq = kmeans.palettize(w, 4, rate_penalty=1.0)
    assert codecs.order0_entropy_bytes(ecsq.indices) < codecs.order0_entropy_bytes(plain.indices)


# ---------------------------------------------------------------- recipes


def test_bits_for_by_kind_and_size():
    r = Recipe(fc_bits=4, conv_bits=6, depthwise_bits=None, min_elements=100)
    assert r.bits_for("fc.weight", "fc", 1000) == 4
    assert r.bits_for("conv.weight", "conv", 1000) == 6
    assert r.bits_for("dw.weight", "depthwise", 1000) is None
    assert r.bits_for("conv.weight", "conv", 99) is None  # below min_elements
    assert r.bits_for("conv.weight", "conv", 100) == 6
    assert r.bits_for("bias", "other", 10**6) is None  # 'other' stays float


def test_bits_for_rules_override_kind_and_size():
    r = Recipe(
        fc_bits=4,
        conv_bits=6,
        min_elements=1000,
        rules=(LayerRule("_fc.*", None), LayerRule("_blocks.?.*", 3), LayerRule("stem*", 8)),
    )
    assert r.bits_for("_fc.weight", "fc", 10**6) is None
    assert r.bits_for("_blocks.3._expand_conv.weight", "conv", 10**6) == 3
    assert r.bits_for("_blocks.12._expand_conv.weight", "conv", 10**6) == 6  # '?' is one character
    assert r.bits_for("stem.weight", "conv", 10) == 8  # rule wins over the size floor
    assert r.bits_for("Stem.weight", "conv", 10) is None  # patterns are case-sensitive
    # First matching rule wins.
    r2 = Recipe(rules=(LayerRule("a*", 2), LayerRule("ab*", 5)))
    assert r2.bits_for("abc", "conv", 10**6) == 2


def test_with_bits_and_describe():
    r = recipes.KMEANS8.with_bits(3, granularity="channel")
    assert (r.fc_bits, r.conv_bits, r.depthwise_bits, r.granularity) == (3, 3, 8, "channel")
    assert recipes.KMEANS8.with_bits() is recipes.KMEANS8
    d = Recipe(rules=(LayerRule("x*", None), LayerRule("y", 4))).describe()
    assert d["rules"] == ["x*=float", "y=4"]
    assert set(d) >= {"name", "fc_bits", "conv_bits", "depthwise_bits", "method", "granularity", "rate_penalty"}
    assert set(recipes.NAMED_RECIPES) == {"lossless", "fp16", "default", "kmeans8", "fc4-rest8"}


@pytest.mark.parametrize(
    "text,pattern,bits",
    [
        ("a*=4", "a*", 4),
        ("x=float", "x", None),
        ("x=FP16", "x", None),
        ("_blocks.*._project_conv.weight=8", "_blocks.*._project_conv.weight", 8),
        ("name=with=equals=2", "name=with=equals", 2),
        ("y=1", "y", 1),
    ],
)
def test_layer_rule_parse(text, pattern, bits):
    assert LayerRule.parse(text) == LayerRule(pattern, bits)


def test_layer_rule_parse_uniform_step():
    rule = LayerRule.parse("_blocks.*=u0.25")
    assert rule == LayerRule("_blocks.*", 8, 0.25) and rule.spec == "u0.25"
    assert Recipe(rules=(rule,)).step_for("_blocks.3.w") == 0.25
    assert Recipe(rules=(rule,)).step_for("_fc.weight") is None


@pytest.mark.parametrize("text", ["a*", "=4", "a=9", "a=-1", "a=x", "a=", "a=4.5", "", "a=u", "a=ux", "a=u0", "a=u9"])
def test_layer_rule_parse_rejects(text):
    with pytest.raises(ValueError):
        LayerRule.parse(text)


# ---------------------------------------------------------------- GPTQ


def _correlated_inputs(n: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 6))
    return latent @ rng.standard_normal((6, width)) + 0.05 * rng.standard_normal((n, width))


@pytest.mark.parametrize("k", [4, 8, 16])
def test_gptq_beats_nearest_rounding_with_same_palette(k):
    rng = np.random.default_rng(k)
    x = _correlated_inputs(4000, 64, seed=k)
    h = x.T @ x / x.shape[0]
    w = rng.standard_normal((32, 64)) * 0.1
    book = kmeans.kmeans_1d(w, k)
    nearest = book.levels[kmeans.assign(w, book.levels, book.edges())]
    idx = gptq.gptq_indices(w, h, book)
    assert idx.shape == w.shape and idx.dtype == np.uint8 and int(idx.max()) < book.levels.size
    rounded = book.levels[idx]
    err_nearest = np.linalg.norm((w - nearest) @ x.T)
    err_gptq = np.linalg.norm((w - rounded) @ x.T)
    assert err_gptq < 0.5 * err_nearest


def test_gptq_with_isotropic_hessian_is_nearest_rounding():
    w = np.random.default_rng(0).standard_normal((16, 24))
    book = kmeans.kmeans_1d(w, 8)
    np.testing.assert_array_equal(gptq.gptq_indices(w, np.eye(24), book), kmeans.assign(w, book.levels, book.edges()))


def test_gptq_dead_inputs_and_singular_hessian():
    rng = np.random.default_rng(0)
    x = _correlated_inputs(500, 12, seed=1)
    x[:, 3] = 0.0  # an input that is never active
    h = x.T @ x / x.shape[0]  # singular (rank 6 + noise, one zero row)
    w = rng.standard_normal((5, 12))
    book = kmeans.kmeans_1d(w, 4)
    idx = gptq.gptq_indices(w, h, book)
    wq = book.levels[idx]
    assert np.all(np.isfinite(wq))
    # A dead input's weights don't matter; GPTQ rounds them toward zero.
    zero_level = int(kmeans.assign(np.zeros(1), book.levels, book.edges())[0])
    assert np.all(idx[:, 3] == zero_level)
    assert np.linalg.norm((w - wq) @ x.T) < np.linalg.norm(
        (w - book.levels[kmeans.assign(w, book.levels, book.edges())]) @ x.T
    )


def _output_error_gemm_out_axis1(w: np.ndarray, wq: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (w - wq)))  # Gemm with transB=0: Y = X @ W, W is (in, out)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_palettize_gptq_gemm_out_axis1(granularity):
    rng = np.random.default_rng(2)
    n_in, n_out = 48, 20
    x = _correlated_inputs(3000, n_in, seed=3)
    h = x.T @ x / x.shape[0]
    w = (rng.standard_normal((n_in, n_out)) * 0.1).astype(np.float32)
    p = gptq.palettize_gptq(w, 3, h, out_axis=1, granularity=granularity)
    assert p.indices.shape == w.shape
    assert p.scale_axis == 1
    if granularity == "channel":
        assert p.scales.shape == (n_out,)
    else:
        assert p.scales is None
    wq = p.decode()
    assert wq.shape == w.shape
    plain = kmeans.palettize(w, 3, axis=1, granularity=granularity).decode()
    assert _output_error_gemm_out_axis1(w, wq, x) < 0.5 * _output_error_gemm_out_axis1(w, plain, x)


@pytest.mark.parametrize("out_axis,shape", [(1, (24, 10)), (0, (10, 24)), (0, (10, 24, 1, 1))])
def test_palettize_gptq_identity_hessian_matches_palettize(out_axis, shape):
    """With H = I GPTQ is nearest rounding, so any axis mix-up shows as a difference."""
    w = (
        np.random.default_rng(4).standard_normal(shape)
        * np.linspace(0.1, 1, shape[out_axis]).reshape([-1 if i == out_axis else 1 for i in range(len(shape))])
    ).astype(np.float32)
    n_in = int(np.prod(shape)) // shape[out_axis]
    a = gptq.palettize_gptq(w, 4, np.eye(n_in), out_axis=out_axis, granularity="channel")
    b = kmeans.palettize(w, 4, axis=out_axis, granularity="channel")
    np.testing.assert_array_equal(a.palette, b.palette)
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.scale_axis == b.scale_axis == out_axis
    np.testing.assert_array_equal(a.decode(), b.decode())


def test_palettize_gptq_1x1_conv():
    rng = np.random.default_rng(5)
    out_ch, in_ch = 32, 16
    x = _correlated_inputs(3000, in_ch, seed=6)  # rows = pixels, columns = input channels
    h = x.T @ x / x.shape[0]
    w = (rng.standard_normal((out_ch, in_ch, 1, 1)) * 0.2).astype(np.float32)
    p = gptq.palettize_gptq(w, 3, h, out_axis=0, granularity="channel")
    assert p.indices.shape == w.shape and p.scales.shape == (out_ch,) and p.scale_axis == 0
    wq = p.decode()[:, :, 0, 0]
    plain = kmeans.palettize(w, 3, axis=0, granularity="channel").decode()[:, :, 0, 0]
    w2 = w[:, :, 0, 0]
    assert np.linalg.norm((w2 - wq) @ x.T) < 0.5 * np.linalg.norm((w2 - plain) @ x.T)


def test_palettize_gptq_rejects_wrong_hessian_size():
    w = np.zeros((10, 24), np.float32)
    with pytest.raises(ValueError, match="24 inputs"):
        gptq.palettize_gptq(w, 4, np.eye(10), out_axis=0)


def test_uniform_grid_is_evenly_spaced_compact_and_entropy_cheaper_than_kmeans():
    from klaus.codecs import order0_entropy_bytes

    w = np.random.default_rng(3).laplace(size=(96, 64, 1, 1)).astype(np.float32)
    u = kmeans.palettize(w, 8, granularity="channel", step=0.25)
    levels = np.sort(u.palette.astype(np.float64))
    gaps = np.diff(levels) / 0.25
    assert np.allclose(gaps, np.round(gaps), atol=2e-3) and np.all(
        np.round(gaps) >= 1
    )  # on the grid, unused levels dropped
    assert len(u.palette) == len(np.unique(u.indices)) and u.bits == int(np.ceil(np.log2(len(u.palette))))
    err_u = np.mean((u.decode() - w) ** 2)
    # Same error budget: the k-means palette with that distortion needs more bits of entropy.
    k = next(
        b for b in range(2, 9) if np.mean((kmeans.palettize(w, b, granularity="channel").decode() - w) ** 2) <= err_u
    )
    km = kmeans.palettize(w, k, granularity="channel")
    assert order0_entropy_bytes(u.indices) < order0_entropy_bytes(km.indices)


def test_uniform_grid_caps_at_256_levels():
    w = np.concatenate([np.zeros(1000), [1e3, -1e3]]).astype(np.float32).reshape(1, -1)
    u = kmeans.palettize(w, 8, step=1e-3 / np.sqrt(np.mean(w.astype(np.float64) ** 2)))
    assert len(u.palette) <= 256 and u.indices.dtype == np.uint8


# ---------------------------------------------------------------- GPTQ per channel (depthwise)


def _window_hessians(channels: int, taps: int, seed: int) -> np.ndarray:
    """Per-channel second moments of strongly correlated windows (like neighbouring pixels)."""
    return np.stack(
        [(lambda x: x.T @ x / x.shape[0])(_correlated_inputs(800, taps, seed=seed + c)) for c in range(channels)]
    )


def test_gptq_rows_equals_gptq_on_each_row():
    rng = np.random.default_rng(3)
    h = _window_hessians(4, 9, seed=10)
    w = rng.standard_normal((4, 9))
    book = kmeans.kmeans_1d(w, 8)
    rows = gptq.gptq_rows(w, gptq.hessian_factors(h), book)
    for c in range(4):
        np.testing.assert_array_equal(rows[c], gptq.gptq_indices(w[c : c + 1], h[c], book, block=9)[0])


def test_gptq_rows_dead_taps_round_to_zero():
    h = _window_hessians(3, 9, seed=20)
    h[1, 4, :] = h[1, :, 4] = 0.0  # channel 1 never sees its centre tap
    h[2] = 0.0  # channel 2 never sees anything
    w = np.random.default_rng(0).standard_normal((3, 9))
    book = kmeans.kmeans_1d(w, 4)
    idx = gptq.gptq_rows(w, gptq.hessian_factors(h), book)
    zero_level = int(kmeans.assign(np.zeros(1), book.levels, book.edges())[0])
    assert idx[1, 4] == zero_level and np.all(idx[2] == zero_level)
    assert np.all(np.isfinite(book.levels[idx]))


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_palettize_gptq_depthwise_cuts_output_error(granularity):
    rng = np.random.default_rng(5)
    h = _window_hessians(12, 9, seed=30)
    weight = rng.standard_normal((12, 1, 3, 3)).astype(np.float32)
    t = gptq.palettize_gptq(weight, 8, h, granularity=granularity, step=0.5)
    assert t.indices.shape == weight.shape and (t.scales is not None) == (granularity == "channel")

    def error(approx):
        d = (approx - weight).reshape(12, 9).astype(np.float64)
        return float(np.einsum("ci,cij,cj->", d, h, d))

    rounded = kmeans.palettize(weight, 8, granularity=granularity, step=0.5)
    assert error(t.decode()) < 0.5 * error(rounded.decode())
    with pytest.raises(ValueError, match="window Hessians"):
        gptq.palettize_gptq(weight, 8, h[:, :4, :4])


@pytest.mark.parametrize(
    "text,detail",
    [
        ("fc.weight=", "got ''"),
        ("head=x.weight", "got 'x.weight'"),
        ("a=4.5", "got '4.5'"),
        ("a=9", "got 9"),
        ("a=ux", "uniform step must be a number"),
        ("a*", "is not"),
    ],
)
def test_layer_rule_parse_errors_say_the_form(text, detail):
    with pytest.raises(ValueError) as info:
        LayerRule.parse(text)
    message = str(info.value)
    assert message.startswith(repr(text)) and detail in message and "PATTERN=BITS|float|uSTEP" in message
    assert "invalid literal" not in message
