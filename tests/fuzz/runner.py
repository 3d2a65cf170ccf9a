"""Running fuzz cases: each in a child process with limits, from a small process pool.

Two ways to start the child, the same limits and the same outcome rules for both:

* ``spawn`` — a fresh `klaus` process (fork, then exec of the installed script), exactly
  what a user runs;
* ``fork`` — a fork of a pool worker that has imported Klaus's modules once (everything
  but ONNX Runtime, which starts a thread at import), running ``klaus.cli.main``: the same
  code on the same arguments, without paying the interpreter start and imports per case.
  Import-time output cannot show here, so runs check it separately (:func:`import_noise`).

Limits in the child: an address-space limit (``RLIMIT_AS``, a backstop at 4 GiB so a bomb
cannot take the machine; what counts as over-memory is the peak RSS, from ``wait4``), no
core files, a file-size limit, and a wall-clock limit after which the child's session is
killed (a hang).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

OUTCOMES = (
    "success",
    "clean-error",
    "traceback",
    "hang",
    "crash",
    "over-memory",
    "stray-stderr",
    "bad-exit",
    "harness-error",
)
BAD = frozenset(OUTCOMES[2:])
#: Environment variables that change what Klaus accepts: never inherited by a case.
CLEARED_ENV = ("KLAUS_TRUST_MODEL", "KLAUS_MAX_PIXELS", "KLAUS_MAX_MEMORY_MB", "KLAUS_DB")
MODEL_COMMANDS = ("inspect", "classify", "export")
MODEL_COMMAND_WEIGHTS = (4, 4, 2)
#: Relative weights of the image mutators (real 90-170 Mpx images take seconds each).
IMAGE_WEIGHTS = {
    "image.truncate": 3,
    "image.flip": 3,
    "image.header-bomb": 2,
    "image.large": 0.15,
    "image.odd": 3,
    "image.junk": 1.5,
    "image.special": 1,
}
TRACEBACK = "Traceback (most recent call last)"
ERROR_LINE = re.compile(r"^klaus: error: \S")


def klaus_command() -> list[str]:
    """The installed `klaus` script beside this Python, or ``python -m klaus.cli``."""
    script = Path(sys.executable).with_name("klaus")
    return [str(script)] if script.exists() else [sys.executable, "-m", "klaus.cli"]


@dataclass(frozen=True)
class Limits:
    seconds: float = 30.0  # longer is a hang
    rss_bytes: int = 1 << 30  # a larger peak RSS is over-memory
    address_space: int = 4 << 30  # RLIMIT_AS: the backstop
    file_bytes: int = 1 << 30  # RLIMIT_FSIZE


@dataclass(frozen=True)
class Case:
    kind: str  # "model" or "image"
    mutator: str
    seed: int
    command: str  # "inspect", "classify" or "export"
    model: str = "tiny"  # image cases: the model that classifies them ("tiny" or "embedded")

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.mutator}:{self.seed}:{self.command}" + (
            ":embedded" if self.model == "embedded" else ""
        )

    @classmethod
    def parse(cls, name: str) -> Case:
        """The case a :attr:`name` names."""
        parts = name.split(":")
        model = "tiny"
        if parts[-1] == "embedded":
            model = parts.pop()
        return cls(parts[0], ":".join(parts[1:-2]), int(parts[-2]), parts[-1], model)


@dataclass
class Result:
    case: Case
    outcome: str
    description: str = ""
    exit_code: int | None = None  # negative: the signal that ended it
    seconds: float = 0.0
    max_rss: int = 0  # bytes
    stderr: str = ""  # the first lines, as the user saw them

    def to_dict(self) -> dict:
        row = asdict(self)
        row["case"] = self.case.name
        return row


def classify_outcome(exit_code: int, timed_out: bool, max_rss: int, stderr: str, limits: Limits) -> str:
    """One outcome per run, the worst first (see the package docstring)."""
    if timed_out:
        return "hang"
    if exit_code < 0:
        return "crash"
    if max_rss > limits.rss_bytes:
        return "over-memory"
    if TRACEBACK in stderr:
        return "traceback"
    lines = stderr.splitlines()
    if exit_code == 0:
        return "success" if not lines else "stray-stderr"
    if exit_code == 1:
        if len(lines) == 1 and ERROR_LINE.match(lines[0]):
            return "clean-error"
        return "stray-stderr" if lines else "bad-exit"
    return "bad-exit"


# ---------------------------------------------------------------- planning


def plan(
    run_seed: int,
    models: int,
    images: int,
    *,
    model_mutators: Sequence[str] | None = None,
    image_mutators: Sequence[str] | None = None,
    embedded_images: float = 0.2,
) -> list[Case]:
    """``models`` model cases and ``images`` image cases, the same for the same arguments."""
    from . import images as image_module
    from . import models as model_module

    rng = random.Random(f"plan/{run_seed}")
    model_names = list(model_mutators or model_module.MUTATORS)
    image_names = list(image_mutators or image_module.MUTATORS)
    cases = []
    for _ in range(models):
        mutator = rng.choice(model_names)
        command = rng.choices(MODEL_COMMANDS, MODEL_COMMAND_WEIGHTS)[0]
        cases.append(Case("model", mutator, rng.randrange(2**32), command))
    weights = [IMAGE_WEIGHTS.get(name, 1.0) for name in image_names]
    for _ in range(images):
        mutator = rng.choices(image_names, weights)[0]
        model = "embedded" if rng.random() < embedded_images else "tiny"
        cases.append(Case("image", mutator, rng.randrange(2**32), "classify", model))
    return cases


# ---------------------------------------------------------------- one case

_STATE: dict[str, object] = {}


def _init(corpus: dict[str, object], limits: Limits, mode: str, work: str, keep: str | None) -> None:
    """Pool worker start: state, a clean environment, and (fork mode) Klaus imported once."""
    for name in CLEARED_ENV:
        os.environ.pop(name, None)
    if mode == "fork":
        os.environ["OPENBLAS_NUM_THREADS"] = "1"  # no BLAS threads in the process that forks
    _STATE.update(corpus=corpus, limits=limits, mode=mode, work=Path(work), keep=Path(keep) if keep else None)
    if mode == "fork":
        preload()


def preload() -> None:
    """Import what the commands use, except ONNX Runtime (it starts a thread at import, and a forked
    child would miss it)."""
    import numpy  # noqa: F401
    import onnx  # noqa: F401
    from PIL import Image

    Image.init()
    import importlib

    import klaus.cli
    import klaus.codecs
    import klaus.format
    import klaus.report

    # The command modules load when their command runs: imported here once, so forked children
    # never compile and write their bytecode side by side.
    for module in sorted(set(klaus.cli.COMMAND_MODULES.values())):
        importlib.import_module(f"klaus.cli.{module}")


def _corpus():
    from .corpus import Corpus

    state = _STATE["corpus"]
    assert isinstance(state, dict)
    return Corpus(**{k: Path(v) if isinstance(v, str) else tuple(Path(p) for p in v) for k, v in state.items()})


def corpus_state(corpus) -> dict[str, object]:
    """The corpus as plain strings (unpickled in a worker before anything is imported)."""
    return {k: str(v) if isinstance(v, Path) else [str(p) for p in v] for k, v in asdict(corpus).items()}


def build(case: Case, corpus, folder: Path) -> tuple[list[str], str]:
    """The input of ``case`` written into ``folder``: the `klaus` arguments and a description."""
    if case.kind == "model":
        from . import models

        path = folder / "model.klaus"
        description = models.mutate(case.mutator, case.seed, corpus, path)
        if case.command == "inspect":
            return ["inspect", str(path)], description
        if case.command == "classify":
            return ["classify", "-m", str(path), "--top", "3", str(corpus.photo)], description
        return ["export", str(path), "-o", str(folder / "out.onnx")], description
    from . import images

    path, description = images.mutate(case.mutator, case.seed, corpus, folder)
    model = ["-m", str(corpus.tiny)] if case.model == "tiny" else []
    return ["classify", *model, "--top", "3", str(path)], description


def run_case(case: Case) -> Result:
    """Build, run and classify one case (in a pool worker)."""
    limits = _STATE["limits"]
    assert isinstance(limits, Limits)
    folder = _STATE["work"] / re.sub(r"[^\w.-]", "_", case.name)  # type: ignore[operator]
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        try:
            args, description = build(case, _corpus(), folder)
        except Exception:
            return Result(case, "harness-error", traceback.format_exc(limit=3)[-600:])
        exit_code, timed_out, seconds, max_rss, stderr = execute(args, folder, limits, str(_STATE["mode"]))
        outcome = classify_outcome(exit_code, timed_out, max_rss, stderr, limits)
        result = Result(case, outcome, description, exit_code, round(seconds, 3), max_rss, stderr[:600])
        keep = _STATE["keep"]
        if outcome in BAD and isinstance(keep, Path):
            _keep(folder, keep / folder.name)
        return result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _keep(folder: Path, target: Path) -> None:
    """Save a failing case's inputs (not its outputs) for the report."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        if item.name in ("out.onnx",) or not item.is_file() or item.is_symlink():
            continue
        shutil.copyfile(item, target / item.name.replace("\n", "\\n"))


