"""Tests for the compression pipeline (klaus.compression: check, plan, quantize, write): ONNX -> .klaus on the tiny real classifier."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from PIL import Image

from conftest import (
    EXAMPLES,
    TINY_CLASSES,
    TINY_PREPROCESS,
    TINY_RECIPE,
    TINY_SIZE,
    feature_map_output,
    make_tiny_onnx,
    tiny_klaus,
)
from klaus import compression, format, onnxgraph
from klaus.compression import calibrate
from klaus.compression.check import check_classifier
from klaus.compression.plan import depthwise_windows
from klaus.compression.recipe import DEFAULT, LOSSLESS, Recipe, effective_recipe
from klaus.errors import KlausFormatError, KlausModelError
from klaus.labels import plain_label_rows

NAMES = [f"class {i}" for i in range(TINY_CLASSES)]
CARD = compression.ModelCard("tiny", "tests", "CC0-1.0", "klaus tests")


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)


def _smooth_images(n: int, seed: int) -> np.ndarray:
    """Natural-ish inputs: low-frequency noise upsampled bicubically to the model's input size."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((n, 3, 4, 4)).astype(np.float32)
    up = [
        np.stack([np.asarray(Image.fromarray(c).resize((TINY_SIZE, TINY_SIZE), Image.Resampling.BICUBIC)) for c in img])
        for img in coarse
    ]
    return (np.stack(up) * 0.6).astype(np.float32)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    batch = calibrate.load_calibration([EXAMPLES], TINY_PREPROCESS, crops=10)
    assert batch is not None
    return batch


def _compress(recipe: Recipe, calibration: np.ndarray | None = None, model: onnx.ModelProto | None = None):
    return compression.compress_onnx(
        model or make_tiny_onnx(),
        recipe,
        preprocess=TINY_PREPROCESS,
        labels=plain_label_rows(NAMES),
        card=CARD,
        calibration=calibration,
    )


# ---------------------------------------------------------------- lossless and lossy builds


def test_lossless_build_is_exact(photos, tmp_path):
    original = make_tiny_onnx()
    model = tiny_klaus(LOSSLESS)
    assert {t.codec for t in model.tensors} == {"raw-f32"}
    # Through the file, as a user would get it.
    path = tmp_path / "l.klaus"
    compression.write(model, path)
    rebuilt = onnxgraph.to_onnx(format.read_model(path))
    noise = np.random.default_rng(0).standard_normal((8, 3, TINY_SIZE, TINY_SIZE)).astype(np.float32)
    for x in (photos, noise):
        assert np.max(np.abs(_logits(rebuilt, x) - _logits(original, x))) < 1e-6
    originals = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    decoded = {t.name: onnx.numpy_helper.to_array(t) for t in rebuilt.graph.initializer}
    assert originals.keys() == decoded.keys()
    for name in originals:
        np.testing.assert_array_equal(decoded[name], originals[name])


def test_compressed_build_is_close(photos):
    original = make_tiny_onnx()
    model = tiny_klaus()
    bits = {t.name: (t.codec, t.bits) for t in model.tensors}
    assert bits == {
        "stem.weight": ("palette-png", 6),
        "dw.weight": ("palette-png", 6),
        "pw.weight": ("palette-png", 6),
        "fc.weight": ("palette-png", 4),
        "stem.bias": ("raw-f16", 0),
        "dw.bias": ("raw-f16", 0),
        "pw.bias": ("raw-f16", 0),
        "fc.bias": ("raw-f16", 0),
    }
    ref = _logits(original, photos)
    out = _logits(onnxgraph.to_onnx(model), photos)
    assert np.sqrt(np.mean((out - ref) ** 2)) < 0.2 * ref.std()
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= 0.9
    # ... but not identical: the weights really were palettized.
    assert np.max(np.abs(out - ref)) > 1e-4


def test_compressed_metadata():
    model = tiny_klaus()
    assert model.meta["model_name"] == "tiny"
    assert model.meta["output"] == "logits"
    assert model.meta["calibration_inputs"] == "0"
    assert json.loads(model.meta["recipe"]) == TINY_RECIPE.describe()
    assert model.preprocess == TINY_PREPROCESS
    assert [r.name for r in model.labels] == NAMES
    # The skeleton holds no weights.
    skeleton = onnx.ModelProto()
    skeleton.ParseFromString(model.graph)
    assert len(skeleton.graph.initializer) == 0


