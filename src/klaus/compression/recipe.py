"""Recipes: which tensors are palettized at how many bits, and how the rest is stored.

A :class:`Recipe` is plain data: widths per layer kind, per-tensor :class:`LayerRule`
overrides (``--layer PATTERN=BITS``), a size floor, the float codec, and how palettes
are found (k-means or GPTQ, per tensor or per channel). :data:`NAMED_RECIPES` are the
ones `klaus recipes` lists.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from ..errors import KlausModelError
from ..onnxgraph import LayerKind
from .kmeans import Granularity

RULE_FORM = "PATTERN=BITS|float|uSTEP"  # how a --layer rule is written


@dataclass(frozen=True)
class LayerRule:
    """``pattern`` (fnmatch on the tensor name) gets ``bits`` (None keeps it float).

    With ``step``, the tensor gets uniform levels ``step`` channel-RMS apart
    (entropy-coded: the bytes follow how often each level is used, not the
    level count) instead of a k-means palette; ``bits`` is then only an upper bound
    (the stored width is what the used levels need).
    """

    pattern: str
    bits: int | None
    step: float | None = None

    @classmethod
    def exact(cls, name: str, bits: int | None, step: float | None = None) -> LayerRule:
        """A rule matching exactly one tensor name, whatever characters it holds."""
        return cls("".join(f"[{c}]" if c in "*?[]" else c for c in name), bits, step)

    @classmethod
    def parse(cls, text: str) -> LayerRule:
        """``PATTERN=BITS``, ``PATTERN=float`` or ``PATTERN=uSTEP``; a ValueError names the rule and the form."""
        pattern, sep, value = text.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"{text!r} is not {RULE_FORM}")
        try:
            if value.strip().lower().startswith("u"):
                return cls(pattern, 8, _parse_step(value.strip()[1:]))
            return cls(pattern, _parse_bits(value))
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc} (the form is {RULE_FORM})") from None

    @property
    def spec(self) -> str:
        if self.step is not None:
            return f"u{self.step:g}"
        return str(self.bits) if self.bits else "float"


def _parse_step(text: str) -> float:
    try:
        step = float(text)
    except ValueError:
        raise ValueError(f"uniform step must be a number, got {text!r}") from None
    if not 0.005 <= step <= 4.0:
        raise ValueError(f"uniform step must be in 0.005..4 (channel RMS units), got {step:g}")
    return step


def _parse_bits(text: str) -> int | None:
    if text.strip().lower() in ("float", "fp16", "none", "0"):
        return None
    try:
        bits = int(text)
    except ValueError:
        raise ValueError(f"BITS must be 1..8, 'float' or uSTEP, got {text.strip()!r}") from None
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be 1..8 (or 'float'), got {bits}")
    return bits


@dataclass(frozen=True)
class Recipe:
    """Which tensors are palettized at how many bits, and how the rest is stored."""

    name: str = "custom"
    fc_bits: int | None = 8
    conv_bits: int | None = 8
    depthwise_bits: int | None = None
    rules: tuple[LayerRule, ...] = ()
    min_elements: int = 4096
    float_codec: Literal["raw-f16", "raw-f32"] = "raw-f16"
    granularity: Granularity = "tensor"
    method: Literal["kmeans", "gptq"] = "kmeans"
    weighted: bool = False  # k-means weighted by input energy (needs calibration)
    rate_penalty: float = 0.0
    iterations: int = 100
    finetune_steps: int = 0  # palette/scale/bias distillation steps (needs calibration and torch)

    def bits_for(self, name: str, kind: LayerKind, size: int) -> int | None:
        """Bits for a tensor; explicit rules win, then the layer kind, then the size floor."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(name, rule.pattern):
                return rule.bits
        if size < self.min_elements or kind == "other":
            return None
        return {"fc": self.fc_bits, "conv": self.conv_bits, "depthwise": self.depthwise_bits}[kind]

    def step_for(self, name: str) -> float | None:
        """The uniform step of the first rule matching ``name`` (None: k-means)."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(name, rule.pattern):
                return rule.step
        return None

    def with_bits(self, bits: int | None = None, **overrides: Any) -> Recipe:
        """Same recipe with every palettized kind set to ``bits`` (plus any field overrides)."""
        base = self if bits is None else replace(self, fc_bits=bits, conv_bits=bits)
        return replace(base, **overrides) if overrides else base

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "fc_bits": self.fc_bits,
            "conv_bits": self.conv_bits,
            "depthwise_bits": self.depthwise_bits,
            "rules": [f"{r.pattern}={r.spec}" for r in self.rules],
            "min_elements": self.min_elements,
            "float_codec": self.float_codec,
            "granularity": self.granularity,
            "method": self.method,
            "weighted": self.weighted,
            "rate_penalty": self.rate_penalty,
            "finetune_steps": self.finetune_steps,
        }


LOSSLESS = Recipe(name="lossless", fc_bits=None, conv_bits=None, float_codec="raw-f32")


FP16 = Recipe(name="fp16", fc_bits=None, conv_bits=None, float_codec="raw-f16")


# The embedded model's recipe; docs/recipes.md has the measurements behind it.
# Needs calibration photos for GPTQ and bias correction; without them it falls
# back to plain k-means (see :func:`effective_recipe`).
DEFAULT = Recipe(
    name="default", fc_bits=5, conv_bits=7, depthwise_bits=8, min_elements=16384, granularity="channel", method="gptq"
)


# The original write-up's per-tensor k-means at one width for everything.
KMEANS8 = Recipe(name="kmeans8", fc_bits=8, conv_bits=8, depthwise_bits=8)


# The original write-up's mixed recipe: first FC layer 4-bit, the rest 8-bit.
# EfficientNet-Lite has one FC layer, so "fc4-rest8" means FC at 4 bits, conv at 8.
FC4_REST8 = Recipe(name="fc4-rest8", fc_bits=4, conv_bits=8)


NAMED_RECIPES = {r.name: r for r in (LOSSLESS, FP16, DEFAULT, KMEANS8, FC4_REST8)}


def effective_recipe(recipe: Recipe, calibrated: bool) -> Recipe:
    """GPTQ needs calibration inputs; without them the same bit plan runs as plain k-means."""
    if recipe.method == "gptq" and not calibrated:
        return replace(recipe, method="kmeans")
    return recipe


def recipe_from_options(
    name: str = "default",
    *,
    bits: int | None = None,
    fc_bits: int | None = None,
    conv_bits: int | None = None,
    depthwise_bits: int | None = None,
    layers: Sequence[str] = (),
    granularity: Granularity | None = None,
    lossless: bool = False,
    min_elements: int | None = None,
    weighted: bool | None = None,
    finetune_steps: int | None = None,
) -> Recipe:
    """The recipe `klaus compress` options describe: the named recipe with the given widths, ``--layer``
    rules (``PATTERN=BITS``, before the recipe's own) and settings; ``lossless`` is :data:`LOSSLESS`.

    A changed recipe is named ``<name>+custom``; widths given to a float-only recipe store the
    remaining floats at fp16. Errors are one :class:`KlausModelError` line naming the option.
    """
    if lossless:
        return LOSSLESS
    if name not in NAMED_RECIPES:
        raise KlausModelError(f"unknown recipe {name!r} (known: {', '.join(NAMED_RECIPES)})")
    recipe = NAMED_RECIPES[name]
    changes: dict[str, Any] = {}
    if bits is not None:
        changes.update(fc_bits=bits, conv_bits=bits)
    if fc_bits is not None:
        changes["fc_bits"] = fc_bits
    if conv_bits is not None:
        changes["conv_bits"] = conv_bits
    if depthwise_bits is not None:
        changes["depthwise_bits"] = depthwise_bits
    if granularity:
        changes["granularity"] = granularity
    try:
        rules = tuple(LayerRule.parse(text) for text in layers)
    except ValueError as exc:
        raise KlausModelError(f"--layer {exc}") from None
    if rules:
        changes["rules"] = rules + recipe.rules
    if changes:
        changes["name"] = f"{recipe.name}+custom" if recipe.name != "custom" else "custom"
        if recipe.float_codec == "raw-f32" and any(k.endswith("bits") for k in changes):
            changes["float_codec"] = "raw-f16"
    recipe = replace(recipe, **changes)
    if min_elements is not None or weighted or finetune_steps:
        recipe = replace(
            recipe,
            name=f"{recipe.name}+custom" if "custom" not in recipe.name else recipe.name,
            min_elements=recipe.min_elements if min_elements is None else min_elements,
            weighted=bool(weighted) or recipe.weighted,
            finetune_steps=recipe.finetune_steps if finetune_steps is None else finetune_steps,
        )
    return recipe
