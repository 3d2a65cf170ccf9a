"""Experiment (not part of klaus; see README.md). Sequential palettization: each layer is fitted to the float model's output given its palettized inputs.

The plain pipeline fits every layer on the float model's activations, so each
layer's rounding is blind to the errors the layers before it already made.
Here the calibration photos run through two copies of the network side by
side, node by node: the float one and the one palettized so far. When a
palettized layer is reached, its weights W are fitted to reproduce the float
output W x_f from the inputs it will really see, x_q:

    min E || W_q x_q - W x_f ||^2  =  min E || (W_q - W~) x_q ||^2 + const,
    W~ = W C H^-1,  H = E[x_q x_q^T],  C = E[x_f x_q^T]

so GPTQ runs on the target W~ with the Hessian of the palettized inputs, and
the downstream layers compensate upstream errors (GPTAQ, Li et al. 2025; Qronos,
Zhang et al. 2025). The bias then matches the float output's per-channel mean
exactly (bias correction on the real inputs, not the float ones). Depthwise
convolutions do the same per channel over their input windows.

Only ONNX Runtime is needed: each node runs as its own one-node session.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from klaus import onnxgraph
from klaus.compression.calibrate import WINDOW_POSITIONS, InputStats, Window, channel_rows, shrunk
from klaus.compression.gptq import DEFAULT_DAMP
from klaus.compression.kmeans import PalettizedTensor

Progress = Callable[[str], None]
Quantizer = Callable[[str, np.ndarray, dict[str, InputStats]], PalettizedTensor]

CHUNK = 32  # rows per one-node ONNX Runtime call


@dataclass
class CrossStats:
    """E[x_f x_q^T] of a layer's float and palettized inputs (or of their windows, per channel)."""

    gram: np.ndarray | None = None
    count: int = 0
    patch_gram: np.ndarray | None = None
    patch_count: int = 0


def paired_statistics(
    x_f: np.ndarray, x_q: np.ndarray, with_gram: bool, window: Window | None
) -> tuple[InputStats, CrossStats]:
    """Statistics of the palettized input ``x_q`` (as :func:`calibrate.input_statistics` computes them) and its
    cross moments with the float input ``x_f``."""
    stats = InputStats.empty(x_q.shape[1], with_gram)
    cross = CrossStats()
    for start in range(0, x_q.shape[0], CHUNK):
        q, f = x_q[start : start + CHUNK], x_f[start : start + CHUNK]
        stats.add(q, window)
        if with_gram:
            rq = channel_rows(q)
            g = channel_rows(f).T @ rq
            cross.gram = g.astype(np.float64) if cross.gram is None else cross.gram + g
            cross.count += rq.shape[0]
        if window is not None:
            pq = window.patches(np.asarray(q, dtype=np.float32), WINDOW_POSITIONS)
            pf = window.patches(np.asarray(f, dtype=np.float32), WINDOW_POSITIONS)
            g = sum(np.matmul(a, b.transpose(0, 2, 1)).astype(np.float64) for a, b in zip(pf, pq, strict=True))
            cross.patch_gram = g if cross.patch_gram is None else cross.patch_gram + g
            cross.patch_count += pq.shape[0] * pq.shape[3]
    return stats, cross


def _damped_solve(h: np.ndarray, rhs: np.ndarray, damp: float) -> np.ndarray:
    """(H + damp * mean(diag H) I)^-1 rhs, for one matrix or a stack."""
    diag = np.diagonal(h, axis1=-2, axis2=-1)
    lam = damp * np.maximum(diag.mean(axis=-1), 1e-12)
    eye = np.eye(h.shape[-1])
    return np.linalg.solve(h + lam[..., None, None] * eye, rhs)


def corrected_target(
    weight: np.ndarray, out_axis: int, stats: InputStats, cross: CrossStats, damp: float = DEFAULT_DAMP
) -> np.ndarray:
    """W~ = W + W (C - H) (H + damp)^-1: the weight whose output on the palettized inputs best matches
    the float layer's output on the float inputs (W itself when the inputs are equal)."""
    w = np.asarray(weight, dtype=np.float64)
    matrix = np.moveaxis(w, out_axis, 0).reshape(w.shape[out_axis], -1)
    if cross.gram is not None and stats.gram is not None:
        # both shrunk like InputStats.hessian (same rho), so C == H gives C_s == H_s
        h = stats.hessian
        c = shrunk(cross.gram / max(1, cross.count), cross.count)
        # rows w_o: w~_o = w_o + (H + lam)^-1 (C^T - H) w_o
        fixed = matrix + _damped_solve(h, (c.T - h) @ matrix.T, damp).T
    elif cross.patch_gram is not None and stats.patch_gram is not None:
        h = stats.patch_gram / max(1, stats.patch_count)
        c = cross.patch_gram / max(1, cross.patch_count)
        delta = np.einsum("cij,cj->ci", c.transpose(0, 2, 1) - h, matrix)
        fixed = matrix + _damped_solve(h, delta[..., None], damp)[..., 0]
    else:
        return np.asarray(weight, dtype=np.float32)
    moved_shape = (w.shape[out_axis], *np.delete(w.shape, out_axis))
    return np.moveaxis(fixed.reshape(moved_shape), 0, out_axis).astype(np.float32)


