"""Latency: EfficientNet-Lite0 through Klaus versus the same network as a plain fp32 ONNX Runtime session.

    python bench/latency.py [--only klaus-b1,low-b1,klaus-b32,low-b32,crops10]

Batch 1 and batch 32 on 2 intra-op threads; the cases run interleaved (one
timed call of each per round) after a warm-up, and the table gives the median
and its ratio to the fp32 session measured in the same rounds. The 10-crop row
times ``Classifier.probabilities`` on one photo (decode, resize, crops and the
network) with ``crops=10`` against ``crops=1``.
"""

from __future__ import annotations

import numpy as np

from _common import (
    CAT,
    THREADS,
    cli,
    command,
    embedded_model,
    fp32_onnx,
    interleaved_ms,
    median,
    ort_session,
    ratio,
    table,
)

KEYS = ("klaus-b1", "low-b1", "klaus-b32", "low-b32", "crops10")
REPEATS = {1: 30, 32: 6}


def session_runner(session, x: np.ndarray):
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def measure_batches(sessions: dict[str, object], batch: int, repeats: int) -> dict[str, float]:
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    times = interleaved_ms(
        {k: session_runner(s, x) for k, s in sessions.items()}, repeats, warmup=2 if batch == 1 else 1
    )
    return {k: median(v) for k, v in times.items()}


def run(only: list[str] | None = None, model=None, onnx_path=None, repeats: dict[int, int] | None = None) -> str:
    from klaus.runtime import Classifier

    wanted = set(only or KEYS)
    model = model or embedded_model()
    onnx_path = onnx_path or fp32_onnx()
    repeats = repeats or REPEATS
    rows = []
    base = ort_session(onnx_path, THREADS)
    default = Classifier(model, threads=THREADS) if wanted & {"klaus-b1", "klaus-b32", "crops10"} else None
    low = Classifier(model, threads=THREADS, memory="low") if wanted & {"low-b1", "low-b32"} else None
    for batch in (1, 32):
        sessions = {"fp32": base}
        if f"klaus-b{batch}" in wanted:
            assert default is not None
            sessions["klaus"] = default.session
        if f"low-b{batch}" in wanted:
            assert low is not None
            sessions["low"] = low.session
        if len(sessions) == 1:
            continue
        med = measure_batches(sessions, batch, repeats[batch])
        labels = {
            "fp32": "plain fp32 ONNX Runtime session (baseline)",
            "klaus": "Klaus default mode (decoded graph)",
            "low": "Klaus low-memory mode (`--low-memory`)",
        }
        for key in sessions:
            only_arg = () if key == "fp32" else ("--only", f"{key}-b{batch}")
            rows.append(
                [
                    labels[key],
                    batch,
                    f"{med[key]:.1f}",
                    f"{med[key] / batch:.2f}",
                    ratio(med[key], med["fp32"]),
                    command("latency.py", *only_arg),
                ]
            )
    out = [
        "### Latency (EfficientNet-Lite0, 2 threads)",
        "",
        f"Median over {repeats[1]} (batch 1) and {repeats[32]} (batch 32) interleaved rounds after warm-up; "
        "random input (latency does not depend on pixel values). Ratio = median / fp32 median of the same rounds.",
        "",
        table(["runtime", "batch", "median ms", "ms / image", "vs fp32 ORT", "command"], rows),
    ]
    if "crops10" in wanted:
        assert default is not None
        clf = default
        times = interleaved_ms(
            {"1": lambda: clf.probabilities([CAT], crops=1), "10": lambda: clf.probabilities([CAT], crops=10)},
            repeats=max(3, repeats[1] // 2),
            warmup=2,
        )
        one, ten = median(times["1"]), median(times["10"])
        out += [
            "",
            "10-crop path (`Classifier.probabilities([examples/cat.jpg], crops=…)`, default mode: decode, resize, "
            "crops, network, softmax):",
            "",
            table(
                ["crops", "median ms", "vs 1 crop", "command"],
                [
                    [1, f"{one:.1f}", "1.00×", command("latency.py", "--only", "crops10")],
                    [10, f"{ten:.1f}", ratio(ten, one), command("latency.py", "--only", "crops10")],
                ],
            ),
        ]
    return "\n".join(out)


def smoke(model_path, onnx_path) -> str:
    """Cheapest path on the tiny test model (32x32 input), for tests/test_bench_smoke.py."""
    from klaus.runtime import Classifier

    clf = Classifier(model_path, threads=1, memory="low")
    x = np.zeros((1, 3, 32, 32), np.float32)
    times = interleaved_ms(
        {"fp32": session_runner(ort_session(onnx_path, 1), x), "low": session_runner(clf.session, x)}, 2, 1
    )
    return table(["runtime", "median ms"], [[k, f"{median(v):.2f}"] for k, v in times.items()])


if __name__ == "__main__":
    cli(__doc__.splitlines()[0], run, KEYS)
