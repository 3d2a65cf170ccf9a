"""Tests for klaus.preprocess (the spec, resizing, crops and tensors), all on synthetic images written to tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import klaus.preprocess as kp
from conftest import noise_image, save_image
from klaus.errors import KlausFormatError
from klaus.images import load_image
from klaus.preprocess import Preprocess, crop_boxes, prepare, resized_size, to_tensor

RED = (255, 0, 0)


# --------------------------------------------------------------------------
# Preprocess spec


def test_defaults_are_efficientnet_lite() -> None:
    spec = Preprocess()
    assert (spec.input_size, spec.resize_side) == (224, 256)
    assert spec.mean == (127.0, 127.0, 127.0) and spec.std == (128.0, 128.0, 128.0)
    assert spec.resample == Image.Resampling.BICUBIC


def test_to_dict_round_trips_through_json() -> None:
    spec = Preprocess(
        input_size=300,
        resize="stretch",
        crop_ratio=0.9,
        interpolation="lanczos",
        mean=(104, 117, 123),
        std=(1, 1, 1),
        channel_order="BGR",
        layout="NHWC",
    )
    d = json.loads(json.dumps(spec.to_dict()))
    assert Preprocess.from_dict(d) == spec
    assert Preprocess.from_dict(Preprocess().to_dict()) == Preprocess()
    assert Preprocess.from_dict({}) == Preprocess()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("input_size", -224),
        ("input_size", 0),
        ("input_size", 224.0),
        ("input_size", True),
        ("input_size", "224"),
        ("input_size", 10**9),
        ("resize", "longer"),
        ("crop_ratio", 0),
        ("crop_ratio", 1.5),
        ("crop_ratio", float("nan")),
        ("crop_ratio", "0.875"),
        ("crop_ratio", 10**400),
        ("interpolation", "cubic"),
        ("interpolation", None),
        ("mean", [127, 127]),
        ("mean", [127, 127, 127, 127]),
        ("mean", "abc"),
        ("mean", ["a", "b", "c"]),
        ("mean", [127, float("inf"), 127]),
        ("mean", 127),
        ("std", [128, 0, 128]),
        ("std", [128, -1, 128]),
        ("channel_order", "rgb"),
        ("layout", "CHW"),
    ],
)
def test_from_dict_rejects_bad_field(field: str, value: object) -> None:
    d = Preprocess().to_dict()
    d[field] = value
    with pytest.raises(KlausFormatError, match=field):
        Preprocess.from_dict(d)


def test_from_dict_rejects_unknown_field_and_non_mapping() -> None:
    with pytest.raises(KlausFormatError, match="input_sise"):
        Preprocess.from_dict({"input_sise": 224})
    with pytest.raises(KlausFormatError, match="expected an object"):
        Preprocess.from_dict([224])


def test_direct_construction_validates_with_value_error() -> None:
    with pytest.raises(ValueError, match="input_size"):
        Preprocess(input_size=-1)


# --------------------------------------------------------------------------
# Tensor shapes, normalization, crops


@pytest.mark.parametrize("crops", [1, 10])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_tensor_shape_and_dtype(crops: int, layout: str) -> None:
    spec = Preprocess(layout=layout)
    x = to_tensor(noise_image(640, 480), spec, crops)
    expected = (crops, 3, 224, 224) if layout == "NCHW" else (crops, 224, 224, 3)
    assert x.shape == expected
    assert x.dtype == np.float32
    assert x.flags.c_contiguous


def test_constant_127_normalizes_to_zero() -> None:
    img = Image.new("RGB", (300, 200), (127, 127, 127))
    x = to_tensor(img, Preprocess(), crops=10)
    assert np.all(x == 0.0)
    white = to_tensor(Image.new("RGB", (300, 200), (255, 255, 255)), Preprocess())
    np.testing.assert_allclose(white, 1.0)  # (255 - 127) / 128


def test_bgr_order_and_per_channel_mean_std() -> None:
    spec = Preprocess(mean=(30.0, 20.0, 10.0), std=(1.0, 2.0, 4.0), channel_order="BGR")
    x = to_tensor(Image.new("RGB", (256, 256), (10, 20, 30)), spec)
    # tensor channels are B, G, R; mean/std are listed in that order too
    np.testing.assert_allclose(x[0, :, 0, 0], [(30 - 30) / 1, (20 - 20) / 2, (10 - 10) / 4])
    spec = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), channel_order="BGR", layout="NHWC")
    np.testing.assert_array_equal(to_tensor(Image.new("RGB", (256, 256), (10, 20, 30)), spec)[0, 5, 5], [30, 20, 10])


def test_invalid_crops() -> None:
    with pytest.raises(ValueError, match="crops"):
        to_tensor(noise_image(300, 300), Preprocess(), crops=5)
    with pytest.raises(ValueError, match="crops"):
        crop_boxes(300, 300, Preprocess(), crops=0)


def test_resized_size_rules() -> None:
    spec = Preprocess()
    assert resized_size(640, 480, spec) == (341, 256)
    assert resized_size(480, 640, spec) == (256, 341)
    assert resized_size(100, 100, spec) == (256, 256)
    stretch = Preprocess(resize="stretch")
    assert resized_size(640, 480, stretch) == (224, 224)
    assert crop_boxes(640, 480, stretch) == [(0, 0, 224, 224)]


def test_ten_crops_of_asymmetric_image() -> None:
    # 14x10 image with resize_side 10 -> no resampling, so crops are exact slices.
    spec = Preprocess(
        input_size=8, crop_ratio=0.8, interpolation="nearest", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), layout="NHWC"
    )
    yy, xx = np.mgrid[0:10, 0:14]
    arr = np.stack([xx * 10, yy * 20, (xx + yy) % 7], axis=-1).astype(np.uint8)
    boxes = crop_boxes(14, 10, spec, crops=10)
    tl, tr, bl, br, center = (0, 0, 8, 8), (6, 0, 14, 8), (0, 2, 8, 10), (6, 2, 14, 10), (3, 1, 11, 9)
    assert boxes == [tl, tr, bl, br, center] * 2
    x = to_tensor(Image.fromarray(arr), spec, crops=10)
    for i, (left, top, right, bottom) in enumerate(boxes):
        expected = arr[top:bottom, left:right]
        if i >= 5:
            expected = expected[:, ::-1]
        np.testing.assert_array_equal(x[i], expected, err_msg=f"crop {i}")
    single = to_tensor(Image.fromarray(arr), spec, crops=1)
    np.testing.assert_array_equal(single[0], arr[1:9, 3:11])


@pytest.mark.parametrize("size", [(640, 480), (333, 500)])
def test_ten_crops_equal_resize_then_crop(size: tuple[int, int]) -> None:
    img = noise_image(*size)
    spec = Preprocess(layout="NHWC")
    full = np.asarray(img.resize(resized_size(*size, spec, 10), Image.Resampling.BICUBIC))
    expected = []
    for i, (left, top, right, bottom) in enumerate(crop_boxes(*size, spec, 10)):
        patch = full[top:bottom, left:right]
        expected.append(patch[:, ::-1] if i >= 5 else patch)
    np.testing.assert_array_equal(to_tensor(img, spec, 10), (np.stack(expected) - 127.0) / 128.0)


def _resize_then_crop(img: Image.Image, spec: Preprocess) -> np.ndarray:
    left, top, right, bottom = crop_boxes(img.width, img.height, spec)[0]
    full = img.resize(resized_size(img.width, img.height, spec), spec.resample)
    return np.asarray(full)[top:bottom, left:right]


# Landscape, portrait, tall enough that Pillow 13 resizes columns first (320 x 685),
# panoramas both ways, upsampling (120 x 90), one axis unscaled (300 x 256, 256 x 300).
WINDOW_SIZES = [
    (640, 480),
    (500, 375),
    (500, 333),
    (333, 500),
    (375, 500),
    (320, 685),
    (1000, 200),
    (200, 1000),
    (120, 90),
    (300, 256),
    (256, 300),
    (257, 999),
]


@pytest.mark.parametrize("size", WINDOW_SIZES)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "lanczos", "hamming"])
def test_one_crop_is_resize_then_crop_within_one_level(size: tuple[int, int], interpolation: str) -> None:
    """The single center crop resamples only its window: the same pixels as resizing the
    whole image then cropping, but for a rare rounding difference of one level."""
    img = noise_image(*size, seed=size[0])
    spec = Preprocess(interpolation=interpolation)
    expected = _resize_then_crop(img, spec)
    got = kp.to_pixels(img, spec)
    assert got.shape == (1, 224, 224, 3) and got.dtype == np.uint8
    diff = np.abs(got[0].astype(int) - expected)
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= 0.01 * diff.size  # rounding, not a shifted sampling grid


def test_one_crop_is_exact_when_the_scale_is_a_binary_fraction() -> None:
    # 640 x 480 -> 341 x 256: the vertical scale 1.875 is exact in float32, so is the window
    img = noise_image(640, 480, seed=3)
    np.testing.assert_array_equal(kp.to_pixels(img, Preprocess())[0], _resize_then_crop(img, Preprocess()))


def test_one_crop_of_a_real_photo_matches_closely(tmp_path: Path) -> None:
    photo = load_image(Path(__file__).resolve().parents[1] / "examples" / "cat.jpg", target=256)
    for spec in (Preprocess(), Preprocess(input_size=160, crop_ratio=0.9)):
        diff = np.abs(kp.to_pixels(photo, spec)[0].astype(int) - _resize_then_crop(photo, spec))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= 0.001 * diff.size


def test_pillow_pass_order_is_known_and_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    rule = kp._pillow_vertical_first()
    assert rule is not None, "this Pillow orders its resize passes in an unknown way: one-crop windows are slow"
    # An unknown order falls back to resizing the whole image: exactly resize-then-crop.
    monkeypatch.setattr(kp, "_pillow_vertical_first", lambda: None)
    img = noise_image(333, 500)
    np.testing.assert_array_equal(kp.to_pixels(img, Preprocess())[0], _resize_then_crop(img, Preprocess()))


@pytest.mark.parametrize("interpolation", ["nearest", "box"])
def test_one_crop_with_a_step_filter_resizes_the_whole_image(interpolation: str) -> None:
    img = noise_image(333, 500)
    spec = Preprocess(interpolation=interpolation)
    np.testing.assert_array_equal(kp.to_pixels(img, spec)[0], _resize_then_crop(img, spec))


@pytest.mark.parametrize("order", ["RGB", "BGR"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_normalize_is_the_float_formula_bit_for_bit(order: str, layout: str) -> None:
    pixels = np.random.default_rng(5).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    spec = Preprocess(mean=(123.7, 116.3, 103.5), std=(58.4, 57.1, 57.4), channel_order=order, layout=layout)
    x: np.ndarray = pixels.astype(np.float32)
    if order == "BGR":
        x = x[..., ::-1]
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    got = kp.normalize(pixels, spec)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, x)
    out = np.full(got.shape, np.nan, np.float32)
    assert kp.normalize(pixels, spec, out=out) is out
    np.testing.assert_array_equal(out, x)
    with pytest.raises(ValueError, match="out must be"):
        kp.normalize(pixels, spec, out=np.empty((1, 2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="pixels must be"):
        kp.normalize(pixels[0], spec)


@pytest.mark.parametrize("crops", [1, 10])
def test_to_tensor_is_normalized_pixels(crops: int) -> None:
    img, spec = noise_image(400, 300), Preprocess()
    np.testing.assert_array_equal(to_tensor(img, spec, crops), kp.normalize(kp.to_pixels(img, spec, crops), spec))


@pytest.mark.parametrize("crops", [1, 10])
@pytest.mark.parametrize("size", [(200_000, 2), (2, 200_000)])
def test_extreme_aspect_ratio_does_not_blow_up(size: tuple[int, int], crops: int) -> None:
    strip = Image.new("RGB", size, (10, 20, 30))  # would be 25.6 Gpx resized whole
    x = to_tensor(strip, Preprocess(layout="NHWC"), crops=crops)
    assert x.shape == (crops, 224, 224, 3)
    np.testing.assert_allclose(x * 128 + 127, np.broadcast_to([10, 20, 30], x.shape), atol=1e-4)


def test_one_crop_of_a_strip_never_makes_a_huge_first_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    made = []
    resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        made.append(size[0] * size[1])
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    to_tensor(Image.new("RGB", (200_000, 2), (10, 20, 30)), Preprocess())
    assert made and max(made) <= kp.MAX_RESIZED_PIXELS


def test_window_resampling_fallback_matches_closely(monkeypatch: pytest.MonkeyPatch) -> None:
    img = noise_image(640, 480)
    exact = to_tensor(img, Preprocess(), crops=10)
    monkeypatch.setattr(kp, "MAX_RESIZED_PIXELS", 1)
    approx = to_tensor(img, Preprocess(), crops=10)
    assert np.abs(exact - approx).max() * 128 <= 2


def test_stretch_fills_input() -> None:
    img = Image.new("RGB", (400, 100), RED)
    img.paste((0, 0, 255), (0, 0, 100, 100))  # blue left quarter survives a stretch, not a crop
    x = to_tensor(img, Preprocess(resize="stretch", layout="NHWC"))
    assert x[0, 112, 10, 2] > 0.9 and x[0, 112, 200, 0] > 0.9


def test_to_tensor_accepts_non_rgb_image() -> None:
    x = to_tensor(Image.new("L", (300, 300), 127), Preprocess())
    assert np.all(x == 0.0)


@pytest.mark.parametrize("size", [(4000, 3000), (300, 4001), (2100, 2100)])
def test_prepare_with_draft(tmp_path: Path, size: tuple[int, int]) -> None:
    p = save_image(noise_image(*size), tmp_path / "x.jpg")
    x = prepare(p, Preprocess(), crops=10)
    assert x.shape == (10, 3, 224, 224) and x.dtype == np.float32
    np.testing.assert_array_equal(x, prepare(p, Preprocess(), crops=10))  # deterministic
