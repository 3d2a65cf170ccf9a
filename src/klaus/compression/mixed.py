"""Mixed precision under a budget: how many bits each layer gets.

Each candidate (a tensor at b bits, or kept at fp16) has a cost in stored bytes
(the index entropy — the PNG codec stores within ~1 % of it — plus palette and
scales) and a predicted loss: its input-energy-weighted squared weight error,
scaled per layer by how much that layer's error actually moves the network's
output (one forward pass per layer on calibration photos: KL to the float model
with only that layer palettized, divided by its proxy error). The allocation
minimizes total predicted loss + lambda * bytes layer by layer, with lambda
found by bisection so the file fits the budget (a Lagrangian knapsack).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import codecs, onnxgraph
from ..runtime import kl_divergence
from .calibrate import InputStats, weight_importance
from .kmeans import PalettizedTensor
from .recipe import LayerRule, Recipe

FLOAT = 0  # "bits" value of the keep-at-fp16 candidate
DEFAULT_CHOICES = (2, 3, 4, 5, 6, 7, 8)
# Uniform (entropy-coded) grids, in channel-RMS units: from ~1.2 to ~5.5 bits per weight.
# (The two coarsest matter at small budgets: at 1.5 MiB for Lite0 they cut the KL to
# fp32 from 0.157 to 0.105.)
DEFAULT_STEPS = (2.0, 1.4, 1.0, 0.7, 0.5, 0.35, 0.25, 0.18, 0.12, 0.09)
PROBE_BITS = 4
# With uniform candidates the sensitivity probe is the 0.18-step grid (~4.5 bits per
# weight): near where allocations land, where KL is still proportional to the proxy.
PROBE_STEP = 0.18


@dataclass(frozen=True)
class Candidate:
    bits: int  # FLOAT = keep fp16
    bytes: float
    proxy: float  # importance-weighted squared weight error
    step: float | None = None  # uniform grid instead of a k-means palette

    @property
    def spec(self) -> str:
        return "fp16" if self.bits == FLOAT else f"u{self.step:g}" if self.step is not None else str(self.bits)

    @property
    def quantizer(self) -> str:
        return (
            "fp16"
            if self.bits == FLOAT
            else f"uniform {self.step:g}"
            if self.step is not None
            else f"{self.bits}-bit k-means"
        )


@dataclass
class LayerOptions:
    name: str
    size: int
    candidates: list[Candidate]
    scale: float = 1.0  # KL per unit of proxy error, measured
    probe: int = 0  # index of the candidate whose KL was measured
    probe_proxy: float | None = None  # proxy error of the measured tensor, if not that candidate's own

    def cost(self, c: Candidate, lam: float) -> float:
        return self.scale * c.proxy + lam * c.bytes

    def best(self, lam: float) -> Candidate:
        return min(self.candidates, key=lambda c: (self.cost(c, lam), -c.bits, -(c.step or 0.0)))


@dataclass(frozen=True)
class Allocation:
    chosen: dict[str, Candidate]
    predicted_bytes: float
    predicted_kl: float
    layers: list[LayerOptions] = field(repr=False, default_factory=list)

    @property
    def bits(self) -> dict[str, int]:
        """Bits per tensor as stored (FLOAT = fp16; a uniform grid: the width its used levels need)."""
        return {n: c.bits for n, c in self.chosen.items()}

    def rules(self) -> tuple[LayerRule, ...]:
        return tuple(
            LayerRule.exact(name, None if c.bits == FLOAT else c.bits, c.step) for name, c in self.chosen.items()
        )

    def table(self) -> list[dict[str, object]]:
        rows = []
        for layer in self.layers:
            chosen = self.chosen[layer.name]
            rows.append(
                {
                    "tensor": layer.name,
                    "parameters": layer.size,
                    "bits": chosen.spec,
                    "quantizer": chosen.quantizer,
                    "bytes": round(chosen.bytes),
                    "predicted_kl": layer.scale * chosen.proxy,
                }
            )
        return rows


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(kl_divergence(p, q)))


Quantizer = Callable[[str, int, "float | None"], PalettizedTensor]


def output_error(weight: np.ndarray, approx: np.ndarray, role: onnxgraph.TensorRole, stats: InputStats | None) -> float:
    """Expected squared output error of a layer whose weight became ``approx``.

    Exact (trace of dW H dW^T) where the input Gram matrix is known (for a depthwise
    layer: per channel, over its input windows); otherwise the diagonal approximation
    (squared error times the input channel's energy).
    """
    delta = approx.astype(np.float64) - weight
    if stats is not None and stats.fits_windows(delta.shape):
        rows = delta.reshape(delta.shape[0], -1)
        return float(np.einsum("ci,cij,cj->", rows, stats.patch_hessian, rows))
    if stats is not None and stats.gram is not None:
        matrix = np.moveaxis(delta, role.out_axis, 0).reshape(delta.shape[role.out_axis], -1)
        if matrix.shape[1] == stats.gram.shape[0]:
            return float(np.sum((matrix @ stats.hessian) * matrix))
    importance = None if stats is None else weight_importance(role, weight.shape, stats.energy)
    return float(np.sum(delta**2 * (1.0 if importance is None else importance)))


def candidate_options(
    weights: dict[str, np.ndarray],
    roles: dict[str, onnxgraph.TensorRole],
    stats: dict[str, InputStats],
    eligible: Sequence[str],
    quantize: Quantizer,
    choices: Sequence[int] = DEFAULT_CHOICES,
    steps: Sequence[float] = (),
    probe_quantize: Quantizer | None = None,
) -> tuple[list[LayerOptions], dict[str, np.ndarray]]:
    """Every tensor at every bit width (and uniform step), quantized as the final build will; plus the probe decodes.

    ``probe_quantize`` makes the probe tensors instead (calibrated without the
    photos their KL is measured on, so a fit that does not carry over to new
    photos is not mistaken for a small error).
    """
    layers, probes = [], {}
    probe_key = (8, PROBE_STEP) if PROBE_STEP in steps else (PROBE_BITS, None)
    for name in eligible:
        w, role = weights[name], roles[name]
        st = stats.get(name)
        cands = [Candidate(FLOAT, 2.0 * w.size, 0.0)]
        layer = LayerOptions(name, int(w.size), cands)
        for bits, step in [(b, None) for b in choices] + [(8, s) for s in steps]:
            q = quantize(name, bits, step)
            decoded = q.decode()
            if (bits, step) == probe_key:
                layer.probe = len(cands)
                probes[name] = decoded if probe_quantize is None else probe_quantize(name, bits, step).decode()
                if probe_quantize is not None:
                    layer.probe_proxy = output_error(w, probes[name], role, st)
            extra = 2 * len(q.palette) + (0 if q.scales is None else 2 * len(q.scales))
            error = output_error(w, decoded, role, st)
            cands.append(Candidate(q.bits, codecs.order0_entropy_bytes(q.indices) * 1.01 + extra, error, step))
        layers.append(layer)
    return layers, probes


def measure_scales(
    layers: list[LayerOptions],
    weights: dict[str, np.ndarray],
    probes: dict[str, np.ndarray],
    probs: Callable[[dict[str, np.ndarray]], np.ndarray],
    reference: np.ndarray,
) -> None:
    """KL per unit proxy error for each layer, from one forward pass with only it palettized."""
    for layer in layers:
        proxy = layer.candidates[layer.probe].proxy if layer.probe_proxy is None else layer.probe_proxy
        kl = _kl(reference, probs({**weights, layer.name: probes[layer.name]}))
        layer.scale = kl / proxy if proxy > 0 else 0.0


def allocate(layers: list[LayerOptions], budget_bytes: float) -> Allocation:
    """Smallest total predicted KL whose bytes fit ``budget_bytes`` (bisection on lambda)."""

    def at(lam: float) -> Allocation:
        return _allocation(layers, {layer.name: layer.best(lam) for layer in layers})

    lo, hi = 0.0, 1e-12
    while at(hi).predicted_bytes > budget_bytes and hi < 1e6:
        hi *= 10
    best = at(hi)
    if best.predicted_bytes > budget_bytes:
        return best  # even the smallest choices do not fit; the caller reports it
    for _ in range(60):
        mid = (lo + hi) / 2
        trial = at(mid)
        if trial.predicted_bytes <= budget_bytes:
            hi, best = mid, trial
        else:
            lo = mid
    return _filled(layers, dict(best.chosen), budget_bytes)


def _filled(layers: list[LayerOptions], chosen: dict[str, Candidate], budget_bytes: float) -> Allocation:
    """Spend what the Lagrangian solution left unused, greedily by loss saved per byte.

    Its solutions jump in steps as large as one layer's change (the 1.28 M-weight FC
    layer moves by ~100 KB), so on its own it can leave a few percent of the budget idle.
    """
    spare = budget_bytes - sum(c.bytes for c in chosen.values())
    while True:
        best_gain, best_move = 0.0, None
        for layer in layers:
            now = chosen[layer.name]
            for c in layer.candidates:
                extra = c.bytes - now.bytes
                saved = layer.scale * (now.proxy - c.proxy)
                if 0 < extra <= spare and saved > 0 and saved / extra > best_gain:
                    best_gain, best_move = saved / extra, (layer.name, c, extra)
        if best_move is None:
            break
        name, c, extra = best_move
        chosen[name] = c
        spare -= extra
    return _allocation(layers, chosen)


def _allocation(layers: list[LayerOptions], chosen: dict[str, Candidate]) -> Allocation:
    return Allocation(
        chosen,
        sum(c.bytes for c in chosen.values()),
        sum(layer.scale * chosen[layer.name].proxy for layer in layers),
        layers,
    )


def budget_recipe(base: Recipe, allocation: Allocation) -> Recipe:
    """The base recipe with one exact rule per tensor (rules win over layer kinds)."""
    return Recipe(
        name=f"{base.name}+budget",
        fc_bits=None,
        conv_bits=None,
        depthwise_bits=None,
        rules=allocation.rules(),
        min_elements=0,
        float_codec=base.float_codec,
        granularity=base.granularity,
        method=base.method,
        rate_penalty=base.rate_penalty,
        iterations=base.iterations,
        finetune_steps=base.finetune_steps,
    )
