"""Size at accuracy: EfficientNet-Lite0 as fp32, fp16, ONNX Runtime int8 (dynamic and static QDQ) and Klaus recipes.

    python bench/size_accuracy.py [--only fp16,int8-dynamic,int8-static,klaus-default,kmeans8,fc4-rest8]

Evaluation: the odd-class half of ``../shared/data/imagenet-sample`` (500
photos, one per class), center crop, top-1 / top-5 and top-1 agreement with the
fp32 model on the same photos. Calibration (ONNX Runtime static QDQ; the
embedded Klaus model was built with the even half): even-class photos only, so
no photo is used for both. All models get identical preprocessed inputs.
"""

from __future__ import annotations

import logging

import numpy as np

from _common import (
    SAMPLE,
    THREADS,
    cached,
    cli,
    command,
    embedded_model,
    fp32_onnx,
    ort_session,
    pct,
    ratio,
    table,
)

KEYS = ("fp16", "int8-dynamic", "int8-static", "klaus-default", "kmeans8", "fc4-rest8")
STATIC_CALIB_IMAGES = 100  # every 5th even-class photo: MinMax keeps activations per batch, so fewer keeps RAM sane
BATCH = 25


def split_files(parity: str) -> list:
    from klaus.compression.calibrate import image_files
    from klaus.compression.calibrate import split_files as split
    from klaus.labels import imagenet_label_rows

    wnids = {r.wnid: r.index for r in imagenet_label_rows()}
    return split(image_files([SAMPLE]), parity, wnids)


def preprocessed(files) -> np.ndarray:
    from klaus.preprocess import prepare
    from klaus.zoo import entry

    spec = entry("efficientnet-lite0").preprocess
    return np.concatenate([prepare(f, spec) for f in files])


def labels_of(files) -> np.ndarray:
    from klaus.labels import imagenet_label_rows

    wnids = {r.wnid: r.index for r in imagenet_label_rows()}
    return np.array([wnids[f.name.split("_", 1)[0]] for f in files])


# ---------------------------------------------------------------- the models


