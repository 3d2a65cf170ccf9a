"""Tests for klaus.sweep and `klaus sweep`: rows, invariants, outputs, and a real-data smoke run."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, TINY_CLASSES, feature_map_output, make_tiny_onnx, string_input, tiny_klaus
from klaus import compression, report
from klaus import sweep as sw
from klaus.cli import main
from klaus.compression.recipe import LOSSLESS
from klaus.errors import KlausError, KlausModelError
from klaus.preprocess import Preprocess, prepare
from klaus.sweep import data as sweep_data

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TIMING = set(sw.TIMING_COLUMNS)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lossless tiny .klaus (plain labels) and a 'path label' list file of the example photos."""
    root = tmp_path_factory.mktemp("sweep")
    compression.write(tiny_klaus(LOSSLESS), root / "tiny-lossless.klaus")
    photos = sorted(EXAMPLES.glob("*.jpg"))
    lines = [f"{p} {(3 * i) % TINY_CLASSES}" for i, p in enumerate(photos * 3)]  # 12 samples, 4 files
    (root / "data.txt").write_text("\n".join(lines) + "\n")
    return root


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def _sweep_args(tiny_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sweep",
        str(tiny_dir / "tiny-lossless.klaus"),
        "--data",
        str(tiny_dir / "data.txt"),
        "--scope",
        "all",
        "--bits",
        "8,4,2",
        "--recipe",
        "fc4-rest8",
        "--recipe",
        "default",
        "--min-elements",
        "64",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def tiny_run(tiny_dir: Path) -> tuple[Path, list[dict], str]:
    """One CLI sweep of the tiny model with calibration (the examples, which overlap the data on purpose)."""
    out = tiny_dir / "out"
    code, stdout, stderr = _run(*_sweep_args(tiny_dir, out, "--calib", str(EXAMPLES), "--json"))
    assert code == 0, stderr
    return out, [json.loads(line) for line in stdout.splitlines()], stderr


# ---------------------------------------------------------------- planning


def test_plan_rows_in_order_and_scope_recipes():
    settings = sw.plan([8, 4, 8], "conv", ["fc4-rest8", "fp16", "default"], min_elements=10)
    assert [s.label for s in settings] == [
        "fp32",
        "fp16",
        "conv 8-bit",
        "conv 4-bit",
        "fc4-rest8",
        "default",
        "ort-int8-dynamic",
    ]
    conv4 = settings[3].recipe
    assert (conv4.fc_bits, conv4.conv_bits, conv4.depthwise_bits) == (None, 4, 4)
    assert (conv4.granularity, conv4.method, conv4.min_elements) == ("tensor", "kmeans", 10)
    assert settings[5].recipe.min_elements == 10 and settings[5].recipe.method == "gptq"
    fc = sw.scope_recipe("fc", 2)
    assert (fc.fc_bits, fc.conv_bits, fc.depthwise_bits, fc.min_elements) == (2, None, None, 4096)
    every = sw.scope_recipe("all", 3)
    assert (every.fc_bits, every.conv_bits, every.depthwise_bits) == (3, 3, 3)
    assert [s.kind for s in sw.plan([8], "fc", int8_baseline=False)] == ["reference", "fp16", "bits"]


@pytest.mark.parametrize("text", ["", "9", "0,4", "a,b"])
def test_bad_bits_are_rejected(text: str):
    with pytest.raises(KlausModelError):
        sw.parse_bits(text)


def test_unknown_recipe_and_scope_are_rejected():
    with pytest.raises(KlausModelError, match="unknown recipe"):
        sw.plan([8], "fc", ["nope"])
    with pytest.raises(KlausModelError, match="unknown scope"):
        sw.scope_recipe("heads", 4)


def test_unknown_source_is_one_clear_error():
    with pytest.raises(KlausModelError, match="not a zoo model"):
        sw.load_source("no-such-model")


# ---------------------------------------------------------------- evaluation images


def test_cached_inputs_equal_fresh_preprocessing(tiny_dir: Path):
    """The uint8 cache re-normalizes to exactly the float inputs, for odd means/stds and NHWC/BGR too."""
    source = sw.load_source(tiny_dir / "tiny-lossless.klaus")
    for spec in (
        source.preprocess,
        Preprocess(
            input_size=32,
            mean=(123.675, 116.28, 103.53),
            std=(58.395, 57.12, 57.375),
            channel_order="BGR",
            layout="NHWC",
        ),
    ):
        src = sw.SweepSource(source.name, "klaus", "x", source.graph, spec, source.labels, source.card)
        evalset = sw.load_eval_set(tiny_dir / "data.txt", src, limit=5, crops=10)
        cached = np.concatenate(list(evalset.batches(images=2)))
        fresh = np.concatenate([prepare(s.path, spec, crops=10) for s in evalset.samples])
        assert cached.dtype == np.float32 and np.array_equal(cached, fresh)
        assert evalset.inputs is not None and evalset.inputs.dtype == np.uint8


def test_inputs_fall_back_to_float_when_pixels_would_not_round_trip(tiny_dir: Path, monkeypatch):
    source = sw.load_source(tiny_dir / "tiny-lossless.klaus")
    real, calls = sweep_data._to_pixels, []

    def flaky(x, spec):
        calls.append(1)
        return None if len(calls) == 3 else real(x, spec)

    monkeypatch.setattr(sweep_data, "_to_pixels", flaky)
    evalset = sw.load_eval_set(tiny_dir / "data.txt", source, limit=5)
    assert evalset.inputs is not None and evalset.inputs.dtype == np.float32 and len(calls) == 3
    fresh = np.concatenate([prepare(s.path, source.preprocess) for s in evalset.samples])
    assert np.array_equal(np.concatenate(list(evalset.batches(images=2))), fresh)


def test_unreadable_images_are_counted_not_fatal(tiny_dir: Path, tmp_path: Path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    (tmp_path / "data.txt").write_text(f"{bad} 1\n{EXAMPLES / 'cat.jpg'} 2\n")
    source = sw.load_source(tiny_dir / "tiny-lossless.klaus")
    errors = []
    evalset = sw.load_eval_set(tmp_path / "data.txt", source, on_error=lambda p, m: errors.append(p))
    assert (evalset.n, evalset.failed, errors) == (1, 1, [str(bad)])
    result = sw.run_sweep(source, evalset, sw.plan([4], "fc", int8_baseline=False, min_elements=64))
    assert all(r.n == 1 and r.failed == 1 for r in result.rows)
    (tmp_path / "none.txt").write_text(f"{bad} 1\n")
    with pytest.raises(KlausError, match="could be read"):
        sw.load_eval_set(tmp_path / "none.txt", source)


# ---------------------------------------------------------------- the tiny sweep


def test_rows_and_invariants(tiny_run):
    _, rows, _ = tiny_run
    by = {r["setting"]: r for r in rows}
    assert list(by) == [
        "fp32",
        "fp16",
        "all 8-bit",
        "all 4-bit",
        "all 2-bit",
        "fc4-rest8",
        "default",
        "ort-int8-dynamic",
    ]
    assert by["fp32"]["agreement"] == 1.0 and by["fp32"]["method"] == "raw-f32"
    assert by["fp16"]["file_bytes"] < by["fp32"]["file_bytes"]
    assert (
        by["all 2-bit"]["palettized_bytes"] < by["all 4-bit"]["palettized_bytes"] < by["all 8-bit"]["palettized_bytes"]
    )
    assert by["all 2-bit"]["file_bytes"] < by["all 8-bit"]["file_bytes"]
    for r in rows:
        assert r["error"] is None, r
        assert r["n"] == 12 and r["failed"] == 0
        assert abs(r["top1_error"] - (1 - r["top1"])) < 1e-6 and r["top1"] <= r["top5"]
        if r["kind"] in ("bits", "recipe"):
            assert r["palettized_tensors"] > 0
            assert r["entropy_bytes"] <= r["index_map_bytes"] + 64  # order-0 bound vs. PNG (header slack)
            assert r["index_map_bytes"] < r["palettized_bytes"]
    assert {r["palettized_tensors"] for r in rows if r["kind"] == "bits"} == {4}  # every layer kind at min 64
    # Scope rows are plain k-means without calibration; recipe rows use it (GPTQ where the recipe asks).
    assert [by[f"all {b}-bit"]["method"] for b in (8, 4, 2)] == ["kmeans"] * 3
    assert not any(by[f"all {b}-bit"]["calibrated"] for b in (8, 4, 2))
    assert by["default"]["method"] == "gptq+bias-correction" and by["default"]["calibrated"]
    assert by["fc4-rest8"]["method"] == "kmeans+bias-correction"
    assert by["ort-int8-dynamic"]["method"] == "ort-dynamic-qint8" and by["ort-int8-dynamic"]["file_bytes"] > 0


def test_overlap_warning(tiny_run):
    _, _, stderr = tiny_run
    warnings = [line for line in stderr.splitlines() if "also calibration images" in line]
    assert len(warnings) == 1 and "12 of the 12" in warnings[0]


def test_files_written(tiny_run):
    out, rows, _ = tiny_run
    md = (out / "sweep.md").read_text()
    assert "| **fp32** | reference | raw-f32 |" in md and "| all 2-bit | tensor | kmeans |" in md
    assert "% (1), " in md and "% (5)" in md
    assert "- command: `klaus sweep " in md and "--min-elements 64" in md
    assert "split all, 12 images" in md and "calibration: `" in md
    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["setting"] for r in table] == [r["setting"] for r in rows]
    assert list(table[0]) == list(sw.COLUMNS)
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["rows"] == rows and doc["n"] == 12 and doc["model"] == "tiny"
    assert (out / "sweep.png").exists() == HAS_MATPLOTLIB
    if HAS_MATPLOTLIB:
        assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_are_deterministic_apart_from_timing(tiny_dir: Path, tiny_run):
    out, rows, _ = tiny_run
    again = tiny_dir / "again"
    code, stdout, stderr = _run(*_sweep_args(tiny_dir, again, "--calib", str(EXAMPLES)))
    assert code == 0, stderr
    assert "| **fp32** |" in stdout and "wrote " in stdout  # the table on stdout without --json
    second = json.loads((again / "sweep.json").read_text())

    def strip(rs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rs]

    assert strip(second["rows"]) == strip(rows)
    first = json.loads((out / "sweep.json").read_text())
    assert {k: v for k, v in first.items() if k not in ("rows", "command")} == {
        k: v for k, v in second.items() if k not in ("rows", "command")
    }

    def drop_timing(text: str) -> list[str]:
        return [line.rsplit("|", 2)[0] for line in text.splitlines()]

    md1, md2 = (out / "sweep.md").read_text(), (again / "sweep.md").read_text()
    assert drop_timing(md1.replace(str(out), "OUT")) == drop_timing(md2.replace(str(again), "OUT"))


def test_onnx_source_and_baseline_failure_is_recorded(
    tiny_dir: Path, tiny_onnx_path: Path, tmp_path: Path, monkeypatch
):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(TINY_CLASSES)) + "\n")
    source = sw.load_source(tiny_onnx_path, [f"class {i}" for i in range(TINY_CLASSES)])
    assert source.kind == "onnx" and source.preprocess == Preprocess(
        input_size=32
    )  # EfficientNet-Lite defaults, graph size

    import onnxruntime.quantization as q

    def broken(*args, **kwargs):
        raise RuntimeError("quantizer exploded\nsecond line")

    monkeypatch.setattr(q, "quantize_dynamic", broken)
    code, stdout, stderr = _run(
        "sweep",
        str(tiny_onnx_path),
        "--labels",
        str(names),
        "--data",
        str(tiny_dir / "data.txt"),
        "--bits",
        "4",
        "--limit",
        "4",
        "--min-elements",
        "64",
        "--out",
        str(tmp_path / "o"),
        "--json",
    )
    assert code == 0, stderr
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["setting"] for r in rows] == ["fp32", "fp16", "fc 4-bit", "ort-int8-dynamic"]
    assert rows[-1]["error"] == "RuntimeError: quantizer exploded" and rows[-1]["top1"] is None
    assert rows[2]["n"] == 4 and rows[2]["palettized_tensors"] == 1
    assert "RuntimeError: quantizer exploded" in (tmp_path / "o" / "sweep.md").read_text()


