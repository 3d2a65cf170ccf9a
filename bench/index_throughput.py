"""Photo-library indexing throughput: `klaus index`'s pipeline versus a naive loop, in the same run.

    .venv/bin/python bench/index_throughput.py                   # both sets, a markdown table
    .venv/bin/python bench/index_throughput.py --sets sample --rounds 3 --json
    .venv/bin/python bench/index_throughput.py --section         # the BENCHMARKS.md section

``run()`` returns that section, for bench/run_all.py.

Sets:

* ``sample`` — ../shared/data/imagenet-sample (1000 JPEGs, mostly 500 px).
* ``12mp`` — 12-megapixel JPEGs (4000 x 3000) made once by upscaling every 25th sample
  photo (Lanczos, light grain so they compress like real photos, quality 90) into
  bench/.cache/12mp/ (git-ignored).

Contenders, each on the same photos and the same model file:

* naive: for each photo, ``Image.open(...).convert("RGB")`` (full-size decode, no draft),
  :func:`klaus.preprocess.to_tensor` (the same resize/crop/normalize), one ONNX Runtime
  call per photo through :class:`klaus.runtime.Classifier`; nothing is stored.
* pipeline: :func:`klaus.index.index_paths` into a fresh database, i.e. everything
  `klaus index` does (walk, stat, read, SHA-256, EXIF header, draft decode in
  ``--workers`` threads, ``--batch``-photo model calls, one transaction per batch).

Each round alternates naive / pipeline over slices of ~100 photos, so both see the
same machine load (after an untimed warm-up of each); the table reports the median images/s of each, the median and
range of the per-round ratio, the process CPU time per photo of each, and top-1 agreement between the two (draft
decoding is a different, slightly smoother downscale). The engine is loaded once, as in a run.

The ceiling of the ratio on this many cores is the naive loop's time per photo over the pipeline's CPU time per
photo spread over every core: what the pipeline would reach if it kept every core busy. A per-photo profile of each
set (one thread, the first 100 photos, best of 3 passes) splits both contenders into their steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "imagenet-sample"
CACHE = ROOT / "bench" / ".cache"
MP12 = (4000, 3000)


def sample_photos(limit: int | None) -> list[Path]:
    if not SAMPLE.is_dir():
        sys.exit(f"bench: {SAMPLE} not found")
    files = sorted(p for p in SAMPLE.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    return files[:limit] if limit else files


def twelve_megapixel_photos(count: int) -> list[Path]:
    folder = CACHE / "12mp"
    folder.mkdir(parents=True, exist_ok=True)
    sources = sample_photos(None)[::25][:count]
    rng = np.random.default_rng(0)
    out = []
    for i, src in enumerate(sources):
        dst = folder / f"{i:03d}_{src.stem}.jpg"
        if not dst.exists():
            img = Image.open(src).convert("RGB")
            size = MP12 if img.width >= img.height else MP12[::-1]
            big = np.asarray(img.resize(size, Image.Resampling.LANCZOS), dtype=np.float32)
            big += rng.normal(0, 6.0, big.shape).astype(np.float32)
            tmp = dst.with_suffix(".tmp")
            Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(tmp, "JPEG", quality=90)
            tmp.rename(dst)
        out.append(dst)
    return out


def naive(files: list[Path], clf) -> tuple[float, float, list[int]]:
    """Seconds and process CPU seconds for the naive loop over ``files``, and each photo's top-1 class."""
    from klaus.preprocess import to_tensor

    top1 = []
    start, cpu = time.perf_counter(), time.process_time()
    for f in files:
        with Image.open(f) as img:
            rgb = img.convert("RGB")
        probs = clf.run(to_tensor(rgb, clf.preprocess))
        top1.append(int(np.argmax(probs[0])))
    return time.perf_counter() - start, time.process_time() - cpu, top1


def pipeline(files: list[Path], engine, args, db: Path, folder: Path) -> tuple[float, float, dict[str, int]]:
    """Seconds and process CPU seconds for `klaus index` of ``files`` (symlinked into their own folder) into
    ``db``; top-1 by name."""
    import sqlite3

    from klaus.index import index_paths

    folder.mkdir()
    for f in files:  # the same files, through symlinks, so only they are walked
        (folder / f.name).symlink_to(f)
    start, cpu = time.perf_counter(), time.process_time()
    summary = index_paths(
        [str(folder)],
        db,
        engine=engine,
        workers=args.workers,
        batch=args.batch,
        decode_mode=args.decode,
        progress=False,
    )
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert summary.indexed == len(files), summary
    conn = sqlite3.connect(db)
    top1 = {
        Path(p).name: c
        for p, c in conn.execute(
            "SELECT ph.path, p.class FROM photos ph JOIN predictions p ON p.photo_id = ph.id AND p.rank = 1 "
            "WHERE ph.path LIKE ?",
            (f"{folder}/%",),
        )
    }
    conn.close()
    return seconds, cpu, top1


