"""`klaus sweep`: accuracy versus bits."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import click

from .common import PRESERVE, calib_options, crops_option, emit, json_option, note, say, threads_option, warn


@click.command(context_settings=PRESERVE)
@click.argument("src", metavar="SRC")
@click.option(
    "--bits", "bits_text", default="8,4,2", show_default=True, help="Comma-separated widths for the scope rows."
)
@click.option(
    "--scope",
    type=click.Choice(["fc", "conv", "all"]),
    default="fc",
    show_default=True,
    help="Layers palettized in the bits rows (conv includes depthwise); the rest stay fp16.",
)
@click.option(
    "--methods",
    "methods_text",
    default="tensor",
    show_default=True,
    metavar="LIST",
    help="Rows per bit width, comma-separated: tensor (per-tensor k-means), channel (per-channel scales + "
    "shared palette), calibrated (per-channel + GPTQ + bias correction; needs --calib), uniform "
    "(per-channel uniform grid, entropy about the width).",
)
@click.option(
    "--budget-mib",
    "budgets_text",
    default=None,
    metavar="LIST",
    help="Also a mixed-precision row per budget (comma-separated MiB, e.g. 2.5,2.0,1.5): the 'default' "
    "recipe fitted to the budget (needs --calib).",
)
@click.option(
    "--recipe",
    "recipe_names",
    multiple=True,
    metavar="NAME",
    help="Also a row for this named recipe (see 'klaus recipes'). Repeatable.",
)
@click.option(
    "--data",
    required=True,
    metavar="DATA",
    help="Labelled images: <wnid>/ folders, <wnid>_*.jpg files, or a 'path label' list file.",
)
@click.option(
    "--split",
    type=click.Choice(["all", "odd", "even"]),
    default="all",
    show_default=True,
    help="Evaluate odd or even class indices only (the project's evaluation/calibration split).",
)
@click.option(
    "--limit", type=click.IntRange(1), default=None, help="Evaluate the first N images (after the split) only."
)
@calib_options
@crops_option
@click.option(
    "--min-elements",
    type=click.IntRange(0),
    default=None,
    help="Tensors with fewer weights stay float (default: 4096 for the bits rows, each recipe's own).",
)
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(dir_okay=False),
    help="Class names, one per line (ONNX SRC without 1000 outputs).",
)
@click.option(
    "--int8/--no-int8", "int8", default=True, show_default=True, help="Add ONNX Runtime's dynamic int8 baseline row."
)
@click.option(
    "--out", "out_dir", metavar="DIR", help="Where to write sweep.md/.csv/.json/.png (default: sweep-<model>/)."
)
@threads_option
@json_option
def sweep(
    src: str,
    bits_text: str,
    scope: str,
    methods_text: str,
    budgets_text: str | None,
    recipe_names: tuple[str, ...],
    data: str,
    split: str,
    limit: int | None,
    calib: tuple[str, ...],
    calib_split: str,
    calib_limit: int | None,
    calib_crops: str,
    crops: str,
    min_elements: int | None,
    labels_file: str | None,
    int8: bool,
    out_dir: str | None,
    threads: int | None,
    as_json: bool,
) -> int:
    """Accuracy versus bits: compress SRC (lossless .klaus, .onnx or zoo name) at each setting and evaluate on DATA."""
    from tqdm import tqdm

    from .. import report
    from .. import sweep as sw
    from ..compression.calibrate import CalibrationOptions

    options = sw.SweepOptions(
        src,
        data,
        bits=tuple(sw.parse_bits(bits_text)),
        scope=scope,
        methods=tuple(sw.parse_methods(methods_text)),
        budgets_mib=tuple(sw.parse_budgets(budgets_text)) if budgets_text is not None else (),
        recipes=recipe_names,
        split=split,
        limit=limit,
        calibration=CalibrationOptions(calib, calib_split, calib_limit, int(calib_crops)),
        crops=int(crops),
        min_elements=min_elements,
        labels_file=labels_file,
        int8=int8,
        out_dir=out_dir,
    )
    quiet = as_json or None  # tqdm: None = only on a terminal
    start = time.perf_counter()
    prepared = sw.prepare(options, warn=warn, note=note)
    with tqdm(desc="preprocess", unit="img", file=sys.stderr, disable=quiet, leave=False) as bar:
        evalset = sw.load_eval_set(
            data,
            prepared.source,
            split=split,
            limit=limit,
            crops=int(crops),
            on_image=bar.update,
            on_error=lambda path, message: say(f"klaus: error: {message}", err=True),
        )
    sw.check_images(prepared, evalset, warn=warn, note=note)

    with tqdm(
        total=len(prepared.settings), desc="settings", unit="row", file=sys.stderr, disable=quiet, position=0
    ) as outer:
        images = tqdm(total=evalset.n, unit="img", file=sys.stderr, disable=quiet, position=1, leave=False)

        def progress(label: str, total: int) -> Callable[[int], Any]:
            outer.set_postfix_str(label)
            images.reset(total=total)
            images.set_description(label)
            return images.update

        def on_row(row: Any) -> None:
            outer.update(1)
            if as_json:
                emit(row.to_dict())

        result = sw.run_sweep(
            prepared.source,
            evalset,
            prepared.settings,
            calibration=prepared.calibration,
            threads=threads,
            command=options.command(),
            on_row=on_row,
            progress=progress,
        )
        images.close()
    written, skipped = report.write_outputs(result, prepared.out_dir)
    if skipped:
        note(skipped)
    if not as_json:
        say(report.markdown(result), nl=False)
        say(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - start:.0f} s")
    return 0


COMMANDS = (sweep,)
