"""Golden outputs of the `klaus` command: what every case prints and writes, normalized for timings.

Used by tests/test_golden.py (compares) and scripts/record_golden.py (records into tests/golden/).
Each case runs the CLI in a subprocess, in a scratch folder, with relative paths, and returns one
text: the commands, their exit status, stdout, stderr, and the SHA-256 or text of the files they
wrote. Timings (``elapsed_ms``, ``seconds``, the sweep's ``compress_seconds``/``eval_seconds``) are
removed, and the Klaus version the files record is pinned to :data:`VERSION`, so a release does not
change the bytes; everything else must stay byte-identical.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx

from conftest import EXAMPLES, IMAGENET_SAMPLE, ROOT, TINY_CLASSES, make_tiny_onnx

GOLDEN = Path(__file__).resolve().parent / "golden"
VERSION = "0.0.0+golden"
EMBEDDED = ROOT / "src" / "klaus" / "data" / "efficientnet-lite0.klaus"
DEV = "imagenet-sample"  # the development photos, linked into the scratch folder under this name
# Runs the real CLI entry point with the version string pinned (it is written into every file).
RUNNER = f"import sys, klaus; klaus.__version__ = {VERSION!r}; from klaus.cli import main; main()"
TIMING_KEYS = ("elapsed_ms", "seconds", "compress_seconds", "eval_seconds")


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Path], str]
    needs_dev: bool = False  # the development photos (../shared/data)
    needs_torch: bool = False  # fine-tuning


def split(command: str) -> list[str]:
    return shlex.split(command)


def dev_photos() -> list[str]:
    """Every 50th development photo in sorted order: 20 photos, relative to the scratch folder."""
    return [f"{DEV}/{p.name}" for p in sorted(IMAGENET_SAMPLE.iterdir())[::50]]


def scratch(folder: Path) -> None:
    """The scratch folder's inputs: the examples, the tiny ONNX classifier and its labels, the
    embedded model, a list file labelling the examples, and a link to the development photos."""
    for photo in sorted(EXAMPLES.glob("*.jpg")):
        shutil.copyfile(photo, folder / photo.name)
    onnx.save(make_tiny_onnx(), folder / "tiny.onnx")
    (folder / "labels.txt").write_text("".join(f"class {i}\n" for i in range(TINY_CLASSES)), encoding="utf-8")
    (folder / "examples.txt").write_text("astronaut.jpg 0\ncat.jpg 1\ncoffee.jpg 2\nrocket.jpg 3\n", encoding="utf-8")
    shutil.copyfile(EMBEDDED, folder / "efficientnet-lite0.klaus")
    if IMAGENET_SAMPLE.is_dir():
        (folder / DEV).symlink_to(IMAGENET_SAMPLE, target_is_directory=True)


def klaus(folder: Path, *args: str) -> str:
    """One CLI run as text: the command, its exit status, stdout and stderr (timings removed)."""
    env = {k: v for k, v in os.environ.items() if k not in ("KLAUS_DB", "COLUMNS")}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, *args], cwd=folder, capture_output=True, text=True, env=env, timeout=600
    )
    return (
        f"$ klaus {shlex.join(args)}\nexit {done.returncode}\n--- stdout\n{without_timings(done.stdout)}"
        f"--- stderr\n{done.stderr}"
    )


def without_timings(text: str) -> str:
    """JSON lines without their timing keys; text lines with '(… ms)' and '… s' for their timings."""
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.dumps(_drop(json.loads(line)), ensure_ascii=False))
        else:
            line = re.sub(r"\(\d+ ms\)", "(… ms)", line)  # classify's time per photo
            lines.append(re.sub(r"(,|\bin) \d+(\.\d+)? s$", r"\1 … s", line))  # compress's and sweep's build time
    return "".join(f"{line}\n" for line in lines)


def _drop(value: object) -> object:
    if isinstance(value, dict):
        return {k: _drop(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_drop(v) for v in value]
    return value


def sha256(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "(not written)"
    return f"--- sha256 {path.name}\n{digest}\n"


def sweep_files(out: Path) -> str:
    """sweep.md (without its 'compress s' column), sweep.csv and sweep.json (without timing columns)."""
    md = []
    for line in (out / "sweep.md").read_text(encoding="utf-8").splitlines():
        md.append(line.rsplit("|", 2)[0] + "|" if line.startswith("| ") else line)
    rows = list(csv.DictReader(io.StringIO((out / "sweep.csv").read_text(encoding="utf-8"))))
    table = io.StringIO()
    columns = [c for c in rows[0] if c not in TIMING_KEYS]
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    data = _drop(json.loads((out / "sweep.json").read_text(encoding="utf-8")))
    return (
        "--- sweep.md\n"
        + "\n".join(md)
        + "\n--- sweep.csv\n"
        + table.getvalue()
        + "--- sweep.json\n"
        + json.dumps(data, indent=2, ensure_ascii=False)
        + "\n"
    )


# ---------------------------------------------------------------- cases


def classify_dev(folder: Path) -> str:
    return klaus(folder, "classify", "--json", *dev_photos())


def classify_examples(folder: Path) -> str:
    photos = [p.name for p in sorted(EXAMPLES.glob("*.jpg"))]
    runs = [
        klaus(folder, "classify", "--json", *photos),
        klaus(folder, *split("classify --json --crops 10 --top 3 --low-memory"), *photos),
        klaus(folder, *split("classify cat.jpg missing.jpg")),
        klaus(folder, *split("classify --json --model tiny.onnx cat.jpg")),
    ]
    return "\n".join(runs)


def eval_dev(folder: Path) -> str:
    return klaus(folder, *split(f"eval --json --split odd --limit 20 {DEV}"))


def inspect_embedded(folder: Path) -> str:
    runs = [
        "inspect --json efficientnet-lite0.klaus",
        "inspect efficientnet-lite0.klaus",
        "recipes --json",
        "zoo list --json",
    ]
    return "\n".join(klaus(folder, *split(run)) for run in runs)


TINY = "tiny.onnx --labels labels.txt"


def compress_tiny(folder: Path) -> str:
    runs = [
        ("kmeans.klaus", "--min-elements 64"),
        ("gptq.klaus", "--min-elements 64 --calib ."),
        ("budget.klaus", "--calib . --budget-mib 0.0122"),
        ("lossless.klaus", "--lossless"),
        (
            "options.klaus",
            "--bits 3 --granularity tensor --min-elements 16 --layer fc.weight=u0.5 --layer 'stem.*=float' --zopfli "
            "--name 'tiny model' --source conftest",
        ),
        (
            "weighted.klaus",
            "--recipe kmeans8 --fc-bits 2 --conv-bits 5 --depthwise-bits 4 --min-elements 64 --weighted --calib . "
            "--calib-crops 10",
        ),
    ]
    parts = [
        klaus(folder, *split(f"compress {TINY} -o {out} --json {options}")) + sha256(folder / out)
        for out, options in runs
    ]
    parts.append(klaus(folder, *split("export gptq.klaus -o gptq.onnx --json")) + sha256(folder / "gptq.onnx"))
    parts.append(klaus(folder, *split("compress gptq.klaus -o again.klaus --bits 4")) + sha256(folder / "again.klaus"))
    parts.append(klaus(folder, *split("compress tiny.onnx -o x.klaus")))  # 10 outputs, no labels: one-line error
    return "\n".join(parts)


def compress_finetune(folder: Path) -> str:
    options = "--min-elements 64 --calib . --calib-crops 10 --finetune-steps 20"
    return klaus(folder, *split(f"compress {TINY} -o tuned.klaus --json {options}")) + sha256(folder / "tuned.klaus")


def compress_max_drop(folder: Path) -> str:
    options = f"--min-elements 64 --calib {DEV} --calib-limit 120 --calib-split even --max-drop 5"
    return klaus(folder, *split(f"compress {TINY} -o drop.klaus --json {options}")) + sha256(folder / "drop.klaus")


def compress_embedded(folder: Path) -> str:
    run = klaus(folder, *split("compress efficientnet-lite0.klaus -o four.klaus --bits 4 --json"))
    return run + sha256(folder / "four.klaus")


def sweep_tiny(folder: Path) -> str:
    options = (
        "--data examples.txt --bits 4,2 --no-int8 --min-elements 64 --methods tensor,channel,calibrated,uniform "
        "--budget-mib 0.0122 --recipe kmeans8 --calib . --out sweep-tiny --json"
    )
    return klaus(folder, *split(f"sweep {TINY} {options}")) + sweep_files(folder / "sweep-tiny")


def sweep_embedded(folder: Path) -> str:
    options = f"--data {DEV} --split odd --limit 8 --bits 4 --no-int8 --out sweep-lite0 --json"
    return klaus(folder, *split(f"sweep efficientnet-lite0.klaus {options}")) + sweep_files(folder / "sweep-lite0")


CASES = (
    Case("classify-dev", classify_dev, needs_dev=True),
    Case("classify-examples", classify_examples),
    Case("eval-dev", eval_dev, needs_dev=True),
    Case("inspect-embedded", inspect_embedded),
    Case("compress-tiny", compress_tiny),
    Case("compress-finetune", compress_finetune, needs_torch=True),
    Case("compress-max-drop", compress_max_drop, needs_dev=True),
    Case("compress-embedded", compress_embedded),
    Case("sweep-tiny", sweep_tiny),
    Case("sweep-embedded", sweep_embedded, needs_dev=True),
)


def missing(case: Case) -> str | None:
    """Why ``case`` cannot run here, or None."""
    if case.needs_dev and not IMAGENET_SAMPLE.is_dir():
        return f"development data not present ({IMAGENET_SAMPLE}); CI has it"
    if case.needs_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            return "fine-tuning needs torch (the 'convert' extra)"
    return None


def output(case: Case, folder: Path) -> str:
    """``case``'s golden text, computed in the (empty) scratch ``folder``."""
    scratch(folder)
    return case.run(folder)


def golden_path(case: Case) -> Path:
    return GOLDEN / f"{case.name}.txt"