def profile(files: list[Path], clf, engine) -> dict:
    """Per-photo milliseconds of each step, one thread (the model calls as each contender makes them)."""
    import hashlib

    from klaus.images import load_image
    from klaus.index.pipeline import MODEL_BATCH, decode_target, header_info, read_photo
    from klaus.preprocess import normalize, to_pixels

    spec = engine.preprocess
    files = files[:100]
    datas = [f.read_bytes() for f in files]

    def naive_decode(i):
        with Image.open(files[i]) as img:
            return img.convert("RGB")

    def index_decode(i):
        data, _ = read_photo(str(files[i]))
        hashlib.sha256(data).hexdigest()
        header_info(data)
        return load_image(data, target=decode_target(spec))

    images = [load_image(d, target=decode_target(spec)) for d in datas]
    pixels = [to_pixels(im, spec) for im in images]
    tensors = [normalize(p, spec) for p in pixels]
    chunks = [np.concatenate(tensors[i : i + MODEL_BATCH]) for i in range(0, len(tensors), MODEL_BATCH)]
    steps = {
        "naive_decode": (lambda: [naive_decode(i) for i in range(len(files))]),
        "index_decode": (lambda: [index_decode(i) for i in range(len(files))]),
        "resize_crop": (lambda: [to_pixels(im, spec) for im in images]),
        "normalize": (lambda: [normalize(p, spec) for p in pixels]),
        "naive_model": (lambda: [clf.run(t) for t in tensors]),
        "index_model": (lambda: [engine.run(c) for c in chunks]),
    }
    ms = {}
    for name, step in steps.items():
        step()  # warm
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
        ms[name] = round(best * 1000 / len(files), 2)
    naive_ms = ms["naive_decode"] + ms["resize_crop"] + ms["normalize"] + ms["naive_model"]
    index_ms = ms["index_decode"] + ms["resize_crop"] + ms["normalize"] + ms["index_model"]
    ms.update(naive_ms=round(naive_ms, 2), index_ms=round(index_ms, 2), model_batch=MODEL_BATCH)
    return ms


