"""Reports: what a `.klaus` file spends its bytes on (:mod:`.inspect`), and a sweep's table, CSV, JSON
(:mod:`.tables`) and plot (:mod:`.plot`), written together by :mod:`.outputs`."""

from __future__ import annotations

from .inspect import summarize, summary_lines
from .outputs import write_outputs
from .plot import plot
from .tables import csv_text, json_text, markdown

__all__ = ["csv_text", "json_text", "markdown", "plot", "summarize", "summary_lines", "write_outputs"]
