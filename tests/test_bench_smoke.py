"""The benchmark scripts (bench/) import and their cheapest paths run, so they cannot rot.

The benchmarks themselves are not part of the test suite: `python bench/run_all.py`
regenerates BENCHMARKS.md. These checks use the tiny test model and take a few seconds.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import onnxruntime as ort
import pytest

from conftest import ROOT, make_tiny_onnx

sys.path.insert(0, str(ROOT / "bench"))

MODULES = (
    "_common",
    "size_accuracy",
    "latency",
    "memory",
    "cold_start",
    "codec",
    "compression_time",
    "browser",
    "foreign_zoo",
    "run_all",
)


@pytest.mark.parametrize("name", MODULES)
def test_imports(name):
    module = importlib.import_module(name)
    if name not in ("_common", "run_all"):
        assert callable(module.run) and module.__doc__.strip()


def test_latency_and_codec_on_tiny_model(tiny_klaus_path, tiny_onnx_path):
    assert "low" in importlib.import_module("latency").smoke(tiny_klaus_path, tiny_onnx_path)
    assert "| 4 |" in importlib.import_module("codec").smoke(tiny_klaus_path, tiny_onnx_path)


def test_memory_child_process_on_tiny_model(tiny_klaus_path, tiny_onnx_path):
    assert "MiB" in importlib.import_module("memory").smoke(tiny_klaus_path, tiny_onnx_path)


def test_alexnet_shaped_network_runs():
    model = importlib.import_module("memory").alexnet_onnx(fc=64, classes=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.zeros((2, 3, 224, 224), np.float32)})[0]
    assert out.shape == (2, 10) and np.all(np.isfinite(out))


def test_fp16_storage_matches_fp32():
    size_accuracy = importlib.import_module("size_accuracy")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    fp32 = ort.InferenceSession(make_tiny_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
    fp16 = ort.InferenceSession(
        size_accuracy.fp16_storage(make_tiny_onnx()).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    np.testing.assert_allclose(fp16.run(None, {"input": x})[0], fp32.run(None, {"input": x})[0], atol=2e-2)
    top5 = np.array([[1, 2, 3, 4, 5], [0, 9, 8, 7, 6]])
    assert size_accuracy.scores(top5, np.array([1, 6]), np.array([1, 9])) == (0.5, 1.0, 0.5)


def test_machine_description_and_table():
    common = importlib.import_module("_common")
    info = common.machine()
    assert info["cores (nproc)"] and info["onnxruntime"] == ort.__version__
    assert common.table(["a", "b"], [[1, 2]]).splitlines()[2] == "| 1 | 2 |"


def test_index_throughput_tables():
    bench = importlib.import_module("index_throughput")
    profile = {
        k: 1.0 for k in ("naive_decode", "index_decode", "resize_crop", "normalize", "naive_model", "index_model")
    }
    profile.update(naive_ms=4.0, index_ms=4.0, model_batch=4)
    results = [
        {
            "set": name,
            "photos": 10,
            "example_size": "500x375",
            "naive_per_s": 100.0,
            "pipeline_per_s": ratio * 100,
            "ratio": ratio,
            "ratio_range": [ratio, ratio],
            "naive_cpu_ms": 18.0,
            "pipeline_cpu_ms": 13.0,
            "cores": 2,
            "ceiling": 1.5,
            "top1_agreement": 1.0,
            "profile": profile,
        }
        for name, ratio in (("sample", 1.4), ("12mp", 5.0))
    ]
    assert (
        "| imagenet-sample (500x375) | 10 | 100.0 | 140.0 | **1.40×** (1.40–1.40) | 18.0 → 13.0 ms | 1.50× |"
        in bench.table(results)
    )
    assert "| index: model, 4 photos per call, 1 thread | 1.00 | 1.00 |" in bench.profile_table(results)
    assert bench.targets(results).startswith(
        "Targets: imagenet-sample: median **1.40×** (target: 1.5× the naive loop) — "
        "**not met**; 12 MP JPEGs: median **5.00×** (target: 3.0× the naive loop) — met. "
        "In this run the naive loop's model call on all 2 cores took 1.00 ms"
    )


def test_foreign_zoo_section_is_replaced_in_place_and_kept_before_reliability(tmp_path):
    foreign_zoo = importlib.import_module("foreign_zoo")
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n### Latency\n\nx\n\n## Reliability\n\nfuzz\n", encoding="utf-8")
    foreign_zoo.write_section("### Default recipe versus ORT int8 (test)\n\n| a |\n", path)
    foreign_zoo.write_section("### Default recipe versus ORT int8 (test)\n\n| b |\n", path)
    text = path.read_text(encoding="utf-8")
    assert text.count(foreign_zoo.HEADING) == 1 and "| b |" in text and "| a |" not in text
    assert text.index(foreign_zoo.HEADING) < text.index("## Reliability") and text.endswith("fuzz\n")
    kept = foreign_zoo.section(text)
    assert kept.startswith(foreign_zoo.HEADING) and "## Reliability" not in kept and "| b |" in kept
