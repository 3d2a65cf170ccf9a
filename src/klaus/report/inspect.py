"""What a `.klaus` file spends its bytes on: per-tensor sizes next to their entropy bound."""

from __future__ import annotations

import json
import os
from typing import Any

from .. import codecs
from ..format import read_model
from ..names import shown


def summarize(path: str | os.PathLike[str]) -> dict[str, object]:
    """`klaus inspect --json`: the file's metadata, and per tensor its shape, codec, bits, stored bytes and
    the order-0 entropy bound of its indices, with totals."""
    model = read_model(path)
    tensors: list[dict[str, Any]] = []
    for t in model.tensors:
        entropy = codecs.order0_entropy_bytes(t.indices()) if t.codec in codecs.PALETTE_CODECS else None
        tensors.append(
            {
                "name": t.name,
                "shape": list(t.dims),
                "codec": t.codec,
                "bits": t.bits,
                "parameters": t.size,
                "stored_bytes": t.stored_bytes,
                "payload_bytes": len(t.payload),
                "entropy_bytes": entropy,
            }
        )
    palettized = [t for t in tensors if t["entropy_bytes"] is not None]
    totals = {
        "tensors": len(tensors),
        "parameters": sum(t["parameters"] for t in tensors),
        "stored_bytes": sum(t["stored_bytes"] for t in tensors),
        "palettized_parameters": sum(t["parameters"] for t in palettized),
        "palettized_bytes": sum(t["stored_bytes"] for t in palettized),
        "index_map_bytes": sum(t["payload_bytes"] for t in palettized),
        "entropy_bytes": sum(t["entropy_bytes"] for t in palettized),
        "graph_bytes": len(model.graph),
    }
    meta = {k: v for k, v in model.meta.items() if k not in ("preprocess", "recipe")}
    meta["recipe"] = json.loads(model.meta["recipe"])
    return {
        "path": str(path),
        "file_bytes": os.path.getsize(path),
        "meta": meta,
        "preprocess": model.preprocess.to_dict(),
        "labels": len(model.labels),
        "tensors": tensors,
        "totals": totals,
    }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """`klaus inspect`: :func:`summarize`'s result as a table, one line per tensor, then the totals."""
    meta = summary["meta"]
    lines = [
        f"{shown(summary['path'])}: {shown(meta['model_name'])}  "
        f"({summary['file_bytes']} bytes, {summary['file_bytes'] / 2**20:.2f} MiB)",
        f"  recipe {json.dumps(meta['recipe'], sort_keys=True)}",
        f"  {'tensor':<44} {'shape':<18} {'codec':<12} {'bits':>4} {'bytes':>10} {'entropy':>10}",
    ]
    for t in summary["tensors"]:
        entropy = "" if t["entropy_bytes"] is None else f"{t['entropy_bytes']:.0f}"
        shape = "x".join(map(str, t["shape"])) or "scalar"
        lines.append(
            f"  {shown(t['name']):<44} {shape:<18} {t['codec']:<12} {t['bits'] or '':>4} {t['stored_bytes']:>10} {entropy:>10}"
        )
    tot = summary["totals"]
    lines.append(
        f"  totals: {tot['tensors']} tensors, {tot['parameters']} parameters, {tot['stored_bytes']} tensor bytes; "
        f"palettized {tot['palettized_parameters']} params in {tot['palettized_bytes']} bytes "
        f"(entropy bound {tot['entropy_bytes']:.0f})"
    )
    return lines
