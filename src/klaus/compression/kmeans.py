"""Weight sharing by 1-D k-means, or by a uniform grid: a small palette per tensor plus an index map.

Pure numerics only — no file or graph I/O — so quantizers can be tested and swept
without touching the container. :func:`palettize` turns one float tensor into a
:class:`PalettizedTensor` whose decoded values are exactly what the `.klaus` file
will reproduce (palette and scales are rounded to fp16 *before* indices are
assigned, so the stored model is the model that was measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ..codecs import dequantize

Granularity = Literal["tensor", "channel"]


def _companded_init(x: np.ndarray, w: np.ndarray, k: int, bins: int = 8192) -> np.ndarray:
    """Centroids at the quantiles of density**(1/3), the high-resolution optimum.

    Plain quantiles starve the tails, and Lloyd's iterations move them out only
    slowly; the cube-root density (Panter & Dite) starts close to the MSE optimum.
    """
    hist, edges = np.histogram(x, bins=bins, weights=w)
    density = np.cbrt(hist)
    cum = np.cumsum(density)
    centers = (edges[:-1] + edges[1:]) / 2.0
    return np.interp((np.arange(k) + 0.5) / k * cum[-1], cum, centers)


@dataclass(frozen=True)
class Codebook:
    """Sorted levels, their usage, and the cell edges that assign values to them."""

    levels: np.ndarray  # float64, increasing
    counts: np.ndarray  # how many values each level received
    rate_penalty: float = 0.0  # lambda, squared-error units per bit (0 = plain k-means)

    def code_lengths(self) -> np.ndarray:
        p = self.counts / max(1.0, float(self.counts.sum()))
        return -np.log2(np.maximum(p, 1e-12))

    def edges(self, levels: np.ndarray | None = None) -> np.ndarray:
        return cell_edges(self.levels if levels is None else levels, self.code_lengths(), self.rate_penalty)


def cell_edges(levels: np.ndarray, code_lengths: np.ndarray, rate_penalty: float) -> np.ndarray:
    """Boundaries between adjacent levels minimizing (x - c)^2 + lambda * bits(c).

    With lambda = 0 these are the midpoints (nearest level); a positive lambda
    widens the cells of frequent levels, which lowers the entropy of the indices
    — entropy-constrained scalar quantization (ECSQ).
    """
    lo, hi = levels[:-1].astype(np.float64), levels[1:].astype(np.float64)
    edges = (lo + hi) / 2.0
    if rate_penalty > 0:
        gap = np.maximum(hi - lo, 1e-30)
        edges = edges + rate_penalty * (code_lengths[1:] - code_lengths[:-1]) / (2.0 * gap)
        edges = np.clip(np.maximum.accumulate(edges), lo, hi)
    return edges


def kmeans_1d(
    values: np.ndarray,
    k: int,
    weights: np.ndarray | None = None,
    iterations: int = 100,
    tol: float = 1e-9,
    rate_penalty: float = 0.0,
) -> Codebook:
    """Deterministic weighted Lloyd's k-means in one dimension (optionally entropy-constrained).

    In 1-D every cell is an interval of the sorted data, so one sort plus prefix
    sums make each iteration O(k log n) instead of O(n k). ``rate_penalty`` is
    relative to the plain k-means solution: lambda = rate_penalty * 2 ln 2 * D0,
    where D0 is its mean squared error — 1.0 trades bits for distortion at the
    slope of the high-rate D(R) curve, so it is meaningful at any bit width.
    """
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    w = np.ones_like(x) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("cannot cluster an empty tensor")
    order = np.argsort(x, kind="stable")
    x, w = x[order], np.maximum(w[order], 1e-30)
    uniq = np.unique(x)
    if uniq.size <= k:
        return _lloyd(x, w, Codebook(uniq, np.ones(uniq.size)), 1, tol)
    start = Codebook(np.unique(_companded_init(x, w, k)), np.ones(k))
    book = _lloyd(x, w, start, iterations, tol)
    if rate_penalty <= 0:
        return book
    lam = rate_penalty * 2.0 * np.log(2.0) * _distortion(x, w, book)
    return _lloyd(x, w, Codebook(book.levels, book.counts, lam), iterations, tol)


def _cells(x: np.ndarray, book: Codebook) -> np.ndarray:
    return np.concatenate([[0], np.searchsorted(x, book.edges(), side="right"), [x.size]])


def _distortion(x: np.ndarray, w: np.ndarray, book: Codebook) -> float:
    cuts = _cells(x, book)
    recon = np.repeat(book.levels, np.diff(cuts))
    return float(np.average((x - recon) ** 2, weights=w))


def _lloyd(x: np.ndarray, w: np.ndarray, book: Codebook, iterations: int, tol: float) -> Codebook:
    """Alternate cell assignment and centroid update on sorted data; drops empty cells."""
    cum_w = np.concatenate([[0.0], np.cumsum(w)])
    cum_wx = np.concatenate([[0.0], np.cumsum(w * x)])
    span = max(1e-12, float(x[-1] - x[0]))
    for _ in range(iterations):
        cuts = _cells(x, book)
        sw, swx, n = np.diff(cum_w[cuts]), np.diff(cum_wx[cuts]), np.diff(cuts).astype(np.float64)
        keep = n > 0
        updated = swx[keep] / sw[keep]
        shift = float(np.max(np.abs(updated - book.levels[keep]))) if keep.all() else np.inf
        book = Codebook(updated, n[keep], book.rate_penalty)
        if shift <= tol * span:
            break
    return book


def assign(values: np.ndarray, levels: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Cell index of every value, given increasing levels and the edges between them."""
    return np.searchsorted(edges, np.asarray(values, dtype=np.float64), side="left").astype(np.uint8)


