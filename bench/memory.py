"""Memory: peak RSS of a fresh process that classifies one photo, Klaus (default and low-memory) vs fp32 ORT.

    python bench/memory.py [--only effnet,alexnet-4096,alexnet-2048]

Each measurement is a new Python process (so nothing is shared) that
loads a model, classifies ``examples/cat.jpg`` and reports its peak resident set
(``VmHWM``) and its resident set after classifying with the model still loaded
(``VmRSS``, steady state), both from ``/proc/self/status``. (``getrusage``'s
``ru_maxrss`` is not used: Linux carries the parent's high-water mark into a
child across fork and exec, so a child of a big benchmark process reports the
parent's size.) Baseline: the same
network as a plain fp32 ONNX file in ONNX Runtime (``bench/minimal_fp32.py``).
Each figure is the median of ``ROUNDS`` fresh processes per runtime, the runtimes
taking turns round by round (the range of the peaks is given beside it): the same
process, run twice, can peak several MiB apart, depending on where glibc happens
to place ONNX Runtime's buffers.
Klaus's default mode is measured twice: reading the decoded weights from its
weights cache (every start after the first), and from an empty cache (the
first start, which decodes the model and writes the cache file).
Rows: EfficientNet-Lite0 (the embedded model), and an FC-heavy AlexNet-shaped
network (5 convs, then FC 9216→W→W→1000 with W = 4096 as in AlexNet, or 2048
as in the original Klaus app's mobile network), random seeded weights,
compressed by Klaus with the ``kmeans8`` recipe (every conv and FC layer 8-bit,
one palette per tensor, no calibration). The AlexNet rows also give batch-1
latency of each mode, measured in one process, interleaved.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable

import numpy as np

from _common import (
    CAT,
    PYTHON,
    THREADS,
    cached,
    cli,
    command,
    embedded_model,
    fp32_onnx,
    interleaved_ms,
    median,
    mib,
    ort_session,
    ratio,
    run_command,
    table,
    weights_cache_env,
)

KEYS = ("effnet", "alexnet-4096", "alexnet-2048")
ROUNDS = 5
CHILD = """
import json, sys
model, image, memory = sys.argv[1], sys.argv[2], sys.argv[3]
if memory == "imports":
    import numpy, onnxruntime, PIL.Image
    import klaus.runtime
else:
    from klaus.runtime import Classifier
    classifier = Classifier(model, threads=2, memory=memory)  # kept alive: 'after' is measured with the model loaded
    classifier.classify(image)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kib = lambda key: int(status[key].split()[0]) * 1024
print(json.dumps({"peak_bytes": kib("VmHWM"), "current_bytes": kib("VmRSS")}))
"""


def rss_child(args: list[str], env: dict[str, str] | None = None) -> dict[str, int]:
    return json.loads(run_command(args, env).stdout.strip().splitlines()[-1])


def median_rss(children: dict[str, Callable[[], dict[str, int]]], rounds: int = ROUNDS) -> dict[str, dict[str, float]]:
    """Per child: median peak and after bytes over ``rounds`` runs, interleaved, and the lowest and highest peak."""
    runs: dict[str, list[dict[str, int]]] = {k: [] for k in children}
    for _ in range(rounds):
        for key, child in children.items():
            runs[key].append(child())
    return {
        key: {
            "peak_bytes": median([r["peak_bytes"] for r in rs]),
            "current_bytes": median([r["current_bytes"] for r in rs]),
            "peak_low": min(r["peak_bytes"] for r in rs),
            "peak_high": max(r["peak_bytes"] for r in rs),
        }
        for key, rs in runs.items()
    }


def peak_cell(r: dict[str, float]) -> str:
    return f"{mib(r['peak_bytes'])} ({mib(r['peak_low'])}–{mib(r['peak_high'])})"


def klaus_rss(model, memory: str, empty_cache: bool = False) -> dict[str, int]:
    """A Klaus child's memory; with ``empty_cache`` it starts from an empty weights cache (decoding the model,
    as a first start does), otherwise from the benchmarks' cache, which the first round fills."""
    with weights_cache_env(empty_cache) as env:
        return rss_child([PYTHON, "-c", CHILD, str(model), str(CAT), memory], env)


