"""Mixed precision under a byte budget (klaus.compression.mixed and klaus.compression.budget)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import EXAMPLES, TINY_CLASSES, TINY_PREPROCESS, make_tiny_onnx
from klaus import compression, onnxgraph
from klaus import format as kf
from klaus.cli import main
from klaus.compression import budget as budgeting
from klaus.compression import calibrate, mixed
from klaus.compression.kmeans import palettize
from klaus.compression.recipe import Recipe
from klaus.errors import KlausModelError
from klaus.format import PAGE_SIZE
from klaus.labels import plain_label_rows

RECIPE = Recipe(name="tiny-budget", granularity="channel")


def _layer(name: str, size: int, scale: float) -> mixed.LayerOptions:
    cands = [mixed.Candidate(mixed.FLOAT, 2.0 * size, 0.0)]
    cands += [mixed.Candidate(b, size * b / 8.0, 4.0 ** (-b)) for b in range(2, 9)]
    return mixed.LayerOptions(name, size, cands, scale)


def test_allocation_fits_the_budget_and_spends_bits_where_they_matter():
    sensitive, robust = _layer("sensitive", 1000, 100.0), _layer("robust", 1000, 0.01)
    budget = 1000.0  # 8 bits per weight on average across the two layers
    alloc = mixed.allocate([sensitive, robust], budget)
    assert alloc.predicted_bytes <= budget
    assert alloc.bits["sensitive"] > alloc.bits["robust"]
    bigger = mixed.allocate([sensitive, robust], 3000.0)
    assert bigger.predicted_kl <= alloc.predicted_kl  # more bytes never predict more loss
    assert bigger.predicted_bytes <= 3000.0


def test_allocation_that_cannot_fit_is_reported_not_hidden():
    layer = _layer("only", 1000, 1.0)
    alloc = mixed.allocate([layer], 10.0)  # less than the 2-bit candidate
    assert alloc.predicted_bytes > 10.0


def test_rules_match_exact_names_only():
    chosen = {"a[1].weight": mixed.Candidate(4, 0.0, 0.0), "a*": mixed.Candidate(mixed.FLOAT, 0.0, 0.0)}
    alloc = mixed.Allocation(chosen, 0.0, 0.0)
    rules = {r.pattern: r.bits for r in alloc.rules()}
    recipe = mixed.budget_recipe(RECIPE, alloc)
    assert recipe.bits_for("a[1].weight", "conv", 10) == 4
    assert recipe.bits_for("a1.weight", "conv", 10) is None  # '[1]' is not a character class
    assert recipe.bits_for("a*", "fc", 10) is None and len(rules) == 2


def test_uniform_candidates_become_step_rules():
    layer = mixed.LayerOptions(
        "w", 1000, [mixed.Candidate(mixed.FLOAT, 2000.0, 0.0), mixed.Candidate(8, 300.0, 0.01, 0.25)], 1.0
    )
    alloc = mixed.allocate([layer], 500.0)
    assert alloc.chosen["w"].step == 0.25 and alloc.table()[0]["bits"] == "u0.25"
    recipe = mixed.budget_recipe(RECIPE, alloc)
    assert recipe.step_for("w") == 0.25 and recipe.bits_for("w", "conv", 1000) == 8
    assert "w=u0.25" in recipe.describe()["rules"][0]


@pytest.fixture(scope="module")
def calibration() -> np.ndarray:
    files = calibrate.image_files([EXAMPLES])
    return calibrate.calibration_batch(files, TINY_PREPROCESS, crops=10)


def _tiny_budget(budget: int, calibration: np.ndarray):
    labels = plain_label_rows([f"c{i}" for i in range(TINY_CLASSES)])
    card = compression.ModelCard("tiny")
    return compression.compress_to_budget(
        make_tiny_onnx(),
        RECIPE,
        budget,
        preprocess=TINY_PREPROCESS,
        labels=labels,
        card=card,
        calibration=calibration,
        min_elements=64,
    )


def test_budgeted_model_fits_and_tighter_budgets_use_fewer_bits(calibration):
    loose_budget = len(
        kf.serialize(
            compression.compress_onnx(
                make_tiny_onnx(),
                replace(RECIPE, fc_bits=None, conv_bits=None),
                preprocess=TINY_PREPROCESS,
                labels=plain_label_rows([f"c{i}" for i in range(TINY_CLASSES)]),
                card=compression.ModelCard("tiny"),
            )
        )
    )
    tight_budget = loose_budget - 2048  # two pages less than keeping every weight at fp16
    model, alloc = _tiny_budget(tight_budget, calibration)
    assert len(kf.serialize(model)) <= tight_budget
    assert any(b != mixed.FLOAT for b in alloc.bits.values())
    assert set(alloc.bits) <= {t.name for t in model.tensors}
    # The allocation is what the file holds.
    stored = {t.name: t.bits for t in model.tensors}
    for name, bits in alloc.bits.items():
        assert stored[name] == bits


def test_impossible_budget_is_an_error(calibration):
    with pytest.raises(KlausModelError, match="cannot fit"):
        _tiny_budget(2000, calibration)


def test_cli_budget_needs_calibration(tmp_path, tiny_onnx_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"c{i}" for i in range(TINY_CLASSES)))
    result = CliRunner().invoke(
        main,
        [
            "compress",
            str(tiny_onnx_path),
            "-o",
            str(tmp_path / "b.klaus"),
            "--labels",
            str(names),
            "--budget-mib",
            "0.01",
        ],
        prog_name="klaus",
    )
    assert result.exit_code == 1
    assert "--calib" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _tiny_agreement(max_drop: float, calibration: np.ndarray):
    labels = plain_label_rows([f"c{i}" for i in range(TINY_CLASSES)])
    return compression.compress_to_agreement(
        make_tiny_onnx(),
        RECIPE,
        max_drop,
        preprocess=TINY_PREPROCESS,
        labels=labels,
        card=compression.ModelCard("tiny"),
        calibration=calibration,
    )


@pytest.fixture(scope="module")
def wide_calibration(calibration) -> np.ndarray:
    """120 inputs: the example crops and their mirror images (--max-drop holds out a fifth)."""
    return np.ascontiguousarray(np.concatenate([calibration, calibration[..., ::-1], calibration[..., ::-1, :]]))


def test_max_drop_finds_smaller_files_for_looser_limits(wide_calibration):
    calibration = wide_calibration
    strict, _, agree_strict = _tiny_agreement(0.0, calibration)
    loose, _, agree_loose = _tiny_agreement(30.0, calibration)
    assert agree_strict == 100.0 and agree_loose >= 70.0
    assert len(kf.serialize(loose)) <= len(kf.serialize(strict))
    # The reported agreement is what the held-out calibration inputs give with the built file.
    held = calibration[np.arange(len(calibration)) % budgeting.HOLDOUT_EVERY == budgeting.HOLDOUT_EVERY - 1]
    from klaus.runtime import make_session

    float_model = make_session(make_tiny_onnx())
    quant = make_session(onnxgraph.to_onnx(loose))
    ref = float_model.run(None, {"input": held})[0].argmax(1)
    got = quant.run(None, {"input": held})[0].argmax(1)
    assert np.mean(ref == got) * 100 == pytest.approx(agree_loose)


def test_max_drop_rejects_bad_values_and_too_few_inputs(calibration):
    with pytest.raises(KlausModelError, match="max-drop"):
        _tiny_agreement(-1.0, calibration)
    with pytest.raises(KlausModelError, match="at least"):
        _tiny_agreement(1.0, calibration[:20])


def test_cli_budget_and_max_drop_are_exclusive(tmp_path, tiny_onnx_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"c{i}" for i in range(TINY_CLASSES)))
    args = ["compress", str(tiny_onnx_path), "-o", str(tmp_path / "b.klaus"), "--labels", str(names)]
    both = CliRunner().invoke(
        main, [*args, "--budget-mib", "1", "--max-drop", "1", "--calib", str(EXAMPLES)], prog_name="klaus"
    )
    assert both.exit_code == 1 and "not both" in both.stderr
    nocal = CliRunner().invoke(main, [*args, "--max-drop", "1"], prog_name="klaus")
    assert nocal.exit_code == 1 and "--max-drop needs calibration" in nocal.stderr


@pytest.mark.parametrize("count,views", [(500, 1), (40, 10), (1000, 1), (6, 1), (43, 10)])
def test_probe_rows_hold_out_whole_photos(count, views):
    fit, probe = budgeting.probe_rows(count, views)
    assert probe.sum() <= budgeting.PROBE_INPUTS and probe.any()
    if fit.all():  # too few inputs to hold any out: every input does both jobs
        assert count < 2 * budgeting.PROBE_EVERY * views and probe.all()
        return
    assert not (fit & probe).any()  # probes never calibrate the tensors they measure
    step = views if count % views == 0 else 1
    photo = np.arange(count) // step
    assert set(photo[~fit]).isdisjoint(photo[fit])  # all crops of a held-out photo are held out
    assert len(set(photo[probe])) == probe.sum()  # one view per probed photo
    assert (~fit).sum() >= count // budgeting.PROBE_EVERY - step


def test_sensitivity_is_measured_on_the_probe_tensors(calibration):
    model = make_tiny_onnx()
    _, weights = onnxgraph.split_weights(model)
    roles = onnxgraph.tensor_roles(model)
    stats = calibrate.layer_statistics(
        model, calibration, {"pw.weight": calibrate.Reading(roles["pw.weight"].activation)}
    )

    def quantize(name, bits, step):
        return palettize(weights[name], bits, granularity="channel", axis=roles[name].out_axis, step=step)

    def probe_quantize(name, bits, step):
        return palettize(weights[name], 1, granularity="channel", axis=roles[name].out_axis)  # much coarser

    layers, probes = mixed.candidate_options(
        weights, roles, stats, ["pw.weight"], quantize, steps=mixed.DEFAULT_STEPS, probe_quantize=probe_quantize
    )
    layer = layers[0]
    np.testing.assert_array_equal(probes["pw.weight"], probe_quantize("pw.weight", 8, None).decode())
    own = layer.candidates[layer.probe]
    assert own.step == mixed.PROBE_STEP and layer.probe_proxy > 10 * own.proxy
    reference = np.full((3, 4), 0.25)
    measured = np.array([[0.4, 0.2, 0.2, 0.2]] * 3)
    mixed.measure_scales(layers, weights, probes, lambda ws: measured, reference)
    kl = float(np.sum(0.25 * (np.log(0.25) - np.log(measured[0]))))
    assert layer.scale == pytest.approx(kl / layer.probe_proxy)


class _FakeFit(budgeting.Search):
    """fit() against a stand-in build whose file size is the allocation's target plus a fixed error."""

    def __init__(self, error: float):
        self.layers, self.overhead, self.fitted, self.error = [], 0.0, None, error
        self.targets: list[float] = []

    def build(self, allocation, method=None):
        self.targets.append(allocation)
        self.fitted = ("pieces", allocation)
        return ("model", int(allocation + self.error))


