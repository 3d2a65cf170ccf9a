"""Shared set-up of the low-bit-route experiments: the dev split, the budgeted build to start from, dev KL."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx

from klaus import codecs, evaluate, onnxgraph, zoo
from klaus import format as kformat
from klaus.compression import budget, calibrate, mixed
from klaus.compression.recipe import DEFAULT
from klaus.labels import imagenet_label_rows
from klaus.runtime import run_batches, softmax

DATA = "../shared/data/imagenet-sample"  # run from the repository root


@dataclass
class Setup:
    model: onnx.ModelProto  # the float ONNX graph
    search: budget.Search
    allocation: mixed.Allocation
    calibration: np.ndarray
    dev: np.ndarray
    reference: np.ndarray  # float probabilities on the dev inputs


def setup(budget_mib: float, data: str = DATA) -> Setup:
    """Calibrate on the even half minus every fifth photo; those 100 photos x 10 crops are the dev set.

    The evaluation (odd) half is not touched.
    """
    entry = zoo.entry("efficientnet-lite0")
    labels = imagenet_label_rows()
    files = calibrate.select_files([data], "even", None, {r.wnid: r.index for r in labels})
    calibration = calibrate.calibration_batch([f for i, f in enumerate(files) if i % 5 != 4], entry.preprocess, 1)
    dev = calibrate.calibration_batch([f for i, f in enumerate(files) if i % 5 == 4], entry.preprocess, 10)
    model = zoo.export_onnx("efficientnet-lite0")
    start = time.time()
    search = budget.Search(
        model,
        DEFAULT,
        calibration,
        preprocess=entry.preprocess,
        labels=labels,
        card=entry.card,
        output="logits",
        png=codecs.PngOptions(),
        min_elements=budget.MIN_BUDGET_ELEMENTS,
        uniform=True,
        views=1,
        progress=None,
    )
    built, allocation = search.fit(int(budget_mib * 2**20))
    result = Setup(model, search, allocation, calibration, dev, probabilities(model, dev))
    report(result, "budgeted build (GPTQ)", built, start)
    return result


def probabilities(model, inputs: np.ndarray) -> np.ndarray:
    return softmax(run_batches(model, inputs, chunk=100))


def report(s: Setup, tag: str, built, start: float) -> None:
    q = probabilities(onnxgraph.to_onnx(built), s.dev)
    kl = float(np.mean(evaluate.kl_divergence(s.reference, q)))
    agree = float(np.mean(q.argmax(1) == s.reference.argmax(1)) * 100)
    size = len(kformat.serialize(built)) / 2**20
    print(
        f"{tag}: {size:.3f} MiB, dev KL {kl:.4f}, dev agreement {agree:.1f} %, {time.time() - start:.0f} s", flush=True
    )
