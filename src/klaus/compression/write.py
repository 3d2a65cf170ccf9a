"""The write step of a build: tensors encoded (palette + PNG index map, or raw floats), the
metadata that says how they were made, and the `.klaus` file written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .. import __version__, codecs
from ..format import KlausModel, LabelRow, TensorRecord, write_model
from ..preprocess import Preprocess
from .kmeans import PalettizedTensor
from .recipe import Recipe


@dataclass(frozen=True)
class ModelCard:
    """Provenance written into the file's metadata."""

    name: str
    source: str = "unknown"
    license: str = "unknown"
    creator: str = "unknown"
    description: str = ""


def card_of(model: KlausModel) -> ModelCard:
    """The provenance a `.klaus` file records, to carry into a file made from it."""
    meta = model.meta
    return ModelCard(meta["model_name"], meta["source"], meta["license"], meta["creator"], meta.get("description", ""))


def encode_tensor(
    name: str, array: np.ndarray, q: PalettizedTensor | None, recipe: Recipe, png: codecs.PngOptions
) -> TensorRecord:
    """A palettized tensor as palette + PNG index map, anything else as raw floats."""
    if q is None:
        return TensorRecord(
            name, tuple(array.shape), recipe.float_codec, 0, codecs.encode_raw(array, recipe.float_codec)
        )
    rows, cols = codecs.index_map_shape(array.shape)
    return TensorRecord(
        name,
        tuple(array.shape),
        "palette-png",
        q.bits,
        codecs.encode_png_indices(q.indices.reshape(rows, cols), q.bits, png),
        palette=q.palette.astype("<f2").tobytes(),
        scales=None if q.scales is None else q.scales.astype("<f2").tobytes(),
        scale_axis=None if q.scales is None else q.scale_axis,
    )


def assemble(
    skeleton: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    quantized: dict[str, PalettizedTensor],
    recipe: Recipe,
    calibration: np.ndarray | None,
    *,
    preprocess: Preprocess,
    labels: Sequence[LabelRow],
    card: ModelCard,
    output: str,
    png: codecs.PngOptions,
) -> KlausModel:
    """The `.klaus` model: encoded tensors plus the metadata that says how they were made."""
    records = [encode_tensor(name, array, quantized.get(name), recipe, png) for name, array in weights.items()]
    meta = {
        "model_name": card.name,
        "source": card.source,
        "license": card.license,
        "creator": card.creator,
        "description": card.description,
        "klaus_version": __version__,
        "output": output,
        "calibration_inputs": str(0 if calibration is None else calibration.shape[0]),
        "recipe": json.dumps(recipe.describe(), sort_keys=True, separators=(",", ":")),
    }
    return KlausModel(meta, preprocess, tuple(labels), skeleton.SerializeToString(deterministic=True), tuple(records))


def write(model: KlausModel, path: str | os.PathLike[str]) -> int:
    """Write ``model`` to ``path`` atomically; returns the file's size in bytes."""
    return write_model(model, path)  # as given: Path() would drop a trailing slash, which write_model refuses