def test_compression_is_deterministic():
    assert format.serialize(tiny_klaus()) == format.serialize(tiny_klaus())


def test_recompress_from_lossless(tiny_lossless_path):
    lossless = format.read_model(tiny_lossless_path)
    again = compression.recompress(lossless, TINY_RECIPE)
    direct = tiny_klaus()
    # Lossless decoding is exact, so recompressing equals compressing the ONNX file.
    assert again.tensors == direct.tensors
    assert again.labels == lossless.labels and again.preprocess == lossless.preprocess
    assert again.meta["model_name"] == lossless.meta["model_name"] == "tiny"
    assert again.meta["license"] == "CC0-1.0"
    assert json.loads(again.meta["recipe"])["name"] == "tiny"
    assert format.serialize(again) == format.serialize(direct)


def test_recompress_with_calibration(tiny_lossless_path, photos):
    lossless = format.read_model(tiny_lossless_path)
    model = compression.recompress(lossless, TINY_RECIPE.with_bits(method="gptq"), calibration=photos)
    assert model.meta["calibration_inputs"] == str(photos.shape[0])
    assert json.loads(model.meta["recipe"])["method"] == "gptq"


# ---------------------------------------------------------------- calibration: GPTQ and bias correction


def _rms_error(model, x, ref):
    return float(np.sqrt(np.mean((_logits(onnxgraph.to_onnx(model), x) - ref) ** 2)))


def _bits_recipe(bits: int, method: Literal["kmeans", "gptq"] = "kmeans") -> Recipe:
    return Recipe(name="t", fc_bits=bits, conv_bits=bits, depthwise_bits=None, min_elements=64, method=method)


