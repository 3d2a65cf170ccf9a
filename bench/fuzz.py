"""The long fuzz run: hostile model files and images through `klaus` (the harness in tests/fuzz).

    .venv/bin/python bench/fuzz.py                               # 10,000 model files + 1,000 images: a summary
    .venv/bin/python bench/fuzz.py --models 300 --images 100     # a quicker look
    .venv/bin/python bench/fuzz.py --write                       # also the "### Fuzzing" part of BENCHMARKS.md
    .venv/bin/python bench/fuzz.py --case model:png.data:123:classify   # one case, rebuilt and run alone
    .venv/bin/python bench/fuzz.py --render --write              # the part again from the last run's results

What it runs, in order:

1. the import check: `klaus --version` and the commands' `--help` in fresh processes print
   nothing on stderr (the forked runs below cannot see import-time output);
2. the hand-built bombs (tests/fuzz: graphs of unbounded work, index maps that inflate to
   gigabytes, an xz label set past the reader's cap, image headers declaring huge sizes), each
   through `inspect`, `classify` and `export` in fresh `klaus` processes, timed as a user sees it;
3. the random cases (``--models`` + ``--images``, seed ``--seed``) in the harness's fork mode
   (children forked from workers that imported Klaus once: the same code, without the
   interpreter start per case), 2 at a time;
4. a sample of those cases (``--spawn-sample``) again in fresh processes, to check that both
   ways give the same outcomes.

Every case runs under an address-space limit of 4 GiB (a backstop), a 30 s wall-clock limit (a
hang), and is over-memory if its peak RSS passes 1 GiB. Results go to
bench/.cache/fuzz/results.jsonl (one JSON object per case); the inputs of failing cases to
bench/.cache/fuzz/failures/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# tests/ first: "fuzz" is the harness package there, not this script.
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]

from fuzz import corpus as fuzz_corpus  # noqa: E402
from fuzz import images, models, runner  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "fuzz"
COMMAND = "python bench/fuzz.py"
SEED = 20261207
IMAGE_BOMBS = (*images.BOMBS, "large-100mpx")
BOMB_SECONDS = 2.0
MIB = 1 << 20


def bomb_cases() -> list[runner.Case]:
    """Every bomb through every command, and the unmodified seed model through each (the baseline)."""
    cases = [runner.Case("model", "seed", 0, command) for command in runner.MODEL_COMMANDS]
    cases += [runner.Case("model", f"bomb:{n}", 0, command) for n in models.BOMBS for command in runner.MODEL_COMMANDS]
    return cases + [runner.Case("image", f"bomb:{name}", 0, "classify") for name in IMAGE_BOMBS]


def shown_line(text: str) -> str:
    """One stderr line for a Markdown table: control characters escaped, the cache folder shortened."""
    from klaus.names import shown

    return shown(text.strip().splitlines()[0] if text.strip() else "").replace(str(CACHE), "…").replace("|", "\\|")


def progress(total: int, start: float):
    counts: Counter = Counter()

    def on_result(result: runner.Result) -> None:
        counts[result.outcome] += 1
        done = sum(counts.values())
        if done % 250 == 0 or done == total:
            rate = done / max(1e-9, time.monotonic() - start)
            print(f"[fuzz] {done}/{total} cases, {rate:.1f}/s: {dict(counts)}", file=sys.stderr, flush=True)

    return on_result


def table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def outcome_row(label: str, results: list[runner.Result]) -> list[object]:
    counts = Counter(r.outcome for r in results)
    clean = [r for r in results if r.outcome not in runner.BAD]
    return [
        label,
        len(results),
        *(counts.get(o, 0) for o in runner.OUTCOMES),
        f"{max((r.seconds for r in clean), default=0):.2f} s",
        f"{max((r.max_rss for r in clean), default=0) / MIB:.0f} MiB",
    ]


def cell(result: runner.Result | None) -> str:
    """One run in the bomb table: its outcome and wall time ('—' for a command the bomb does not go through)."""
    return "—" if result is None else f"{result.outcome.replace('-', ' ')}, {result.seconds:.2f} s"


def fast_refusal(result: runner.Result) -> bool:
    """A bomb run that ended the way the acceptance asks: one error line, in under BOMB_SECONDS."""
    return result.outcome == "clean-error" and result.seconds < BOMB_SECONDS


def expected_success(name: str) -> bool:
    """The one "bomb" that is a result, not a refusal: a real 100 Mpx image, which Klaus classifies."""
    return "large" in name


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def part(seed: int, results, spawned, bombs, noise: str, minutes: float, load: tuple[float, float]) -> str:
    """The "### Fuzzing" part of BENCHMARKS.md."""
    model_results = [r for r in results if r.case.kind == "model"]
    image_results = [r for r in results if r.case.kind == "image"]
    everything = results + spawned + bombs
    counts = Counter(r.outcome for r in everything)
    forked = {r.case: r for r in results}
    agree = sum(forked[r.case].outcome == r.outcome for r in spawned)
    headers = ["inputs", "cases", *runner.OUTCOMES, "slowest clean run", "largest peak RSS"]
    lines = [
        "### Fuzzing",
        "",
        f"`{COMMAND}` (seed {seed}; {minutes:.0f} min on {os.cpu_count()} cores, 1-minute load average "
        f"{load[0]:.1f} → {load[1]:.1f}). The harness (`tests/fuzz`) mutates `.klaus` files — raw bytes; SQLite rows "
        "edited on a copy (meta values, the preprocessing JSON, the label set, tensor dims, codec, bits, palette, scales "
        "and payload); PNG chunks inside index maps, including zlib streams that inflate to gigabytes; the ONNX graph "
        "(bytes, structure, and graphs of unbounded work built with the `onnx` package) — with the checksums recomputed "
        "for 85 % of the mutations so that they reach the checks behind them, and images (truncations, flipped bytes, "
        "huge declared sizes in PNG, GIF, JPEG, BMP, TIFF and WebP headers, real 90–170 Mpx images, odd modes and EXIF, "
        "junk, pipes, devices, names with line breaks). Model files go through `klaus inspect`, `klaus classify -m` and "
        "`klaus export` (4 : 4 : 2), images through `klaus classify` (the small test model, a fifth with the embedded "
        "EfficientNet-Lite0). Each case runs in a child process with a 4 GiB address-space limit (a backstop) and a 30 s "
        "wall-clock limit; over-memory is a peak RSS above 1 GiB. Outcomes: success; clean error (exit status 1 and "
        "exactly one stderr line `klaus: error: …`); traceback; hang; crash (a signal); over-memory; stray stderr "
        "(anything else on stderr); bad exit (another status, or 1 with nothing said); harness error (the case could "
        "not be built). The random cases run forked from workers that imported Klaus once (peak RSS includes the "
        "worker's, about 150 MiB); a sample runs again as fresh `klaus` processes.",
        "",
        table(
            headers,
            [
                outcome_row("model files", model_results),
                outcome_row("images", image_results),
                outcome_row("sample as fresh processes", spawned),
                outcome_row("hand-built bombs (fresh processes)", bombs),
            ],
        ),
        "",
        f"The {len(spawned)} cases run again as fresh processes gave the same outcome as forked in {agree}. "
        f"Import-time output of a fresh `klaus`: {'none' if not noise.strip() else repr(noise[:200])}.",
        "",
    ]
    seed = {r.case.command: r for r in bombs if r.case.mutator == "seed"}
    bomb_runs = [r for r in bombs if r.case.mutator != "seed"]
    by_bomb: dict[str, list[runner.Result]] = {}
    for r in bomb_runs:
        by_bomb.setdefault(r.case.mutator.removeprefix("bomb:"), []).append(r)
    commands = runner.MODEL_COMMANDS
    rows = [
        ["unmodified seed model (baseline)", *(cell(seed.get(c)) for c in commands), "—", "—", "(success)"]
        if seed
        else []
    ]
    for name, rs in by_bomb.items():
        by_command = {r.case.command: r for r in rs}
        refused = not expected_success(name)
        rows.append(
            [
                f"`{name}`",
                *(cell(by_command.get(c)) for c in commands),
                (("yes" if all(fast_refusal(r) for r in rs) else "**no**") if refused else "— (a result)"),
                f"{max(r.max_rss for r in rs) / MIB:.0f} MiB",
                next((shown_line(r.stderr) for r in rs if r.stderr.strip()), "")[:160] or "(nothing: success)",
            ]
        )
    rows = [row for row in rows if row]
    bombs_ok = all(r.outcome == ("success" if expected_success(r.case.mutator) else "clean-error") for r in bomb_runs)
    refusals = [r for r in bomb_runs if not expected_success(r.case.mutator)]
    bombs_fast = all(fast_refusal(r) for r in refusals)
    slowest = max(refusals, key=lambda r: r.seconds, default=None)
    lines += [
        "Hand-built bombs, each through every command in fresh `klaus` processes: the outcome and the wall time "
        "of each run as a user sees it (starting Python and Klaus included), and whether every command refused the bomb "
        f"in one line in under {BOMB_SECONDS:g} s. Graphs made of allowed operators whose tensors would be huge (`pad-100000`, "
        "`expand-100000`) are refused when the file is read, by the static shape walk at the declared input size "
        "(`klaus.shapes`, docs/format.md). "
        + (
            f"The slowest refusal: `{slowest.case.mutator.removeprefix('bomb:')}` through `{slowest.case.command}`, "
            f"{slowest.seconds:.2f} s."
            if slowest
            else ""
        ),
        "",
        table(
            [
                "bomb",
                *(f"`{c}`" for c in commands),
                f"refused in one line, each under {BOMB_SECONDS:g} s",
                "largest peak RSS",
                "stderr (first line)",
            ],
            rows,
        ),
        "",
        f"Targets: 0 tracebacks — {met(counts['traceback'] == 0)}; 0 hangs (over 30 s) — {met(counts['hang'] == 0)}; "
        f"0 runs over 1 GiB — {met(counts['over-memory'] == 0)}; 0 stray stderr lines — "
        f"{met(counts['stray-stderr'] == 0)}; 0 crashes — {met(counts['crash'] == 0)}; every bomb refused in one line "
        f"— {met(bombs_ok)}, in under {BOMB_SECONDS:g} s — {met(bombs_fast)}.",
    ]
    bad = [r for r in everything if r.outcome in runner.BAD]
    by_mutator: dict[str, Counter] = {}
    for r in results:
        by_mutator.setdefault(r.case.mutator, Counter())[r.outcome] += 1
    lines += [
        "",
        "By mutator (random cases):",
        "",
        table(
            ["mutator", "cases", "success", "clean error", "other"],
            [
                [
                    f"`{m}`",
                    sum(c.values()),
                    c["success"],
                    c["clean-error"],
                    sum(c.values()) - c["success"] - c["clean-error"],
                ]
                for m, c in sorted(by_mutator.items())
            ],
        ),
    ]
    if bad:
        groups: dict[tuple[str, str], list[runner.Result]] = {}
        for r in bad:
            groups.setdefault((r.outcome, signature(r.stderr)), []).append(r)
        lines += [
            "",
            f"What failed ({len(bad)} runs, grouped by their first stderr line with times, paths and node names taken "
            f"out; rebuild a case with `{COMMAND} --case NAME`):",
            "",
            table(
                ["runs", "outcome", "first stderr line", "for example"],
                [
                    [len(rs), outcome, f"`{line}`", f"`{rs[0].case.name}` ({rs[0].description})"]
                    for (outcome, line), rs in sorted(groups.items(), key=lambda item: -len(item[1]))
                ],
            ),
        ]
    return "\n".join(lines)


def signature(stderr: str) -> str:
    """A failure's first stderr line with what varies between runs of the same fault taken out."""
    line = shown_line(stderr)
    line = re.sub(r"^(\\x1b\[[0-9;]*m)?\d{4}-\d\d-\d\d \S+ ", "", line)  # ONNX Runtime's colour and timestamp
    line = re.sub(r"\S*/\S+", "…", line)  # paths
    line = re.sub(r"Name:'[^']*'", "Name:'…'", line)
    return line.split(" Status Message")[0][:140]


