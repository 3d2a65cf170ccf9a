"""Reports: what a `.klaus` file spends its bytes on (:mod:`.inspect`), and a sweep's table, CSV, JSON
(:mod:`.tables`) and plot (:mod:`.plot`), written together by :mod:`.outputs`.

The names below load their module on first use: `klaus inspect` reads a model file through
:mod:`.inspect` alone and never pays for the sweep and compression packages the other reports
build on.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .inspect import summarize, summary_lines
    from .outputs import write_outputs
    from .plot import plot
    from .tables import csv_text, json_text, markdown

_HOMES = {
    "summarize": "inspect",
    "summary_lines": "inspect",
    "write_outputs": "outputs",
    "plot": "plot",
    "csv_text": "tables",
    "json_text": "tables",
    "markdown": "tables",
}

__all__ = ["csv_text", "json_text", "markdown", "plot", "summarize", "summary_lines", "write_outputs"]


def __getattr__(name: str) -> Any:
    """The report function ``name``, importing its module the first time it is asked for."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{home}", __name__), name)
