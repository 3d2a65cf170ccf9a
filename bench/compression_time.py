"""Compression time: `klaus zoo build efficientnet-lite0` with the default recipe and as the embedded model, on 2 cores.

    python bench/compression_time.py

Wall time of the calibrated default-recipe build (``--calib ../shared/data/imagenet-sample
--calib-split even``: GPTQ and bias correction over the 500 even-class photos) and
of the embedded model's build (the same plus ``--budget-mib 2.5``: the per-tensor
search over k-means widths and uniform steps) versus the lossless build (the same
export from the PyTorch weights, no palettization) as the baseline; all are new
processes of the installed ``klaus`` entry point. Also whether the budgeted build
reproduces the embedded model byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import time

from _common import CACHE, KLAUS, ROOT, SAMPLE, cli, embedded_model, ratio, run_command, table


def timed_build(args: list[str]) -> float:
    start = time.perf_counter()
    run_command(args)
    return time.perf_counter() - start


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def run() -> str:
    CACHE.mkdir(parents=True, exist_ok=True)
    lossless = CACHE / "ct-efficientnet-lite0-lossless.klaus"
    default = CACHE / "ct-efficientnet-lite0-default.klaus"
    calib = os.path.relpath(SAMPLE, ROOT)
    lossless_cmd = ["klaus", "zoo", "build", "efficientnet-lite0", "--lossless", "-o", str(lossless.relative_to(ROOT))]
    default_cmd = [
        "klaus",
        "zoo",
        "build",
        "efficientnet-lite0",
        "-o",
        str(default.relative_to(ROOT)),
        "--calib",
        calib,
        "--calib-split",
        "even",
    ]
    embedded = CACHE / "ct-efficientnet-lite0-embedded.klaus"
    embedded_cmd = [
        "klaus",
        "zoo",
        "build",
        "efficientnet-lite0",
        "--budget-mib",
        "2.5",
        "-o",
        str(embedded.relative_to(ROOT)),
        "--calib",
        calib,
        "--calib-split",
        "even",
    ]
    rows = []
    base = timed_build([KLAUS, *lossless_cmd[1:]])
    rows.append(
        [
            "lossless (export only; baseline)",
            f"{base:.1f}",
            "1.00×",
            f"{lossless.stat().st_size / 2**20:.2f}",
            "—",
            "`" + " ".join(lossless_cmd) + "`",
        ]
    )
    if SAMPLE.is_dir():
        for label, out, cmd in (
            ("default recipe, calibrated (GPTQ + bias correction)", default, default_cmd),
            ("embedded model: default recipe under a 2.5 MiB budget", embedded, embedded_cmd),
        ):
            seconds = timed_build([KLAUS, *cmd[1:]])
            same = "yes" if sha256(out) == sha256(embedded_model()) else "no"
            rows.append(
                [
                    label,
                    f"{seconds:.1f}",
                    ratio(seconds, base),
                    f"{out.stat().st_size / 2**20:.2f}",
                    same,
                    "`" + " ".join(cmd) + "`",
                ]
            )
        note = ""
    else:
        note = f"\n\nThe calibrated build was skipped: {SAMPLE} is not present."
    return (
        "\n".join(
            [
                "### Compression time (EfficientNet-Lite0, 2 cores)",
                "",
                "One run each (a build takes about a minute); wall time of a new `klaus` process, including the PyTorch export "
                'that both builds share. "= embedded": the output is byte-identical to `src/klaus/data/efficientnet-lite0.klaus`.',
                "",
                table(["build", "seconds", "vs lossless", "MiB", "= embedded", "command"], rows),
            ]
        )
        + note
    )


if __name__ == "__main__":
    cli(__doc__.splitlines()[0], run)
