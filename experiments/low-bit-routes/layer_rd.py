"""Rate-distortion of single layers: per-output-channel grids (as built) vs grids also scaled per input channel.

    python experiments/low-bit-routes/layer_rd.py

For each large pointwise layer of EfficientNet-Lite0 (200 even-half photos for the
Hessian H), GPTQ on uniform grids of several steps gives (index entropy in bits per
weight, relative output error tr(dW H dW^T) / tr(W H W^T)). The variant scales input
column i by g_i = (H_ii / mean H_ii)^(alpha/2) before quantizing (and back after), so
columns that matter less get coarser steps: high-rate theory's optimum is alpha = 1.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import DATA

from klaus import codecs, onnxgraph, zoo
from klaus.compression import calibrate
from klaus.compression.gptq import palettize_gptq
from klaus.labels import imagenet_label_rows

STEPS = (2.0, 1.4, 1.0, 0.7, 0.5)


def curve(w: np.ndarray, h: np.ndarray, g: np.ndarray) -> list[tuple[float, float]]:
    out = []
    for step in STEPS:
        q = palettize_gptq(w * g[None, :], 8, h / np.outer(g, g), granularity="channel", step=step)
        d = q.decode().reshape(w.shape) / g[None, :] - w
        error = np.einsum("oi,ij,oj->", d, h, d) / np.einsum("oi,ij,oj->", w, h, w)
        out.append((codecs.order0_entropy_bytes(q.indices) * 8 / w.size, float(error)))
    return out


def main() -> None:
    entry = zoo.entry("efficientnet-lite0")
    labels = imagenet_label_rows()
    files = calibrate.select_files([DATA], "even", 200, {r.wnid: r.index for r in labels})
    model = zoo.export_onnx("efficientnet-lite0")
    _, weights = onnxgraph.split_weights(model)
    roles = onnxgraph.tensor_roles(model)
    big = [
        n for n, w in weights.items() if roles[n].op == "Conv" and roles[n].kind != "depthwise" and w.size >= 100_000
    ]
    acts = [roles[n].activation for n in big]
    stats = calibrate.input_statistics(model, calibrate.calibration_batch(files, entry.preprocess, 1), acts, acts)
    for name in big:
        w = weights[name].reshape(weights[name].shape[0], -1)
        h = stats[roles[name].activation].hessian
        energy = np.diag(h) / np.diag(h).mean()
        print(name, w.shape)
        for alpha in (0.0, 0.5, 1.0):
            g = np.clip(energy ** (alpha / 2), 1 / 16, 16)
            print(f"  alpha {alpha}: " + ", ".join(f"{r:.2f} b/w {e:.4f}" for r, e in curve(w, h, g)), flush=True)


if __name__ == "__main__":
    main()