def run_one(name: str, corpus, work: Path) -> None:
    """Rebuild one case by name, run it in a fresh process, and keep its input in bench/.cache/fuzz/case/."""
    case = runner.Case.parse(name)
    keep = CACHE / "case"
    result = runner.run([case], corpus, work, workers=1, mode="spawn", keep=keep)[0]
    print(json.dumps(result.to_dict(), indent=2))
    if result.outcome in runner.BAD:
        print(f"input kept in {keep}", file=sys.stderr)


def render(write: bool) -> None:
    """The part from bench/.cache/fuzz/results.jsonl and run.json (the last run), printed and optionally written."""
    info = json.loads((CACHE / "run.json").read_text(encoding="utf-8"))
    bombs, results, spawned = [], [], []
    for line in (CACHE / "results.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        mode = row.pop("mode")
        result = runner.Result(**{**row, "case": runner.Case.parse(row["case"])})
        if mode == "fork":
            results.append(result)
        elif result.case.mutator == "seed" or result.case.mutator.startswith("bomb:"):
            bombs.append(result)
        else:
            spawned.append(result)
    text = part(info["seed"], results, spawned, bombs, info["noise"], info["minutes"], tuple(info["load"]))
    print(text)
    if write:
        from reliability import write_part

        write_part("### Fuzzing", text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=int, default=10_000)
    parser.add_argument("--images", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--spawn-sample", type=int, default=300)
    parser.add_argument("--case", help="rebuild and run one case by name (as results.jsonl names it)")
    parser.add_argument("--write", action="store_true", help="write the part into BENCHMARKS.md")
    parser.add_argument(
        "--render", action="store_true", help="the part again from the last run's results, without running"
    )
    args = parser.parse_args()

    if args.render:
        render(args.write)
        return
    corpus = fuzz_corpus.build(CACHE / "corpus")
    work = CACHE / "work"
    if args.case:
        run_one(args.case, corpus, work)
        return
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    noise = runner.import_noise()
    print("[fuzz] bombs ...", file=sys.stderr, flush=True)
    bombs = runner.run(bomb_cases(), corpus, work, workers=args.workers, mode="spawn", keep=CACHE / "failures")
    cases = runner.plan(args.seed, args.models, args.images)
    print(f"[fuzz] {len(cases)} random cases ...", file=sys.stderr, flush=True)
    results = runner.run(
        cases,
        corpus,
        work,
        workers=args.workers,
        mode="fork",
        keep=CACHE / "failures",
        on_result=progress(len(cases), time.monotonic()),
    )
    sample = random.Random(args.seed).sample(cases, min(args.spawn_sample, len(cases)))
    print(f"[fuzz] {len(sample)} cases again in fresh processes ...", file=sys.stderr, flush=True)
    spawned = runner.run(sample, corpus, work, workers=args.workers, mode="spawn", keep=CACHE / "failures")
    minutes = (time.monotonic() - start) / 60
    with open(CACHE / "results.jsonl", "w", encoding="utf-8") as out:
        for mode, rs in (("spawn", bombs), ("fork", results), ("spawn", spawned)):
            for r in rs:
                out.write(json.dumps({**r.to_dict(), "mode": mode}) + "\n")
    info = {"seed": args.seed, "minutes": minutes, "load": [load_before, os.getloadavg()[0]], "noise": noise}
    (CACHE / "run.json").write_text(json.dumps(info), encoding="utf-8")
    text = part(args.seed, results, spawned, bombs, noise, minutes, (load_before, os.getloadavg()[0]))
    print(text)
    if args.write:
        from reliability import write_part

        write_part("### Fuzzing", text)
        print(f"wrote the Fuzzing part of {ROOT / 'BENCHMARKS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
