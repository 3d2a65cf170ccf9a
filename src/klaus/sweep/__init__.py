"""Accuracy versus bits: compress one model at many settings and measure every one.

The original Klaus write-up was a table — top-1/top-5 error of the network with
its fully connected layers palettized at 8, 4 and 2 bits, next to the model's
size. :func:`run_sweep` makes that table's rows for any classifier: the fp32 reference
and fp16 rows; for each bit width, one row per quantization method on a layer
scope (:data:`METHODS`: per-tensor plain k-means as the original, per-channel
k-means, per-channel calibrated GPTQ + bias correction, per-channel uniform
grid); budgeted mixed-precision rows (``compression.compress_to_budget``); named
recipes; and ONNX Runtime's dynamic int8 as a baseline. Each row is compressed
in memory, serialized (the byte count is the real file's), parsed back, and
evaluated on the same preprocessed images.

Modules: :mod:`.settings` (which rows), :mod:`.source` (the float model),
:mod:`.data` (evaluation and calibration images), :mod:`.rows` (computing them),
:mod:`.command` (`klaus sweep`'s options and checks), :mod:`.outdir` (where the files go).
Compression, evaluation and the file format are other packages' jobs, and the
tables and the plot are :mod:`klaus.report`'s. Nothing here prints.
"""

from __future__ import annotations

from .command import Prepared, SweepOptions, check_images, prepare
from .data import CalibrationSet, EvalSet, load_calibration_set, load_eval_set, overlap
from .outdir import OUTPUT_NAMES, check_out_dir, default_out_dir
from .rows import COLUMNS, TIMING_COLUMNS, SweepResult, SweepRow, frontier, run_sweep
from .settings import (
    INT8_BASELINE,
    METHODS,
    REFERENCE,
    SCHEMES,
    SCOPES,
    UNIFORM_STEPS,
    Setting,
    method_setting,
    mixed_setting,
    parse_bits,
    parse_budgets,
    parse_methods,
    plan,
    scope_recipe,
    uniform_recipe,
    without_calibration,
)
from .source import SweepSource, load_source

__all__ = [
    "COLUMNS",
    "INT8_BASELINE",
    "METHODS",
    "OUTPUT_NAMES",
    "REFERENCE",
    "SCHEMES",
    "SCOPES",
    "TIMING_COLUMNS",
    "UNIFORM_STEPS",
    "CalibrationSet",
    "EvalSet",
    "Prepared",
    "Setting",
    "SweepOptions",
    "SweepResult",
    "SweepRow",
    "SweepSource",
    "check_images",
    "check_out_dir",
    "default_out_dir",
    "frontier",
    "load_calibration_set",
    "load_eval_set",
    "load_source",
    "method_setting",
    "mixed_setting",
    "overlap",
    "parse_bits",
    "parse_budgets",
    "parse_methods",
    "plan",
    "prepare",
    "run_sweep",
    "scope_recipe",
    "uniform_recipe",
    "without_calibration",
]
