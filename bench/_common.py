"""Shared helpers for the benchmark scripts: paths, cached artifacts, timing, Markdown.

Benchmarks compare against a baseline measured in the same run and report
ratios; absolute times are context only. Built artifacts (the fp32 ONNX export,
recompressed models, quantized ONNX files) are cached under ``bench/.cache/``
(git-ignored); delete it to rebuild from scratch.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CACHE = BENCH / ".cache"
DATA = ROOT.parent / "shared" / "data"
SAMPLE = DATA / "imagenet-sample"
SEED = DATA / "klaus-seed"
EXAMPLES = ROOT / "examples"
CAT = EXAMPLES / "cat.jpg"
PYTHON = sys.executable
KLAUS = str(Path(sys.executable).with_name("klaus"))
THREADS = 2
MODEL = "efficientnet-lite0"

# An installed Klaus runs from cached bytecode (pip compiles it; an editable install caches it on first
# import). A shell that sets PYTHONDONTWRITEBYTECODE would charge every timed process for compiling
# Klaus's sources, which no installed copy pays, so the measured processes may write and reuse it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
# Klaus keeps each model's decoded weights in a cache (klaus.staging); the benchmarks keep theirs here, apart
# from the user's, so a row that starts from an empty cache (:func:`weights_cache_env`) means just that.
WEIGHTS_CACHE_ENV = "KLAUS_CACHE_DIR"
os.environ[WEIGHTS_CACHE_ENV] = str(CACHE / "weights")

if str(BENCH) not in sys.path:  # so `python bench/x.py` can import its siblings
    sys.path.insert(0, str(BENCH))


def embedded_model() -> Path:
    from klaus.runtime import default_model_path

    return default_model_path()


def fp32_onnx() -> Path:
    """EfficientNet-Lite0 as a plain fp32 ONNX file (klaus.zoo export, needs torch); cached."""
    path = CACHE / f"{MODEL}-fp32.onnx"
    if not path.exists():
        import onnx

        from klaus import zoo

        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        onnx.save(zoo.export_onnx(MODEL), tmp)
        os.replace(tmp, path)
    return path


def cached(name: str, build: Callable[[Path], None]) -> Path:
    """``CACHE/name``, built by ``build(tmp_path)`` if missing or stale (atomic rename).

    A cached ``.klaus`` file that this Klaus cannot read (another format
    version) counts as stale and is rebuilt.
    """
    path = CACHE / name
    if path.exists() and path.suffix == ".klaus":
        from klaus.errors import KlausError
        from klaus.format import read_model

        try:
            read_model(path)
        except KlausError:
            path.unlink()
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        build(tmp)
        os.replace(tmp, path)
    return path


def ort_session(path_or_bytes, threads: int = THREADS):
    """A plain ONNX Runtime CPU session: default optimizations, ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(path_or_bytes) if isinstance(path_or_bytes, Path) else path_or_bytes
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- timing


def interleaved_ms(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Run every case ``warmup`` times, then ``repeats`` rounds with the cases interleaved.

    Interleaving means a slow phase of a shared machine hits every case alike,
    so the ratios stay meaningful even when absolute times drift.
    """
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


@contextlib.contextmanager
def weights_cache_env(empty: bool) -> Iterator[dict[str, str] | None]:
    """The environment of a measured child process: with ``empty``, one whose weights cache is a new, empty
    directory (Klaus's first start after install); otherwise this process's own (None: inherited)."""
    if not empty:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="klaus-bench-cache-") as directory:
        yield {**os.environ, WEIGHTS_CACHE_ENV: str(Path(directory) / "cache")}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def run_command(args: Sequence[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc


# ---------------------------------------------------------------- reporting


def command(script: str, *args: str) -> str:
    return "`" + " ".join(["python", f"bench/{script}", *args]) + "`"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f} %"


def ratio(x: float, base: float, digits: int = 2) -> str:
    return f"{x / base:.{digits}f}×" if base else "—"


def machine() -> dict[str, str]:
    import numpy
    import onnxruntime

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cores (nproc)": str(os.cpu_count()),
        "CPU": cpu,
        "memory": mem,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "date": datetime.date.today().isoformat(),
    }


def cli(description: str, run: Callable[..., str], keys: Sequence[str] = ()) -> None:
    """Standard ``python bench/x.py [--only KEY,...]`` entry point: prints the Markdown section."""
    parser = argparse.ArgumentParser(description=description)
    if keys:
        parser.add_argument("--only", help=f"comma-separated rows to run (baselines always run): {', '.join(keys)}")
    args = parser.parse_args()
    only = None
    if keys and args.only:
        only = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = sorted(set(only) - set(keys))
        if unknown:
            parser.error(f"unknown rows {unknown}; known: {', '.join(keys)}")
    print(run(only=only) if keys else run())