def fp32_rss(onnx_path) -> dict[str, int]:
    return rss_child([PYTHON, "bench/minimal_fp32.py", str(onnx_path), str(CAT), "--rss"])


# ---------------------------------------------------------------- the FC-heavy network


def alexnet_onnx(fc: int = 4096, seed: int = 0, classes: int = 1000):
    """AlexNet-shaped classifier (224x224 input): 5 convs + 3 max-pools, then FC 9216→fc→fc→classes; He-init weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name: str, *shape: int) -> None:
        std = np.sqrt(2.0 / int(np.prod(shape[1:])))
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), f"{name}.weight"))
        inits.append(numpy_helper.from_array(np.full(shape[0], 0.01, np.float32), f"{name}.bias"))

    x = "input"
    convs = [
        ("conv1", 96, 3, 11, 4, 2, True),
        ("conv2", 256, 96, 5, 1, 2, True),
        ("conv3", 384, 256, 3, 1, 1, False),
        ("conv4", 384, 384, 3, 1, 1, False),
        ("conv5", 256, 384, 3, 1, 1, True),
    ]
    for name, out, inp, k, stride, pad, pool in convs:
        weight(name, out, inp, k, k)
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight", f"{name}.bias"],
                [f"{name}_y"],
                name=f"/{name}/Conv",
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        nodes.append(helper.make_node("Relu", [f"{name}_y"], [f"{name}_r"], name=f"/{name}/Relu"))
        x = f"{name}_r"
        if pool:
            nodes.append(
                helper.make_node(
                    "MaxPool", [x], [f"{name}_p"], name=f"/{name}/MaxPool", kernel_shape=[3, 3], strides=[2, 2]
                )
            )
            x = f"{name}_p"
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="/flatten"))
    x = "flat"
    for i, (inp, out) in enumerate([(9216, fc), (fc, fc), (fc, classes)], 6):
        weight(f"fc{i}", out, inp)
        y = "logits" if out == classes and i == 8 else f"fc{i}_y"
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [y], name=f"/fc{i}/Gemm", transB=1))
        if i < 8:
            nodes.append(helper.make_node("Relu", [y], [f"fc{i}_r"], name=f"/fc{i}/Relu"))
            x = f"fc{i}_r"
    graph = helper.make_graph(
        nodes,
        f"alexnet-{fc}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="klaus-bench")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def alexnet_files(fc: int):
    """(fp32 ONNX, kmeans8 .klaus) for the AlexNet-shaped network, built once into bench/.cache/."""
    import onnx

    from klaus import compression
    from klaus.compression.recipe import KMEANS8
    from klaus.labels import imagenet_label_rows
    from klaus.preprocess import Preprocess

    onnx_path = cached(f"alexnet-{fc}-fp32.onnx", lambda p: onnx.save(alexnet_onnx(fc), str(p)))

    def build(path):
        card = compression.ModelCard(
            f"alexnet-{fc}", "bench/memory.py (random He-init weights, seed 0)", "CC0-1.0", "klaus bench"
        )
        model = compression.compress_onnx(
            onnx.load(str(onnx_path)), KMEANS8, preprocess=Preprocess(), labels=imagenet_label_rows(), card=card
        )
        compression.write(model, path)

    return onnx_path, cached(f"alexnet-{fc}-kmeans8.klaus", build)


def alexnet_latency(onnx_path, klaus_path, repeats: int = 8) -> dict[str, float]:
    from klaus.runtime import Classifier

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    sessions = {
        "fp32": ort_session(onnx_path, THREADS),
        "default": Classifier(klaus_path, threads=THREADS).session,
        "low": Classifier(klaus_path, threads=THREADS, memory="low").session,
    }
    runners: dict[str, Callable[[], object]] = {
        k: functools.partial(s.run, None, {"input": x}) for k, s in sessions.items()
    }
    return {k: median(v) for k, v in interleaved_ms(runners, repeats, warmup=2).items()}


# ---------------------------------------------------------------- report


def run(only: list[str] | None = None) -> str:
    wanted = list(only or KEYS)
    rows = []
    floor = median_rss({"imports": lambda: klaus_rss("-", "imports")})["imports"]
    rows.append(
        [
            "imports only (numpy, onnxruntime, Pillow, klaus.runtime)",
            "—",
            "—",
            peak_cell(floor),
            "—",
            mib(floor["current_bytes"]),
            "—",
            "—",
            "—",
            command("memory.py"),
        ]
    )
    latency_rows = []
    networks = []
    if "effnet" in wanted:
        networks.append(("effnet", "EfficientNet-Lite0", fp32_onnx(), embedded_model()))
    for fc in (4096, 2048):
        if f"alexnet-{fc}" in wanted:
            onnx_path, klaus_path = alexnet_files(fc)
            networks.append((f"alexnet-{fc}", f"AlexNet-shaped, FC {fc}", onnx_path, klaus_path))
    for key, label, onnx_path, klaus_path in networks:
        klaus_rss(klaus_path, "default")  # fills the weights cache before the rounds
        results = median_rss(
            {
                "fp32 ORT (baseline)": functools.partial(fp32_rss, onnx_path),
                "Klaus default (weights cached)": functools.partial(klaus_rss, klaus_path, "default"),
                "Klaus default, first start (empty cache)": functools.partial(klaus_rss, klaus_path, "default", True),
                "Klaus `--low-memory`": functools.partial(klaus_rss, klaus_path, "low"),
            }
        )
        base = results["fp32 ORT (baseline)"]
        for mode, r in results.items():
            rows.append(
                [
                    label,
                    mode,
                    f"{onnx_path.stat().st_size / 2**20:.1f} / {klaus_path.stat().st_size / 2**20:.1f}",
                    peak_cell(r),
                    ratio(r["peak_bytes"], base["peak_bytes"]),
                    mib(r["current_bytes"]),
                    ratio(r["current_bytes"], base["current_bytes"]),
                    mib(r["current_bytes"] - floor["current_bytes"]),
                    ratio(r["current_bytes"] - floor["current_bytes"], base["current_bytes"] - floor["current_bytes"]),
                    command("memory.py", "--only", key),
                ]
            )
        if key.startswith("alexnet"):
            lat = alexnet_latency(onnx_path, klaus_path)
            for mode, name in (
                ("fp32", "fp32 ORT (baseline)"),
                ("default", "Klaus default"),
                ("low", "Klaus `--low-memory`"),
            ):
                latency_rows.append(
                    [
                        label,
                        name,
                        f"{lat[mode]:.1f}",
                        ratio(lat[mode], lat["fp32"]),
                        command("memory.py", "--only", key),
                    ]
                )
    out = [
        "### Memory (peak RSS of a fresh process classifying one photo)",
        "",
        f"MiB = 2^20 bytes; each figure is the median of {ROUNDS} fresh processes per runtime, taking turns "
        "(the peak's lowest–highest in brackets). Peak = `VmHWM` (includes loading: reading and decoding the file, "
        "building the session); "
        "after = `VmRSS` once the photo is classified, model still loaded (what a long-running process keeps). "
        '"model\'s share" = after minus the first row (a process that only imports the libraries): the memory the '
        "loaded model itself keeps.",
        "",
        table(
            [
                "network",
                "runtime",
                "file MiB (onnx / klaus)",
                "peak MiB (range)",
                "peak vs fp32",
                "after MiB",
                "after vs fp32",
                "model's share MiB",
                "share vs fp32",
                "command",
            ],
            rows,
        ),
    ]
    if latency_rows:
        out += [
            "",
            "Batch-1 latency of the AlexNet-shaped networks (2 threads, median of 8 interleaved rounds; the low-memory mode "
            "decodes every weight on every run):",
            "",
            table(["network", "runtime", "median ms", "vs fp32", "command"], latency_rows),
        ]
    return "\n".join(out)


def smoke(model_path, onnx_path) -> str:
    """One low-memory child process on the tiny model, for tests/test_bench_smoke.py."""
    r = klaus_rss(model_path, "low")
    return table(["runtime", "peak MiB"], [["Klaus --low-memory", mib(r["peak_bytes"])]])


if __name__ == "__main__":
    cli(__doc__.splitlines()[0], run, KEYS)
