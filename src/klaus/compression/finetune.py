"""Palette fine-tuning by distillation: nudge palettes, scales and biases towards the float model.

After k-means/GPTQ every palettized layer is fixed by its indices; what is left
free are a few numbers per layer -- the palette levels, the per-channel scales
and the bias. Training only those, with the float model as teacher
(KL(teacher || student) on its own logits, on unlabeled calibration photos and
their mirror images), recovers much of what low bit widths lose. Indices never
change, so the stored size stays what the budget allowed.

The network is run in PyTorch by a small interpreter of the ONNX graph (the
usual CNN operators; anything else raises :class:`KlausModelError`). Torch is a
build-time tool only: the `convert` extra. Seeds, the batch order and the
thread count are fixed, so a build is repeatable on one machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from .. import onnxgraph
from ..errors import KlausModelError
from ..runtime import run_batches
from .kmeans import PalettizedTensor

Progress = Callable[[str], None]


@dataclass(frozen=True)
class FinetuneOptions:
    """Distillation schedule. ``steps`` minibatches of ``batch`` inputs, Adam with cosine decay."""

    steps: int = 200
    batch: int = 32
    copies: int = 2  # random resized crops per calibration input, besides the input and its mirror
    tail_share: float = 0.9
    holdout: int = 5  # every n-th calibration photo is held out to choose the stopping point
    check_every: int = 25  # train the layers after the latest cut holding this share of palettized weights
    lr: float = 1e-3  # relative step for palettes and log-scales (both are O(1))
    bias_lr: float = 1e-4  # 0 freezes biases
    scales: bool = True  # train per-channel scales too
    seed: int = 0


@dataclass(frozen=True)
class FinetuneResult:
    quantized: dict[str, PalettizedTensor]
    biases: dict[str, np.ndarray]
    kl_before: float
    kl_after: float


def _torch():
    try:
        import torch
    except ImportError:
        raise KlausModelError(
            "palette fine-tuning needs PyTorch at build time: pip install 'klaus-classifier[convert]'"
        ) from None
    return torch


# ------------------------------------------------------------------ interpreter


def _conv(F, x, w, b, a):
    if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise KlausModelError("fine-tuning: Conv with auto_pad is not supported")
    spatial = w.dim() - 2
    if spatial != 2:
        raise KlausModelError(f"fine-tuning: {spatial}-D Conv is not supported")
    pads = list(a.get("pads", [0] * 4))
    if pads[:2] != pads[2:]:
        x = F.pad(x, (pads[1], pads[3], pads[0], pads[2]))
        pads = [0, 0, 0, 0]
    return F.conv2d(
        x,
        w,
        b,
        stride=tuple(a.get("strides", [1, 1])),
        padding=tuple(pads[:2]),
        dilation=tuple(a.get("dilations", [1, 1])),
        groups=int(a.get("group", 1)),
    )


def _pool(F, x, a, kind):
    k = tuple(a["kernel_shape"])
    pads = list(a.get("pads", [0] * 4))
    if pads[:2] != pads[2:]:
        raise KlausModelError(f"fine-tuning: asymmetric {kind} padding is not supported")
    stride = tuple(a.get("strides", [1] * len(k)))
    ceil = bool(a.get("ceil_mode", 0))
    if kind == "MaxPool":
        return F.max_pool2d(x, k, stride, tuple(pads[:2]), ceil_mode=ceil)
    return F.avg_pool2d(
        x, k, stride, tuple(pads[:2]), ceil_mode=ceil, count_include_pad=bool(a.get("count_include_pad", 0))
    )


def _run_node(torch, F, op: str, ins: list, a: dict):
    """One ONNX node in torch; ``ins`` holds tensors (None for omitted optional inputs)."""
    if op == "Conv":
        return _conv(F, ins[0], ins[1], ins[2] if len(ins) > 2 else None, a)
    if op == "Gemm":
        x, w = ins[0], ins[1]
        x = x.t() if a.get("transA", 0) else x
        w = w.t() if a.get("transB", 0) else w
        y = float(a.get("alpha", 1.0)) * (x @ w)
        return y + float(a.get("beta", 1.0)) * ins[2] if len(ins) > 2 and ins[2] is not None else y
    simple = {
        "Add": lambda: ins[0] + ins[1],
        "Sub": lambda: ins[0] - ins[1],
        "Mul": lambda: ins[0] * ins[1],
        "Div": lambda: ins[0] / ins[1],
        "MatMul": lambda: ins[0] @ ins[1],
        "Relu": lambda: F.relu(ins[0]),
        "Sigmoid": lambda: torch.sigmoid(ins[0]),
        "Tanh": lambda: torch.tanh(ins[0]),
        "HardSwish": lambda: F.hardswish(ins[0]),
        "Identity": lambda: ins[0],
        "Dropout": lambda: ins[0],
        "GlobalAveragePool": lambda: ins[0].mean(dim=tuple(range(2, ins[0].dim())), keepdim=True),
        "GlobalMaxPool": lambda: ins[0].amax(dim=tuple(range(2, ins[0].dim())), keepdim=True),
    }
    if op in simple:
        return simple[op]()
    if op == "Clip":
        lo = ins[1] if len(ins) > 1 and ins[1] is not None else a.get("min")
        hi = ins[2] if len(ins) > 2 and ins[2] is not None else a.get("max")
        lo = None if lo is None else float(lo)
        hi = None if hi is None else float(hi)
        return torch.clamp(ins[0], lo, hi)
    if op == "LeakyRelu":
        return F.leaky_relu(ins[0], float(a.get("alpha", 0.01)))
    if op == "HardSigmoid":
        return torch.clamp(float(a.get("alpha", 0.2)) * ins[0] + float(a.get("beta", 0.5)), 0.0, 1.0)
    if op in ("MaxPool", "AveragePool"):
        return _pool(F, ins[0], a, op)
    if op == "Flatten":
        axis = int(a.get("axis", 1))
        return ins[0].reshape(int(np.prod(ins[0].shape[:axis])), -1)
    if op == "Reshape":
        shape = [int(s) for s in ins[1].tolist()]
        shape = [ins[0].shape[i] if s == 0 and not a.get("allowzero", 0) else s for i, s in enumerate(shape)]
        return ins[0].reshape(shape)
    if op == "Concat":
        return torch.cat(ins, dim=int(a["axis"]))
    if op == "Softmax":
        return torch.softmax(ins[0], dim=int(a.get("axis", -1)))
    if op == "Transpose":
        return ins[0].permute(*[int(p) for p in a.get("perm", range(ins[0].dim() - 1, -1, -1))])
    if op == "ReduceMean":
        axes = a.get("axes") or (ins[1].tolist() if len(ins) > 1 and ins[1] is not None else None)
        dims = tuple(int(d) for d in axes) if axes else tuple(range(ins[0].dim()))
        return ins[0].mean(dim=dims, keepdim=bool(a.get("keepdims", 1)))
    if op == "BatchNormalization":
        return F.batch_norm(ins[0], ins[3], ins[4], ins[1], ins[2], False, 0.0, float(a.get("epsilon", 1e-5)))
    raise KlausModelError(f"fine-tuning: ONNX operator {op} is not supported")


class _Student:
    """The palettized network with palettes, log-scales and biases as trainable tensors."""

    def __init__(
        self,
        torch,
        model: onnx.ModelProto,
        weights: dict[str, np.ndarray],
        quantized: dict[str, PalettizedTensor],
        trainable_biases: list[str],
        start: int,
        entry: str,
    ):
        self.torch = torch
        self.graph = model.graph
        self.entry = entry
        self.nodes = [(n.op_type, list(n.input), list(n.output), onnxgraph.attributes(n)) for n in model.graph.node]
        self.nodes = [n for i, n in enumerate(self.nodes) if i >= start or n[0] == "Constant"]
        check_supported(model)
        self.constants = {
            t.name: torch.from_numpy(np.array(numpy_helper.to_array(t)))
            for t in model.graph.initializer
            if t.name not in weights
        }
        for op, _, outs, a in self.nodes:
            if op == "Constant":
                value = a.get("value")
                if not isinstance(value, onnx.TensorProto):
                    raise KlausModelError(f"fine-tuning runs Constant nodes that hold a tensor, not {sorted(a)}")
                self.constants[outs[0]] = torch.from_numpy(np.array(numpy_helper.to_array(value)))
        self.fixed = {
            n: torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
            for n, w in weights.items()
            if n not in quantized and n not in trainable_biases
        }
        self.palettes = {
            n: torch.tensor(q.palette.astype(np.float32), requires_grad=True) for n, q in quantized.items()
        }
        self.log_scales = {
            n: torch.zeros(q.scales.shape[0], requires_grad=True) for n, q in quantized.items() if q.scales is not None
        }
        self.base_scales = {
            n: torch.from_numpy(q.scales.astype(np.float32)) for n, q in quantized.items() if q.scales is not None
        }
        self.indices = {n: torch.from_numpy(q.indices.astype(np.int64)) for n, q in quantized.items()}
        self.axes = {n: q.scale_axis for n, q in quantized.items()}
        self.biases = {
            n: torch.tensor(np.asarray(weights[n], dtype=np.float32), requires_grad=True) for n in trainable_biases
        }

    def weight(self, name: str):
        w = self.palettes[name][self.indices[name]]
        if name in self.log_scales:
            shape = [1] * w.dim()
            shape[self.axes[name]] = -1
            w = w * (self.base_scales[name] * self.log_scales[name].exp()).reshape(shape)
        return w

    def __call__(self, x):
        torch = self.torch
        F = torch.nn.functional
        env = {self.entry: x}
        for op, ins, outs, a in self.nodes:
            if op == "Constant":
                continue
            args = [self._value(env, i) if i else None for i in ins]
            env[outs[0]] = _run_node(torch, F, op, args, a)
        return env[self.graph.output[0].name]

    def _value(self, env, name):
        if name in env:
            return env[name]
        if name in self.palettes:
            return self.weight(name)
        for table in (self.biases, self.fixed, self.constants):
            if name in table:
                return table[name]
        raise KlausModelError(f"fine-tuning: graph value {name!r} has no producer")


_SUPPORTED = {
    "Conv",
    "Gemm",
    "Add",
    "Sub",
    "Mul",
    "Div",
    "MatMul",
    "Relu",
    "Sigmoid",
    "Tanh",
    "HardSwish",
    "Identity",
    "Dropout",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Clip",
    "LeakyRelu",
    "HardSigmoid",
    "MaxPool",
    "AveragePool",
    "Flatten",
    "Reshape",
    "Concat",
    "Softmax",
    "Transpose",
    "ReduceMean",
    "BatchNormalization",
    "Constant",
}


def check_supported(model: onnx.ModelProto) -> None:
    """Raise a one-line error naming the operators the interpreter cannot run."""
    bad = sorted({n.op_type for n in model.graph.node if n.op_type not in _SUPPORTED})
    if bad:
        raise KlausModelError(
            f"fine-tuning: ONNX operator(s) {', '.join(bad)} not supported (compress without --finetune-steps)"
        )


# ------------------------------------------------------------------ training


def graph_cuts(model: onnx.ModelProto) -> list[tuple[int, str]]:
    """(node position, value) pairs where one value carries everything later nodes need.

    After node i, the only live graph value (besides weights and constants) is
    the cut: the network factors into prefix(x) -> cut -> tail(cut).
    """
    static = {t.name for t in model.graph.initializer}
    static |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    last_use: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            if name and name not in static:
                last_use[name] = i
    outputs = {o.name for o in model.graph.output}
    live = {i.name for i in model.graph.input if i.name not in static}
    cuts = []
    for i, node in enumerate(model.graph.node):
        live |= {o for o in node.output if o and o not in static}
        live = {v for v in live if last_use.get(v, -1) > i or v in outputs}
        if len(live) == 1 and not live & outputs and node.op_type != "Constant":
            cuts.append((i, next(iter(live))))
    return cuts


def choose_cut(
    model: onnx.ModelProto, quantized: dict[str, PalettizedTensor], tail_share: float
) -> tuple[int, str] | None:
    """The latest cut after which at least ``tail_share`` of the palettized weights lie.

    Training only the tail lets the prefix run once per input (in ONNX Runtime)
    instead of forward and backward at every step; in mobile CNNs the late,
    low-resolution layers hold most weights and are the cheap ones to run.
    """
    position: dict[str, int] = {}
    for i, node in enumerate(model.graph.node):
        for name in node.input:
            if name in quantized:
                position.setdefault(name, i)
    total = sum(q.indices.size for q in quantized.values())
    best = None
    for i, value in graph_cuts(model):
        after = sum(q.indices.size for n, q in quantized.items() if position.get(n, -1) > i)
        if total and after >= tail_share * total:
            best = (i, value)
    return best


def augmented_views(calibration: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """The inputs, their mirror images, and ``copies`` random resized crops of each (NCHW).

    Augmenting in tensor space keeps fine-tuning independent of the image files.
    """
    torch = _torch()
    x = torch.from_numpy(np.ascontiguousarray(calibration, dtype=np.float32))
    views = [x, torch.flip(x, dims=[3])]
    rng = np.random.default_rng(seed)
    n, _, h, w = x.shape
    for _ in range(copies):
        out = torch.empty_like(x)
        for j in range(n):
            area = rng.uniform(0.35, 1.0) * h * w
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            ch = min(h, max(8, round(math.sqrt(area / aspect))))
            cw = min(w, max(8, round(math.sqrt(area * aspect))))
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = x[j : j + 1, :, top : top + ch, left : left + cw]
            crop = torch.nn.functional.interpolate(
                crop, size=(h, w), mode="bilinear", align_corners=False, antialias=True
            )
            out[j] = torch.flip(crop[0], dims=[2]) if rng.random() < 0.5 else crop[0]
        views.append(out)
    return torch.cat(views).numpy()


def _kl(torch, teacher_logp, student_logits):
    logq = torch.log_softmax(student_logits, dim=1)
    return (teacher_logp.exp() * (teacher_logp - logq)).sum(dim=1).mean()


def finetune(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    quantized: dict[str, PalettizedTensor],
    roles: dict[str, onnxgraph.TensorRole],
    calibration: np.ndarray,
    options: FinetuneOptions = FinetuneOptions(),
    progress: Progress | None = None,
) -> FinetuneResult:
    """Distil the float ``model`` into the palettized one; returns new palettes/scales and biases.

    ``weights`` are the student's non-palettized tensors as they will be stored
    (bias-corrected biases included); ``model`` carries the float weights.
    """
    torch = _torch()
    torch.manual_seed(options.seed)
    check_supported(model)
    views = augmented_views(calibration, options.copies, options.seed)
    teacher_logp = torch.log_softmax(torch.from_numpy(run_batches(model, views)), dim=1)
    cut = choose_cut(model, quantized, options.tail_share)
    start = 0 if cut is None else cut[0] + 1
    tail_nodes = set(range(start, len(model.graph.node)))
    used = {i for k in tail_nodes for i in model.graph.node[k].input}
    train = {n: q for n, q in quantized.items() if n in used}
    decoded = {**weights, **{n: q.decode() for n, q in quantized.items()}}
    if cut is None:
        features, entry = views, model.graph.input[0].name
    else:
        skeleton, _ = onnxgraph.split_weights(model)
        features, entry = run_batches(onnxgraph.join_weights(skeleton, decoded), views, cut[1]), cut[1]
    trainable_biases = sorted({roles[n].bias for n in train if roles[n].bias and roles[n].bias in weights})
    fixed = {n: w for n, w in decoded.items() if n not in train}
    student = _Student(torch, model, fixed, train, trainable_biases, start, entry)
    groups: list[dict[str, Any]] = [
        {"params": list(student.palettes.values()), "lr": options.lr},
        {"params": list(student.log_scales.values()) if options.scales else [], "lr": options.lr},
        {"params": list(student.biases.values()) if options.bias_lr > 0 else [], "lr": options.bias_lr},
    ]
    optimizer = torch.optim.Adam([g for g in groups if g["params"]])
    x_all = torch.from_numpy(np.ascontiguousarray(features))
    # Views of one photo stay on one side: every fifth photo is held out to pick the
    # stopping point, so the result is never worse than the start on unseen photos.
    photo = np.arange(len(x_all)) % len(calibration)
    held = (
        photo % options.holdout == options.holdout - 1
        if len(calibration) >= options.holdout
        else np.zeros(len(x_all), bool)
    )
    fit = np.flatnonzero(~held) if held.any() else np.arange(len(x_all))
    check = np.flatnonzero(held) if held.any() else fit
    params = [t for g in groups for t in g["params"]]

    def mean_kl(rows: np.ndarray) -> float:
        with torch.no_grad():
            parts = [torch.from_numpy(rows[i : i + 128]) for i in range(0, len(rows), 128)]
            return sum(float(_kl(torch, teacher_logp[p], student(x_all[p]))) * len(p) for p in parts) / len(rows)

    kl_before = best_kl = mean_kl(check)
    best = [t.detach().clone() for t in params]
    rng = np.random.default_rng(options.seed)
    epochs = math.ceil(options.steps * options.batch / len(fit)) + 1
    order = np.concatenate([fit[rng.permutation(len(fit))] for _ in range(epochs)])
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    for step in range(options.steps):
        factor = 0.5 * (1 + math.cos(math.pi * step / options.steps))
        for g, lr in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = lr * factor
        pick = torch.from_numpy(order[step * options.batch : (step + 1) * options.batch])
        loss = _kl(torch, teacher_logp[pick], student(x_all[pick]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % options.check_every == 0 or step + 1 == options.steps:
            kl = mean_kl(check)
            if kl < best_kl:
                best_kl, best = kl, [t.detach().clone() for t in params]
            if progress:
                progress(f"fine-tune step {step + 1}/{options.steps}: held-out KL {kl:.5f} (best {best_kl:.5f})")
    out = dict(quantized)
    with torch.no_grad():
        for t, b in zip(params, best, strict=True):
            t.copy_(b)
        for name in train:
            q = quantized[name]
            palette = student.palettes[name].numpy().astype(np.float16)
            scales = q.scales
            if q.scales is not None:
                scales = (student.base_scales[name] * student.log_scales[name].exp()).numpy().astype(np.float16)
            out[name] = replace(q, palette=palette, scales=scales)
        biases = {n: t.numpy().astype(np.float32) for n, t in student.biases.items()}
    return FinetuneResult(out, biases, kl_before, best_kl)
