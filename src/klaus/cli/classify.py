"""`klaus classify` and `klaus eval`: running a model on photos."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

import click

from ..errors import KlausError
from ..names import shown
from . import common
from .common import (
    PRESERVE,
    crops_option,
    emit,
    error_text,
    fail,
    json_option,
    low_memory_option,
    model_option,
    say,
    threads_option,
)


@click.command(context_settings=PRESERVE)
@model_option
@click.option("--top", type=click.IntRange(1, 1000), default=5, show_default=True, help="How many labels to show.")
@crops_option
@threads_option
@low_memory_option
@json_option
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
def classify(
    model: str | None,
    top: int,
    crops: str,
    threads: int | None,
    low_memory: bool,
    as_json: bool,
    images: tuple[str, ...],
) -> int:
    """Top labels of each IMAGE with their WordNet hierarchy ('-' reads one from standard input).

    Images larger than $KLAUS_MAX_PIXELS pixels (default and most: 178956970) are refused.
    """
    from ..images import pixel_limit

    pixel_limit()  # a bad $KLAUS_MAX_PIXELS is one error now, not one per image
    if images.count("-") > 1:
        fail("'-' (the photo on standard input) can be given once")
    # One photo at a time, each decoded between two runs, the first while the session builds (``background``):
    # ONNX Runtime's idle threads sleep rather than take a core from the decoding (``spinning``).
    classifier = common.classifier(model, threads, low_memory, spinning=False, background=True)
    failures = 0
    for path in images:
        try:
            source = sys.stdin.buffer if path == "-" else path
            result = classifier.classify(source, top=top, crops=int(crops))
        except KlausError as exc:
            classifier.ready()  # a model that cannot run is the command's one error, not one per image
            failures += 1
            if as_json:
                emit({"path": path, "error": str(exc)})
            else:
                say(f"klaus: error: {error_text(exc)}", err=True)
            continue
        if as_json:
            emit(replace(result, path=path).to_dict())
        else:
            _print_classification(path, result)
    return 1 if failures else 0


def _print_classification(path: str, result: Any) -> None:
    say(f"{shown(path)}  ({result.elapsed_ms:.0f} ms)")
    labels = [shown(p.label) for p in result.predictions]
    width = max(len(label) for label in labels)
    for p, label in zip(result.predictions, labels, strict=True):
        say(f"  {p.rank}. {p.probability * 100:5.1f}%  {label:<{width}}  {shown('/'.join(p.hierarchy))}".rstrip())


@click.command("eval", context_settings=PRESERVE)
@model_option
@click.option(
    "--reference",
    "-r",
    metavar="R",
    help="A model to compare with on the same photos: its top-1, top-1 agreement, the standard error of the "
    "paired top-1 difference and the mean KL(R || model).",
)
@crops_option
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate the first N images only.")
@click.option(
    "--split",
    type=click.Choice(["all", "odd", "even"]),
    default="all",
    show_default=True,
    help="Keep odd or even class indices only (the project's evaluation/calibration split).",
)
@threads_option
@low_memory_option
@json_option
@click.argument("data", metavar="DATA")
def evaluate(
    model: str | None,
    reference: str | None,
    crops: str,
    limit: int | None,
    split: str,
    threads: int | None,
    low_memory: bool,
    as_json: bool,
    data: str,
) -> int:
    """Top-1/top-5 accuracy on DATA: <wnid>/ folders, <wnid>_*.jpg files, or a 'path label' list file."""
    from tqdm import tqdm

    from .. import evaluate as ev

    clf = common.classifier(model, threads, low_memory)
    samples = ev.select_samples(data, clf.labels, split, limit)
    ref = common.classifier(reference, threads) if reference else None

    def on_error(path: str, message: str) -> None:
        say(f"klaus: error: {message}", err=True)

    with tqdm(total=len(samples), desc="eval", unit="img", file=sys.stderr, disable=as_json or None) as bar:
        acc = ev.evaluate(
            clf,
            samples,
            int(crops),
            reference=ref,
            reference_where=reference or "",
            where=model or clf.name,
            on_batch=bar.update,
            on_error=on_error,
        )
    if acc.n == 0:  # every photo failed (each said why): there is no accuracy to report
        fail(f"{data}: none of its {acc.failed} photos could be read, so there is nothing to evaluate")
    if as_json:
        emit(acc.to_dict())
    else:
        say(
            f"{clf.name}: n={acc.n}  top-1 {acc.top1 * 100:.2f}%  top-5 {acc.top5 * 100:.2f}%"
            + (f"  ({acc.failed} failed)" if acc.failed else "")
        )
        if acc.reference_top1 is not None:
            se = "" if acc.top1_diff_se is None else f" ± {acc.top1_diff_se * 100:.2f} (paired SE)"
            say(
                f"vs reference: top-1 {acc.reference_top1 * 100:.2f}%, difference "
                f"{(acc.top1 - acc.reference_top1) * 100:+.2f} points{se}, "
                f"agreement {_percent(acc.agreement)}, KL {acc.kl:.5f}"
            )
    return 1 if acc.failed else 0


def _percent(fraction: float | None) -> str:
    return "—" if fraction is None else f"{fraction * 100:.2f}%"


COMMANDS = (classify, evaluate)