def execute(args: list[str], folder: Path, limits: Limits, mode: str) -> tuple[int, bool, float, int, str]:
    """Run `klaus ARGS` in ``folder``; (exit code or -signal, timed out, seconds, peak RSS bytes, stderr)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        _child(args, folder, limits, mode)
    deadline = start + limits.seconds
    timed_out = False
    pause = 0.001
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            timed_out = True
            _kill_group(pid)
            _, status, usage = os.wait4(pid, 0)
            break
        time.sleep(pause)
        pause = min(0.02, pause * 1.5)
    seconds = time.monotonic() - start
    _kill_group(pid)  # anything it left behind
    exit_code = os.waitstatus_to_exitcode(status)
    stderr = (folder / ".stderr").read_bytes().decode("utf-8", "backslashreplace")
    return exit_code, timed_out, seconds, usage.ru_maxrss * 1024, stderr


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _child(args: list[str], folder: Path, limits: Limits, mode: str) -> None:
    code = 70
    try:
        import resource

        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (limits.address_space, limits.address_space))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        os.chdir(folder)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(".stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 1)
        os.dup2(os.open(".stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 2)
        if mode == "spawn":
            command = klaus_command()
            env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV and k != "OPENBLAS_NUM_THREADS"}
            os.execve(command[0], [*command, *args], env)
        code = _main_in_process(args)
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()
    finally:
        os._exit(code)


def _main_in_process(args: list[str]) -> int:
    """What the `klaus` script does with ``args``, in this (forked) process: its exit code."""
    sys.argv = ["klaus", *args]
    code = 0
    try:
        from klaus.cli import main

        main(args=args, prog_name="klaus")
    except SystemExit as exc:
        if exc.code is None:
            code = 0
        elif isinstance(exc.code, int):
            code = exc.code
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    return code


# ---------------------------------------------------------------- many cases


def run(
    cases: Iterable[Case],
    corpus,
    work: Path,
    *,
    workers: int = 2,
    mode: str = "fork",
    limits: Limits = Limits(),
    keep: Path | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run ``cases`` in a pool of ``workers`` processes; results in case order."""
    work.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    init = (corpus_state(corpus), limits, mode, str(work), str(keep) if keep else None)
    results = []
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init, initargs=init) as pool:
        for result in pool.map(run_case, list(cases), chunksize=1):
            results.append(result)
            if on_result:
                on_result(result)
    return results


