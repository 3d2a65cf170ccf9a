"""What every `klaus` command shares: one-line errors, output helpers and common options."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from ..errors import KlausError, one_line
from ..names import json_line, printable, shown

PRESERVE: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
F = TypeVar("F", bound=Callable[..., Any])


def emit(obj: object) -> None:
    """One JSON object on one line of stdout: always valid UTF-8 JSON."""
    click.echo(json_line(obj))


def say(message: object = "", err: bool = False, **kwargs: Any) -> None:
    """click.echo, with undecodable file-name bytes escaped (see :func:`printable`)."""
    click.echo(printable(str(message)), err=err, **kwargs)


def warn(message: str) -> None:
    say(f"klaus: warning: {message}", err=True)


def note(message: str) -> None:
    say(f"klaus: note: {message}", err=True)


def fail(message: str) -> None:
    raise click.ClickException(message)


class KlausGroup(click.Group):
    """Turns every error — ours or click's — into one line and exit status 1."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:  # type: ignore[override]
        try:
            rv = super().main(args=args, prog_name=prog_name or "klaus", standalone_mode=False, **extra)
        except click.exceptions.Abort:
            say("klaus: aborted", err=True)
            sys.exit(1)
        except ImportError as exc:
            if not _interrupted(exc):
                raise
            say("klaus: aborted", err=True)  # Ctrl-C while an extension (onnxruntime) initialized
            sys.exit(1)
        except click.exceptions.NoArgsIsHelpError as exc:
            say(exc.ctx.get_help() if exc.ctx else "")
            sys.exit(0)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            say(f"klaus: error: {one_line(exc.format_message())}{hint}", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            say(f"klaus: error: {one_line(exc.format_message())}", err=True)
            sys.exit(1)
        except KlausError as exc:
            say(f"klaus: error: {error_text(exc)}", err=True)
            sys.exit(1)
        except OSError as exc:
            where = f"{shown(os.fsdecode(exc.filename))}: " if isinstance(exc.filename, (str, bytes)) else ""
            say(f"klaus: error: {where}{one_line(str(exc.strerror or exc))}", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` was caused by Ctrl-C: a C extension whose initialization is interrupted
    (onnxruntime's, for one) raises ``ImportError: initialization failed`` from the KeyboardInterrupt."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def error_text(exc: BaseException) -> str:
    """A KlausError's message as one line: it is one line by construction, so a line break or
    control character in it comes from a file name or a file's text and is shown escaped."""
    return shown(str(exc).strip())


# ---------------------------------------------------------------- options several commands take

model_option = click.option(
    "--model", "-m", "model", metavar="M", help="A .klaus or .onnx model (default: the embedded EfficientNet-Lite0)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output, one JSON object per line.")
crops_option = click.option(
    "--crops",
    type=click.Choice(["1", "10"]),
    default="1",
    show_default=True,
    help="1 = center crop; 10 = corners + center and their mirrors, averaged.",
)
threads_option = click.option(
    "--threads", type=click.IntRange(1, 256), default=None, help="ONNX Runtime intra-op threads."
)
low_memory_option = click.option(
    "--low-memory",
    is_flag=True,
    help="Keep the weights palettized in memory (uint8 indices + palette, decoded per layer as it runs): less RAM, slower.",
)


def calib_options(f: F) -> F:
    """Calibration photos: unlabeled images the float model is run on (GPTQ, bias correction)."""
    f = click.option(
        "--calib-crops",
        type=click.Choice(["1", "10"]),
        default="1",
        show_default=True,
        help="Crops per calibration image.",
    )(f)
    f = click.option("--calib-limit", type=click.IntRange(1), default=None, help="Use at most N calibration images.")(f)
    f = click.option(
        "--calib-split",
        type=click.Choice(["all", "even", "odd"]),
        default="all",
        show_default=True,
        help="Only images of even/odd ImageNet class index (by <wnid> file prefix or folder).",
    )(f)
    return click.option(
        "--calib", "calib", multiple=True, metavar="DIR", help="Calibration images (folder or file). Repeatable."
    )(f)


def budget_option(f: F) -> F:
    f = click.option(
        "--max-drop",
        type=click.FloatRange(0, 100, max_open=True),
        default=None,
        metavar="POINTS",
        help="Instead of a size: the smallest file whose top-1 agreement with the float model, on held-out "
        "calibration photos, drops at most POINTS (needs --calib).",
    )(f)
    return click.option(
        "--budget-mib",
        type=click.FloatRange(0.01),
        default=None,
        help="Choose bits per layer to fit the file in this many MiB (needs --calib; see docs/recipes.md).",
    )(f)


def classifier(
    model: str | None,
    threads: int | None = None,
    low_memory: bool = False,
    spinning: bool = True,
    background: bool = False,
) -> Any:
    """The model a command runs (:class:`klaus.runtime.Classifier`), imported when it is needed."""
    from ..runtime import Classifier

    memory = "low" if low_memory else "default"
    return Classifier(model, threads=threads, memory=memory, spinning=spinning, background=background)


class StageProgress:
    """A long command's progress on stderr (:class:`klaus.compression.pipeline.Stages`): one line with the
    command, the stage (export, calibration, search, quantize, write), the steps done in it, the time it
    has taken and the item at hand. Drawn only on a terminal, never with --json or when stderr is piped."""

    def __init__(self, command: str, quiet: bool = False, stream: Any = None) -> None:
        self.command = command
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet or not _is_terminal(self.stream)
        self.bar: Any = None

    def stage(self, name: str) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        self.close()
        self.bar = tqdm(
            desc=f"{self.command}: {name}",
            unit="step",
            file=self.stream,
            leave=False,
            dynamic_ncols=True,
            bar_format="{desc} [{elapsed}, {n_fmt} steps{postfix}]",
        )

    def step(self, detail: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(printable(detail)[:60], refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
