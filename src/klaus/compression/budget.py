"""Builds under a size budget (``--budget-mib``) or an accuracy floor (``--max-drop``).

:class:`Search` does once what every candidate build needs: calibration statistics, every
layer's candidate quantizers with their bytes, and each layer's measured sensitivity
(:mod:`klaus.compression.mixed`). :meth:`Search.fit` then builds the allocation with the least
predicted loss whose real file fits the budget; :func:`compress_to_agreement` bisects the budget
for the smallest file whose top-1 agreement with the float model stays within a drop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import numpy as np
import onnx

from .. import codecs, onnxgraph
from ..errors import KlausModelError
from ..format import PAGE_SIZE, KlausModel, LabelRow, serialize
from ..preprocess import Preprocess
from ..runtime import run_batches, softmax
from . import mixed
from .calibrate import InputStats
from .check import check_fp16_range, check_inputs
from .kmeans import PalettizedTensor
from .mixed import Allocation
from .plan import calibration_stats
from .quantize import Progress, finetuned, palettized, quantize_tensor
from .recipe import LayerRule, Recipe
from .write import ModelCard, assemble

FIT_BUILDS = 5  # builds a budget fit may spend shrinking an allocation that came out too big


FIT_REFINEMENTS = 2  # ... and growing one that left more than FIT_SLACK of the budget unused


FIT_SLACK, FIT_SLACK_PAGES = 0.005, 4


MIN_BUDGET_ELEMENTS = 1024  # smaller weights stay fp16 under a budget: not worth a palette


PROBE_INPUTS = 128  # calibration inputs used to measure each layer's sensitivity


PROBE_EVERY = 4  # ... every fourth one, held out of the statistics the probe tensors are fitted to


def _views(count: int, views: int) -> int:
    """Rows per photo; rows that do not split evenly into photos count one by one."""
    return views if views > 0 and count % views == 0 else 1


def held_out_photos(count: int, every: int, views: int = 1) -> np.ndarray:
    """Rows of every ``every``-th photo; ``views`` consecutive rows (crops) make one photo."""
    return (np.arange(count) // _views(count, views)) % every == every - 1


def probe_rows(count: int, views: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(rows the statistics come from, rows that measure sensitivities).

    Every PROBE_EVERY-th photo is held out of the statistics the probe tensors
    are fitted to, so their KL says how the fit carries over to new photos; its
    first view (at most PROBE_INPUTS of them) is the probe. With very few
    inputs all of them do both.
    """
    if count < 2 * PROBE_EVERY * max(1, views):
        every = np.ones(count, dtype=bool)
        return every, every
    views = _views(count, views)
    held = held_out_photos(count, PROBE_EVERY, views)
    first = held & (np.arange(count) % views == 0)
    probe = np.zeros(count, dtype=bool)
    probe[np.flatnonzero(first)[:PROBE_INPUTS]] = True
    return ~held, probe


def merged_stats(a: dict[str, InputStats], b: dict[str, InputStats]) -> dict[str, InputStats]:
    """Statistics of two disjoint input sets combined (the sums add up); layers that shared one
    :class:`InputStats` share the merged one too."""
    merged: dict[tuple[int, int], InputStats] = {}
    out = {}
    for name, stats in a.items():
        if name not in b:
            out[name] = stats
            continue
        key = (id(stats), id(b[name]))
        if key not in merged:
            merged[key] = stats.merged(b[name])
        out[name] = merged[key]
    return out


# A build's pieces, kept for fine-tuning it later: its recipe, float tensors and palettized tensors.
Fitted = tuple[Recipe, dict[str, np.ndarray], dict[str, PalettizedTensor]]