@dataclass(frozen=True)
class PalettizedTensor:
    """A tensor as palette[indices] (times per-channel scales along ``scale_axis``)."""

    bits: int
    palette: np.ndarray  # float16, at most 2**bits entries
    indices: np.ndarray  # uint8, same shape as the tensor
    scales: np.ndarray | None = None  # float16, one per slice along scale_axis
    scale_axis: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def decode(self) -> np.ndarray:
        return dequantize(self.palette, self.indices, self.scales, self.scale_axis)


def _along(scales: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return scales.astype(np.float32).reshape(shape)


def channel_scales(weight: np.ndarray, axis: int) -> np.ndarray:
    """Per-output-channel RMS, rounded to fp16 (so decode uses exactly these)."""
    moved = np.moveaxis(weight.astype(np.float64), axis, 0).reshape(weight.shape[axis], -1)
    rms = np.sqrt(np.mean(moved * moved, axis=1))
    rms = np.where(rms > 0, rms, 1.0)
    scales = rms.astype(np.float16)
    return np.where(np.isfinite(scales) & (scales > 0), scales, np.float16(1.0)).astype(np.float16)


def palettize(
    weight: np.ndarray,
    bits: int,
    *,
    granularity: Granularity = "tensor",
    axis: int = 0,
    importance: np.ndarray | None = None,
    iterations: int = 100,
    rate_penalty: float = 0.0,
    step: float | None = None,
) -> PalettizedTensor:
    """Cluster a tensor's values into 2**bits fp16 levels (or a uniform grid) and index every value."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8, got {bits}")
    weight = np.asarray(weight, dtype=np.float32)
    scales = channel_scales(weight, axis) if granularity == "channel" else None
    normalized = weight if scales is None else weight / _along(scales, weight.ndim, axis)
    book = codebook(normalized, bits, step, scales is not None, importance, iterations, rate_penalty)
    indices = assign(normalized.reshape(-1), book.levels, book.edges()).reshape(weight.shape)
    return packed(bits, book, indices, scales, axis, compact=step is not None)


def codebook(
    normalized: np.ndarray,
    bits: int,
    step: float | None,
    scaled: bool,
    importance: np.ndarray | None,
    iterations: int,
    rate_penalty: float,
) -> Codebook:
    """The fp16 levels to index against: k-means at ``bits``, or the uniform grid of ``step``
    (in channel-RMS units when the values are already ``scaled`` per channel, else tensor-RMS units).

    Rounded to fp16 first so indices are chosen against the levels that are stored.
    """
    if step is None:
        return _fp16_codebook(kmeans_1d(normalized, 1 << bits, importance, iterations, rate_penalty=rate_penalty))
    return uniform_codebook(normalized, step if scaled else step * _rms(normalized))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) or 1.0


UNIFORM_MAX_LEVELS = 256


def uniform_codebook(values: np.ndarray, step: float) -> Codebook:
    """Levels ``step`` apart covering the values (at most 256 of them, centred on the median).

    At a given entropy, evenly spaced levels quantize with less error than a
    fixed-size k-means palette (the high-rate ECSQ optimum is uniform).
    """
    k = np.round(np.asarray(values, dtype=np.float64) / step)
    lo, hi = float(k.min()), float(k.max())
    if hi - lo + 1 > UNIFORM_MAX_LEVELS:
        mid = float(np.median(k))
        lo = max(lo, mid - UNIFORM_MAX_LEVELS // 2)
        hi = lo + UNIFORM_MAX_LEVELS - 1
    levels = np.arange(lo, hi + 1) * step
    return _fp16_codebook(Codebook(levels, np.ones(levels.size)))


def packed(
    bits: int, book: Codebook, indices: np.ndarray, scales: np.ndarray | None, axis: int, compact: bool
) -> PalettizedTensor:
    """The tensor record; ``compact`` drops unused levels and sizes ``bits`` to the rest."""
    palette = book.levels.astype(np.float16)
    if compact:
        used, inverse = np.unique(indices.reshape(-1), return_inverse=True)
        palette, indices = palette[used], inverse.astype(np.uint8).reshape(indices.shape)
        bits = max(1, int(np.ceil(np.log2(max(2, used.size)))))
    return PalettizedTensor(bits=bits, palette=palette, indices=indices, scales=scales, scale_axis=axis)


def _fp16_codebook(book: Codebook) -> Codebook:
    """Round levels to fp16 (what the file stores) and merge levels that collide."""
    palette16 = book.levels.astype(np.float16)
    keep = np.isfinite(palette16) & np.concatenate([[True], palette16[1:] != palette16[:-1]])
    return Codebook(palette16[keep].astype(np.float64), book.counts[keep], book.rate_penalty)
