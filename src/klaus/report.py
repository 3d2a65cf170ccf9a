"""What a `.klaus` file spends its bytes on: per-tensor sizes next to their entropy bound."""

from __future__ import annotations

import json
import os

from . import codecs
from .format import read_model


def summarize(path: str | os.PathLike[str]) -> dict[str, object]:
    model = read_model(path)
    tensors = []
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
