"""The short fuzz run (tests/fuzz): hostile model files and images through `klaus inspect`,
`klaus classify -m` and `klaus export`, each in a child process with memory and time limits.

Every run must end in a result or one clean error line: no traceback, no hang (30 s), no
crash, nothing else on stderr. Each hand-built bomb (graphs of unbounded work, index maps
that inflate to gigabytes, an xz label set past the cap, images whose headers declare
huge sizes) is refused in one line. bench/fuzz.py is the long run, with the figures.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # "fuzz" is tests/fuzz (bench/ holds a fuzz.py too)
from fuzz import corpus as fuzz_corpus
from fuzz import images, models, runner

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the harness uses fork, wait4 and /proc (Linux)")

SEED = 20261207
MODEL_CASES = 160
IMAGE_CASES = 80
IMAGE_BOMBS = (*images.BOMBS, "large-100mpx")

#: Failures whose fix belongs to other work in progress: (what, how to recognize it). A run whose
#: only failures are these is an expected failure naming them; any other failure fails the test.
KNOWN: list[tuple[str, object]] = []


def _known(result: runner.Result) -> str | None:
    return next((what for what, matches in KNOWN if matches(result)), None)  # type: ignore[operator]


def _report(results: list[runner.Result]) -> str:
    return "\n".join(
        f"{r.outcome}: {r.case.name} [{r.description}] exit {r.exit_code}, {r.seconds} s, "
        f"{r.max_rss >> 20} MiB: {r.stderr[:300]!r}"
        for r in results
    )


def check(results: list[runner.Result]) -> None:
    """No bad outcome, except known ones (then the test is an expected failure that names them)."""
    bad = [r for r in results if r.outcome in runner.BAD]
    unexplained = [r for r in bad if _known(r) is None]
    assert not unexplained, _report(unexplained)
    if bad:
        reasons = sorted({reason for r in bad if (reason := _known(r)) is not None})
        pytest.xfail(f"{len(bad)} cases fail for known reasons: {'; '.join(reasons)}\n{_report(bad)}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fuzz_corpus.build(tmp_path_factory.mktemp("fuzz-corpus"))


def test_outcome_rules():
    limits = runner.Limits()
    rule = runner.classify_outcome
    assert rule(0, False, 100, "", limits) == "success"
    assert rule(1, False, 100, "klaus: error: x.klaus: bad\n", limits) == "clean-error"
    assert rule(1, False, 100, "klaus: error: x\nklaus: error: y\n", limits) == "stray-stderr"
    assert rule(1, False, 100, "some warning\nklaus: error: x\n", limits) == "stray-stderr"
    assert rule(1, False, 100, "", limits) == "bad-exit"
    assert rule(2, False, 100, "Usage: ...", limits) == "bad-exit"
    assert rule(1, False, 100, "Traceback (most recent call last):\n  ...\nValueError\n", limits) == "traceback"
    assert rule(0, False, 100, "a warning\n", limits) == "stray-stderr"
    assert rule(-9, False, 100, "", limits) == "crash"
    assert rule(-9, True, 100, "", limits) == "hang"
    assert rule(1, False, (1 << 30) + 1, "klaus: error: x\n", limits) == "over-memory"


def test_cases_are_deterministic(corpus, tmp_path):
    for mutator in ("meta.preprocess", "tensor.palette", "png.data", "graph.proto", "labels.json", "bytes.flip"):
        for seed in (1, 2):
            a, b = tmp_path / "a.klaus", tmp_path / "b.klaus"
            assert models.mutate(mutator, seed, corpus, a) == models.mutate(mutator, seed, corpus, b)
            assert a.read_bytes() == b.read_bytes(), mutator
    for mutator in images.MUTATORS:
        if mutator == "image.large":
            continue
        first, second = tmp_path / "first", tmp_path / "second"
        for folder in (first, second):
            folder.mkdir()
        (pa, da), (pb, db) = images.mutate(mutator, 3, corpus, first), images.mutate(mutator, 3, corpus, second)
        assert (pa.name, da) == (pb.name, db)
        if pa.is_file() and not pa.is_symlink():
            assert pa.read_bytes() == pb.read_bytes(), mutator
        for folder in (first, second):
            for item in folder.iterdir():
                item.rmdir() if item.is_dir() and not item.is_symlink() else item.unlink()
            folder.rmdir()
    assert runner.plan(SEED, 20, 10) == runner.plan(SEED, 20, 10)


def test_short_fuzz_run(corpus, tmp_path):
    cases = runner.plan(SEED, MODEL_CASES, IMAGE_CASES)
    results = runner.run(cases, corpus, tmp_path / "work", workers=2, mode="fork")
    assert [r.case for r in results] == cases
    summary = runner.summarize(results)
    assert summary.outcomes["clean-error"] > MODEL_CASES // 4 and summary.outcomes["success"] > 10, summary.outcomes
    check(results)


def test_a_sample_in_fresh_processes(corpus, tmp_path):
    """The fork mode runs Klaus's own code in forked children; a sample in fresh `klaus` processes
    (as a user runs it) gives the same outcomes."""
    cases = random.Random(SEED).sample(runner.plan(SEED, MODEL_CASES, IMAGE_CASES), 8)
    spawned = runner.run(cases, corpus, tmp_path / "work", workers=2, mode="spawn")
    forked = runner.run(cases, corpus, tmp_path / "work", workers=2, mode="fork")  # the same paths, so the same lines
    assert [r.outcome for r in spawned] == [r.outcome for r in forked], _report(spawned + forked)
    assert [r.stderr for r in spawned] == [r.stderr for r in forked]
    check(spawned)


#: Cases a long run (bench/fuzz.py) found failing, rebuilt from their names: kept as regression tests.
REGRESSIONS = (
    "model:graph.bytes:1593309638:export",  # the ONNX checker's UnicodeDecodeError (a name not UTF-8) as a traceback
    "model:graph.bytes:3738277604:export",
    "model:tensor.dims:2194405953:classify",  # a bias of the wrong size: ONNX Runtime's own ERROR line on stderr
)


def test_cases_a_long_run_found(corpus, tmp_path):
    cases = [runner.Case.parse(name) for name in REGRESSIONS]
    check(runner.run(cases, corpus, tmp_path / "work", workers=2, mode="fork"))


def test_nothing_is_printed_at_import():
    assert runner.import_noise() == ""


@pytest.fixture(scope="module")
def bomb_results(corpus, tmp_path_factory) -> dict[str, list[runner.Result]]:
    cases = [
        runner.Case("model", f"bomb:{name}", 0, command) for name in models.BOMBS for command in runner.MODEL_COMMANDS
    ]
    cases += [runner.Case("image", f"bomb:{name}", 0, "classify") for name in IMAGE_BOMBS]
    results = runner.run(cases, corpus, tmp_path_factory.mktemp("bombs"), workers=2, mode="fork")
    grouped: dict[str, list[runner.Result]] = {}
    for r in results:
        grouped.setdefault(r.case.mutator.removeprefix("bomb:"), []).append(r)
    return grouped


def _expected(name: str) -> str:
    """Every bomb is one error line, from every command: graphs of allowed operators whose tensors
    would be huge (Pad, Expand) are refused when read, by the static shape walk (klaus.shapes)."""
    return "success" if name == "large-100mpx" else "clean-error"


@pytest.mark.parametrize("name", [*models.BOMBS, *IMAGE_BOMBS])
def test_bomb_is_refused_in_one_line(bomb_results, name):
    results = bomb_results[name]
    check(results)
    assert [r.outcome for r in results] == [_expected(name)] * len(results), _report(results)


def test_inspect_and_a_refused_export_load_only_what_they_use(corpus, tmp_path):
    """Reading a model file needs the format modules and numpy: `inspect` of a `.klaus` file, and an
    `export` that refuses a bomb, import neither `onnx` nor the sweep, compression or ONNX Runtime."""
    bomb = tmp_path / "pad.klaus"
    models.bomb("graph:pad-100000", corpus, bomb)
    probe = (
        "import sys\n"
        "from klaus.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('onnx', 'onnxruntime', 'klaus.onnxgraph', 'klaus.sweep', 'klaus.compression', 'klaus.runtime')\n"
        "print('loaded:', ' '.join(m for m in heavy if m in sys.modules))\n"
    )
    for args in (["inspect", str(corpus.tiny)], ["export", str(bomb), "-o", str(tmp_path / "out.onnx")]):
        run = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=60)
        assert run.stdout.splitlines()[-1] == "loaded: ", (args, run.stdout[-300:], run.stderr)
    assert "pad-100000/pad' (Pad) makes a 1x3x" in run.stderr and len(run.stderr.splitlines()) == 1