def run_set(name: str, files: list[Path], args, clf, engine) -> dict:
    """Rounds of: for each slice of the set, the naive loop then `klaus index` (fine-grained
    alternation, so a machine shared with other jobs loads both alike)."""
    import os

    slices = max(1, len(files) // args.slice)
    parts = [files[i::slices] for i in range(slices)]
    naive_rates, pipe_rates, agreements, naive_cpu, pipe_cpu = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:  # warm-up (ONNX Runtime allocates on first use), not timed
        naive(files[:8], clf)
        pipeline(files[: 2 * args.batch], engine, args, Path(tmp) / "warm.db", Path(tmp) / "warm")
    for _ in range(args.rounds):
        naive_s = pipe_s = naive_c = pipe_c = 0.0
        naive_top1: dict[str, int] = {}
        pipe_top1: dict[str, int] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for k, part in enumerate(parts):
                seconds, cpu, top1 = naive(part, clf)
                naive_s, naive_c = naive_s + seconds, naive_c + cpu
                naive_top1.update((f.name, t) for f, t in zip(part, top1, strict=True))
                seconds, cpu, by_name = pipeline(part, engine, args, Path(tmp) / "bench.db", Path(tmp) / f"slice{k}")
                pipe_s, pipe_c = pipe_s + seconds, pipe_c + cpu
                pipe_top1.update(by_name)
        naive_rates.append(len(files) / naive_s)
        pipe_rates.append(len(files) / pipe_s)
        naive_cpu.append(naive_c * 1000 / len(files))
        pipe_cpu.append(pipe_c * 1000 / len(files))
        agreements.append(float(np.mean([pipe_top1[n] == t for n, t in naive_top1.items()])))
        print(f"  {name}: naive {naive_rates[-1]:.1f}/s  pipeline {pipe_rates[-1]:.1f}/s", file=sys.stderr, flush=True)
    naive_rate, pipe_rate = statistics.median(naive_rates), statistics.median(pipe_rates)
    ratios = [p / n for p, n in zip(pipe_rates, naive_rates, strict=True)]
    with Image.open(files[0]) as img:
        size = f"{img.width}x{img.height}"
    return {
        "set": name,
        "photos": len(files),
        "example_size": size,
        "megabytes": round(sum(f.stat().st_size for f in files) / 1e6, 1),
        "naive_per_s": round(naive_rate, 1),
        "pipeline_per_s": round(pipe_rate, 1),
        "ratio": round(statistics.median(ratios), 2),
        "ratio_range": [round(min(ratios), 2), round(max(ratios), 2)],
        "naive_cpu_ms": round(statistics.median(naive_cpu), 2),
        "pipeline_cpu_ms": round(statistics.median(pipe_cpu), 2),
        "cores": os.cpu_count() or 1,
        "ceiling": round((1000 / naive_rate) / (statistics.median(pipe_cpu) / (os.cpu_count() or 1)), 2),
        "top1_agreement": round(min(agreements), 4),
        "naive_rounds": [round(r, 1) for r in naive_rates],
        "pipeline_rounds": [round(r, 1) for r in pipe_rates],
        "workers": args.workers,
        "batch": args.batch,
        "decode": args.decode,
        "slices": slices,
        "profile": profile(files, clf, engine) if args.profile else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="sample,12mp", help="comma-separated: sample, 12mp")
    parser.add_argument("--limit", type=int, default=None, help="use the first N sample photos")
    parser.add_argument("--mp12", type=int, default=40, help="how many 12-megapixel photos")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--slice", type=int, default=100, help="photos per alternation slice")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--decode", choices=["threads", "processes"], default="threads")
    parser.add_argument("--json", action="store_true", help="one JSON object per set")
    parser.add_argument("--section", action="store_true", help="the whole BENCHMARKS.md section (markdown)")
    parser.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-photo profile")
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> list[dict]:
    from klaus.index.engine import Engine
    from klaus.runtime import Classifier

    clf = Classifier()
    engine = Engine.load(threads=1)  # as `klaus index` builds it: single-threaded calls, one lane per core
    results = []
    for name in args.sets.split(","):
        files = sample_photos(args.limit) if name == "sample" else twelve_megapixel_photos(args.mp12)
        results.append(run_set(name, files, args, clf, engine))
    return results


