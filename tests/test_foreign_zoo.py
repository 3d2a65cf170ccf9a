"""Classifiers from outside the EfficientNet-Lite family, exported from PyTorch and driven through the CLI.

Each architecture of tests/foreign_models.py (small widths, 64 px inputs, seeded random weights:
the structure is what is tested) is exported with torch.onnx -- the TorchScript exporter at
opsets 13 and 17, the dynamo exporter (opset 18) where it works, with a free and a fixed batch --
and then compressed with every method, classified, evaluated, inspected, exported back to ONNX
and swept, as a user would. A command must finish without a traceback and the decoded graph's
logits must stay within a tolerance of the float graph's. Exports are made once per session.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import EXAMPLES
from klaus import onnxgraph
from klaus.cli import main
from klaus.format import read_model
from klaus.preprocess import prepare

torch = pytest.importorskip("torch", reason="exporting PyTorch models needs the convert extra")
fm = pytest.importorskip("foreign_models")

CALIB_PHOTOS = 100  # enough for --max-drop (a fifth of them checks agreement)
MIN_ELEMENTS = "512"  # the small networks' layers are small: palettize most of them
FAST_PNG = ("--png-level", "0")  # index maps are tested elsewhere; here they only need to decode


@dataclass(frozen=True)
class Export:
    """One way to export an architecture: exporter, opset and batch (None: free)."""

    arch: str
    opset: int = 17
    dynamo: bool = False
    batch: int | None = None

    @property
    def id(self) -> str:
        batch = "dyn" if self.batch is None else f"b{self.batch}"
        return f"{self.arch}-{'dynamo' if self.dynamo else 'torchscript'}-op{self.opset}-{batch}"


LEGACY = [Export(arch) for arch in fm.ARCHITECTURES]
VARIANTS = [
    Export("resnet18", 13),
    Export("mobilenet_v3", 13),
    Export("vit", 13),
    Export("densenet", 13, batch=2),
    Export("shufflenet", 17, batch=2),
    Export("googlenet", 17, batch=3),
    Export("resnet50", 18, dynamo=True),
    Export("squeezenet", 18, dynamo=True, batch=2),
    Export("vit", 18, dynamo=True),
]


def run(*args: str | Path) -> str:
    """One `klaus` command, in process; its stdout. A failure shows the command and its stderr."""
    result = CliRunner().invoke(main, [str(a) for a in args], prog_name="klaus")
    command = " ".join(str(a) for a in args)
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{command}: {result.exception!r}"
    assert result.exit_code == 0, f"klaus {command}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Calibration photos (crops of examples/), a labelled list of the examples, and room for exports."""
    folder = tmp_path_factory.mktemp("foreign-zoo")
    calib = folder / "calib"
    calib.mkdir()
    rng = np.random.default_rng(0)
    photos = sorted(EXAMPLES.glob("*.jpg"))
    for i in range(CALIB_PHOTOS):
        with Image.open(photos[i % len(photos)]) as opened:
            image = opened.convert("RGB")
            w, h = image.size
            side = int(min(w, h) * rng.uniform(0.4, 0.9))
            x, y = int(rng.uniform(0, w - side)), int(rng.uniform(0, h - side))
            image.crop((x, y, x + side, y + side)).resize((80, 80), Image.Resampling.BILINEAR).save(
                calib / f"{i:03d}.png"
            )
    (folder / "examples.txt").write_text(
        "".join(f"{p} {i}\n" for i, p in enumerate(photos)), encoding="utf-8"
    )  # labels are arbitrary: random weights
    return folder


@pytest.fixture(scope="session")
def exported(zoo_dir: Path) -> Callable[[Export], Path]:
    """The ONNX file of an export, made on first use."""
    made: dict[Export, Path] = {}

    def get(export: Export) -> Path:
        if export.dynamo:
            pytest.importorskip("onnxscript", reason="torch.onnx's dynamo exporter needs onnxscript (convert extra)")
        if export not in made:
            net, size = fm.build(export.arch)
            path = zoo_dir / f"{export.id}.onnx"
            fm.export(net, size, path, opset=export.opset, dynamo=export.dynamo, batch=export.batch)
            made[export] = path
        return made[export]

    return get


