"""Cold start: wall time of `klaus classify examples/cat.jpg` versus a minimal fp32 ONNX Runtime script.

    python bench/cold_start.py [--only klaus,klaus-first,klaus-low,ten,help,imports]

Every run is a new process (interpreter start, imports, model load, one photo;
``ten``: ten photos in one process, against the same script on the same ten);
the commands run interleaved, a few rounds after one untimed warm-up round (so
the files are in the page cache and Klaus's weights cache holds the model), and
the table gives the median wall time and its ratio to the baseline,
``python bench/minimal_fp32.py`` (onnxruntime + Pillow + numpy, loading the fp32
ONNX export of the same network). The ``klaus-first`` row starts each run from an
empty weights cache, as the first start after installing Klaus does: it decodes
the model and writes the cache file.
"""

from __future__ import annotations

import subprocess
import time

from _common import CAT, KLAUS, PYTHON, ROOT, SAMPLE, cli, command, fp32_onnx, median, ratio, table, weights_cache_env

KEYS = ("klaus", "klaus-first", "klaus-low", "ten", "help", "imports")
ROUNDS = 11
FIRST = "klaus-first"  # each run from an empty weights cache
TEN = 10  # photos in one process: the first ten development photos


def wall_ms(args: list[str], empty_cache: bool = False) -> float:
    with weights_cache_env(empty_cache) as env:
        start = time.perf_counter()
        subprocess.run(args, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        return (time.perf_counter() - start) * 1000.0


def run(only: list[str] | None = None, rounds: int = ROUNDS) -> str:
    wanted = set(only or KEYS)
    cat = str(CAT.relative_to(ROOT))
    onnx_path = str(fp32_onnx().relative_to(ROOT))
    script = [PYTHON, "bench/minimal_fp32.py", onnx_path]
    photos = [str(p) for p in sorted(SAMPLE.glob("*.JPEG"))[:TEN]]
    ten = f"the first {TEN} photos of `../shared/data/imagenet-sample`"
    # key: (what, the command, how the table shows it, the key of the row it is compared with)
    cases: dict[str, tuple[str, list[str], str, str | None]] = {
        "baseline": (
            "minimal fp32 ONNX Runtime script (baseline)",
            [*script, cat],
            f"`python bench/minimal_fp32.py {onnx_path} {cat}`",
            "baseline",
        ),
        "klaus": (
            "`klaus classify` (embedded model, weights cached)",
            [KLAUS, "classify", cat],
            f"`klaus classify {cat}`",
            "baseline",
        ),
        FIRST: (
            "`klaus classify`, first start (empty weights cache: decodes and writes it)",
            [KLAUS, "classify", cat],
            f"`klaus classify {cat}`",
            "baseline",
        ),
        "klaus-low": (
            "`klaus classify --low-memory`",
            [KLAUS, "classify", "--low-memory", cat],
            f"`klaus classify --low-memory {cat}`",
            "baseline",
        ),
        "baseline-ten": (
            f"minimal fp32 script, {TEN} photos in one process (baseline of the next row)",
            [*script, *photos],
            f"`python bench/minimal_fp32.py {onnx_path}` on {ten}",
            "baseline-ten",
        ),
        "ten": (
            f"`klaus classify`, {TEN} photos in one process",
            [KLAUS, "classify", *photos],
            f"`klaus classify` on {ten}",
            "baseline-ten",
        ),
        "help": ("context: `klaus --help`", [KLAUS, "--help"], "`klaus --help`", None),
        "imports": (
            "context: `python -c 'import onnxruntime'`",
            [PYTHON, "-c", "import onnxruntime"],
            "`python -c 'import onnxruntime'`",
            None,
        ),
    }
    if len(photos) < TEN:
        wanted.discard("ten")
    if "ten" in wanted:
        wanted.add("baseline-ten")
    cases = {k: v for k, v in cases.items() if k == "baseline" or k in wanted}
    for _, args, _, _ in cases.values():  # warm-up: page cache, .pyc files, the weights cache
        wall_ms(args)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for key, (_, args, _, _) in cases.items():
            times[key].append(wall_ms(args, empty_cache=key == FIRST))
    rows = [
        [
            label,
            f"{median(times[k]):.0f}",
            ratio(median(times[k]), median(times[base])) if base else "—",
            cmd,
            command("cold_start.py", *(() if k == "baseline" else ("--only", k.removeprefix("baseline-")))),
        ]
        for k, (label, _, cmd, base) in cases.items()
    ]
    return "\n".join(
        [
            "### Cold start (new process: imports, model load, one photo)",
            "",
            f"Median wall time of {rounds} interleaved runs after a warm-up run; ratio to the minimal fp32 script "
            "(on the same photos).",
            "",
            table(["what", "median ms", "vs baseline", "the command timed", "reproduce"], rows),
        ]
    )


def smoke(model_path, onnx_path) -> str:
    """One timed run of the minimal script on the tiny model, for tests/test_bench_smoke.py (no image-size check)."""
    return f"{wall_ms([PYTHON, '-c', 'import onnxruntime']):.0f} ms"


if __name__ == "__main__":
    cli(__doc__.splitlines()[0], run, KEYS)