def table(results: list[dict]) -> str:
    cores = results[0]["cores"] if results else 0
    rows = [
        "| set | photos | naive loop (img/s) | `klaus index` (img/s) | speed-up (median, range of rounds) | "
        f"CPU per photo, naive → index | ceiling on {cores} cores | top-1 agreement |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        low, high = r["ratio_range"]
        rows.append(
            f"| {_label(r)} ({r['example_size']}) | {r['photos']} | {r['naive_per_s']} | {r['pipeline_per_s']} | "
            f"**{r['ratio']:.2f}×** ({low:.2f}–{high:.2f}) | {r['naive_cpu_ms']:.1f} → {r['pipeline_cpu_ms']:.1f} ms | "
            f"{r['ceiling']:.2f}× | {r['top1_agreement'] * 100:.1f} % |"
        )
    return "\n".join(rows)


def _label(r: dict) -> str:
    return {"sample": "imagenet-sample", "12mp": "12 MP JPEGs"}.get(r["set"], r["set"])


def profile_table(results: list[dict]) -> str:
    results = [r for r in results if r.get("profile")]
    if not results:
        return ""
    rows = [
        "| ms per photo, one thread | " + " | ".join(_label(r) for r in results) + " |",
        "| --- |" + " --- |" * len(results),
    ]
    lines = [
        ('naive: `Image.open(...).convert("RGB")` (full-size decode)', "naive_decode"),
        ("index: read, SHA-256, EXIF header, draft decode", "index_decode"),
        ("both: resize and crop (`to_pixels`)", "resize_crop"),
        ("both: normalize", "normalize"),
        ("naive: model, 1 photo per call, all cores (wall time)", "naive_model"),
        ("index: model, {model_batch} photos per call, 1 thread", "index_model"),
        ("**naive loop: sum**", "naive_ms"),
        ("**index: sum** (without walking, the database and thread hand-offs)", "index_ms"),
    ]
    p0 = results[0]["profile"]
    for text, key in lines:
        cells = [f"{r['profile'][key]:.2f}" for r in results]
        rows.append(f"| {text.format(**p0)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


METHOD = """`klaus index` versus a naive loop, in the same run, on the same photos and the same
model file: `.venv/bin/python bench/index_throughput.py` (each round alternates the two
over slices of ~100 photos so both see the same machine load, after an untimed warm-up
of each).

- **naive loop**: per photo `Image.open(path).convert("RGB")` (full-size decode, no
  draft), `klaus.preprocess.to_tensor` (the same resize, crop and normalization), one
  ONNX Runtime call through `klaus.runtime.Classifier` (default session: all cores);
  nothing stored.
- **`klaus index`** with its defaults (`--workers 2 --batch 16`: decode threads read,
  SHA-256, EXIF-parse and draft-decode ahead; one single-threaded ONNX Runtime call per
  core in flight; one SQLite transaction per batch), timed end to end: walk, plan,
  hashing and database writes included.
- **12 MP JPEGs**: photos of 4000×3000 made by upscaling every 25th development photo
  (Lanczos, light grain, quality 90) into `bench/.cache/12mp/`.
- **CPU per photo**: the process's CPU time (all threads) over the photos; the naive
  loop's includes ONNX Runtime's worker threads spinning between calls. **Ceiling**:
  the naive loop's time per photo over the index's CPU time per photo divided by the
  number of cores, i.e. the speed-up if the index kept every core busy."""

WHY = """Where the time goes (profile below): on the 500-pixel photos the model is most of the
work, and the naive loop's model call already uses both cores (ONNX Runtime splits each
convolution across them with little loss), so the pipeline gains almost nothing there.
What it can overlap is decoding and preprocessing, which the naive loop runs on one core.
Hence the ceiling: the index does more CPU work per photo (the model single-threaded,
plus reading, hashing, the database) than the naive loop takes time per photo on both
cores, so spreading that work over the cores cannot beat the naive loop by much — and a
cheaper shared step (both run the same `to_pixels` and normalization) shortens the naive
time by all of its saving but the index's by half of it, so it lowers the ceiling. On 12 MP
photos decoding dominates and JPEG draft decoding (at 1/8 scale) removes most of it, so the
index is several times faster there."""


TARGETS = {"sample": 1.5, "12mp": 3.0}  # target speed-up of `klaus index` over the naive loop, per photo set


def targets(results: list[dict]) -> str:
    lines = [
        f"{_label(r)}: median **{r['ratio']:.2f}×** (target: {TARGETS[r['set']]:.1f}× the naive loop) — "
        + ("met" if r["ratio"] >= TARGETS[r["set"]] else "**not met**")
        for r in results
        if r["set"] in TARGETS
    ]
    text = "Targets: " + "; ".join(lines) + "." if lines else ""
    p = next((r["profile"] for r in results if r["set"] == "sample" and r.get("profile")), None)
    if p and text:
        text += (
            f" In this run the naive loop's model call on all {results[0]['cores']} cores took {p['naive_model']:.2f} ms "
            f"per photo against {p['index_model']:.2f} ms on one thread ({p['index_model'] / p['naive_model']:.2f}× "
            "faster): the less other work slows that call, the closer this is to the core count and the lower "
            "the speed-up of `klaus index`."
        )
    return text


def run(argv: list[str] | None = None) -> str:
    """The BENCHMARKS.md section "## Photo library indexing", freshly measured (for bench/run_all.py)."""
    args = parse_args(argv or [])
    results = measure(args)
    rounds = "; ".join(
        f"{r['set']}: " + ", ".join(f"{n} → {p}" for n, p in zip(r["naive_rounds"], r["pipeline_rounds"], strict=True))
        for r in results
    )
    parts = [
        "## Photo library indexing",
        METHOD,
        table(results),
        f"Rounds (img/s, naive → `klaus index`): {rounds}. On a machine shared with other jobs the absolute "
        "rates move between rounds; the ratios are the comparable numbers. Disturbances hit the naive loop "
        "harder (its two-thread model calls wait for each other at every layer), so a round whose naive rate "
        "dropped shows a larger ratio: read the median.",
        targets(results),
    ]
    if any(r.get("profile") for r in results):
        parts += [WHY, profile_table(results)]
    return "\n\n".join(p for p in parts if p)


def main() -> None:
    args = parse_args()
    if args.section:
        import os

        start, load = time.perf_counter(), os.getloadavg()[0]
        section = run(sys.argv[1:])
        print(
            section + f"\n\n_Section time: {time.perf_counter() - start:.0f} s; 1-minute load average "
            f"{load:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores._"
        )
        return
    results = measure(args)
    if args.json:
        for r in results:
            print(json.dumps(r))
        return
    print(table(results))
    if any(r.get("profile") for r in results):
        print()
        print(profile_table(results))


if __name__ == "__main__":
    main()
