"""Block-wise learned rounding (BRECQ-style AdaRound per block of ~3 palettized layers) on a budgeted build.

    python experiments/low-bit-routes/run_blockwise.py 1.5 --init gptq --lr 0.03 --lam 0.05 --flip --guard

Every palettized weight chooses between two adjacent levels of its own grid (the
grid, scales and FC layer stay as the GPTQ build made them); the choice is a soft
variable trained with AdaRound's annealed regularizer to match the float block's
output from the palettized network's input. Needs torch (the `convert` extra).
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).parent))

from common import report, setup

from klaus.compression.finetune import _run_node, graph_cuts
from klaus.compression.quantize import stored_float
from klaus.compression.write import assemble
from klaus.onnxgraph import attributes

ZETA, GAMMA = 1.1, -0.1  # AdaRound's rectified sigmoid stretch


def tensor(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def blocks_of(model, layer_at, per_block):
    """(entry value, node positions, exit value): cut the graph where one value is live, >= per_block layers apart."""
    cuts = dict(graph_cuts(model))
    blocks, current, count, entry = [], [], 0, model.graph.input[0].name
    for k, node in enumerate(model.graph.node):
        current.append(k)
        count += bool(node.output and node.output[0] in layer_at)
        if k in cuts and count >= per_block:
            blocks.append((entry, current, cuts[k]))
            entry, current, count = cuts[k], [], 0
    if current:
        blocks.append((entry, current, model.graph.output[0].name))
    return blocks


def main(a) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    s = setup(a.budget)
    start = time.time()
    model, search, roles = s.model, s.search, s.search.roles
    assert search.fitted is not None  # setup() fitted the budget
    fitted = search.fitted
    _, weights, quantized = fitted
    floats = search.weights
    nodes = list(model.graph.node)
    layer_at = {roles[n].output: n for n in quantized}
    consts = {
        t.name: torch.from_numpy(np.array(numpy_helper.to_array(t)))
        for t in model.graph.initializer
        if t.name not in floats
    }
    for node in nodes:
        if node.op_type == "Constant":
            value = attributes(node)["value"]
            assert isinstance(value, onnx.TensorProto)
            consts[node.output[0]] = torch.from_numpy(np.array(numpy_helper.to_array(value)))
    teacher = {n: tensor(w) for n, w in floats.items()}
    student = {
        n: tensor(quantized[n].decode() if n in quantized else stored_float(w, "raw-f16")) for n, w in weights.items()
    }

    def run(block, x, value):
        env = {block[0]: x}
        for k in block[1]:
            node = nodes[k]
            if node.op_type != "Constant":
                args = [None if not i else env[i] if i in env else value(i) for i in node.input]
                env[node.output[0]] = _run_node(torch, torch.nn.functional, node.op_type, args, attributes(node))
        return env[block[2]]

    def table(t):
        return lambda i: t[i] if i in t else consts[i]

    def batched(block, x, value):
        with torch.no_grad():
            return torch.cat([run(block, x[i : i + 32], value) for i in range(0, len(x), 32)])

    inputs = np.concatenate([s.calibration, s.calibration[:, :, :, ::-1]]) if a.flip else s.calibration
    photo = np.arange(len(inputs)) % len(s.calibration)
    held = np.flatnonzero(photo % 5 == 4) if a.guard else np.array([], dtype=int)
    train_rows = np.flatnonzero(photo % 5 != 4) if a.guard else np.arange(len(inputs))
    xf = xq = tensor(inputs)
    out = dict(quantized)
    for bi, block in enumerate(blocks_of(model, layer_at, a.per_block)):
        names = [layer_at[nodes[k].output[0]] for k in block[1] if nodes[k].output and nodes[k].output[0] in layer_at]
        train = [n for n in names if roles[n].op != "Gemm" and len(quantized[n].palette) >= 2]
        yf = batched(block, xf, table(teacher))
        if train and xq.dim() == 4 and xq.shape[2] >= a.min_size:
            lows, gaps, scales, latent = {}, {}, {}, {}
            for n in train:
                q = quantized[n]
                levels = np.asarray(q.palette, dtype=np.float32)
                shape = [-1 if d == q.scale_axis else 1 for d in range(q.indices.ndim)]
                scale = q.scales.astype(np.float32).reshape(shape) if q.scales is not None else np.ones(1, np.float32)
                v = floats[n] / scale
                if a.init == "gptq":
                    g = q.indices.astype(np.int64)
                    low = np.clip(np.where(v > levels[g], g, g - 1), 0, len(levels) - 2)
                    frac = np.where(g == low, a.start, 1 - a.start)
                else:
                    low = np.clip(np.searchsorted(levels, v) - 1, 0, len(levels) - 2)
                    frac = np.clip((v - levels[low]) / (levels[low + 1] - levels[low]), 0.01, 0.99)
                lows[n], gaps[n] = low, (tensor(levels[low]), tensor(levels[low + 1] - levels[low]))
                scales[n] = tensor(np.broadcast_to(scale, q.indices.shape))
                latent[n] = torch.tensor(
                    -np.log((ZETA - GAMMA) / (frac - GAMMA) - 1), dtype=torch.float32, requires_grad=True
                )
            biases = {
                roles[n].bias: student[roles[n].bias].clone().requires_grad_(True)
                for n in train
                if roles[n].bias in student
            }
            saved = {**{n: student[n] for n in train}, **{b: student[b] for b in biases}}
            opt = torch.optim.Adam(
                [{"params": list(latent.values()), "lr": a.lr}, {"params": list(biases.values()), "lr": 1e-4}]
            )

            def h(n, latent=latent):
                return torch.clamp(torch.sigmoid(latent[n]) * (ZETA - GAMMA) + GAMMA, 0, 1)

            def soft(i, latent=latent, gaps=gaps, scales=scales, biases=biases, h=h):
                if i in latent:
                    return (gaps[i][0] + h(i) * gaps[i][1]) * scales[i]
                return biases[i] if i in biases else student[i] if i in student else consts[i]

            rng = np.random.default_rng(bi)
            size = xq.shape[2]
            for it in range(a.iters):
                pick = torch.from_numpy(rng.choice(train_rows, a.batch, replace=False))
                xin, fin = xq[pick], xf[pick]
                if size > a.crop:
                    r, c = rng.integers(0, size - a.crop + 1, 2)
                    xin, fin = xin[:, :, r : r + a.crop, c : c + a.crop], fin[:, :, r : r + a.crop, c : c + a.crop]
                    with torch.no_grad():
                        target = run(block, fin, table(teacher))
                else:
                    target = yf[pick]
                loss = (run(block, xin, soft) - target).pow(2).sum(1).mean()
                if it >= 0.2 * a.iters:
                    beta = 20 + (2 - 20) * (it - 0.2 * a.iters) / (0.8 * a.iters)
                    loss = loss + a.lam * sum((1 - (2 * h(n) - 1).abs().pow(beta)).sum() for n in latent)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                for n in latent:
                    out[n] = replace(quantized[n], indices=(lows[n] + (h(n).numpy() >= 0.5)).astype(np.uint8))
                    student[n] = tensor(out[n].decode())
                for b, t in biases.items():
                    student[b] = t.detach().to(torch.float16).float()
                if len(held):
                    rows = torch.from_numpy(held)
                    learned = float((batched(block, xq[rows], table(student)) - yf[rows]).pow(2).sum(1).mean())
                    before = {**student, **saved}
                    gptq = float((batched(block, xq[rows], table(before)) - yf[rows]).pow(2).sum(1).mean())
                    kept = learned < gptq
                    print(
                        f"block {bi}: held-out output error GPTQ {gptq:.3f}, learned {learned:.3f} -> {'kept' if kept else 'rejected'}",
                        flush=True,
                    )
                    if not kept:
                        student.update(saved)
                        out.update({n: quantized[n] for n in latent})
        xq, xf = batched(block, xq, table(student)), yf
    stored = {n: (student[n].numpy() if n in student and n not in quantized else w) for n, w in weights.items()}
    built = assemble(search.skeleton, stored, out, fitted[0], s.calibration, **search.meta)
    report(s, f"block-wise learned rounding ({vars(a)})", built, start)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("budget", type=float, nargs="?", default=1.5)
    p.add_argument("--init", choices=["gptq", "float"], default="gptq")
    p.add_argument("--start", type=float, default=0.2, help="initial soft rounding towards GPTQ's choice")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--lam", type=float, default=0.05)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--per-block", type=int, default=3)
    p.add_argument(
        "--min-size", type=int, default=0, help="train only blocks whose input is at least this many pixels high"
    )
    p.add_argument("--flip", action="store_true", help="add mirror images")
    p.add_argument(
        "--guard", action="store_true", help="train on 4/5 of the photos, keep a block only if the other 1/5 agree"
    )
    main(p.parse_args())