class Search:
    """What a budgeted build needs once: statistics, every layer's candidates and their measured sensitivity."""

    def __init__(
        self,
        model,
        recipe,
        calibration,
        *,
        preprocess,
        labels,
        card,
        output,
        png,
        min_elements,
        uniform,
        views,
        progress,
    ):
        check_inputs(model, preprocess, labels, card.name)
        self.model, self.recipe, self.calibration = model, recipe, calibration
        self.skeleton, self.weights = onnxgraph.split_weights(model)
        self.roles = roles = onnxgraph.tensor_roles(model)
        check_fp16_range(self.weights, roles, recipe, card.name)
        eligible = [n for n, w in self.weights.items() if roles[n].kind != "other" and w.size >= min_elements]
        planned = replace(recipe, rules=tuple(LayerRule.exact(n, 8) for n in eligible))
        fit, probing = probe_rows(len(calibration), views)
        fit_stats = calibration_stats(model, self.weights, roles, planned, calibration[fit])
        rest = None if fit.all() else calibration_stats(model, self.weights, roles, planned, calibration[~fit])
        self.stats = stats = fit_stats if rest is None else merged_stats(fit_stats, rest)
        probe = calibration[probing]
        if progress:
            progress("candidates")
        weights = self.weights
        self.layers, probes = mixed.candidate_options(
            weights,
            roles,
            stats,
            eligible,
            lambda name, bits, step: quantize_tensor(weights[name], roles[name], bits, recipe, stats.get(name), step),
            steps=mixed.DEFAULT_STEPS if uniform else (),
            probe_quantize=None
            if rest is None
            else (
                lambda name, bits, step: quantize_tensor(
                    weights[name], roles[name], bits, recipe, fit_stats.get(name), step
                )
            ),
        )
        if progress:
            progress("sensitivities")
        mixed.measure_scales(
            self.layers, weights, probes, lambda ws: self.probabilities(ws, probe), self.probabilities(weights, probe)
        )
        self.meta = dict(preprocess=preprocess, labels=labels, card=card, output=output, png=png)
        self.progress = progress
        self.overhead: float | None = None
        self.fitted: Fitted | None = None

    def probabilities(self, weights: dict[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
        return softmax(run_batches(onnxgraph.join_weights(self.skeleton, weights), inputs))

    def build(self, allocation: Allocation, method: Literal["kmeans", "gptq"] | None = None) -> KlausModel:
        """The allocation built without fine-tuning; its pieces are kept for :meth:`finished`."""
        plan = replace(mixed.budget_recipe(self.recipe, allocation), method=method or self.recipe.method)
        weights, quantized = palettized(
            self.model, self.weights, self.roles, plan, self.stats, self.calibration, self.progress, finetune=False
        )
        self.fitted = plan, weights, quantized
        return assemble(self.skeleton, weights, quantized, plan, self.calibration, **self.meta)

    def measure_overhead(self, budget_bytes: float) -> float:
        """Bytes outside the planned tensors (labels, graph, small tensors, SQLite pages).

        Measured once, on a quick plain-k-means build of a first allocation.
        """
        if self.overhead is None:
            first = mixed.allocate(self.layers, budget_bytes * 0.9)
            self.overhead = len(serialize(self.build(first, "kmeans"))) - first.predicted_bytes
        return self.overhead

    def fit(self, budget_bytes: int) -> tuple[KlausModel, Allocation]:
        """The allocation with the least predicted loss whose built file fits ``budget_bytes`` (no fine-tuning yet).

        Predicted bytes miss the built size by a little (PNG and SQLite overheads), so an
        allocation that overshoots is shrunk, and one that leaves more than FIT_SLACK of
        the budget unused is grown once or twice, keeping the largest build that fits.
        """
        target = budget_bytes - self.measure_overhead(budget_bytes)
        best = None
        refinements = 0
        for _ in range(FIT_BUILDS + FIT_REFINEMENTS):
            allocation = mixed.allocate(self.layers, target)
            model = self.build(allocation)
            size = len(serialize(model))
            if size > budget_bytes:
                if best is not None:
                    break  # a refinement overshot: keep the last build that fit
                target -= (size - budget_bytes) * 1.5 + PAGE_SIZE
                continue
            best = model, allocation, self.fitted
            slack = budget_bytes - size
            if slack <= max(FIT_SLACK_PAGES * PAGE_SIZE, FIT_SLACK * budget_bytes) or refinements == FIT_REFINEMENTS:
                break
            target += 0.9 * slack  # the prediction error barely changes between nearby allocations
            refinements += 1
        if best is None:
            raise KlausModelError(f"cannot fit the model in {budget_bytes} bytes (smallest build: {size} bytes)")
        model, allocation, self.fitted = best
        return model, allocation

    def finished(self, model: KlausModel, fitted: Fitted | None) -> KlausModel:
        """``model`` fine-tuned from its build's pieces (``fitted``) if the recipe asks: palette, scale
        and bias values change, never their count or the indices, so the size stays within the budget."""
        if not self.recipe.finetune_steps:
            return model
        if fitted is None:
            raise ValueError("finished() needs the pieces of a build (call fit() first)")
        plan, weights, quantized = fitted
        quantized, weights = finetuned(
            self.model, weights, quantized, self.roles, plan, self.calibration, self.progress
        )
        return assemble(self.skeleton, weights, quantized, plan, self.calibration, **self.meta)


def compress_to_budget(
    model: onnx.ModelProto,
    recipe: Recipe,
    budget_bytes: int,
    *,
    preprocess: Preprocess,
    labels: Sequence[LabelRow],
    card: ModelCard,
    calibration: np.ndarray,
    output: str = "logits",
    png: codecs.PngOptions = codecs.PngOptions(),
    min_elements: int = MIN_BUDGET_ELEMENTS,
    uniform: bool = True,
    views: int = 1,
    progress: Progress | None = None,
) -> tuple[KlausModel, Allocation]:
    """The most accurate model whose file fits ``budget_bytes`` (see :mod:`klaus.compression.mixed`).

    ``views`` consecutive calibration rows are crops of one photo (held out together).
    """
    search = Search(
        model,
        recipe,
        calibration,
        preprocess=preprocess,
        labels=labels,
        card=card,
        output=output,
        png=png,
        min_elements=min_elements,
        uniform=uniform,
        views=views,
        progress=progress,
    )
    built, allocation = search.fit(budget_bytes)
    return search.finished(built, search.fitted), allocation


HOLDOUT_EVERY = 5  # --max-drop: every fifth calibration input checks agreement instead of calibrating


MAX_DROP_ROUNDS = 7


def compress_to_agreement(
    model: onnx.ModelProto,
    recipe: Recipe,
    max_drop: float,
    *,
    preprocess: Preprocess,
    labels: Sequence[LabelRow],
    card: ModelCard,
    calibration: np.ndarray,
    output: str = "logits",
    png: codecs.PngOptions = codecs.PngOptions(),
    min_elements: int = MIN_BUDGET_ELEMENTS,
    uniform: bool = True,
    views: int = 1,
    progress: Progress | None = None,
) -> tuple[KlausModel, Allocation, float]:
    """The smallest budgeted build whose top-1 agreement with the float model drops at most ``max_drop`` points.

    Agreement is measured on held-out calibration inputs (every fifth; the rest
    calibrate), so no evaluation photo is involved; it is returned with the model.
    The search bisects the byte budget between the smallest and the largest
    allocation in ``MAX_DROP_ROUNDS`` builds.
    """
    if not 0 <= max_drop < 100:
        raise KlausModelError(f"--max-drop must be in 0..100 percentage points, got {max_drop:g}")
    held = held_out_photos(len(calibration), HOLDOUT_EVERY, views)
    if held.sum() < 20:
        raise KlausModelError(
            f"--max-drop needs at least {20 * HOLDOUT_EVERY} calibration inputs (got {len(calibration)})"
        )
    search = Search(
        model,
        recipe,
        calibration[~held],
        preprocess=preprocess,
        labels=labels,
        card=card,
        output=output,
        png=png,
        min_elements=min_elements,
        uniform=uniform,
        views=views,
        progress=progress,
    )
    check = calibration[held]
    reference = search.probabilities(search.weights, check).argmax(axis=1)

    def agreement(built: KlausModel) -> float:
        return float(np.mean(search.probabilities(built.decoded_weights(), check).argmax(axis=1) == reference) * 100)

    smallest = mixed.allocate(search.layers, 0.0).predicted_bytes
    largest = sum(max(c.bytes for c in layer.candidates) for layer in search.layers)
    overhead = search.measure_overhead(largest)
    lo, hi = smallest + overhead, largest * 1.02 + overhead + 4 * PAGE_SIZE
    best = None
    for round_ in range(MAX_DROP_ROUNDS):
        budget = int(np.sqrt(lo * hi)) if round_ else int(hi)
        try:
            built, allocation = search.fit(budget)
        except KlausModelError:
            lo = budget
            continue
        agree = agreement(built)
        if progress:
            progress(f"{len(serialize(built)) / 2**20:.2f} MiB: agreement {agree:.1f} % on held-out calibration inputs")
        if agree >= 100 - max_drop:
            best, hi = (built, allocation, agree, search.fitted), budget
        else:
            lo = budget
    if best is None:
        raise KlausModelError(f"no build kept top-1 agreement within {max_drop:g} points of the float model")
    built, allocation, agree, fitted = best
    return search.finished(built, fitted), allocation, agree