class NodeRunner:
    """Runs a model's nodes one at a time (one small ONNX Runtime session per node and weight set)."""

    def __init__(self, skeleton: onnx.ModelProto):
        self.skeleton = skeleton
        self.constants = {i.name: i for i in skeleton.graph.initializer}
        self.opsets = list(skeleton.opset_import)

    def run(
        self, node: onnx.NodeProto, env: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray]
    ) -> list[np.ndarray]:
        from onnx import helper, numpy_helper

        from klaus.runtime import make_session

        data = [n for n in dict.fromkeys(node.input) if n and n not in weights and n not in self.constants]
        inits = [
            numpy_helper.from_array(np.ascontiguousarray(weights[n], dtype=np.float32), n)
            for n in dict.fromkeys(node.input)
            if n in weights
        ]
        inits += [self.constants[n] for n in dict.fromkeys(node.input) if n in self.constants]
        inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(env[n].dtype), None) for n in data]
        outputs = [helper.make_empty_tensor_value_info(n) for n in node.output if n]
        graph = helper.make_graph([node], "node", inputs, outputs, initializer=inits)
        model = helper.make_model(graph, opset_imports=self.opsets, ir_version=self.skeleton.ir_version)
        session = make_session(model)
        names = [o.name for o in outputs]
        if not data:
            return session.run(names, {})
        rows = env[data[0]].shape[0]
        parts = [session.run(names, {n: env[n][i : i + CHUNK] for n in data}) for i in range(0, rows, CHUNK)]
        return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]


def sequential_palettize(
    skeleton: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    stored: dict[str, np.ndarray],
    roles: dict[str, onnxgraph.TensorRole],
    planned: Mapping[str, int],
    quantizer: Quantizer,
    windows: Mapping[str, Window],
    linear: Callable[[str], bool],
    calibration: np.ndarray,
    asymmetric: Callable[[str], bool] = lambda name: True,
    progress: Progress | None = None,
) -> tuple[dict[str, PalettizedTensor], dict[str, np.ndarray]]:
    """Palettize the ``planned`` tensors in graph order on the inputs the palettized network gives them.

    ``weights`` are the float values, ``stored`` the non-palettized ones as the
    file will hold them (fp16-rounded). ``quantizer(name, target, stats)`` rounds
    one tensor; ``asymmetric(name)`` says whether that layer gets the W C H^-1 target.
    Returns the palettized tensors and the corrected biases.
    """
    graph_input = skeleton.graph.input[0].name
    runner = NodeRunner(skeleton)
    by_output: dict[str, list[str]] = {}
    for name in planned:
        by_output.setdefault(roles[name].output, []).append(name)
    last_use: dict[str, int] = {}
    for i, node in enumerate(skeleton.graph.node):
        for n in node.input:
            last_use[n] = i
    keep = {o.name for o in skeleton.graph.output}
    env_f: dict[str, np.ndarray] = {graph_input: calibration}
    env_q: dict[str, np.ndarray] = {graph_input: calibration}
    current = dict(stored)
    quantized: dict[str, PalettizedTensor] = {}
    biases: dict[str, np.ndarray] = {}
    for i, node in enumerate(skeleton.graph.node):
        outs_f = runner.run(node, env_f, weights)
        layers = by_output.get(node.output[0], []) if node.output else []
        for name in layers:
            role = roles[name]
            if progress:
                progress(name)
            x_f, x_q = env_f[role.activation], env_q[role.activation]
            stats, cross = paired_statistics(x_f, x_q, linear(name), windows.get(role.activation))
            target = corrected_target(weights[name], role.out_axis, stats, cross) if asymmetric(name) else weights[name]
            q = quantizer(name, target, {role.activation: stats})
            quantized[name] = q
            current[name] = q.decode()
        outs_q = runner.run(node, env_q, current)
        for name in layers:
            role = roles[name]
            if not role.bias or role.bias not in current or role.beta == 0 or outs_q[0].ndim < 2:
                continue
            axes = tuple(a for a in range(outs_q[0].ndim) if a != 1)
            shift = outs_f[0].mean(axis=axes, dtype=np.float64) - outs_q[0].mean(axis=axes, dtype=np.float64)
            if shift.shape != current[role.bias].shape:
                continue
            new_bias = (current[role.bias].astype(np.float64) + shift / role.beta).astype(np.float16).astype(np.float32)
            applied = (new_bias - current[role.bias]) * role.beta
            current[role.bias] = biases[role.bias] = new_bias
            outs_q[0] = outs_q[0] + applied.reshape(-1, *([1] * (outs_q[0].ndim - 2))).astype(outs_q[0].dtype)
        for n, vf, vq in zip([o for o in node.output if o], outs_f, outs_q, strict=False):
            env_f[n], env_q[n] = vf, vq
        for n in list(env_f):
            if last_use.get(n, -1) <= i and n not in keep:
                del env_f[n], env_q[n]
    return quantized, biases