@pytest.mark.parametrize("error", [-50_000.0, -3_000.0, 0.0, 20_000.0])
def test_budget_fit_fills_the_budget_and_never_exceeds_it(monkeypatch, error):
    monkeypatch.setattr(mixed, "allocate", lambda layers, target: target)
    monkeypatch.setattr(budgeting, "serialize", lambda model: b"x" * model[1])
    limit = 1_000_000
    search = _FakeFit(error)
    model, allocation = search.fit(limit)
    size = model[1]
    assert size <= limit
    assert search.fitted == ("pieces", allocation)  # the kept build's pieces, not the last one tried
    assert len(search.targets) <= budgeting.FIT_BUILDS + budgeting.FIT_REFINEMENTS
    slack = limit - size
    allowed = max(budgeting.FIT_SLACK * limit, budgeting.FIT_SLACK_PAGES * PAGE_SIZE)
    if -error > allowed:  # an underfull first build is grown until little is left unused
        assert slack < -error
        assert slack <= allowed or len(search.targets) == 1 + budgeting.FIT_REFINEMENTS
    elif error <= 0:  # close enough: one build
        assert len(search.targets) == 1 and slack == -error
    if error > 0:  # an overfull first build is shrunk
        assert len(search.targets) >= 2


def test_budget_fit_keeps_the_last_fitting_build_when_growing_overshoots(monkeypatch):
    monkeypatch.setattr(mixed, "allocate", lambda layers, target: target)
    sizes = iter([900_000, 1_200_000])  # fits with slack, then the grown allocation is too big

    class Jumpy(_FakeFit):
        def build(self, allocation, method=None):
            self.targets.append(allocation)
            self.fitted = ("pieces", allocation)
            return ("model", next(sizes))

    monkeypatch.setattr(budgeting, "serialize", lambda model: b"x" * model[1])
    search = Jumpy(0.0)
    model, allocation = search.fit(1_000_000)
    assert model[1] == 900_000 and search.fitted == ("pieces", allocation) and len(search.targets) == 2


