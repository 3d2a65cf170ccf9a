"""The bounds Klaus puts on what a model file may ask for, and how a user lifts them.

A `.klaus` file can come from anyone. Before anything is allocated for it, the reader checks
that its weights fit a size a classifier needs (:func:`max_weights`) and that its graph uses
only the operators image classifiers use (:data:`klaus.onnxwire.CLASSIFIER_OPS`); while it
runs, ONNX Runtime allocates from one arena capped at :func:`max_run_bytes`, so no input can
make a model take unbounded memory. A file that breaks a bound is one error line, never an
exhausted machine.

People who know what they load lift the file bounds with ``KLAUS_TRUST_MODEL=1`` (any ONNX
operator, any number of weights); ``KLAUS_MAX_MEMORY_MB`` sets the run-time cap.
"""

from __future__ import annotations

import os

from .errors import KlausError

TRUST_ENV = "KLAUS_TRUST_MODEL"
MEMORY_ENV = "KLAUS_MAX_MEMORY_MB"
# 2^26 weights (256 MiB as float32): more than every common ImageNet classifier up to
# EfficientNet-B7 (66 M) needs; VGG-16 (138 M) and ViT-L need KLAUS_TRUST_MODEL=1.
MAX_WEIGHTS = 1 << 26
DEFAULT_RUN_MB = 1024


def trusted() -> bool:
    """True when the user has said the model files they load are trusted."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "yes", "true", "on")


def max_weights() -> int | None:
    """How many weights a model file may hold in all (None: no limit, the files are trusted)."""
    return None if trusted() else MAX_WEIGHTS


def max_run_bytes() -> int:
    """The cap on ONNX Runtime's arena for running models (weights and activations)."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if not text:
        return DEFAULT_RUN_MB << 20
    try:
        mb = int(text)
    except ValueError:
        mb = 0
    if mb < 16:
        raise KlausError(f"{MEMORY_ENV}={text!r}: expected a whole number of MiB, at least 16")
    return mb << 20
