"""A sweep's files: sweep.md, sweep.csv, sweep.json and sweep.png in its output folder."""

from __future__ import annotations

import os
from pathlib import Path

from ..format import write_atomic
from ..sweep import SweepResult, check_out_dir
from .plot import plot
from .tables import csv_text, json_text, markdown


def write_outputs(result: SweepResult, out_dir: str | os.PathLike[str]) -> tuple[list[Path], str | None]:
    """sweep.md, sweep.csv, sweep.json and sweep.png, each written atomically (a temporary file and a rename);
    returns (written files, note if the plot was skipped). A file that cannot be written is a
    :class:`KlausWriteError` naming it."""
    out = check_out_dir(out_dir)
    written = []
    for name, text in (
        ("sweep.md", markdown(result)),
        ("sweep.csv", csv_text(result)),
        ("sweep.json", json_text(result)),
    ):
        write_atomic(text.encode("utf-8"), out / name)
        written.append(out / name)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return written, "matplotlib is not installed, so sweep.png was skipped (pip install 'klaus-classifier[plot]')"
    plot(result, out / "sweep.png")
    written.append(out / "sweep.png")
    return written, None
