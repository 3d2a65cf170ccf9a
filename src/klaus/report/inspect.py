"""What a `.klaus` file spends its bytes on: per-tensor sizes next to their entropy bound."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from .. import codecs
from ..errors import KlausFormatError, KlausModelError
from ..format import looks_like_klaus, read_model
from ..names import shown

if TYPE_CHECKING:
    import onnx


def summarize(path: str | os.PathLike[str]) -> dict[str, object]:
    """`klaus inspect --json`: the file's metadata, and per tensor its shape, codec, bits, stored bytes and
    the order-0 entropy bound of its indices, with totals."""
    model = read_model(path)
    tensors: list[dict[str, Any]] = []
    for t in model.tensors:
        try:
            entropy = codecs.order0_entropy_bytes(t.indices()) if t.codec in codecs.PALETTE_CODECS else None
        except KlausFormatError as exc:  # the index map itself is checked when decoded: name file and tensor
            raise KlausFormatError(f"{path}: tensor {t.name!r}: {exc}") from None
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
    names = [shown(t["name"]) for t in summary["tensors"]]
    width = name_width(names)
    shapes = [shape_text(t["shape"]) for t in summary["tensors"]]
    shape_width = max([18, *(len(s) for s in shapes)])
    lines = [
        f"{shown(summary['path'])}: {shown(meta['model_name'])}  "
        f"({summary['file_bytes']} bytes, {summary['file_bytes'] / 2**20:.2f} MiB)",
        f"  recipe {json.dumps(meta['recipe'], sort_keys=True)}",
        f"  {'tensor':<{width}} {'shape':<{shape_width}} {'codec':<12} {'bits':>4} {'bytes':>10} {'entropy':>10}",
    ]
    for t, name, shape in zip(summary["tensors"], names, shapes, strict=True):
        entropy = "" if t["entropy_bytes"] is None else f"{t['entropy_bytes']:.0f}"
        lines.append(
            f"  {name:<{width}} {shape:<{shape_width}} {t['codec']:<12} {t['bits'] or '':>4} "
            f"{t['stored_bytes']:>10} {entropy:>10}"
        )
    tot = summary["totals"]
    lines.append(
        f"  totals: {tot['tensors']} tensors, {tot['parameters']} parameters, {tot['stored_bytes']} tensor bytes; "
        f"palettized {tot['palettized_parameters']} params in {tot['palettized_bytes']} bytes "
        f"(entropy bound {tot['entropy_bytes']:.0f})"
    )
    return lines


def name_width(names: list[str], least: int = 44) -> int:
    """A name column as wide as its longest name (at least ``least``), so long names never shift the columns."""
    return max([least, *(len(n) for n in names)])


def shape_text(shape: list[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


# ---------------------------------------------------------------- an ONNX file: what compress would do


def is_onnx(path: str | os.PathLike[str]) -> bool:
    """Whether `klaus inspect` reads ``path`` as an ONNX graph (anything that is not a `.klaus` file)."""
    return not looks_like_klaus(path)


def summarize_onnx(path: str | os.PathLike[str]) -> dict[str, object]:
    """`klaus inspect MODEL.onnx --json`: the weights `klaus compress` sees -- after simplifying the graph
    and naming them as it does, so these are the names ``--layer`` rules match -- with their shapes, the
    layer each one feeds, and what the default recipe stores for each (with ``--calib``, GPTQ and bias
    correction; without, plain k-means)."""
    from .. import onnxgraph  # the onnx package and the compression planner: for ONNX files only
    from ..compression.check import check_classifier
    from ..compression.plan import planned_bits
    from ..compression.recipe import DEFAULT

    where = str(path)
    graph = onnxgraph.load_onnx(where)
    layout = _layout(graph, where, check_classifier)
    simplified = onnxgraph.rename_weights(onnxgraph.simplify(graph, where))
    _, weights = onnxgraph.split_weights(simplified)
    roles = onnxgraph.tensor_roles(simplified)
    plan = planned_bits(weights, roles, DEFAULT)
    tensors: list[dict[str, Any]] = []
    for name, array in weights.items():
        role = roles[name]
        bits = plan.get(name)
        tensors.append(
            {
                "name": name,
                "shape": list(array.shape),
                "parameters": int(array.size),
                "layer": role.kind,
                "op": role.op,
                "compress": {"codec": "palette-png", "bits": bits} if bits else {"codec": DEFAULT.float_codec},
            }
        )
    return {
        "path": where,
        "file_bytes": os.path.getsize(path),
        "format": "onnx",
        "producer": f"{graph.producer_name} {graph.producer_version}".strip(),
        "opset": max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=0),
        "input": onnxgraph.input_dims(graph),
        "layout": layout,
        "outputs": onnxgraph.output_classes(graph),
        "fixed_batch": onnxgraph.fixed_batch(graph),
        "recipe": DEFAULT.name,
        "tensors": tensors,
        "totals": {
            "tensors": len(tensors),
            "parameters": sum(t["parameters"] for t in tensors),
            "palettized": sum(1 for t in tensors if t["compress"]["codec"] == "palette-png"),
        },
    }


def _layout(graph: onnx.ModelProto, where: str, check: Any) -> str:
    """The input layout the graph is a classifier in (NCHW tried first); its NCHW error if neither."""
    try:
        check(graph, layout="NCHW", where=where)
        return "NCHW"
    except KlausModelError as first:
        try:
            check(graph, layout="NHWC", where=where)
        except KlausModelError:
            raise first from None
        return "NHWC"


def onnx_summary_lines(summary: dict[str, Any]) -> list[str]:
    """`klaus inspect MODEL.onnx`: one line per weight with what compress's default recipe does with it."""
    names = [shown(t["name"]) for t in summary["tensors"]]
    width = name_width(names)
    shapes = [shape_text(t["shape"]) for t in summary["tensors"]]
    shape_width = max([18, *(len(s) for s in shapes)])
    batch = "free" if summary["fixed_batch"] is None else f"fixed at {summary['fixed_batch']}"
    lines = [
        f"{shown(summary['path'])}: ONNX ({shown(summary['producer']) or 'unknown producer'}, opset {summary['opset']}), "
        f"input {summary['input']} ({summary['layout']}, batch {batch}), {summary['outputs']} outputs",
        "  weights as 'klaus compress' names them (--layer PATTERN=BITS matches these); 'default recipe' is what "
        "'klaus compress' stores for each (with --calib: GPTQ and bias correction; without: k-means)",
        f"  {'tensor':<{width}} {'shape':<{shape_width}} {'layer':<9} {'op':<13} {'default recipe':<18}",
    ]
    for t, name, shape in zip(summary["tensors"], names, shapes, strict=True):
        plan = t["compress"]
        action = f"{plan['bits']}-bit palette" if plan.get("bits") else plan["codec"]
        lines.append(
            f"  {name:<{width}} {shape:<{shape_width}} {t['layer']:<9} {t['op'] or '—':<13} {action:<18}".rstrip()
        )
    tot = summary["totals"]
    lines.append(
        f"  totals: {tot['tensors']} float tensors, {tot['parameters']} parameters; "
        f"{tot['palettized']} palettized by the default recipe"
    )
    return lines