def logits(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    """The model's outputs for ``x``, run in groups of its fixed batch (padded) when it has one."""
    model = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fixed = onnxgraph.fixed_batch(model)
    return np.concatenate(
        [session.run(None, {"input": part})[0][:real] for part, real in onnxgraph.batches(x, 8, fixed)]
    )


def probe_inputs(klaus_file: Path, zoo_dir: Path, count: int = 12) -> np.ndarray:
    """Preprocessed inputs as the .klaus file's preprocessing makes them (crops of examples/)."""
    preprocess = read_model(klaus_file).preprocess
    return np.concatenate([prepare(p, preprocess) for p in sorted((zoo_dir / "calib").iterdir())[:count]])


def relative_error(approx: np.ndarray, reference: np.ndarray) -> float:
    """RMS difference of the logits in units of the reference logits' spread across classes."""
    return float(np.sqrt(np.mean((approx - reference) ** 2)) / np.mean(np.std(reference, axis=1)))


def decoded_error(klaus_file: Path, float_onnx: Path, zoo_dir: Path) -> float:
    """How far the decoded graph (written by `klaus export`) is from the float graph, on the same inputs."""
    decoded = klaus_file.with_suffix(".decoded.onnx")
    run("export", klaus_file, "-o", decoded)
    x = probe_inputs(klaus_file, zoo_dir)
    return relative_error(logits(decoded, x), logits(float_onnx, x))


# method -> compress options and the tolerance of the decoded logits (relative_error); measured on these
# networks: plain and per-channel 8-bit k-means <= 0.01, calibrated (default recipe) <= 0.03, uniform 0.25
# grid <= 0.17, budget (a fifth of fp32) and --max-drop 10 <= 0.25.
METHODS: dict[str, tuple[tuple[str, ...], float]] = {
    "plain": (("--recipe", "kmeans8", "--granularity", "tensor"), 0.05),
    "per-channel": (("--recipe", "kmeans8", "--granularity", "channel"), 0.05),
    "calibrated": (("--calib", "{calib}", "--calib-limit", "32"), 0.1),
    "uniform": (("--layer", "*.weight=u0.25"), 0.3),
    "budget": (("--calib", "{calib}", "--calib-limit", "24", "--budget-mib", "{budget}"), 0.5),
    "max-drop": (("--calib", "{calib}", "--max-drop", "10"), 0.5),
}
# Every architecture gets the calibrated build (per-layer statistics are what it tests) and one more
# method; the searches (budget, --max-drop) run where their structure differs most.
PLAN: dict[str, tuple[str, ...]] = {
    "resnet18": ("calibrated", "plain"),
    "resnet50": ("calibrated", "per-channel"),
    "mobilenet_v2": ("calibrated",),
    "mobilenet_v3": ("calibrated", "plain"),
    "efficientnet_b0": ("calibrated",),
    "convnext": ("calibrated", "uniform"),
    "densenet": ("calibrated", "plain", "per-channel"),
    "squeezenet": ("calibrated", "uniform", "budget"),
    "shufflenet": ("calibrated", "per-channel"),
    "googlenet": ("calibrated", "uniform"),
    "vit": ("calibrated", "plain", "max-drop"),
}


def compress(src: Path, out: Path, zoo_dir: Path, options: tuple[str, ...], budget: float = 0.0) -> dict:
    filled = [o.format(calib=zoo_dir / "calib", budget=f"{budget:.4f}") for o in options]
    floor = () if "--lossless" in options else ("--min-elements", MIN_ELEMENTS, *FAST_PNG)
    report = json.loads(run("compress", src, "-o", out, *floor, "--json", *filled))
    assert out.is_file() and report["bytes"] == out.stat().st_size
    return report


@pytest.mark.parametrize("export", LEGACY + VARIANTS, ids=lambda e: e.id)
def test_weights_keep_their_pytorch_names(export: Export, exported: Callable[[Export], Path]) -> None:
    net, _ = fm.build(export.arch)
    graph = onnxgraph.rename_weights(onnxgraph.simplify(onnx.load(str(exported(export)))))
    roles = onnxgraph.tensor_roles(graph)
    layers = [name for name, role in roles.items() if role.kind != "other"]
    assert layers and set(layers) <= set(net.state_dict()), sorted(set(layers) - set(net.state_dict()))


@pytest.mark.parametrize("arch", list(PLAN))
def test_methods_compress_within_tolerance(arch: str, exported, zoo_dir: Path) -> None:
    src = exported(Export(arch))
    budget = 0.0
    if "budget" in PLAN[arch]:
        lossless = zoo_dir / f"{arch}-lossless.klaus"
        compress(src, lossless, zoo_dir, ("--lossless",))
        budget = lossless.stat().st_size / 2**20 / 5  # a fifth of the fp32 file
    for method in PLAN[arch]:
        options, tolerance = METHODS[method]
        out = zoo_dir / f"{arch}-{method}.klaus"
        report = compress(src, out, zoo_dir, options, budget)
        assert report["recipe"]["method"] == ("kmeans" if method in ("plain", "per-channel", "uniform") else "gptq")
        if method == "budget":
            assert report["bytes"] <= budget * 2**20
        error = decoded_error(out, src, zoo_dir)
        assert error < tolerance, f"{method}: decoded logits {error:.3f} from the float ones (tolerance {tolerance})"


@pytest.mark.parametrize("export", [*VARIANTS, Export("convnext"), Export("efficientnet_b0")], ids=lambda e: e.id)
def test_classify_eval_inspect_export(export: Export, exported, zoo_dir: Path) -> None:
    """A calibrated build of each export runs as a user runs it; fixed batches run in padded groups."""
    src = exported(export)
    out = zoo_dir / f"{export.id}-run.klaus"
    lossless = zoo_dir / f"{export.id}-run-lossless.klaus"
    compress(src, out, zoo_dir, ("--calib", "{calib}", "--calib-limit", "24"))
    compress(src, lossless, zoo_dir, ("--lossless",))
    photos = sorted(EXAMPLES.glob("*.jpg"))[:3]  # 3 photos: a fixed batch of 2 pads the second group
    rows = [json.loads(line) for line in run("classify", "--json", "--model", out, *photos).splitlines()]
    assert len(rows) == len(photos) and all(len(r["predictions"]) == 5 for r in rows)
    evaluation = json.loads(
        run("eval", "--json", "--model", out, "--reference", lossless, zoo_dir / "examples.txt").splitlines()[-1]
    )
    assert evaluation["n"] == 4
    summary = json.loads(run("inspect", "--json", out).splitlines()[0])
    assert any(t["codec"] == "palette-png" for t in summary["tensors"])
    assert run("inspect", out).strip()
    error = decoded_error(out, src, zoo_dir)
    assert error < METHODS["calibrated"][1], error


@pytest.mark.parametrize("export", [Export("squeezenet"), Export("shufflenet", 17, batch=2)], ids=lambda e: e.id)
def test_sweep_of_a_foreign_model(export: Export, exported, zoo_dir: Path) -> None:
    """Every row of a sweep, ORT's int8 baseline included; a fixed batch of 2 evaluates 3 photos in padded groups."""
    src = exported(export)
    out = zoo_dir / f"sweep-{export.id}"
    args: list[str | Path] = ["--data", zoo_dir / "examples.txt", "--limit", "3", "--bits", "4", "--scope", "all"]
    args += ["--min-elements", MIN_ELEMENTS, "--methods", "tensor,calibrated,uniform"]
    args += ["--calib", zoo_dir / "calib", "--calib-limit", "24", "--out", out, "--json"]
    rows = [json.loads(line) for line in run("sweep", src, *args).splitlines()]
    settings = [r.get("setting") for r in rows]
    assert len(rows) == 6 and "ort-int8-dynamic" in settings, settings
    assert all(r["n"] == 3 and r["error"] is None for r in rows) and (out / "sweep.md").is_file()
