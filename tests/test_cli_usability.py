"""The `klaus` command where a new user meets it: preprocessing presets and the PyTorch hint, inspecting an
ONNX file before compressing it, tables for people, a photo on standard input, eval with nothing readable,
help text for every preprocessing option, and build outputs git ignores."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, ROOT, TINY_CLASSES, make_tiny_onnx
from klaus.cli import main
from klaus.format import read_model

CAT = EXAMPLES / "cat.jpg"


def run(*args: str | Path, stdin: bytes | None = None):
    return CliRunner().invoke(main, [str(a) for a in args], input=stdin, prog_name="klaus")


@pytest.fixture
def tiny(tmp_path: Path) -> dict[str, Path]:
    model = make_tiny_onnx()
    onnx.save(model, tmp_path / "tiny.onnx")
    model.producer_name, model.producer_version = "pytorch", "2.13.0"
    onnx.save(model, tmp_path / "torch.onnx")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(TINY_CLASSES)), encoding="utf-8")
    return {"dir": tmp_path, "onnx": tmp_path / "tiny.onnx", "torch": tmp_path / "torch.onnx", "labels": labels}


# ---------------------------------------------------------------- --preprocess presets


@pytest.mark.parametrize(
    ("preset", "mean", "std", "interpolation"),
    [
        (None, (127.0,) * 3, (128.0,) * 3, "bicubic"),
        ("lite", (127.0,) * 3, (128.0,) * 3, "bicubic"),
        ("torchvision", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "bilinear"),
        ("inception", (127.5,) * 3, (127.5,) * 3, "bilinear"),
    ],
)
def test_preprocess_presets(tiny, preset, mean, std, interpolation):
    out = tiny["dir"] / "p.klaus"
    given = ["--preprocess", preset] if preset else []
    result = run("compress", tiny["onnx"], "-o", out, "--labels", tiny["labels"], *given)
    assert result.exit_code == 0, result.stderr
    stored = read_model(out).preprocess
    assert (tuple(stored.mean), tuple(stored.std), stored.interpolation) == (mean, std, interpolation)
    assert stored.crop_ratio == 0.875 and stored.resize == "shorter"


def test_options_override_the_preset(tiny):
    out = tiny["dir"] / "p.klaus"
    args = ["--preprocess", "torchvision", "--mean", "1,2,3", "--interpolation", "lanczos", "--crop-ratio", "1"]
    result = run("compress", tiny["onnx"], "-o", out, "--labels", tiny["labels"], *args)
    assert result.exit_code == 0, result.stderr
    stored = read_model(out).preprocess
    assert tuple(stored.mean) == (1.0, 2.0, 3.0) and tuple(stored.std) == (58.395, 57.12, 57.375)
    assert stored.interpolation == "lanczos" and stored.crop_ratio == 1.0


def test_a_pytorch_export_without_preprocessing_options_gets_a_hint(tiny):
    out = tiny["dir"] / "p.klaus"
    result = run("compress", tiny["torch"], "-o", out, "--labels", tiny["labels"])
    assert result.exit_code == 0
    notes = [line for line in result.stderr.splitlines() if "PyTorch" in line]
    assert len(notes) == 1 and notes[0].startswith("klaus: note: ") and "--preprocess torchvision" in notes[0]
    for told in (["--preprocess", "lite"], ["--mean", "127,127,127", "--std", "128,128,128"]):
        quiet = run("compress", tiny["torch"], "-o", out, "--labels", tiny["labels"], *told)
        assert quiet.exit_code == 0 and "PyTorch" not in quiet.stderr
    other = run("compress", tiny["onnx"], "-o", out, "--labels", tiny["labels"])  # not from PyTorch
    assert other.exit_code == 0 and "PyTorch" not in other.stderr


def test_a_klaus_source_refuses_a_preset(tiny):
    lossless = tiny["dir"] / "l.klaus"
    assert run("compress", tiny["onnx"], "-o", lossless, "--labels", tiny["labels"], "--lossless").exit_code == 0
    result = run("compress", lossless, "-o", tiny["dir"] / "again.klaus", "--preprocess", "torchvision")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "klaus: error: --preprocess applies to ONNX input; a .klaus source keeps its own labels and preprocessing"
    )


def test_preprocessing_options_have_help_text():
    text = run("compress", "--help").stdout
    for option, words in {
        "--preprocess": "torchvision",
        "--resize": "keeping the aspect ratio",
        "--interpolation": "resampling filter",
        "--channel-order": "BGR: Caffe",
        "--layout": "NHWC",
    }.items():
        block = text[text.index(option) :]
        assert words in " ".join(block[:600].split()), option


# ---------------------------------------------------------------- inspect


def test_inspect_an_onnx_file_lists_what_compress_would_do(tiny):
    summary = json.loads(run("inspect", "--json", tiny["onnx"]).stdout)
    assert summary["format"] == "onnx" and summary["layout"] == "NCHW" and summary["outputs"] == TINY_CLASSES
    tensors = {t["name"]: t for t in summary["tensors"]}
    assert tensors["fc.weight"]["shape"] == [TINY_CLASSES, 64] and tensors["fc.weight"]["layer"] == "fc"
    assert tensors["dw.weight"]["layer"] == "depthwise" and tensors["fc.bias"]["layer"] == "other"
    # the tiny layers are under the default recipe's 16384-weight floor: all stay fp16
    assert {t["compress"]["codec"] for t in summary["tensors"]} == {"raw-f16"}
    out = tiny["dir"] / "t.klaus"
    assert run("compress", tiny["onnx"], "-o", out, "--labels", tiny["labels"]).exit_code == 0
    assert [t.name for t in read_model(out).tensors] == list(tensors)  # the names compress stores
    text = run("inspect", tiny["onnx"])
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert "tiny.onnx: ONNX" in lines[0] and "--layer PATTERN=BITS" in lines[1]
    assert any(line.split()[:2] == ["fc.weight", f"{TINY_CLASSES}x64"] for line in lines)


def test_inspect_columns_fit_long_names(tiny):
    model = make_tiny_onnx()
    long_name = "features.denseblock4.denselayer16.conv2.weight.with.a.very.long.name"
    for t in model.graph.initializer:
        if t.name == "fc.weight":
            t.name = long_name
    for node in model.graph.node:
        node.input[:] = [long_name if n == "fc.weight" else n for n in node.input]
    onnx.save(model, tiny["dir"] / "long.onnx")
    out = tiny["dir"] / "long.klaus"
    assert run("compress", tiny["dir"] / "long.onnx", "-o", out, "--labels", tiny["labels"]).exit_code == 0
    for source in (out, tiny["dir"] / "long.onnx"):
        lines = run("inspect", source).stdout.splitlines()
        header = next(line for line in lines if line.lstrip().startswith("tensor "))
        rows = [line for line in lines if line.startswith("  ") and line.split()[0] in ("stem.weight", long_name)]
        column = header.index("shape")
        assert len(rows) == 2 and all(row[column - 1] == " " and row[column] != " " for row in rows), rows


# ---------------------------------------------------------------- recipes, eval, classify -


def test_recipes_table_for_people_and_json_for_programs():
    lines = run("recipes").stdout.splitlines()
    assert lines[0].split()[:4] == ["recipe", "fc", "conv", "depthwise"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"lossless", "fp16", "default", "kmeans8", "fc4-rest8"}
    assert rows["default"][1:4] == ["5", "7", "8"]
    described = [json.loads(line) for line in run("recipes", "--json").stdout.splitlines()]
    assert [d["name"] for d in described] == ["lossless", "fp16", "default", "kmeans8", "fc4-rest8"]


def test_eval_with_no_readable_photo_is_an_error(tmp_path: Path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "n01440764_broken.jpg").write_bytes(b"not a photo")
    for json_flag in ([], ["--json"]):
        result = run("eval", *json_flag, folder)
        assert result.exit_code == 1 and result.stdout == ""
        errors = result.stderr.splitlines()
        assert errors[0].startswith("klaus: error: ") and "n01440764_broken.jpg" in errors[0]
        assert (
            errors[-1] == f"klaus: error: {folder}: none of its 1 photos could be read, so there is nothing to evaluate"
        )


def test_classify_reads_a_photo_from_standard_input():
    from_file = json.loads(run("classify", "--json", CAT).stdout)
    from_stdin = run("classify", "--json", "-", stdin=CAT.read_bytes())
    assert from_stdin.exit_code == 0, from_stdin.stderr
    row = json.loads(from_stdin.stdout)
    assert row["path"] == "-" and row["predictions"] == from_file["predictions"]
    junk = run("classify", "-", stdin=b"not a photo")
    assert junk.exit_code == 1 and "not an image" in junk.stderr
    twice = run("classify", "-", "-", stdin=b"")
    assert twice.exit_code == 1 and "can be given once" in twice.stderr


# ---------------------------------------------------------------- build outputs


def test_zoo_build_says_where_it_writes():
    text = " ".join(run("zoo", "build", "--help").stdout.split())
    assert "Default: NAME.klaus in the current folder" in text


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_built_models_are_git_ignored_except_the_embedded_one():
    def ignored(path: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("efficientnet-lite0-lossless.klaus") and ignored("out/some/model.klaus")
    assert not ignored("src/klaus/data/efficientnet-lite0.klaus")


# ---------------------------------------------------------------- progress


def on_a_terminal(*args: str | Path, cwd: Path) -> str:
    """What `klaus ARGS` writes to a terminal (a pseudo-terminal 120 columns wide), stdout and stderr together."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import sys
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    command = [sys.executable, "-m", "klaus.cli", *map(str, args)]
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
    return out.decode(errors="replace")


def test_compress_shows_its_stages_on_a_terminal_only(tiny):
    args = ["compress", tiny["onnx"], "-o", tiny["dir"] / "p.klaus", "--labels", tiny["labels"]]
    args += ["--min-elements", "64", "--calib", EXAMPLES]
    shown = on_a_terminal(*args, cwd=tiny["dir"])
    stages = [s for s in ("compress: calibration", "compress: quantize", "compress: write") if s in shown]
    assert stages == ["compress: calibration", "compress: quantize", "compress: write"], shown
    assert "compress:" not in on_a_terminal(*args, "--json", cwd=tiny["dir"])
    piped = run(*args)
    assert piped.exit_code == 0 and "compress:" not in piped.stderr
