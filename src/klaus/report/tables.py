"""A sweep as tables: the Markdown report (the original write-up's table, with sizes, agreement and the
Pareto frontier), and every row as CSV and JSON."""

from __future__ import annotations

import csv
import io
import json

from ..sweep import COLUMNS, REFERENCE, SweepResult, frontier


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.2f}%"


def _mib(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def markdown(result: SweepResult) -> str:
    """The table, in the spirit of the original's "8-bit: 41.15% (1), 18.18% (5)" lines."""
    ref = result.row(REFERENCE) if any(r.setting == REFERENCE for r in result.rows) else None
    lines = [
        f"# Accuracy versus bits: {result.model}",
        "",
        f"- model: {result.source}",
        f"- data: `{result.data}`, split {result.split}, {result.n} images"
        + (f" ({result.failed} unreadable)" if result.failed else "")
        + f", {result.crops} crop{'s' if result.crops > 1 else ''} per image",
        f"- calibration: {result.calibration + _calibration_users(result) if result.calibration else 'none'}",
        *([f"- bits rows: {result.scope_rows}"] if result.scope_rows else []),
        *(["- schemes:", *(f"  - {line}" for line in result.schemes)] if result.schemes else []),
        f"- command: `{result.command}`" if result.command else "- command: (library call)",
        "",
        "| setting | scheme | method | file | bytes | vs fp32 | error: top-1 (1), top-5 (5) | top-1 | top-5 "
        "| top-1 agreement with fp32 | palettized tensors | palettized bytes | entropy bound | bits/weight | compress s |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes = []
    for r in result.rows:
        ratio = (
            "—"
            if (r.file_bytes is None or ref is None or not ref.file_bytes)
            else f"{r.file_bytes / ref.file_bytes:.3f}"
        )
        errors = "—" if r.top1 is None else f"{_pct(r.top1_error)} (1), {_pct(r.top5_error)} (5)"
        if r.error:
            notes.append(f"- {r.setting}: {r.error}")
        pal = r.palettized_tensors
        lines.append(
            "| "
            + " | ".join(
                [
                    f"**{r.setting}**" if r.kind == "reference" else r.setting,
                    r.scheme or "—",
                    r.method or ("failed" if r.error else "—"),
                    _mib(r.file_bytes),
                    "—" if r.file_bytes is None else f"{r.file_bytes:,}",
                    ratio,
                    errors,
                    _pct(r.top1),
                    _pct(r.top5),
                    _pct(r.agreement),
                    "—" if pal is None else str(pal),
                    "—" if not pal else f"{r.palettized_bytes:,}",
                    "—" if not pal else f"{r.entropy_bytes:,.0f}",
                    "—" if r.bits_per_weight is None else f"{r.bits_per_weight:.2f}",
                    "—" if r.compress_seconds is None else f"{r.compress_seconds:.1f}",
                ]
            )
            + " |"
        )
    lines += [
        "",
        "file, bytes: the whole `.klaus` file (the int8 baseline: its ONNX file). palettized bytes: index-map PNGs + fp16 "
        "palettes + scales of the palettized tensors; entropy bound: order-0 entropy of their indices; bits/weight: "
        "palettized bytes × 8 / palettized weights. Only the compress s column varies between runs.",
    ]
    best = frontier(result.rows)
    if best:
        lines += [
            "",
            "Pareto frontier (the best top-1 at each size, over all rows, smallest first): "
            + " → ".join(f"{r.setting} ({_mib(r.file_bytes)}, {_pct(r.top1)})" for r in best)
            + ".",
        ]
    budgeted = [r for r in result.rows if r.kind == "mixed" and r.budget_bytes is not None and not r.error]
    if budgeted:
        lines += ["", "Mixed rows (budget; tensors per width, fp16 = kept float, uN = uniform grid of step N):", ""]
        lines += [
            f"- {r.setting}: budget {r.budget_bytes:,} bytes, file {r.file_bytes:,} bytes; {r.allocation}"
            for r in budgeted
        ]
    if notes:
        lines += ["", "Failed rows:", "", *notes]
    return "\n".join(lines) + "\n"


def _calibration_users(result: SweepResult) -> str:
    users = [scheme for scheme in ("calibrated", "mixed", "recipe") if any(r.scheme == scheme for r in result.rows)]
    if users == ["recipe"]:
        return " (recipe rows only)"
    return f" ({', '.join(users)} rows only)" if users else " (no row uses it)"


def csv_text(result: SweepResult) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    for r in result.rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.to_dict().items()})
    return out.getvalue()


def json_text(result: SweepResult) -> str:
    return json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n"