def test_cli_errors_are_one_line(tiny_dir: Path, tmp_path: Path):
    code, _, stderr = _run("sweep", "nope", "--data", str(tiny_dir / "data.txt"), "--out", str(tmp_path))
    assert code == 1 and stderr.startswith("klaus: error: nope: no such file, and not a zoo model")
    code, _, stderr = _run(
        "sweep", str(tiny_dir / "tiny-lossless.klaus"), "--data", str(tiny_dir / "data.txt"), "--bits", "12"
    )
    assert code == 1 and "--bits" in stderr and len(stderr.strip().splitlines()) == 1


def test_missing_matplotlib_skips_the_plot(tiny_dir: Path, tmp_path: Path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    source = sw.load_source(tiny_dir / "tiny-lossless.klaus")
    evalset = sw.load_eval_set(tiny_dir / "data.txt", source, limit=2)
    result = sw.run_sweep(source, evalset, sw.plan([4], "fc", int8_baseline=False))
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    written, note = report.write_outputs(result, tmp_path)
    assert [p.name for p in written] == ["sweep.md", "sweep.csv", "sweep.json"]
    assert note and "matplotlib" in note and "\n" not in note


# ---------------------------------------------------------------- real data


def test_zoo_smoke_on_development_photos(imagenet_sample: Path, tmp_path: Path):
    """The CI smoke run: EfficientNet-Lite0 from the zoo, FC at 8 and 4 bits, 20 odd-class photos."""
    pytest.importorskip("torch")
    pytest.importorskip("efficientnet_lite_pytorch")
    out = tmp_path / "lite0"
    code, _, stderr = _run(
        "sweep",
        "efficientnet-lite0",
        "--scope",
        "fc",
        "--bits",
        "8,4",
        "--data",
        str(imagenet_sample),
        "--split",
        "odd",
        "--limit",
        "20",
        "--out",
        str(out),
    )
    assert code == 0, stderr
    md = (out / "sweep.md").read_text()
    for setting in ("**fp32**", "fp16", "fc 8-bit", "fc 4-bit", "ort-int8-dynamic"):
        assert f"| {setting} |" in md
    assert "split odd, 20 images" in md
    rows = {r["setting"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert rows["fp32"]["agreement"] == 1.0 and rows["fp32"]["n"] == 20
    assert (
        rows["fc 4-bit"]["file_bytes"]
        < rows["fc 8-bit"]["file_bytes"]
        < rows["fp16"]["file_bytes"]
        < rows["fp32"]["file_bytes"]
    )
    assert rows["fc 8-bit"]["palettized_tensors"] == 1  # the one FC layer
    assert rows["fc 8-bit"]["agreement"] >= 0.9 and rows["fc 4-bit"]["agreement"] >= 0.8


# ---------------------------------------------------------------- methods and budgets


def test_plan_methods_per_width_then_budgets():
    settings = sw.plan(
        [4], "all", ["default"], methods=["tensor", "channel", "calibrated"], budgets_mib=[2.5, 1.5], min_elements=10
    )
    assert [s.label for s in settings] == [
        "fp32",
        "fp16",
        "all 4-bit",
        "all 4-bit channel",
        "all 4-bit calibrated",
        "mixed 2.5 MiB",
        "mixed 1.5 MiB",
        "default",
        "ort-int8-dynamic",
    ]
    assert [s.row_scheme for s in settings] == [
        "reference",
        "fp16",
        "tensor",
        "channel",
        "calibrated",
        "mixed",
        "mixed",
        "recipe",
        "baseline",
    ]
    tensor, channel, calibrated = (s.recipe for s in settings[2:5])
    for r in (tensor, channel, calibrated):  # one width: the same tensors, differing only in how
        assert (r.fc_bits, r.conv_bits, r.depthwise_bits, r.min_elements, r.rules) == (4, 4, 4, 10, ())
    assert (tensor.granularity, tensor.method) == ("tensor", "kmeans")
    assert (channel.granularity, channel.method) == ("channel", "kmeans")
    assert (calibrated.granularity, calibrated.method) == ("channel", "gptq")
    assert [s.calibrated for s in settings[2:5]] == [False, False, True]
    mixed = settings[5]
    assert (mixed.kind, mixed.recipe, mixed.budget_bytes, mixed.min_elements) == ("mixed", None, int(2.5 * 2**20), 10)
    assert [s.label for s in settings if s.requires_calibration] == [
        "all 4-bit calibrated",
        "mixed 2.5 MiB",
        "mixed 1.5 MiB",
    ]
    kept, skipped = sw.without_calibration(settings)
    assert [s.label for s in skipped] == ["all 4-bit calibrated", "mixed 2.5 MiB", "mixed 1.5 MiB"]
    assert [s.label for s in kept] == ["fp32", "fp16", "all 4-bit", "all 4-bit channel", "default", "ort-int8-dynamic"]
    # Widths outer, methods inner; the default method list is the original table.
    two = sw.plan([8, 4], "fc", methods=["channel", "tensor"], int8_baseline=False)
    assert [s.label for s in two] == ["fp32", "fp16", "fc 8-bit channel", "fc 8-bit", "fc 4-bit channel", "fc 4-bit"]
    assert [s.label for s in sw.plan([4], "fc")] == ["fp32", "fp16", "fc 4-bit", "ort-int8-dynamic"]


def test_uniform_rows_map_bits_to_steps_and_rules_cover_the_scope():
    settings = sw.plan([8, 6, 4, 2], "conv", methods=["uniform"], min_elements=64, int8_baseline=False)
    uniform = [s for s in settings if s.row_scheme == "uniform"]
    assert [(s.label, s.step) for s in uniform] == [
        ("conv 6-bit uniform", 0.0625),
        ("conv 4-bit uniform", 0.25),
        ("conv 2-bit uniform", 1.0),
    ]  # no grid at 8 bits: it would clip
    graph = make_tiny_onnx()
    recipe = sw.uniform_recipe(uniform[1].recipe, 0.25, graph)
    assert recipe.granularity == "channel"
    assert [(r.bits, r.step) for r in recipe.rules] == [(8, 0.25)] * 3
    assert {r.pattern for r in recipe.rules} == {
        "stem.weight",
        "dw.weight",
        "pw.weight",
    }  # conv scope, not fc or biases
    assert recipe.step_for("pw.weight") == 0.25 and recipe.bits_for("fc.weight", "fc", 640) is None


@pytest.mark.parametrize("text", ["", "mixed", "tensor,nope"])
def test_bad_methods_are_rejected(text: str):
    with pytest.raises(KlausModelError, match="--methods"):
        sw.parse_methods(text)


@pytest.mark.parametrize("text", ["", "0", "-1", "a", "2.5,nan"])
def test_bad_budgets_are_rejected(text: str):
    with pytest.raises(KlausModelError, match="--budget-mib"):
        sw.parse_budgets(text)


def test_parsers_keep_order_and_drop_repeats():
    assert sw.parse_methods("channel, tensor,channel") == ["channel", "tensor"]
    assert sw.parse_budgets("2.5,2.0,1.5,2") == [2.5, 2.0, 1.5]


def _row(setting: str, file_bytes: int | None, top1: float | None) -> sw.SweepRow:
    return sw.SweepRow(
        setting,
        "bits",
        None,
        None,
        None,
        None,
        False,
        file_bytes,
        None,
        None,
        None,
        None,
        None,
        1,
        0,
        top1,
        top1,
        None,
        None,
        None,
    )


def test_frontier_is_the_best_top1_at_each_size():
    rows = [
        _row("big", 100, 0.9),
        _row("mid-bad", 50, 0.5),
        _row("mid", 60, 0.85),
        _row("small", 10, 0.6),
        _row("tie", 100, 0.9),
        _row("failed", None, None),
        _row("small-worse", 10, 0.4),
    ]
    assert [r.setting for r in sw.frontier(rows)] == ["small", "mid", "big"]
    assert sw.frontier([]) == []


def test_rows_needing_calibration_are_error_rows_without_it(tiny_dir: Path):
    source = sw.load_source(tiny_dir / "tiny-lossless.klaus")
    evalset = sw.load_eval_set(tiny_dir / "data.txt", source, limit=2)
    settings = sw.plan([4], "all", methods=["calibrated"], budgets_mib=[0.011], min_elements=64, int8_baseline=False)
    result = sw.run_sweep(source, evalset, settings)
    by = {r.setting: r for r in result.rows}
    for label in ("all 4-bit calibrated", "mixed 0.011 MiB"):
        assert by[label].error == "skipped: needs calibration images (--calib)" and by[label].top1 is None


@pytest.fixture(scope="module")
def methods_run(tiny_dir: Path) -> tuple[Path, list[dict], str]:
    """The tiny model at 4 bits by every method, plus one budgeted row; calibration on the examples."""
    out = tiny_dir / "methods"
    code, stdout, stderr = _run(
        "sweep",
        str(tiny_dir / "tiny-lossless.klaus"),
        "--data",
        str(tiny_dir / "data.txt"),
        "--scope",
        "all",
        "--bits",
        "4",
        "--methods",
        "tensor,channel,calibrated,uniform",
        "--budget-mib",
        "0.011",
        "--min-elements",
        "64",
        "--no-int8",
        "--calib",
        str(EXAMPLES),
        "--out",
        str(out),
        "--json",
    )
    assert code == 0, stderr
    return out, [json.loads(line) for line in stdout.splitlines()], stderr


def test_method_rows_end_to_end(methods_run):
    out, rows, _ = methods_run
    by = {r["setting"]: r for r in rows}
    expected = ["fp32", "fp16", "all 4-bit", "all 4-bit channel", "all 4-bit calibrated", "all 4-bit uniform"]
    assert list(by) == [*expected, "mixed 0.011 MiB"]
    for r in rows:
        assert r["error"] is None, r
        assert r["n"] == 12 and r["file_bytes"] > 0 and abs(r["file_mib"] - r["file_bytes"] / 2**20) < 1e-4
    assert [by[s]["scheme"] for s in expected[2:]] == ["tensor", "channel", "calibrated", "uniform"]
    assert (by["all 4-bit"]["method"], by["all 4-bit channel"]["method"]) == ("kmeans", "kmeans")
    assert by["all 4-bit calibrated"]["method"] == "gptq+bias-correction" and by["all 4-bit calibrated"]["calibrated"]
    assert not by["all 4-bit channel"]["calibrated"]
    # Same tensors at one width; per-channel rows also store fp16 scales.
    assert {by[s]["palettized_tensors"] for s in expected[2:]} == {4}
    assert by["all 4-bit channel"]["palettized_bytes"] > by["all 4-bit"]["palettized_bytes"]
    u = by["all 4-bit uniform"]
    assert (u["method"], u["step"], u["recipe"], u["calibrated"]) == ("uniform", 0.25, "all-u0.25", False)
    m = by["mixed 0.011 MiB"]
    assert m["kind"] == "mixed" and m["scheme"] == "mixed" and m["calibrated"] and m["bits"] is None
    assert m["budget_bytes"] == int(0.011 * 2**20) and m["file_bytes"] <= m["budget_bytes"]
    assert m["allocation"] and "×" in m["allocation"] and m["method"].startswith("gptq")

    md = (out / "sweep.md").read_text()
    assert "--methods tensor,channel,calibrated,uniform" in md and "--budget-mib 0.011" in md
    assert "| all 4-bit calibrated | calibrated | gptq+bias-correction |" in md
    assert "| mixed 0.011 MiB | mixed |" in md and f"{m['file_bytes']:,}" in md
    assert "Pareto frontier" in md and f"- mixed 0.011 MiB: budget {m['budget_bytes']:,} bytes" in md
    assert "(calibrated, mixed rows only)" in md and "  - calibrated: " in md and "  - mixed: " in md
    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(sw.COLUMNS) and [r["scheme"] for r in table] == [r["scheme"] for r in rows]
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["rows"] == rows and any(line.startswith("mixed:") for line in doc["schemes"])
    if HAS_MATPLOTLIB:
        assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrated_and_mixed_rows_are_skipped_without_calib(tiny_dir: Path, tmp_path: Path):
    code, stdout, stderr = _run(
        "sweep",
        str(tiny_dir / "tiny-lossless.klaus"),
        "--data",
        str(tiny_dir / "data.txt"),
        "--scope",
        "fc",
        "--bits",
        "4",
        "--methods",
        "tensor,calibrated",
        "--budget-mib",
        "0.011",
        "--min-elements",
        "64",
        "--no-int8",
        "--limit",
        "2",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert code == 0, stderr
    assert [json.loads(line)["setting"] for line in stdout.splitlines()] == ["fp32", "fp16", "fc 4-bit"]
    warning = [line for line in stderr.splitlines() if "skipped" in line]
    assert len(warning) == 1 and "fc 4-bit calibrated, mixed 0.011 MiB" in warning[0] and "--calib" in warning[0]
    assert "--methods tensor,calibrated --budget-mib 0.011" in (tmp_path / "sweep.md").read_text()  # as asked


def test_cli_rejects_bad_methods_in_one_line(tiny_dir: Path, tmp_path: Path):
    code, _, stderr = _run(
        "sweep",
        str(tiny_dir / "tiny-lossless.klaus"),
        "--data",
        str(tiny_dir / "data.txt"),
        "--methods",
        "tensor,mixed",
        "--out",
        str(tmp_path),
    )
    assert code == 1 and "--budget-mib" in stderr and len(stderr.strip().splitlines()) == 1


def test_uniform_widths_without_a_grid_are_noted(tiny_dir: Path, tmp_path: Path):
    code, stdout, stderr = _run(
        "sweep",
        str(tiny_dir / "tiny-lossless.klaus"),
        "--data",
        str(tiny_dir / "data.txt"),
        "--scope",
        "fc",
        "--bits",
        "8,4",
        "--methods",
        "uniform",
        "--min-elements",
        "64",
        "--no-int8",
        "--limit",
        "1",
        "--out",
        str(tmp_path),
        "--json",
    )
    assert code == 0, stderr
    assert [json.loads(line)["setting"] for line in stdout.splitlines()] == ["fp32", "fp16", "fc 4-bit uniform"]
    assert "no uniform row at 8 bits" in stderr


# ---------------------------------------------------------------- --out checked up front, written atomically


@pytest.fixture
def no_rows(monkeypatch):
    """Fail the test if the sweep gets as far as computing a row."""

    def refuse(*args, **kwargs):
        raise AssertionError("rows were computed before --out was checked")

    monkeypatch.setattr(sw, "run_sweep", refuse)
    monkeypatch.setattr(sw, "load_eval_set", refuse)


def _one_line(code: int, stderr: str) -> str:
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    return stderr.strip()


def test_out_is_refused_before_any_work(tiny_dir: Path, tmp_path: Path, no_rows):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    src, data = str(tiny_dir / "tiny-lossless.klaus"), str(tiny_dir / "data.txt")
    cases = [
        (str(afile), f"klaus: error: {afile}: exists and is not a folder"),
        ("", "klaus: error: '': the output folder name is empty"),
        (str(afile / "sub"), f"klaus: error: {afile / 'sub'}: {afile} is not a folder"),
        (str(tmp_path / ("x" * 300)), f"klaus: error: {tmp_path / ('x' * 300)}: "),
    ]
    for out, message in cases:
        code, _, stderr = _run("sweep", src, "--data", data, "--bits", "8", "--out", out, "--json")
        assert _one_line(code, stderr).startswith(message), stderr
    assert afile.read_text() == "keep me"
    (tmp_path / "o" / "sweep.csv").mkdir(parents=True)
    code, _, stderr = _run("sweep", src, "--data", data, "--bits", "8", "--out", str(tmp_path / "o"))
    assert _one_line(code, stderr) == f"klaus: error: {tmp_path / 'o' / 'sweep.csv'}: is a directory, not a file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_is_refused_before_any_work(tiny_dir: Path, tmp_path: Path, no_rows):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, stderr = _run(
            "sweep",
            str(tiny_dir / "tiny-lossless.klaus"),
            "--data",
            str(tiny_dir / "data.txt"),
            "--out",
            str(locked / "new"),
        )
    finally:
        locked.chmod(0o700)
    assert _one_line(code, stderr) == f"klaus: error: {locked / 'new'}: cannot write ({locked} is not writable)"


def test_default_out_folder_of_a_very_long_model_name_is_shortened(tmp_path: Path):
    assert sw.default_out_dir("tiny") == "sweep-tiny"
    long_a, long_b = "a" * 300, "a" * 299 + "b"
    name = sw.default_out_dir(long_a)
    assert len(name.encode()) <= 255 and name.startswith("sweep-aaaa") and name == sw.default_out_dir(long_a)
    assert sw.default_out_dir(long_b) != name  # the hash keeps long names apart
    assert len(sw.default_out_dir("é" * 200).encode()) <= 255
    assert sw.check_out_dir(tmp_path / name) == tmp_path / name  # a name the file system takes


def test_outputs_are_written_atomically_and_errors_name_the_file(tiny_dir: Path, tmp_path: Path, monkeypatch):
    from klaus.errors import KlausWriteError

    source = sw.load_source(tiny_dir / "tiny-lossless.klaus")
    evalset = sw.load_eval_set(tiny_dir / "data.txt", source, limit=2)
    result = sw.run_sweep(source, evalset, sw.plan([4], "fc", int8_baseline=False))
    out = tmp_path / "o"
    out.mkdir()
    (out / "sweep.md").write_text("the previous table")
    real = os.replace

    def full_disk(src, dst):
        if str(dst).endswith("sweep.csv"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(KlausWriteError, match=f"^{out / 'sweep.csv'}: cannot write \\(No space left on device\\)$"):
        report.write_outputs(result, out)
    assert sorted(p.name for p in out.iterdir()) == ["sweep.md"]  # no temporary file, no partial sweep.csv
    assert (out / "sweep.md").read_text() == report.markdown(result)  # replaced whole, before the failure
    monkeypatch.setattr(os, "replace", real)
    written, _ = report.write_outputs(result, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)


# ---------------------------------------------------------------- source errors name SRC


def _variant(tmp_path: Path, name: str, change) -> Path:
    import onnx

    model = make_tiny_onnx(classes=1000)
    change(model)
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _ten_outputs(m):
    m.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 10
    m.graph.initializer[6].dims[0] = 10
    m.graph.initializer[6].raw_data = m.graph.initializer[6].raw_data[: 10 * 64 * 4]
    m.graph.initializer[7].dims[0] = 10
    m.graph.initializer[7].raw_data = m.graph.initializer[7].raw_data[: 10 * 4]


def _nan_weight(m):
    from onnx import numpy_helper

    arr = numpy_helper.to_array(m.graph.initializer[6]).copy()
    arr[0, 0] = np.nan
    m.graph.initializer[6].CopyFrom(numpy_helper.from_array(arr, m.graph.initializer[6].name))


def _two_inputs(m):
    import onnx

    m.graph.input.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, ["batch", 3]))


@pytest.mark.parametrize(
    "change,fragment",
    [
        (string_input, "input 'input' is a string tensor"),
        (feature_map_output, "not (N, classes)"),
        (_ten_outputs, "the model has 10 outputs"),
        (_nan_weight, "weight 'fc.weight' holds NaN or infinite values"),
        (_two_inputs, "the graph has 2 inputs"),
    ],
)
def test_source_errors_name_the_src_path(tiny_dir: Path, tmp_path: Path, change, fragment, no_rows):
    src = _variant(tmp_path, "bad.onnx", change)
    code, _, stderr = _run(
        "sweep", str(src), "--data", str(tiny_dir / "data.txt"), "--bits", "8", "--out", str(tmp_path / "o")
    )
    line = _one_line(code, stderr)
    assert line.startswith(f"klaus: error: {src}: ") and fragment in line, line
    assert not (tmp_path / "o").exists()


def test_a_source_with_nan_scores_is_an_error_not_a_table(tiny_dir: Path, tmp_path: Path):
    """fc weights of 3e38 make every logit infinite and every probability NaN: no 'fp32 100 %' row."""

    def huge_fc(m):
        m.graph.initializer[6].raw_data = np.full((1000, 64), 3e38, np.float32).tobytes()

    src = _variant(tmp_path, "nan.onnx", huge_fc)
    code, _, stderr = _run(
        "sweep",
        str(src),
        "--data",
        str(tiny_dir / "data.txt"),
        "--bits",
        "8",
        "--no-int8",
        "--out",
        str(tmp_path / "o"),
    )
    assert (
        _one_line(code, stderr)
        == f"klaus: error: {src}: the model gives NaN or infinite scores on the evaluation images"
    )
    assert not (tmp_path / "o" / "sweep.md").exists()


def test_a_missing_src_is_named(tiny_dir: Path, tmp_path: Path, no_rows):
    missing = tmp_path / "missing.onnx"
    code, _, stderr = _run("sweep", str(missing), "--data", str(tiny_dir / "data.txt"), "--out", str(tmp_path / "o"))
    assert _one_line(code, stderr).startswith(f"klaus: error: {missing}: no such file")
