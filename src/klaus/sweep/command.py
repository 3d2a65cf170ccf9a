"""`klaus sweep` before its rows run: the options as one record, the settings they plan, the source,
the calibration and evaluation images, and every warning the user should see first."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..compression.calibrate import CalibrationOptions
from ..labels import read_label_names
from .data import CalibrationSet, EvalSet, load_calibration_set, overlap
from .outdir import check_out_dir, default_out_dir
from .settings import UNIFORM_STEPS, Setting, plan, without_calibration
from .source import SweepSource, load_source

Say = Callable[[str], None]


@dataclass(frozen=True)
class SweepOptions:
    """What `klaus sweep` is asked: SRC, the rows (bit widths × methods on a scope, budgets, named
    recipes, the int8 baseline), the evaluation and calibration photos, and where to write."""

    src: str
    data: str
    bits: tuple[int, ...] = (8, 4, 2)
    scope: str = "fc"
    methods: tuple[str, ...] = ("tensor",)
    budgets_mib: tuple[float, ...] = ()
    recipes: tuple[str, ...] = ()
    split: str = "all"
    limit: int | None = None
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    crops: int = 1
    min_elements: int | None = None
    labels_file: str | None = None
    int8: bool = True
    out_dir: str | None = None  # None: sweep-<model>/

    def command(self) -> str:
        """The command line these options are written as (the report's header): defaults left out."""
        calib = self.calibration
        command = ["klaus", "sweep", self.src, "--scope", self.scope, "--bits", ",".join(map(str, self.bits))]
        command += ["--methods", ",".join(self.methods)] if list(self.methods) != ["tensor"] else []
        command += ["--budget-mib", ",".join(f"{b:g}" for b in self.budgets_mib)] if self.budgets_mib else []
        command += [a for name in dict.fromkeys(self.recipes) for a in ("--recipe", name)]
        command += ["--data", self.data] + (["--split", self.split] if self.split != "all" else [])
        command += ["--limit", str(self.limit)] if self.limit else []
        command += [a for c in calib.sources for a in ("--calib", c)]
        if calib.sources:
            command += ["--calib-split", calib.split] if calib.split != "all" else []
            command += ["--calib-limit", str(calib.limit)] if calib.limit else []
            command += ["--calib-crops", str(calib.crops)] if calib.crops != 1 else []
        command += ["--crops", str(self.crops)] if self.crops != 1 else []
        command += ["--min-elements", str(self.min_elements)] if self.min_elements is not None else []
        command += (["--labels", self.labels_file] if self.labels_file else []) + ([] if self.int8 else ["--no-int8"])
        command += ["--out", self.out_dir] if self.out_dir is not None else []
        return shlex.join(command)


@dataclass(frozen=True)
class Prepared:
    """What a sweep's rows need besides the evaluation images (:func:`load_eval_set`), checked and loaded."""

    source: SweepSource
    settings: list[Setting]
    calibration: CalibrationSet | None
    out_dir: Path


def _quiet(message: str) -> None:
    """A warning or note nobody asked to hear."""


def prepare(options: SweepOptions, *, warn: Say = _quiet, note: Say = _quiet) -> Prepared:
    """The settings planned, SRC and the output folder checked before any row is computed, the source and
    the calibration photos loaded; ``warn`` and ``note`` hear what the table would not show (rows skipped,
    calibration given but unused, a lossy source). The evaluation images come next (:func:`load_eval_set`),
    then :func:`check_images`."""
    settings = plan(
        options.bits,
        options.scope,
        options.recipes,
        methods=options.methods,
        budgets_mib=options.budgets_mib,
        min_elements=options.min_elements,
        int8_baseline=options.int8,
    )
    if options.out_dir is not None:  # refused before any work, not after every row is computed
        check_out_dir(options.out_dir)
    names = read_label_names(options.labels_file) if options.labels_file else None
    source = load_source(options.src, names)
    out_dir = check_out_dir(options.out_dir if options.out_dir is not None else default_out_dir(source.name))
    if source.palettized_tensors:
        warn(
            f"{options.src} has {source.palettized_tensors} palettized tensors, so the 'fp32' row is "
            "its decoded weights, not the original float model"
        )
    no_grid = [str(b) for b in options.bits if b not in UNIFORM_STEPS] if "uniform" in options.methods else []
    if no_grid:
        note(
            f"no uniform row at {', '.join(no_grid)} bits: a grid that fine needs more than 256 levels "
            f"(uniform widths: {min(UNIFORM_STEPS)}..{max(UNIFORM_STEPS)})"
        )
    calib = options.calibration
    if not calib.sources:
        settings, skipped = without_calibration(settings)
        if skipped:
            warn(
                f"no --calib images, so {len(skipped)} row{'s' if len(skipped) > 1 else ''} "
                f"({', '.join(s.label for s in skipped)}) skipped: calibrated and mixed rows need calibration"
            )
    sources = calib.sources
    if sources and not any(s.calibrated for s in settings):
        note("--calib is used by calibrated, mixed and --recipe rows only, so it is ignored")
        sources = ()
    calibration = load_calibration_set(sources, source, split=calib.split, limit=calib.limit, crops=calib.crops)
    return Prepared(source, settings, calibration, out_dir)


def check_images(prepared: Prepared, evalset: EvalSet, *, warn: Say = _quiet, note: Say = _quiet) -> None:
    """What the user should know about the images before the rows run: evaluation photos that also
    calibrate (calibrated rows would look better than they are), GPTQ recipes without calibration."""
    shared = overlap(prepared.calibration, evalset)
    if shared:
        warn(
            f"{shared} of the {len(evalset.samples)} evaluation images are also calibration images; "
            "calibrated rows will look better than they are (use --split/--calib-split)"
        )
    calibrated = prepared.calibration is not None
    if not calibrated and any(s.recipe is not None and s.recipe.method == "gptq" for s in prepared.settings):
        note("no --calib images, so GPTQ recipes run as plain k-means without bias correction")
