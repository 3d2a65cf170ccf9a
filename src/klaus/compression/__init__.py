"""Making a model: an ONNX classifier plus a recipe in, a `.klaus` file out.

The pipeline (:mod:`.pipeline`) runs four steps, one module each: :mod:`.check` (the graph is a
safe, finite classifier the labels and preprocessing fit), :mod:`.plan` (bits per tensor and
the calibration statistics they need), :mod:`.quantize` (palettize, correct biases, fine-tune)
and :mod:`.write` (encode and write the file). The quantizers are :mod:`.kmeans` (k-means
palettes and uniform grids) and :mod:`.gptq` (Hessian-aware rounding), fed by :mod:`.calibrate`
(statistics of calibration photos); :mod:`.finetune` distils palettes from the float model;
:mod:`.mixed` allocates bits under a budget and :mod:`.budget` builds to it. :mod:`.recipe`
holds the recipes that say what to do.
"""

from __future__ import annotations

from .budget import compress_to_agreement, compress_to_budget
from .pipeline import compress_onnx, load_source, recompress
from .recipe import DEFAULT, FP16, LOSSLESS, NAMED_RECIPES, LayerRule, Recipe
from .write import ModelCard, write

__all__ = [
    "DEFAULT",
    "FP16",
    "LOSSLESS",
    "NAMED_RECIPES",
    "LayerRule",
    "ModelCard",
    "Recipe",
    "compress_onnx",
    "compress_to_agreement",
    "compress_to_budget",
    "load_source",
    "recompress",
    "write",
]
