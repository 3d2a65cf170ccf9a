"""The quantize step of a build: every planned tensor palettized (k-means, a uniform grid or GPTQ),
biases corrected for the shift that causes, and, if the recipe asks, palettes, scales and biases
fine-tuned by distillation from the float model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from .. import onnxgraph
from .calibrate import InputStats, correct_biases, weight_importance
from .finetune import FinetuneOptions, finetune
from .gptq import palettize_gptq
from .kmeans import PalettizedTensor, palettize
from .plan import planned_bits
from .recipe import Recipe

Progress = Callable[[str], None]


def quantize_weights(
    weights: dict[str, np.ndarray],
    roles: dict[str, onnxgraph.TensorRole],
    recipe: Recipe,
    stats: dict[str, InputStats] | None = None,
    progress: Progress | None = None,
) -> dict[str, PalettizedTensor]:
    """Palettize every tensor the recipe gives bits to (GPTQ where the recipe and calibration allow)."""
    out = {}
    for name, bits in planned_bits(weights, roles, recipe).items():
        if progress:
            progress(name)
        st = stats.get(name) if stats else None
        out[name] = quantize_tensor(weights[name], roles[name], bits, recipe, st, recipe.step_for(name))
    return out


def quantize_tensor(
    array: np.ndarray,
    role: onnxgraph.TensorRole,
    bits: int,
    recipe: Recipe,
    st: InputStats | None,
    step: float | None = None,
) -> PalettizedTensor:
    """One tensor as the recipe says: GPTQ where its layer's input statistics ``st`` hold a Hessian
    of its shape, else (weighted) k-means.

    ``step`` replaces the k-means palette by uniform levels that far apart.
    """
    granularity, iterations, rate_penalty = recipe.granularity, recipe.iterations, recipe.rate_penalty
    inputs = array.size // max(1, array.shape[role.out_axis]) if array.ndim else 0
    if (
        recipe.method == "gptq"
        and st is not None
        and st.gram is not None
        and st.count > 0
        and st.gram.shape[0] == inputs
    ):
        return palettize_gptq(
            array,
            bits,
            st.hessian,
            out_axis=role.out_axis,
            factor=st.factor(),
            granularity=granularity,
            iterations=iterations,
            rate_penalty=rate_penalty,
            step=step,
        )
    if recipe.method == "gptq" and st is not None and role.kind == "depthwise" and st.fits_windows(array.shape):
        return palettize_gptq(
            array,
            bits,
            st.patch_hessian,
            factor=st.patch_factor(),
            granularity=granularity,
            iterations=iterations,
            rate_penalty=rate_penalty,
            step=step,
        )
    importance = None if st is None or not recipe.weighted else weight_importance(role, array.shape, st.energy)
    return palettize(
        array,
        bits,
        axis=role.out_axis,
        importance=importance,
        granularity=granularity,
        iterations=iterations,
        rate_penalty=rate_penalty,
        step=step,
    )


def palettized(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    roles: dict[str, onnxgraph.TensorRole],
    recipe: Recipe,
    stats: dict[str, InputStats] | None,
    calibration: np.ndarray | None,
    progress: Progress | None,
    finetune: bool,
) -> tuple[dict[str, np.ndarray], dict[str, PalettizedTensor]]:
    """Every float tensor as it will be stored (biases corrected) and the palettized ones; ``stats`` by weight name."""
    quantized = quantize_weights(weights, roles, recipe, stats, progress)
    if stats is not None:
        weights = {**weights, **bias_corrected(weights, quantized, roles, stats)}
    if finetune and recipe.finetune_steps and calibration is not None and quantized:
        quantized, weights = finetuned(model, weights, quantized, roles, recipe, calibration, progress)
    return weights, quantized


def bias_corrected(
    weights: dict[str, np.ndarray],
    quantized: dict[str, PalettizedTensor],
    roles: dict[str, onnxgraph.TensorRole],
    stats: dict[str, InputStats],
) -> dict[str, np.ndarray]:
    """Biases that cancel each palettized layer's expected output shift (float-model input means).

    (An empirical variant that re-measured every layer's mean output in the
    palettized model and corrected all biases at once over-corrected — later
    layers compensate what earlier corrections already fixed — and raised KL.)
    """
    layers = [n for n in quantized if roles[n].bias in weights]
    means = {name: s.mean for name, s in stats.items()}
    decoded = {n: _live_taps_only(quantized[n].decode(), weights[n], stats.get(n)) for n in layers}
    biases = {roles[n].bias: weights[roles[n].bias] for n in layers}
    return correct_biases(weights, decoded, roles, means, biases)


def _live_taps_only(approx: np.ndarray, weight: np.ndarray, stats: InputStats | None) -> np.ndarray:
    """``approx`` with the float weight back on depthwise taps whose input windows only ever read padding.

    Such a tap multiplies zeros (a 7x7 window over a 2x2 map), so its change moves no output; GPTQ
    zeroes it, and counting that change against the channel's mean input would shift the bias by
    what the tap never contributes (ConvNeXt's last stage: decoded logits 0.24 of their spread
    from the float ones with it, 0.02 without).
    """
    if stats is None or stats.patch_gram is None or not stats.fits_windows(weight.shape):
        return approx
    live = np.diagonal(stats.patch_gram, axis1=1, axis2=2) > 0
    return np.where(live.reshape(weight.shape), approx, weight)


def finetuned(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    quantized: dict[str, PalettizedTensor],
    roles: dict[str, onnxgraph.TensorRole],
    recipe: Recipe,
    calibration: np.ndarray,
    progress: Progress | None,
) -> tuple[dict[str, PalettizedTensor], dict[str, np.ndarray]]:
    """Palettes, scales and biases after distillation from the float model (:mod:`klaus.compression.finetune`)."""
    stored = {n: stored_float(w, recipe.float_codec) for n, w in weights.items() if n not in quantized}
    result = finetune(
        model, stored, quantized, roles, calibration, FinetuneOptions(steps=recipe.finetune_steps), progress
    )
    if progress:
        progress(
            f"fine-tuned: KL to the float model {result.kl_before:.5f} -> {result.kl_after:.5f} (calibration inputs)"
        )
    return result.quantized, {**weights, **result.biases}


def stored_float(array: np.ndarray, codec: str) -> np.ndarray:
    """A float tensor as the file will hold it (fp16-rounded for raw-f16)."""
    return array.astype(np.float16).astype(np.float32) if codec == "raw-f16" else array
