"""Codec: index-map bytes versus the order-0 entropy bound, per bit width; and the original Klaus app's maps.

    python bench/codec.py [--only seed]

Part 1 reads the embedded model: for every palettized tensor the PNG payload
(index map) bytes, palette + scale bytes, and the order-0 entropy bound of its
indices (``klaus.codecs.order0_entropy_bytes``: what an ideal memoryless coder
would need), summed per bit width. Part 2 takes the original Klaus app's own
8-bit index maps (``../shared/data/klaus-seed/layer-11.png``, ``layer-12.png``,
already ``pngcrush -brute``-ed) and stores the same indices with Klaus's codec
(``encode_png_indices(bits=8)``) with the default PngOptions and with zopfli.
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from _common import SEED, cli, command, embedded_model, ratio, table

KEYS = ("seed",)


def model_rows(path) -> tuple[list[list[object]], dict[str, float]]:
    from klaus import codecs
    from klaus.format import read_model

    model = read_model(path)
    groups: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for t in model.tensors:
        if t.codec not in codecs.PALETTE_CODECS:
            continue
        g = groups[t.bits]
        g["tensors"] += 1
        g["params"] += t.size
        g["payload"] += len(t.payload)
        g["side"] += len(t.palette or b"") + len(t.scales or b"")
        g["entropy"] += codecs.order0_entropy_bytes(t.indices())
    total: defaultdict[str, float] = defaultdict(float)
    rows = []
    for bits in sorted(groups):
        g = groups[bits]
        for k, v in g.items():
            total[k] += v
        rows.append(_row(f"{bits}", g))
    rows.append(_row("all", total))
    return rows, total


def _row(label: str, g: dict[str, float]) -> list[object]:
    return [
        label,
        int(g["tensors"]),
        int(g["params"]),
        int(g["payload"]),
        f"{8 * g['payload'] / g['params']:.3f}",
        round(g["entropy"]),
        f"{8 * g['entropy'] / g['params']:.3f}",
        ratio(g["payload"], g["entropy"], 3),
        int(g["side"]),
        command("codec.py"),
    ]


def seed_rows() -> list[list[object]]:
    from PIL import Image

    from klaus import codecs

    rows: list[list[object]] = []
    for name in ("layer-11.png", "layer-12.png"):
        path = SEED / name
        with Image.open(path) as image:
            indices = np.asarray(image.convert("L") if image.mode != "L" else image).astype(np.uint8)
        entropy = codecs.order0_entropy_bytes(indices)
        file_bytes = path.stat().st_size
        timings = {}
        sizes = {}
        for label, options in (("default", codecs.PngOptions()), ("zopfli", codecs.PngOptions(zopfli=True))):
            start = time.perf_counter()
            payload = codecs.encode_png_indices(indices, 8, options)
            timings[label] = time.perf_counter() - start
            sizes[label] = len(payload)
            height, width = indices.shape
            assert np.array_equal(codecs.decode_png_indices(payload, height, width, 8), indices)
        shape = f"{indices.shape[0]}×{indices.shape[1]}"
        rows.append(
            [
                name,
                shape,
                file_bytes,
                round(entropy),
                ratio(file_bytes, entropy, 3),
                f"{sizes['default']} ({timings['default']:.1f} s)",
                ratio(sizes["default"], file_bytes, 3),
                f"{sizes['zopfli']} ({timings['zopfli']:.1f} s)",
                ratio(sizes["zopfli"], file_bytes, 3),
                ratio(sizes["zopfli"], entropy, 3),
                command("codec.py", "--only", "seed"),
            ]
        )
    return rows


def run(only: list[str] | None = None) -> str:
    out = []
    if not only:
        rows, _ = model_rows(embedded_model())
        out += [
            "### Codec: the embedded model's index maps versus their order-0 entropy bound",
            "",
            "Per bit width: palettized tensors, weights, PNG index-map bytes and bits per weight, the order-0 entropy "
            "bound of the same indices, and their ratio (PNG / bound; < 1 is possible because deflate also exploits "
            "repeats, which an order-0 bound ignores). Palette + scale bytes are listed apart.",
            "",
            table(
                [
                    "bits",
                    "tensors",
                    "weights",
                    "PNG bytes",
                    "PNG bits/weight",
                    "entropy bound bytes",
                    "bound bits/weight",
                    "PNG / bound",
                    "palette + scales bytes",
                    "command",
                ],
                rows,
            ),
            "",
        ]
    if SEED.is_dir():
        out += [
            "### Codec: the original Klaus app's index maps (`../shared/data/klaus-seed`)",
            "",
            "8-bit k-means indices of the original app's 2nd and 3rd FC layers, as shipped (`pngcrush -brute`), versus "
            "their order-0 entropy bound and what `klaus.codecs.encode_png_indices(indices, bits=8)` stores "
            "(default PngOptions: oxipng level 2, libdeflate; and with zopfli). Seconds = encoding time on this machine.",
            "",
            table(
                [
                    "map",
                    "rows×cols",
                    "original bytes",
                    "entropy bound",
                    "original / bound",
                    "Klaus default bytes",
                    "vs original",
                    "Klaus zopfli bytes",
                    "vs original",
                    "zopfli / bound",
                    "command",
                ],
                seed_rows(),
            ),
        ]
    else:
        out += ["### Codec: the original Klaus app's index maps", "", f"Skipped: {SEED} is not present."]
    return "\n".join(out)


def smoke(model_path, onnx_path) -> str:
    rows, _ = model_rows(model_path)
    return table(["bits", "tensors"], [[r[0], r[1]] for r in rows])


if __name__ == "__main__":
    cli(__doc__.splitlines()[0], run, KEYS)
