"""Tests for klaus.preprocess, all on synthetic images written to tmp_path."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import klaus.preprocess as kp
from klaus.errors import KlausFormatError, KlausImageError
from klaus.preprocess import (
    DEFAULT_MAX_PIXELS,
    Preprocess,
    crop_boxes,
    load_image,
    prepare,
    resized_size,
    to_tensor,
)

RED = (255, 0, 0)


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A ~70-byte PNG whose header claims width x height (1-bit gray)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


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
    x = to_tensor(_noise(640, 480), spec, crops)
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
        to_tensor(_noise(300, 300), Preprocess(), crops=5)
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
    img = _noise(*size)
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
    img = _noise(*size, seed=size[0])
    spec = Preprocess(interpolation=interpolation)
    expected = _resize_then_crop(img, spec)
    got = kp.to_pixels(img, spec)
    assert got.shape == (1, 224, 224, 3) and got.dtype == np.uint8
    diff = np.abs(got[0].astype(int) - expected)
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= 0.01 * diff.size  # rounding, not a shifted sampling grid


def test_one_crop_is_exact_when_the_scale_is_a_binary_fraction() -> None:
    # 640 x 480 -> 341 x 256: the vertical scale 1.875 is exact in float32, so is the window
    img = _noise(640, 480, seed=3)
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
    img = _noise(333, 500)
    np.testing.assert_array_equal(kp.to_pixels(img, Preprocess())[0], _resize_then_crop(img, Preprocess()))


@pytest.mark.parametrize("interpolation", ["nearest", "box"])
def test_one_crop_with_a_step_filter_resizes_the_whole_image(interpolation: str) -> None:
    img = _noise(333, 500)
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
    img, spec = _noise(400, 300), Preprocess()
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
    assert made and max(made) <= kp._MAX_RESIZED_PIXELS


def test_window_resampling_fallback_matches_closely(monkeypatch: pytest.MonkeyPatch) -> None:
    img = _noise(640, 480)
    exact = to_tensor(img, Preprocess(), crops=10)
    monkeypatch.setattr(kp, "_MAX_RESIZED_PIXELS", 1)
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


# --------------------------------------------------------------------------
# Loading: sources, orientation, modes


def test_sources_path_str_bytes_fileobj(tmp_path: Path) -> None:
    p = _save(Image.new("RGB", (32, 16), RED), tmp_path / "red.png")
    for source in (p, str(p), p.read_bytes(), bytearray(p.read_bytes()), io.BytesIO(p.read_bytes())):
        img = load_image(source)
        assert (img.mode, img.size, img.getpixel((0, 0))) == ("RGB", (32, 16), RED)
    with open(p, "rb") as f:
        assert load_image(f).size == (32, 16)


def test_result_is_detached_from_file(tmp_path: Path) -> None:
    p = _save(Image.new("RGB", (8, 8), RED), tmp_path / "red.png")
    img = load_image(p)
    p.unlink()
    assert img.getpixel((7, 7)) == RED


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste(RED, (0, 0, 10, 10))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = _save(img, tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
    loaded = load_image(p)
    assert loaded.size == (20, 40)
    r, _, b = _px(loaded, (15, 4))  # stored top-left is displayed top-right
    assert r > 200 and b < 60


def test_corrupt_exif_does_not_prevent_loading(tmp_path: Path) -> None:
    p = _save(
        Image.new("RGB", (40, 20), RED), tmp_path / "bad_exif.jpg", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff"
    )
    with _no_warnings():  # Pillow's "Corrupt EXIF data" would print stray lines on stderr
        assert load_image(p).size == (40, 20)
    with pytest.warns(UserWarning, match="Corrupt EXIF"):  # the file does trigger it in Pillow itself
        Image.open(p).getexif()


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    assert [str(w.message) for w in caught] == []


def _px(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    assert img.mode == "RGB"
    value = img.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def test_grayscale_and_bilevel(tmp_path: Path) -> None:
    assert _px(load_image(_save(Image.new("L", (8, 8), 100), tmp_path / "g.png"))) == (100, 100, 100)
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.putpixel((1, 0), 1)
    img = load_image(_save(bilevel, tmp_path / "b.png"))
    assert _px(img) == (0, 0, 0) and _px(img, (1, 0)) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    assert _px(load_image(_save(pal, tmp_path / "p.png")), (1, 1)) == (0, 255, 0)
    img = load_image(_save(pal, tmp_path / "pt.png", transparency=0))
    assert _px(img) == (255, 255, 255)  # transparent black index -> white
    assert _px(img, (1, 1)) == (0, 255, 0)
    gif = load_image(_save(pal, tmp_path / "pt.gif", transparency=0))
    assert _px(gif) == (255, 255, 255)


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    assert _px(load_image(_save(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), tmp_path / "t.png"))) == (255, 255, 255)
    assert _px(load_image(_save(Image.new("RGBA", (8, 8), (255, 0, 0, 255)), tmp_path / "o.png"))) == RED
    half = _px(load_image(_save(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), tmp_path / "h.png")))
    assert all(abs(c - 127) <= 1 for c in half)
    assert _px(load_image(_save(Image.new("LA", (8, 8), (0, 0)), tmp_path / "la.png"))) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["PA", "RGBa", "La"])
def test_other_alpha_modes_over_white(mode: str) -> None:
    img = Image.new(mode, (4, 4), (0,) * len(mode))
    assert _px(kp._to_rgb(img)) == (255, 255, 255)


def test_cmyk_jpeg_adobe_inverted(tmp_path: Path) -> None:
    p = _save(Image.new("RGB", (16, 16), RED).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(p) as raw:
        assert raw.mode == "CMYK" and "adobe" in raw.info  # Pillow writes inverted Adobe CMYK
    r, g, b = _px(load_image(p), (8, 8))
    assert r > 240 and g < 15 and b < 15


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 257, 32768, 65535]] * 2, dtype=np.uint16)
    p = _save(Image.fromarray(arr), tmp_path / "16.png")
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")
    img = load_image(p)
    assert [_px(img, (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    full = load_image(_save(Image.fromarray(np.full((4, 4), 65535, np.uint16)), tmp_path / "w.png"))
    assert _px(full) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_modes(mode: str) -> None:
    assert _px(kp._to_rgb(Image.new(mode, (4, 4), 65535))) == (255, 255, 255)
    assert _px(kp._to_rgb(Image.new(mode, (4, 4), 32768))) == (128, 128, 128)


def test_float_images(tmp_path: Path) -> None:
    unit = load_image(_save(Image.new("F", (4, 4), 0.5), tmp_path / "f.tif"))
    assert _px(unit) == (128, 128, 128)
    assert _px(kp._to_rgb(Image.new("F", (4, 4), 200.0))) == (200, 200, 200)


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "LAB"])
def test_color_spaces_convert_back_to_rgb(mode: str) -> None:
    if mode == "LAB":
        from PIL import ImageCms

        to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
        converted = ImageCms.applyTransform(Image.new("RGB", (4, 4), RED), to_lab)
        assert converted is not None
        img = converted
    else:
        img = Image.new("RGB", (4, 4), RED).convert(mode)
    r, g, b = _px(kp._to_rgb(img))
    assert r > 240 and g < 15 and b < 15


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert _px(load_image(p)) == RED


# --------------------------------------------------------------------------
# JPEG draft


def test_draft_decodes_large_jpeg_at_reduced_size(tmp_path: Path) -> None:
    p = _save(_noise(4000, 3000), tmp_path / "large.jpg", quality=80)
    small = load_image(p, target=256)
    assert min(small.size) >= 256
    assert small.size[0] <= 1000 and small.size[1] <= 750
    assert small.size[0] * 3 == small.size[1] * 4
    assert load_image(p).size == (4000, 3000)
    assert min(load_image(p, target=1000).size) >= 1000
    assert load_image(p, target=5000).size == (4000, 3000)  # never upsampled


@pytest.mark.parametrize("size", [(4000, 3000), (300, 4001), (2100, 2100)])
def test_prepare_with_draft(tmp_path: Path, size: tuple[int, int]) -> None:
    p = _save(_noise(*size), tmp_path / "x.jpg")
    x = prepare(p, Preprocess(), crops=10)
    assert x.shape == (10, 3, 224, 224) and x.dtype == np.float32
    np.testing.assert_array_equal(x, prepare(p, Preprocess(), crops=10))  # deterministic


# --------------------------------------------------------------------------
# Errors


def _error(source: object, **kw) -> str:
    with pytest.raises(KlausImageError) as info:
        load_image(source, **kw)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_truncated_jpeg_and_png(tmp_path: Path) -> None:
    for name in ("cut.jpg", "cut.png"):
        data = io.BytesIO()
        _noise(200, 150).save(data, "JPEG" if name.endswith("jpg") else "PNG")
        p = tmp_path / name
        p.write_bytes(data.getvalue()[: len(data.getvalue()) // 2])
        message = _error(p)
        assert name in message and "truncated" in message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_not_an_image(tmp_path: Path) -> None:
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(np.random.default_rng(1).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.txt"
    text.write_text("hello, I am not a photo\n")
    for p in (noise, text):
        message = _error(p)
        assert p.name in message and "not an image" in message
    assert _error(b"GIF89a nonsense").startswith("<bytes>: ")


def test_empty_missing_and_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "empty.jpg" in _error(empty) and "empty" in _error(empty)
    assert _error(tmp_path / "missing.jpg").endswith("missing.jpg: no such file")
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    assert "folder.jpg" in _error(folder)
    assert _error(b"") == "<bytes>: empty file"


def test_header_bomb_is_rejected_before_decoding(tmp_path: Path) -> None:
    p = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert p.stat().st_size < 200
    message = _error(p)
    assert "bomb.png" in message and "too large" in message
    assert message == f"{p}: image too large (400.0 Mpx > 178.9 Mpx limit)"
    # Pillow's own guard (2 * Image.MAX_IMAGE_PIXELS) still applies as a backstop
    assert _error(p, max_pixels=10**9).endswith("(400.0 Mpx > 178.9 Mpx limit)")


def test_bomb_check_does_not_rely_on_pillow_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    p = _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert _error(p) == f"{p}: image too large (20000x20000 = 400.0 Mpx > 178.9 Mpx limit)"
    assert _error(p.read_bytes(), max_pixels=10**8).startswith("<bytes>: image too large (20000x20000")


def test_large_photo_within_our_limit_prints_no_pillow_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A photo above Pillow's warning threshold but within max_pixels: Pillow warns on
    # open and again when a large region is cropped. Scaled down: warning above 6000 px.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    p = _save(_noise(120, 90), tmp_path / "large.png")
    with _no_warnings():
        batch = prepare(p, Preprocess(input_size=64))
    assert batch.shape == (1, 3, 64, 64)
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow on its own does warn
        Image.open(p).crop((0, 0, 120, 90))


def test_low_max_pixels(tmp_path: Path) -> None:
    p = _save(Image.new("RGB", (64, 48), RED), tmp_path / "small.png")
    assert _error(p, max_pixels=1000) == f"{p}: image too large (64x48 = 3072 px > 1000 px limit)"
    assert load_image(p, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(KlausImageError, match="too large"):
        prepare(p, Preprocess(), max_pixels=100)


def test_pillow_global_state_untouched(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    _error(_png_header_only(tmp_path / "bomb.png", 20000, 20000))
    load_image(_save(Image.new("RGB", (8, 8)), tmp_path / "ok.png"))
    assert before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert DEFAULT_MAX_PIXELS == 178_956_970


# --------------------------------------------------------------------------
# Sources that cannot seek (pipes, /dev/stdin, process substitution)


def _piped(data: bytes) -> tuple[str, threading.Thread]:
    """A path naming the read end of a pipe that ``data`` is being written into (like ``<(cat x)``)."""
    import os

    read, write = os.pipe()

    def feed() -> None:
        with open(write, "wb") as f:
            f.write(data)

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    return f"/dev/fd/{read}", thread


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="needs /dev/fd")
def test_a_pipe_is_read_into_memory_and_decodes_like_the_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    photo = _save(Image.fromarray(noise), tmp_path / "photo.png")
    data = photo.read_bytes()
    assert len(data) > 65536  # more than a pipe's buffer: the whole stream is read
    path, thread = _piped(data)
    try:
        image = load_image(path)
    finally:
        thread.join(5)
    assert np.array_equal(np.asarray(image), np.asarray(load_image(photo)))

    # A non-seekable file object is read whole as well.
    class Unseekable(io.RawIOBase):
        def __init__(self) -> None:
            self.inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            return self.inner.readinto(b)

    assert np.array_equal(np.asarray(load_image(io.BufferedReader(Unseekable()))), np.asarray(image))


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="needs /dev/fd")
def test_pipe_errors_are_one_line_image_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path, thread = _piped(b"")
    assert _error(path) == f"{path}: empty file"
    thread.join(5)
    path, thread = _piped(b"not an image at all")
    assert _error(path) == f"{path}: not an image (cannot identify image file)"
    thread.join(5)
    monkeypatch.setattr(kp, "MAX_STREAM_BYTES", 10)  # the in-memory cap
    path, thread = _piped(b"x" * 11)
    assert _error(path) == f"{path}: too large (more than 10 bytes)"
    thread.join(5)


def test_stream_cap_is_the_indexers_file_limit() -> None:
    from klaus.index.pipeline import MAX_FILE_BYTES

    assert kp.MAX_STREAM_BYTES == MAX_FILE_BYTES