def fp16_storage(model):
    """fp16 storage: every float initializer stored as fp16, a Cast back to fp32 in front of its use.

    onnxconverter-common is not installed; ONNX Runtime folds the Casts at load,
    so the arithmetic is fp32 on fp16-rounded weights (the `.klaus` fp16 recipe's numbers).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    casts, kept = [], []
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
            kept.append(half)
            casts.append(
                helper.make_node("Cast", [half.name], [init.name], name=init.name + "_cast", to=TensorProto.FLOAT)
            )
        else:
            kept.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def fp16_onnx(path_fp32):
    import onnx

    return cached(
        "efficientnet-lite0-fp16.onnx", lambda out: onnx.save(fp16_storage(onnx.load(str(path_fp32))), str(out))
    )


def int8_dynamic(path_fp32):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    return cached(
        "efficientnet-lite0-int8-dynamic.onnx",
        lambda out: quantize_dynamic(str(path_fp32), str(out), weight_type=QuantType.QInt8),
    )


def int8_static(path_fp32):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            files = split_files("even")[::5][:STATIC_CALIB_IMAGES]
            self.batches = iter(preprocessed([f])[None][0] for f in files)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {"input": x}

    def build(out):
        quantize_static(
            str(path_fp32),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"CalibMaxIntermediateOutputs": 16},  # 100 % 16 != 0: ORT fails on an empty last flush
        )

    return cached("efficientnet-lite0-int8-static-qdq.onnx", build)


def klaus_recipe(path_fp32, recipe_name: str):
    import onnx

    from klaus import compression, zoo
    from klaus.compression.recipe import NAMED_RECIPES

    def build(out):
        model = zoo.build("efficientnet-lite0", NAMED_RECIPES[recipe_name], model=onnx.load(str(path_fp32)))
        compression.write(model, out)

    return cached(f"efficientnet-lite0-{recipe_name}.klaus", build)


# ---------------------------------------------------------------- evaluation


def top5_onnx(path, x: np.ndarray) -> np.ndarray:
    session = ort_session(path, THREADS)
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i : i + BATCH]})[0] for i in range(0, len(x), BATCH)])
    return np.argsort(-logits, axis=1, kind="stable")[:, :5]


def top5_klaus(path, x: np.ndarray) -> np.ndarray:
    from klaus.runtime import Classifier

    clf = Classifier(path, threads=THREADS)
    probs = np.concatenate([clf.run(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])
    return np.argsort(-probs, axis=1, kind="stable")[:, :5]


def scores(top5: np.ndarray, labels: np.ndarray, ref_top1: np.ndarray) -> tuple[float, float, float]:
    top1 = float(np.mean(top5[:, 0] == labels))
    top5_acc = float(np.mean((top5 == labels[:, None]).any(axis=1)))
    agree = float(np.mean(top5[:, 0] == ref_top1))
    return top1, top5_acc, agree


def run(only: list[str] | None = None) -> str:
    header = [
        "### Size at accuracy (EfficientNet-Lite0, odd-class half of the development photos)",
        "",
    ]
    if not SAMPLE.is_dir():
        return "\n".join([*header, f"Skipped: {SAMPLE} is not present."])
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's pre-processing advice
    wanted = list(only or KEYS)
    files = split_files("odd")
    x, labels = preprocessed(files), labels_of(files)
    base_path = fp32_onnx()
    ref = top5_onnx(base_path, x)
    base_bytes = base_path.stat().st_size
    plan = {
        "fp16": ("fp16 ONNX (fp16 initializers + Cast, built by this script)", lambda: fp16_onnx(base_path), top5_onnx),
        "int8-dynamic": ("ORT `quantize_dynamic`, QInt8 weights", lambda: int8_dynamic(base_path), top5_onnx),
        "int8-static": (
            f"ORT `quantize_static` QDQ, per-channel QInt8 weights / QUInt8 activations, MinMax over "
            f"{STATIC_CALIB_IMAGES} even-class photos",
            lambda: int8_static(base_path),
            top5_onnx,
        ),
        "klaus-default": (
            "Klaus embedded model (`--budget-mib 2.5`: mixed k-means/uniform grids per tensor, GPTQ + bias "
            "correction, even-half calibration)",
            embedded_model,
            top5_klaus,
        ),
        "kmeans8": (
            "Klaus `kmeans8` (all conv/FC 8-bit, per-tensor palette, no calibration)",
            lambda: klaus_recipe(base_path, "kmeans8"),
            top5_klaus,
        ),
        "fc4-rest8": (
            "Klaus `fc4-rest8` (FC 4-bit, conv 8-bit, no calibration)",
            lambda: klaus_recipe(base_path, "fc4-rest8"),
            top5_klaus,
        ),
    }
    t1, t5, _ = scores(ref, labels, ref[:, 0])
    rows = [
        [
            "fp32 ONNX (`klaus.zoo.export_onnx`; baseline)",
            base_bytes,
            f"{base_bytes / 2**20:.2f}",
            "1.00×",
            pct(t1),
            pct(t5),
            "—",
            command("size_accuracy.py"),
        ]
    ]
    failures = []
    for key in wanted:
        label, make, evaluate = plan[key]
        try:
            path = make()
            top5 = evaluate(path, x)
        except Exception as exc:  # a baseline that does not run is a result too
            failures.append(f"- {label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
            continue
        size = path.stat().st_size
        t1, t5, agree = scores(top5, labels, ref[:, 0])
        rows.append(
            [
                label,
                size,
                f"{size / 2**20:.2f}",
                ratio(size, base_bytes, 3),
                pct(t1),
                pct(t5),
                pct(agree),
                command("size_accuracy.py", "--only", key),
            ]
        )
    return "\n".join(
        header
        + [
            f"n = {len(files)} photos (odd class indices). File = the bytes a user ships (`.onnx` or `.klaus`). "
            "Agreement = same top-1 as the fp32 model. These are mostly ImageNet training photos: use the differences, "
            "not the absolute accuracy. Published context (full ImageNet validation set): TFLite int8 EfficientNet-Lite0 "
            "is 4.65 MB at 74.22 % top-1 versus 74.94 % for fp32.",
            "",
            table(
                ["model", "file bytes", "MiB", "vs fp32 size", "top-1", "top-5", "agreement with fp32", "command"], rows
            ),
        ]
        + (["", *failures] if failures else [])
    )


if __name__ == "__main__":
    cli(__doc__.splitlines()[0], run, KEYS)
