"""The rows a sweep measures: fp32 and fp16, each bit width × quantization method on a layer scope,
budgeted mixed-precision rows, named recipes, and ONNX Runtime's dynamic int8 as a baseline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import onnx

from .. import onnxgraph
from ..compression.recipe import FP16, LOSSLESS, NAMED_RECIPES, LayerRule, Recipe
from ..errors import KlausModelError

SCOPES: tuple[str, ...] = ("fc", "conv", "all")


RowKind = Literal["reference", "fp16", "bits", "mixed", "recipe", "baseline"]


# Per bit width, how the scope is quantized (--methods); "tensor" is the original's method.
METHODS: tuple[str, ...] = ("tensor", "channel", "calibrated", "uniform")


# What a row is, for the table and the plot: a method above, or one of these.
SCHEMES: tuple[str, ...] = ("reference", "fp16", *METHODS, "mixed", "recipe", "baseline")


CALIBRATED_SCHEMES = ("calibrated", "mixed")  # rows that cannot be made without calibration images


MIXED_RECIPE = "default"  # the named recipe budgeted rows start from (looked up when the row runs)


# Uniform rows: the grid step (in channel-RMS units) whose index entropy is about b bits per
# weight (entropy ~ 2 - log2(step) for weights of unit RMS; measured on EfficientNet-Lite0's
# palettized tensors: 6.02, 5.08, 4.03, 3.04, 2.09 bits/weight at 0.0625, 0.125 (0.12), 0.25,
# 0.5, 1.0). Finer grids than 0.0625 need more than the palette's 256 levels to cover a
# channel's outliers (clipping), so widths 7 and 8 have no uniform row.
UNIFORM_STEPS: dict[int, float] = {1: 2.0, 2: 1.0, 3: 0.5, 4: 0.25, 5: 0.125, 6: 0.0625}


REFERENCE = "fp32"


INT8_BASELINE = "ort-int8-dynamic"


DEFAULT_MIN_ELEMENTS = Recipe().min_elements


@dataclass(frozen=True)
class Setting:
    """One row to measure: how it is compressed (None: the ONNX Runtime int8 baseline)."""

    label: str
    kind: RowKind
    recipe: Recipe | None
    scope: str | None = None
    bits: int | None = None
    calibrated: bool = False  # receives the calibration batch, if there is one
    scheme: str = ""  # see SCHEMES; "" = the kind's own
    step: float | None = None  # uniform rows: the grid step, channel-RMS units
    budget_bytes: int | None = None  # mixed rows: the file budget
    min_elements: int | None = None  # mixed rows: smaller tensors stay fp16 (None: compress_to_budget's own)

    @property
    def row_scheme(self) -> str:
        return self.scheme or {"bits": "tensor"}.get(self.kind, self.kind)

    @property
    def requires_calibration(self) -> bool:
        return self.row_scheme in CALIBRATED_SCHEMES


def scope_recipe(scope: str, bits: int, min_elements: int | None = None) -> Recipe:
    """Only the scope palettized, per tensor, by plain k-means (the original write-up's method)."""
    if scope not in SCOPES:
        raise KlausModelError(f"unknown scope {scope!r} (known: {', '.join(SCOPES)})")
    if not 1 <= bits <= 8:
        raise KlausModelError(f"bits must be 1..8, got {bits}")
    fc = bits if scope in ("fc", "all") else None
    conv = bits if scope in ("conv", "all") else None
    return Recipe(
        name=f"{scope}{bits}",
        fc_bits=fc,
        conv_bits=conv,
        depthwise_bits=conv,
        min_elements=DEFAULT_MIN_ELEMENTS if min_elements is None else min_elements,
        float_codec="raw-f16",
        granularity="tensor",
        method="kmeans",
    )


def method_setting(scope: str, bits: int, method: str, min_elements: int | None = None) -> Setting | None:
    """The row for ``method`` at ``bits`` on ``scope`` (None: the method has no row at that width).

    Every method starts from :func:`scope_recipe`, so rows at one width palettize the same
    tensors (same scope, same size floor) and differ only in how.
    """
    base = scope_recipe(scope, bits, min_elements)
    if method == "tensor":
        return Setting(f"{scope} {bits}-bit", "bits", base, scope, bits, scheme="tensor")
    if method == "channel":
        recipe = replace(base, name=f"{scope}{bits}-channel", granularity="channel")
        return Setting(f"{scope} {bits}-bit channel", "bits", recipe, scope, bits, scheme="channel")
    if method == "calibrated":
        recipe = replace(base, name=f"{scope}{bits}-calibrated", granularity="channel", method="gptq")
        return Setting(
            f"{scope} {bits}-bit calibrated", "bits", recipe, scope, bits, calibrated=True, scheme="calibrated"
        )
    if method == "uniform":
        step = UNIFORM_STEPS.get(bits)
        if step is None:
            return None
        # The per-tensor rules that carry the step are added per model (uniform_recipe), because
        # a rule matches tensor names and wins over the scope and the size floor.
        recipe = replace(base, name=f"{scope}-u{step:g}", granularity="channel")
        return Setting(f"{scope} {bits}-bit uniform", "bits", recipe, scope, bits, scheme="uniform", step=step)
    raise KlausModelError(f"unknown method {method!r} (known: {', '.join(METHODS)}; mixed rows come from --budget-mib)")


def uniform_recipe(recipe: Recipe, step: float, graph: onnx.ModelProto) -> Recipe:
    """``recipe`` with a uniform grid of ``step`` on exactly the tensors it palettizes in ``graph``."""
    roles = onnxgraph.tensor_roles(graph)
    rules = []
    for init in graph.graph.initializer:
        size = int(np.prod(init.dims)) if init.dims else 1
        role = roles.get(init.name)
        if role is not None and init.dims and size and recipe.bits_for(init.name, role.kind, size) is not None:
            rules.append(LayerRule.exact(init.name, 8, step))
    return replace(recipe, rules=tuple(rules))


def mixed_setting(mib: float, min_elements: int | None = None) -> Setting:
    """A budgeted mixed-precision row: the whole file within ``mib`` MiB (the recipe is chosen when it runs)."""
    budget = int(mib * 2**20)
    if budget <= 0:
        raise KlausModelError(f"--budget-mib must be positive, got {mib:g}")
    return Setting(
        f"mixed {mib:g} MiB",
        "mixed",
        None,
        calibrated=True,
        scheme="mixed",
        budget_bytes=budget,
        min_elements=min_elements,
    )


def plan(
    bits: Sequence[int],
    scope: str,
    recipes: Sequence[str] = (),
    *,
    methods: Sequence[str] = ("tensor",),
    budgets_mib: Sequence[float] = (),
    min_elements: int | None = None,
    int8_baseline: bool = True,
) -> list[Setting]:
    """The rows in table order: fp32, fp16, each width × each method, budgets, named recipes, int8 baseline.

    ``min_elements`` (tensors with fewer weights stay float) defaults to
    Recipe's 4096 for the method rows, to ``compress_to_budget``'s own for the
    mixed rows and to each named recipe's own value.
    """
    for method in methods:
        if method not in METHODS:
            raise KlausModelError(
                f"unknown method {method!r} (known: {', '.join(METHODS)}; mixed rows come from --budget-mib)"
            )
    settings = [
        Setting(REFERENCE, "reference", LOSSLESS),
        Setting("fp16", "fp16", FP16),
    ]
    for b in dict.fromkeys(bits):
        for method in dict.fromkeys(methods):
            setting = method_setting(scope, b, method, min_elements)
            if setting is not None:
                settings.append(setting)
    for mib in dict.fromkeys(budgets_mib):
        settings.append(mixed_setting(mib, min_elements))
    for name in dict.fromkeys(recipes):
        if name not in NAMED_RECIPES:
            raise KlausModelError(f"unknown recipe {name!r} (known: {', '.join(NAMED_RECIPES)})")
        if name in (LOSSLESS.name, FP16.name):
            continue  # always a row already
        recipe = NAMED_RECIPES[name]
        if min_elements is not None:
            recipe = recipe.with_bits(min_elements=min_elements)
        settings.append(Setting(name, "recipe", recipe, calibrated=True, scheme="recipe"))
    if int8_baseline:
        settings.append(Setting(INT8_BASELINE, "baseline", None, scheme="baseline"))
    return settings


def without_calibration(settings: Sequence[Setting]) -> tuple[list[Setting], list[Setting]]:
    """(rows that can run without calibration images, rows that cannot: calibrated and mixed)."""
    kept = [s for s in settings if not s.requires_calibration]
    return kept, [s for s in settings if s.requires_calibration]


def parse_methods(text: str) -> list[str]:
    """'tensor,channel' -> ['tensor', 'channel']."""
    values = list(dict.fromkeys(v for v in text.replace(" ", "").lower().split(",") if v))
    unknown = [v for v in values if v not in METHODS]
    if not values or unknown:
        raise KlausModelError(
            f"--methods needs comma-separated methods from {', '.join(METHODS)}, got {text!r}"
            + (" (mixed rows come from --budget-mib)" if "mixed" in unknown else "")
        )
    return values


def parse_budgets(text: str) -> list[float]:
    """'2.5,2.0,1.5' -> [2.5, 2.0, 1.5] (MiB)."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(not (v > 0 and np.isfinite(v)) for v in values):
        raise KlausModelError(f"--budget-mib needs comma-separated positive sizes in MiB, got {text!r}")
    return list(dict.fromkeys(values))


def parse_bits(text: str) -> list[int]:
    """'8,4,2' -> [8, 4, 2]."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or any(not 1 <= v <= 8 for v in values):
        raise KlausModelError(f"--bits needs comma-separated widths 1..8, got {text!r}")
    return list(dict.fromkeys(values))
