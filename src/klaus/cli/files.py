"""`klaus inspect` and `klaus export`: reading a model file, and writing it for other runtimes."""

from __future__ import annotations

import os

import click

from ..names import shown
from .common import PRESERVE, emit, fail, json_option, say


@click.command(context_settings=PRESERVE)
@click.argument("model_path", metavar="MODEL")
@json_option
def inspect(model_path: str, as_json: bool) -> int:
    """Per-tensor shape, codec, bits, stored bytes and the order-0 entropy bound of its indices.

    An ONNX MODEL is listed as 'klaus compress' sees it: each weight's name (what --layer rules
    match), shape and layer, and what the default recipe stores for it.
    """
    from ..report.inspect import is_onnx, onnx_summary_lines, summarize, summarize_onnx, summary_lines

    onnx_file = os.path.isfile(model_path) and is_onnx(model_path)
    summary = summarize_onnx(model_path) if onnx_file else summarize(model_path)
    if as_json:
        emit(summary)
        return 0
    for line in onnx_summary_lines(summary) if onnx_file else summary_lines(summary):
        say(line)
    return 0


@click.command(context_settings=PRESERVE)
@click.argument("model_path", metavar="[MODEL]", required=False)
@click.option("-o", "--output", "out", metavar="OUT.onnx", help="Where to write the decoded ONNX model.")
@click.option(
    "--web",
    "web_dir",
    metavar="DIR",
    help="Write the on-device app (the browser decodes and runs the model) as a static folder for any web host.",
)
@click.option("--model", "model_option", metavar="M", help="The model (instead of MODEL); default: the embedded one.")
@json_option
def export(
    model_path: str | None, out: str | None, web_dir: str | None, model_option: str | None, as_json: bool
) -> int:
    """Decode MODEL into a plain ONNX file for any other runtime (-o), or write the on-device web app (--web)."""
    if model_path and model_option and model_path != model_option:
        fail(f"give the model once: MODEL {model_path} or --model {model_option}")
    model_path = model_path or model_option
    if out is None and web_dir is None:
        fail("say where to write: -o OUT.onnx and/or --web DIR")
    if out is not None and not model_path:
        fail("-o needs the MODEL to decode")
    if out is not None and model_path:
        _export_onnx(model_path, out, as_json)
    if web_dir is not None:
        _export_web(model_path, web_dir, as_json)
    return 0


def _export_onnx(model_path: str, out: str, as_json: bool) -> None:
    from ..format import read_model
    from ..names import check_output

    check_output(out, model_path)
    model = read_model(model_path)  # a file Klaus refuses, or an index map that fails to decode,
    weights = model.decoded_weights()  # is refused before the onnx package loads
    from .. import onnxgraph

    size = onnxgraph.save(onnxgraph.to_onnx(model, weights), out)
    if as_json:
        emit({"path": out, "bytes": size})
    else:
        say(f"{shown(out)}: {size} bytes")


def _export_web(model_path: str | None, web_dir: str, as_json: bool) -> None:
    """The on-device app as a static folder (klaus.web.ondevice.export_web)."""
    if not web_dir:
        fail("'': the folder name (--web) is empty")
    from ..web.ondevice import export_web

    result = export_web(model_path, web_dir)
    if as_json:
        emit(
            {
                "path": result.path,
                "files": result.files,
                "bytes": result.bytes,
                "model_bytes": result.model_bytes,
                "model_sha256": result.model_sha256,
            }
        )
    else:
        say(
            f"{shown(result.path)}/: {result.files} files, {result.bytes} bytes (model {result.model_bytes} bytes); "
            "serve the folder over https, e.g. any static host"
        )


COMMANDS = (inspect, export)
