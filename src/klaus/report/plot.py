"""A sweep as a plot: top-1 accuracy against file size, one marker per scheme, the Pareto frontier as a line."""

from __future__ import annotations

import io
import os
from typing import Any

from ..format import write_atomic
from ..sweep import SweepResult, SweepRow, frontier

_LEGENDS = {
    "reference": "fp32 reference",
    "fp16": "fp16",
    "tensor": "k-means per tensor",
    "channel": "k-means per channel",
    "calibrated": "per channel, GPTQ + bias correction",
    "uniform": "uniform grid per channel",
    "mixed": "mixed precision under a budget",
    "recipe": "named recipe",
    "baseline": "ONNX Runtime int8 (dynamic)",
}


_STYLE: dict[str, dict[str, Any]] = {
    "reference": {"marker": "*", "s": 220, "color": "black", "zorder": 4},
    "fp16": {"marker": "s", "s": 60, "color": "dimgray", "zorder": 3},
    "tensor": {"marker": "o", "s": 50, "color": "tab:blue", "zorder": 3},
    "channel": {"marker": "v", "s": 60, "color": "tab:orange", "zorder": 3},
    "calibrated": {"marker": "^", "s": 60, "color": "tab:green", "zorder": 3},
    "uniform": {"marker": "P", "s": 65, "color": "tab:purple", "zorder": 3},
    "mixed": {"marker": "X", "s": 75, "color": "tab:red", "zorder": 3},
    "recipe": {"marker": "D", "s": 55, "color": "tab:olive", "zorder": 3},
    "baseline": {"marker": "^", "s": 80, "color": "tab:brown", "zorder": 3},
}


def _scheme(r: SweepRow) -> str:
    return r.scheme or {"bits": "tensor"}.get(r.kind, r.kind)


_SIZE_TICKS = (
    0.25,
    0.5,
    0.75,
    1,
    1.5,
    2,
    2.5,
    3,
    4,
    5,
    6,
    8,
    10,
    12,
    16,
    20,
    24,
    32,
    48,
    64,
    96,
    128,
    192,
    256,
    384,
    512,
)


def _mib(r: SweepRow) -> float:
    """A measured row's file size in MiB (the plot only has rows with a size and a top-1)."""
    return (r.file_bytes or 0) / 2**20


def _percent(r: SweepRow) -> float:
    return (r.top1 or 0.0) * 100


def _point_label(r: SweepRow) -> str:
    """The label next to a point: bits rows by their width (the marker says the method)."""
    if r.kind == "bits" and r.bits is not None:
        return f"{r.bits}-bit" + (f" u{r.step:g}" if r.step is not None else "")
    return r.setting


def plot(result: SweepResult, path: str | os.PathLike[str]) -> None:
    """Top-1 accuracy against model size (MiB, log scale): one marker and colour per scheme, the Pareto frontier as a line.

    Rows of one scheme at several sizes (the bit widths, the budgets) are joined by a faint line of
    their colour. Needs matplotlib.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    fig = Figure(figsize=(9, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [r for r in result.rows if r.file_bytes is not None and r.top1 is not None]
    for scheme in ("tensor", "channel", "calibrated", "uniform", "mixed"):
        curve = sorted((r for r in done if _scheme(r) == scheme), key=_mib)
        if len(curve) > 1:
            ax.plot(
                [_mib(r) for r in curve],
                [_percent(r) for r in curve],
                color=_STYLE[scheme]["color"],
                lw=1,
                alpha=0.45,
                zorder=2,
            )
    best = frontier(done)
    if len(best) > 1:
        ax.plot(
            [_mib(r) for r in best],
            [_percent(r) for r in best],
            color="black",
            lw=1.4,
            ls="--",
            alpha=0.7,
            zorder=2,
            label="Pareto frontier (best top-1 at each size)",
        )
    seen: set[str] = set()
    # Labels alternate above and below in size order, so neighbouring points stay readable.
    for i, r in enumerate(sorted(done, key=lambda r: (_mib(r), r.setting))):
        x, y = _mib(r), _percent(r)
        scheme = _scheme(r) if _scheme(r) in _STYLE else "recipe"
        legend = _LEGENDS[scheme]
        ax.scatter([x], [y], label=None if legend in seen else legend, **_STYLE[scheme])
        seen.add(legend)
        ax.annotate(
            _point_label(r), (x, y), textcoords="offset points", xytext=(5, 7 if i % 2 == 0 else -13), fontsize=7
        )
        if r.kind == "reference":
            ax.axhline(y, color="black", lw=0.8, ls=":", zorder=1)
    ax.set_xlabel("model file (MiB, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    crops = f"{result.crops} crop{'s' if result.crops > 1 else ''}"
    ax.set_title(
        f"{result.model}: top-1 accuracy vs file size ({result.n} images, split {result.split}, {crops})", fontsize=10
    )
    if done:
        sizes = [_mib(r) for r in done if _mib(r) > 0]
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(sizes) / 1.2, max(sizes) * 1.35)
        low_x, high_x = ax.get_xlim()
        ticks = [t for t in _SIZE_TICKS if low_x <= t <= high_x]
        if len(ticks) >= 3:
            ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        low, high = min(_percent(r) for r in done), max(_percent(r) for r in done)
        pad = max(1.0, (high - low) * 0.15)
        ax.set_ylim(low - pad, high + pad)
        handles, names = ax.get_legend_handles_labels()
        rank = [*_LEGENDS.values(), "Pareto frontier (best top-1 at each size)"]
        order = sorted(range(len(names)), key=lambda i: rank.index(names[i]) if names[i] in rank else len(rank))
        ax.legend([handles[i] for i in order], [names[i] for i in order], fontsize=8, loc="best")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", metadata={"Software": None})
    write_atomic(image.getvalue(), path)