@pytest.fixture(scope="module")
def smooth_sets() -> tuple[np.ndarray, np.ndarray]:
    return _smooth_images(200, seed=0), _smooth_images(100, seed=1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_plain_kmeans_on_held_out_inputs(smooth_sets, bits):
    calibration, held_out = smooth_sets
    ref = _logits(make_tiny_onnx(), held_out)
    plain = _compress(_bits_recipe(bits))  # no calibration: plain k-means, no bias correction
    gptq = _compress(_bits_recipe(bits, "gptq"), calibration)
    assert json.loads(gptq.meta["recipe"])["method"] == "gptq"
    assert json.loads(plain.meta["recipe"])["method"] == "kmeans"
    assert gptq.meta["calibration_inputs"] == "200"
    # Same bits, same palettized tensors; only palettes, rounding and biases differ.
    assert [(t.name, t.codec, t.bits) for t in gptq.tensors] == [(t.name, t.codec, t.bits) for t in plain.tensors]
    err_plain = _rms_error(plain, held_out, ref)
    err_gptq = _rms_error(gptq, held_out, ref)
    assert err_gptq < 0.6 * err_plain, (err_gptq, err_plain)


def _random_crops(path, n: int, seed: int) -> np.ndarray:
    """Model inputs from random square crops (20-90 % of the shorter side, some mirrored) of one photo."""
    rng = np.random.default_rng(seed)
    with Image.open(path) as opened:
        img = opened.convert("RGB")
    patches = []
    for _ in range(n):
        side = int(rng.uniform(0.2, 0.9) * min(img.size))
        x, y = int(rng.integers(0, img.width - side + 1)), int(rng.integers(0, img.height - side + 1))
        patch = img.crop((x, y, x + side, y + side)).resize((TINY_SIZE, TINY_SIZE), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        patches.append(np.asarray(patch, dtype=np.float32))
    batch = (np.stack(patches) - np.float32(127.0)) / np.float32(128.0)  # TINY_PREPROCESS normalization
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def photo_crops() -> list[np.ndarray]:
    files = sorted(EXAMPLES.glob("*.jpg"))
    assert [f.name for f in files] == ["astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg"]
    return [_random_crops(f, 60, seed) for seed, f in enumerate(files)]


def _held_out_error(photo_crops, held_out: int, recipe: Recipe, calibrated: bool) -> float:
    calibration = np.concatenate([c for i, c in enumerate(photo_crops) if i != held_out])
    test = photo_crops[held_out]
    model = _compress(recipe, calibration if calibrated else None)
    return _rms_error(model, test, _logits(make_tiny_onnx(), test))


def test_gptq_beats_plain_kmeans_on_a_held_out_photo(photo_crops):
    """Calibrate on crops of three example photos, measure on crops of the fourth (each in turn).

    Measured error ratios (GPTQ / plain) are 0.23-0.60; the shrunk Hessian
    (calibrate.InputStats.hessian) costs the random-weight tiny model's FC layer a
    little (worst ratio 0.56 -> 0.60) while it helps real networks.
    """
    ratios = []
    for held_out in range(len(photo_crops)):
        err_plain = _held_out_error(photo_crops, held_out, _bits_recipe(3), calibrated=False)
        err_gptq = _held_out_error(photo_crops, held_out, _bits_recipe(3, "gptq"), calibrated=True)
        ratios.append(err_gptq / err_plain)
    assert max(ratios) < 0.7 and np.mean(ratios) < 0.45, ratios


def test_gptq_beats_calibrated_kmeans(smooth_sets, photo_crops):
    """Same calibration for both: GPTQ's Hessian-aware rounding is what makes the difference."""
    calibration, held_out = smooth_sets
    ref = _logits(make_tiny_onnx(), held_out)
    err_kmeans = _rms_error(_compress(_bits_recipe(3), calibration), held_out, ref)
    err_gptq = _rms_error(_compress(_bits_recipe(3, "gptq"), calibration), held_out, ref)
    assert err_gptq < err_kmeans, (err_gptq, err_kmeans)
    # Averaged over the four held-out photos as well.
    kmeans = np.mean([_held_out_error(photo_crops, i, _bits_recipe(3), True) for i in range(4)])
    gptq = np.mean([_held_out_error(photo_crops, i, _bits_recipe(3, "gptq"), True) for i in range(4)])
    assert gptq < kmeans, (gptq, kmeans)


def test_depthwise_windows():
    model = make_tiny_onnx()
    roles = onnxgraph.tensor_roles(model)
    _, floats = onnxgraph.split_weights(model)
    shapes = {n: w.shape for n, w in floats.items()}
    assert depthwise_windows(model, roles, shapes) == {
        "dw.weight": calibrate.Window((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    }
    dw = next(n for n in model.graph.node if n.output[0] == "d")
    dw.attribute.append(onnx.helper.make_attribute("auto_pad", "SAME_UPPER"))
    assert depthwise_windows(model, roles, shapes) == {}  # no explicit window: weighted rounding instead


def test_gptq_on_the_depthwise_layer(smooth_sets):
    """Only the depthwise layer palettized (3 bits), same calibration: per-channel GPTQ on its input
    windows changes its rounding and beats weighted k-means on held-out inputs."""
    calibration, held_out = smooth_sets
    ref = _logits(make_tiny_onnx(), held_out)
    recipe = Recipe(name="t", fc_bits=None, conv_bits=None, depthwise_bits=3, min_elements=64)
    kmeans = _compress(recipe, calibration)
    gptq = _compress(replace(recipe, method="gptq"), calibration)
    names = lambda m: [t.name for t in m.tensors if t.codec == "palette-png"]  # noqa: E731
    assert names(kmeans) == names(gptq) == ["dw.weight"]
    err_kmeans, err_gptq = _rms_error(kmeans, held_out, ref), _rms_error(gptq, held_out, ref)
    assert err_gptq < 0.8 * err_kmeans, (err_gptq, err_kmeans)


def test_bias_correction_uses_float_input_means(photos):
    """Calibrated biases = float biases minus the mean output shift the palettized weights cause."""
    original = make_tiny_onnx()
    _, floats = onnxgraph.split_weights(original)
    model = _compress(TINY_RECIPE, photos)
    assert model.meta["calibration_inputs"] == "40"
    decoded = model.decoded_weights()
    stats = calibrate.input_statistics(original, photos, ["f", "d_act"])
    fc_shift = (decoded["fc.weight"].astype(np.float64) - floats["fc.weight"]) @ stats["f"].mean
    pw_delta = decoded["pw.weight"][:, :, 0, 0].astype(np.float64) - floats["pw.weight"][:, :, 0, 0]
    pw_shift = pw_delta @ stats["d_act"].mean
    assert np.abs(fc_shift).max() > 1e-3 and np.abs(pw_shift).max() > 1e-3  # something to correct
    # Biases are stored as fp16: allow its rounding.
    np.testing.assert_allclose(decoded["fc.bias"], floats["fc.bias"] - fc_shift, atol=3e-4)
    np.testing.assert_allclose(decoded["pw.bias"], floats["pw.bias"] - pw_shift, atol=3e-4)
    # Without calibration the biases are just the float ones (in fp16).
    plain = _compress(TINY_RECIPE).decoded_weights()
    np.testing.assert_allclose(plain["fc.bias"], floats["fc.bias"], atol=3e-4)


def test_effective_recipe():
    gptq = Recipe(method="gptq", fc_bits=3)
    fallback = effective_recipe(gptq, calibrated=False)
    assert fallback.method == "kmeans" and fallback.fc_bits == 3
    assert effective_recipe(gptq, calibrated=True) is gptq
    assert effective_recipe(TINY_RECIPE, calibrated=False) is TINY_RECIPE
    # The default recipe without calibration runs (and records) plain k-means.
    model = _compress(DEFAULT.with_bits(min_elements=64))
    assert json.loads(model.meta["recipe"])["method"] == "kmeans"


# ---------------------------------------------------------------- labels and sources


def test_default_labels():
    tiny = make_tiny_onnx()
    with pytest.raises(KlausModelError, match=r"10 outputs.*--labels"):
        onnxgraph.default_labels(tiny)
    rows = onnxgraph.default_labels(tiny, NAMES)
    assert [(r.index, r.name, r.wnid) for r in rows] == [(i, n, "") for i, n in enumerate(NAMES)]
    imagenet = onnxgraph.default_labels(make_tiny_onnx(classes=1000))
    assert len(imagenet) == 1000
    assert [r.index for r in imagenet] == list(range(1000))
    assert imagenet[0].wnid == "n01440764" and imagenet[281].name == "tabby"
    assert imagenet[281].hierarchy[0] == "entity" and imagenet[281].hierarchy[-1] == "tabby"


@pytest.mark.parametrize("count", [3, TINY_CLASSES + 1])
def test_default_labels_must_match_the_outputs(count):
    """A names file with the wrong number of lines would misname or leave classes unnamed."""
    with pytest.raises(KlausModelError, match=str(count)):
        onnxgraph.default_labels(make_tiny_onnx(), [f"n{i}" for i in range(count)])


def test_default_labels_unknown_width():
    model = make_tiny_onnx()
    dims = model.graph.output[0].type.tensor_type.shape.dim
    dims[1].dim_param = "classes"
    assert onnxgraph.output_classes(model) is None
    with pytest.raises(KlausModelError, match="unknown number"):
        onnxgraph.default_labels(model)


def test_load_source_tells_formats_apart(tmp_path, tiny_klaus_path, tiny_onnx_path):
    assert isinstance(compression.load_source(tiny_klaus_path), format.KlausModel)
    assert isinstance(compression.load_source(tiny_onnx_path), onnx.ModelProto)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01this is not a protobuf" * 10)
    with pytest.raises(KlausModelError):
        compression.load_source(garbage)
    corrupt = tmp_path / "corrupt.klaus"
    corrupt.write_bytes(tiny_klaus_path.read_bytes()[:3000])
    with pytest.raises(KlausFormatError):
        compression.load_source(corrupt)


def test_custom_operator_domains_are_refused():
    model = make_tiny_onnx()
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(KlausFormatError, match=r"com\.microsoft"):
        _compress(TINY_RECIPE, model=model)


def test_preprocess_must_fit_the_graph_input():
    """A 224-px preprocessing for a graph whose input is a static 32x32 makes a file that can never run."""
    from klaus.preprocess import Preprocess

    with pytest.raises(KlausModelError, match="224"):
        compression.compress_onnx(
            make_tiny_onnx(),
            TINY_RECIPE,
            preprocess=Preprocess(input_size=224),
            labels=plain_label_rows(NAMES),
            card=CARD,
        )
    # A symbolic (dynamic) spatial size accepts any preprocessing.
    dynamic = make_tiny_onnx()
    for d in dynamic.graph.input[0].type.tensor_type.shape.dim[2:]:
        d.dim_param = "side"
    _compress(TINY_RECIPE, model=dynamic)


def test_duplicate_label_names_never_make_an_unreadable_file(tmp_path):
    """The reader requires unique label names; compress must refuse duplicates or write a file that reads back."""
    from klaus.errors import KlausError

    path = tmp_path / "dup.klaus"
    try:
        model = compression.compress_onnx(
            make_tiny_onnx(),
            TINY_RECIPE,
            preprocess=TINY_PREPROCESS,
            labels=plain_label_rows(["same"] * TINY_CLASSES),
            card=CARD,
        )
        compression.write(model, path)
    except KlausError:
        assert not path.exists()
        return
    assert len(format.read_model(path).labels) == TINY_CLASSES


# ---------------------------------------------------------------- what a source must be (check_classifier)


def _variant(change) -> onnx.ModelProto:
    model = make_tiny_onnx()
    change(model)
    return model


def _set_weight(name: str, index: tuple, value: float):
    def change(model: onnx.ModelProto) -> None:
        init = next(t for t in model.graph.initializer if t.name == name)
        array = onnx.numpy_helper.to_array(init).copy()
        array[index] = value
        init.CopyFrom(onnx.numpy_helper.from_array(array, name))

    return change


def _nan_constant(model: onnx.ModelProto) -> None:
    """A NaN hidden in a Constant node (what --no-simplify keeps in the graph)."""
    shift = helper.make_node(
        "Constant", [], ["shift"], value=onnx.numpy_helper.from_array(np.array([np.nan], np.float32))
    )
    add = helper.make_node("Add", ["logits_raw", "shift"], ["logits"])
    model.graph.node[-1].output[0] = "logits_raw"
    model.graph.node.extend([shift, add])


@pytest.mark.parametrize(
    "change,error,fragment",
    [
        (lambda m: m.graph.node[3].input.__setitem__(0, "nowhere"), KlausFormatError, "ONNX graph is invalid"),
        (_set_weight("fc.weight", (0, 0), np.nan), KlausModelError, "'fc.weight' holds NaN"),
        (_set_weight("dw.weight", (0, 0, 1, 1), -np.inf), KlausModelError, "'dw.weight' holds NaN or infinite"),
        (_nan_constant, KlausModelError, "Constant node 'shift' holds NaN"),
        (feature_map_output, KlausModelError, "(?, 64, 16, 16), not (N, classes)"),
        (
            lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", onnx.TensorProto.STRING),
            KlausModelError,
            "string tensor",
        ),
        (
            lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type", onnx.TensorProto.FLOAT16),
            KlausModelError,
            "float16 tensor, not a float32 image",
        ),
        (
            lambda m: m.graph.input.append(helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, [1])),
            KlausModelError,
            "2 inputs ('input', 'mask')",
        ),
        (
            lambda m: m.graph.input[0].type.tensor_type.shape.dim[1].__setattr__("dim_value", 1),
            KlausModelError,
            "(?, 1, 32, 32), not an image tensor (N, 3, H, W)",
        ),
        (
            lambda m: m.graph.output.append(
                helper.make_tensor_value_info("s_act", onnx.TensorProto.FLOAT, ["b", 16, 16, 16])
            ),
            KlausModelError,
            "2 outputs",
        ),
    ],
)
def test_check_classifier_refuses(change, error, fragment):
    model = _variant(change)
    with pytest.raises(error) as info:
        check_classifier(model, classes=TINY_CLASSES, where="src.onnx")
    assert str(info.value).startswith("src.onnx: ") and fragment in str(info.value)
    assert "\n" not in str(info.value)
    # compress_onnx refuses it the same way (named after the model card there), before any work.
    with pytest.raises(error, match=re.escape(fragment)):
        _compress(TINY_RECIPE, model=model)


def test_weights_beyond_fp16_are_refused_unless_stored_as_fp32():
    """A weight beyond fp16's range would turn infinite in an fp16 palette or tensor: refused up front, in one line."""
    model = _variant(_set_weight("fc.weight", (0, 0), 1e6))
    with pytest.raises(
        KlausModelError, match=r"^tiny: weight 'fc.weight' holds values up to 1e\+06, beyond the ±65504 "
    ):
        _compress(TINY_RECIPE, model=model)
    with pytest.raises(KlausModelError, match="only --lossless"):  # palettized, though leftovers are fp32
        _compress(replace(LOSSLESS, fc_bits=4, min_elements=64), model=model)
    kept = _compress(replace(LOSSLESS, conv_bits=6, min_elements=64), model=model)  # fc stays fp32
    assert {t.name: t.codec for t in kept.tensors}["fc.weight"] == "raw-f32"
    exact = onnxgraph.to_onnx(_compress(LOSSLESS, model=model))
    assert onnx.numpy_helper.to_array(next(t for t in exact.graph.initializer if t.name == "fc.weight"))[0, 0] == 1e6


def test_check_classifier_accepts_what_it_cannot_know():
    check_classifier(make_tiny_onnx(), classes=TINY_CLASSES, where="x")
    # symbolic dimensions everywhere
    model = make_tiny_onnx()
    for d in [*model.graph.input[0].type.tensor_type.shape.dim, *model.graph.output[0].type.tensor_type.shape.dim]:
        d.dim_param = "n"
    check_classifier(model, classes=TINY_CLASSES, where="x")
    # a known class count must match the labels
    with pytest.raises(KlausModelError, match="10 classes but there are 3 labels"):
        check_classifier(make_tiny_onnx(), classes=3, where="x")


def test_check_classifier_layout_hint():
    model = make_tiny_onnx()  # NCHW (N, 3, 32, 32)
    with pytest.raises(
        KlausModelError, match=r"not an image tensor \(N, H, W, 3\) \(for NCHW input use --layout NCHW\)"
    ):
        check_classifier(model, layout="NHWC", where="x")


def test_default_labels_name_the_file():
    with pytest.raises(KlausModelError, match=r"^m\.onnx: the model has 10 outputs"):
        onnxgraph.default_labels(make_tiny_onnx(), where="m.onnx")
    with pytest.raises(KlausModelError, match=r"^m\.onnx: the labels file has 3 names"):
        onnxgraph.default_labels(make_tiny_onnx(), ["a", "b", "c"], where="m.onnx")


def test_graph_input_size_without_inputs_and_with_listed_initializers():
    model = make_tiny_onnx()
    assert onnxgraph.graph_input_size(model) == TINY_SIZE
    # IR < 4 style: initializers listed as graph inputs, before the image
    listed = make_tiny_onnx()
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in listed.graph.initializer]
    image = listed.graph.input[0]
    del listed.graph.input[:]
    listed.graph.input.extend([*weights, image])
    assert onnxgraph.graph_input_size(listed) == TINY_SIZE
    assert [i.name for i in onnxgraph.data_inputs(listed)] == ["input"]
    check_classifier(listed, classes=TINY_CLASSES, where="x")
    del model.graph.input[:]
    assert onnxgraph.graph_input_size(model) is None


# ---------------------------------------------------------------- graphs with a fixed batch size


def _fixed_batch_tiny(batch: int) -> onnx.ModelProto:
    model = make_tiny_onnx()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    return model


def _same_weights(a: format.KlausModel, b: format.KlausModel) -> None:
    assert [(t.name, t.codec, t.bits) for t in a.tensors] == [(t.name, t.codec, t.bits) for t in b.tensors]
    wa, wb = a.decoded_weights(), b.decoded_weights()
    for name in wa:
        np.testing.assert_allclose(wa[name], wb[name], atol=1e-3, err_msg=name)


def test_agreement_search_on_a_fixed_batch_graph():
    """--max-drop runs the calibration inputs through the graph (statistics, sensitivity probes,
    agreement on held-out inputs): a graph that takes exactly 3 rows gets them 3 at a time."""
    calibration = _smooth_images(101, 5)  # not a multiple of 3: the last batch is padded
    kwargs = dict(
        preprocess=TINY_PREPROCESS, labels=plain_label_rows(NAMES), card=CARD, calibration=calibration, min_elements=64
    )
    fixed, fixed_allocation, fixed_agree = compression.compress_to_agreement(
        _fixed_batch_tiny(3), DEFAULT, 5.0, **kwargs
    )
    free, free_allocation, free_agree = compression.compress_to_agreement(make_tiny_onnx(), DEFAULT, 5.0, **kwargs)
    assert fixed_agree == free_agree
    rows = (
        [(r.pop("predicted_kl"), r) for r in fixed_allocation.table()],
        [(r.pop("predicted_kl"), r) for r in free_allocation.table()],
    )
    assert [r for _, r in rows[0]] == [r for _, r in rows[1]]
    np.testing.assert_allclose([kl for kl, _ in rows[0]], [kl for kl, _ in rows[1]], rtol=1e-5)
    _same_weights(fixed, free)
    graph = onnx.ModelProto.FromString(fixed.graph)  # the user's graph, batch still fixed
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3


def test_finetuning_a_fixed_batch_graph(photos):
    pytest.importorskip("torch", reason="fine-tuning needs the convert extra (torch)")
    recipe = replace(DEFAULT, min_elements=64, finetune_steps=3)
    fixed = _compress(recipe, photos[:13], _fixed_batch_tiny(1))
    _same_weights(fixed, _compress(recipe, photos[:13]))
