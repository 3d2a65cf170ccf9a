"""Does the 1.5 MiB build get better with more calibration photos? (learning curve)

Builds the budgeted model from 100, 200 and 400 of the 400 calibration photos (every
4th, every 2nd, all: the classes stay spread over the even half) and reports each
build's dev KL and agreement on the same 100 held-out even photos x 10 crops.

    python experiments/low-bit-routes/learning_curve.py 1.5
"""

from __future__ import annotations

import sys
import time

import common

from klaus import codecs
from klaus.compression import budget
from klaus.compression.recipe import DEFAULT
from klaus.labels import imagenet_label_rows


def build(s: common.Setup, calibration, budget_mib: float) -> None:
    entry = common.zoo.entry("efficientnet-lite0")
    start = time.time()
    search = budget.Search(
        s.model,
        DEFAULT,
        calibration,
        preprocess=entry.preprocess,
        labels=imagenet_label_rows(),
        card=entry.card,
        output="logits",
        png=codecs.PngOptions(),
        min_elements=budget.MIN_BUDGET_ELEMENTS,
        uniform=True,
        views=1,
        progress=None,
    )
    built, _ = search.fit(int(budget_mib * 2**20))
    common.report(s, f"calibrated on {len(calibration)} photos", built, start)


def main() -> None:
    budget = float(sys.argv[1]) if len(sys.argv) > 1 else 1.5
    s = common.setup(budget)  # the 400-photo build, printed first
    for every in (4, 2):
        build(s, s.calibration[::every], budget)


if __name__ == "__main__":
    main()
