"""The compression pipeline: an ONNX classifier plus a recipe in, a `.klaus` model out.

check (:mod:`~klaus.compression.check`) → plan (:mod:`~klaus.compression.plan`) → quantize
(:mod:`~klaus.compression.quantize`) → write (:mod:`~klaus.compression.write`); under a size
budget the plan is chosen by :mod:`~klaus.compression.budget`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import onnx

from .. import codecs, onnxgraph
from ..format import KlausModel, LabelRow, looks_like_klaus, read_model
from ..onnxgraph import to_onnx
from ..preprocess import Preprocess
from .check import check_fp16_range, check_inputs
from .plan import calibration_stats
from .quantize import Progress, palettized
from .recipe import Recipe, effective_recipe
from .write import ModelCard, assemble, card_of


def compress_onnx(
    model: onnx.ModelProto,
    recipe: Recipe,
    *,
    preprocess: Preprocess,
    labels: Sequence[LabelRow],
    card: ModelCard,
    output: str = "logits",
    png: codecs.PngOptions = codecs.PngOptions(),
    calibration: np.ndarray | None = None,
    progress: Progress | None = None,
) -> KlausModel:
    """Palettize, bias-correct (when calibration inputs are given) and encode a model."""
    check_inputs(model, preprocess, labels, card.name)
    skeleton, weights = onnxgraph.split_weights(model)
    roles = onnxgraph.tensor_roles(model)
    check_fp16_range(weights, roles, recipe, card.name)
    recipe = effective_recipe(recipe, calibration is not None)
    stats = None if calibration is None else calibration_stats(model, weights, roles, recipe, calibration)
    weights, quantized = palettized(model, weights, roles, recipe, stats, calibration, progress, finetune=True)
    return assemble(
        skeleton, weights, quantized, recipe, calibration, preprocess=preprocess, labels=labels, card=card,
        output=output, png=png,
    )


def recompress(
    model: KlausModel,
    recipe: Recipe,
    png: codecs.PngOptions = codecs.PngOptions(),
    calibration: np.ndarray | None = None,
    progress: Progress | None = None,
) -> KlausModel:
    """Apply a recipe to an existing (ideally lossless) model, keeping its card and labels."""
    return compress_onnx(
        to_onnx(model), recipe, preprocess=model.preprocess, labels=model.labels, card=card_of(model),
        output=model.meta["output"], png=png, calibration=calibration, progress=progress,
    )


def load_source(path: str | os.PathLike[str]) -> KlausModel | onnx.ModelProto:
    """A compression source: a `.klaus` model or an ONNX file, told apart by content."""
    if looks_like_klaus(path):
        return read_model(path)
    return onnxgraph.load_onnx(str(path))