def test_allocation_leaves_no_upgrade_that_would_still_fit():
    """The Lagrangian solution jumps by whole-layer steps; the fill spends what it leaves."""
    big = _layer("big", 100_000, 1.0)  # steps of 12.5 kB per bit
    small = [_layer(f"small{i}", 800, 50.0) for i in range(6)]  # steps of 100 B per bit
    layers = [big, *small]
    for target in (40_000.0, 47_000.0, 61_000.0, 75_500.0):
        alloc = mixed.allocate(layers, target)
        assert alloc.predicted_bytes <= target
        spare = target - alloc.predicted_bytes
        for layer in layers:
            now = alloc.chosen[layer.name]
            for c in layer.candidates:
                if c.proxy < now.proxy:  # every better candidate costs more than what is left
                    assert c.bytes - now.bytes > spare, (target, layer.name, c, now, spare)
    kls = [mixed.allocate(layers, b).predicted_kl for b in (40_000.0, 47_000.0, 61_000.0, 75_500.0)]
    assert kls == sorted(kls, reverse=True)


def test_output_error_of_a_depthwise_layer_uses_its_window_hessians():
    rng = np.random.default_rng(0)
    windows = rng.standard_normal((4, 9, 300))
    stats = calibrate.InputStats.empty(4, with_gram=False)
    stats.patch_gram, stats.patch_count = np.matmul(windows, windows.transpose(0, 2, 1)), 300
    stats.sumsq, stats.count = np.einsum("ckp,ckp->c", windows, windows) / 9, 300 * 9
    weight = rng.standard_normal((4, 1, 3, 3))
    approx = weight + 0.01 * rng.standard_normal(weight.shape)
    role = onnxgraph.TensorRole("depthwise", 0, "dw", op="Conv", activation="x", group=4)
    change = np.einsum("ck,ckp->cp", (approx - weight).reshape(4, 9), windows)  # every output's change
    assert mixed.output_error(weight, approx, role, stats) == pytest.approx(np.sum(change**2) / 300)
    stats.patch_gram = None  # without window statistics: the diagonal approximation
    assert mixed.output_error(weight, approx, role, stats) != pytest.approx(np.sum(change**2) / 300)