def import_noise(mode: str = "spawn") -> str:
    """What a fresh `klaus --version` prints on stderr (import-time warnings would show here): ''."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV}
    noise = ""
    for args in (["--version"], ["inspect", "--help"], ["classify", "--help"], ["export", "--help"]):
        proc = subprocess.run([*klaus_command(), *args], capture_output=True, text=True, env=env, timeout=120)
        noise += proc.stderr
    return noise


@dataclass
class Summary:
    """Counts of a run: outcomes overall, by kind and by mutator; the slowest clean runs; the bad ones."""

    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    by_mutator: dict[str, Counter] = field(default_factory=dict)
    max_rss: int = 0
    max_seconds: float = 0.0
    bad: list[Result] = field(default_factory=list)

    def bad_count(self) -> int:
        return sum(n for outcome, n in self.outcomes.items() if outcome in BAD)


def summarize(results: Sequence[Result]) -> Summary:
    summary = Summary(cases=len(results))
    for r in results:
        summary.outcomes[r.outcome] += 1
        summary.by_kind.setdefault(r.case.kind, Counter())[r.outcome] += 1
        summary.by_mutator.setdefault(r.case.mutator, Counter())[r.outcome] += 1
        if r.outcome in BAD:
            summary.bad.append(r)
        else:
            summary.max_rss = max(summary.max_rss, r.max_rss)
            summary.max_seconds = max(summary.max_seconds, r.seconds)
    return summary
