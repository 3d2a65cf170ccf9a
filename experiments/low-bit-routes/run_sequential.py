"""Sequential GPTQ on the palettized network's own activations, with and without the asymmetric target.

python experiments/low-bit-routes/run_sequential.py 1.5
"""

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import report, setup
from sequential import sequential_palettize

from klaus.compression import mixed
from klaus.compression.plan import depthwise_windows, is_linear, planned_bits
from klaus.compression.quantize import quantize_tensor, stored_float
from klaus.compression.write import assemble
from klaus.onnxgraph import TensorRole

MODES = {
    "none": lambda role: False,
    "all": lambda role: True,
    "pointwise": lambda role: role.op == "Conv" and role.kind != "depthwise",
    "depthwise": lambda role: role.kind == "depthwise",
}


def _on_layers(which: Callable[[TensorRole], bool], roles: dict[str, TensorRole], name: str) -> bool:
    """Whether the tensor ``name`` is on a layer ``which`` selects (an asymmetric target)."""
    return which(roles[name])


def main(budget_mib: float) -> None:
    s = setup(budget_mib)
    search, roles, weights = s.search, s.search.roles, s.search.weights
    plan = mixed.budget_recipe(search.recipe, s.allocation)
    bits = planned_bits(weights, roles, plan)
    stored = {n: stored_float(w, plan.float_codec) for n, w in weights.items()}
    windows = depthwise_windows(s.model, roles, {n: weights[n].shape for n in bits})

    def quantizer(name, target, stats):
        return quantize_tensor(target, roles[name], bits[name], plan, stats, plan.step_for(name))

    for mode, which in MODES.items():
        start = time.time()
        quantized, biases = sequential_palettize(
            search.skeleton,
            weights,
            stored,
            roles,
            bits,
            quantizer,
            windows,
            lambda n: is_linear(roles[n], weights[n]),
            s.calibration,
            asymmetric=functools.partial(_on_layers, which, roles),
        )
        built = assemble(search.skeleton, {**weights, **biases}, quantized, plan, s.calibration, **search.meta)
        report(s, f"sequential, asymmetric target on {mode}", built, start)


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1.5)
