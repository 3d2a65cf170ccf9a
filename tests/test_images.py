"""Tests for klaus.images (opening and decoding images), all on synthetic images written to tmp_path."""

from __future__ import annotations

import contextlib
import io
import struct
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import klaus.images as ki
from conftest import noise_image, save_image
from klaus.errors import KlausImageError
from klaus.images import DEFAULT_MAX_PIXELS, load_image
from klaus.preprocess import Preprocess, prepare

RED = (255, 0, 0)


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
# Loading: sources, orientation, modes


def test_sources_path_str_bytes_fileobj(tmp_path: Path) -> None:
    p = save_image(Image.new("RGB", (32, 16), RED), tmp_path / "red.png")
    for source in (p, str(p), p.read_bytes(), bytearray(p.read_bytes()), io.BytesIO(p.read_bytes())):
        img = load_image(source)
        assert (img.mode, img.size, img.getpixel((0, 0))) == ("RGB", (32, 16), RED)
    with open(p, "rb") as f:
        assert load_image(f).size == (32, 16)


def test_result_is_detached_from_file(tmp_path: Path) -> None:
    p = save_image(Image.new("RGB", (8, 8), RED), tmp_path / "red.png")
    img = load_image(p)
    p.unlink()
    assert img.getpixel((7, 7)) == RED


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste(RED, (0, 0, 10, 10))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = save_image(img, tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
    loaded = load_image(p)
    assert loaded.size == (20, 40)
    r, _, b = _px(loaded, (15, 4))  # stored top-left is displayed top-right
    assert r > 200 and b < 60


def test_corrupt_exif_does_not_prevent_loading(tmp_path: Path) -> None:
    p = save_image(
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
    assert _px(load_image(save_image(Image.new("L", (8, 8), 100), tmp_path / "g.png"))) == (100, 100, 100)
    bilevel = Image.new("1", (8, 8), 0)
    bilevel.putpixel((1, 0), 1)
    img = load_image(save_image(bilevel, tmp_path / "b.png"))
    assert _px(img) == (0, 0, 0) and _px(img, (1, 0)) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    assert _px(load_image(save_image(pal, tmp_path / "p.png")), (1, 1)) == (0, 255, 0)
    img = load_image(save_image(pal, tmp_path / "pt.png", transparency=0))
    assert _px(img) == (255, 255, 255)  # transparent black index -> white
    assert _px(img, (1, 1)) == (0, 255, 0)
    gif = load_image(save_image(pal, tmp_path / "pt.gif", transparency=0))
    assert _px(gif) == (255, 255, 255)


def test_alpha_is_composited_over_white(tmp_path: Path) -> None:
    assert _px(load_image(save_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), tmp_path / "t.png"))) == (255, 255, 255)
    assert _px(load_image(save_image(Image.new("RGBA", (8, 8), (255, 0, 0, 255)), tmp_path / "o.png"))) == RED
    half = _px(load_image(save_image(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), tmp_path / "h.png")))
    assert all(abs(c - 127) <= 1 for c in half)
    assert _px(load_image(save_image(Image.new("LA", (8, 8), (0, 0)), tmp_path / "la.png"))) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["PA", "RGBa", "La"])
def test_other_alpha_modes_over_white(mode: str) -> None:
    img = Image.new(mode, (4, 4), (0,) * len(mode))
    assert _px(ki.to_rgb(img)) == (255, 255, 255)


def test_cmyk_jpeg_adobe_inverted(tmp_path: Path) -> None:
    p = save_image(Image.new("RGB", (16, 16), RED).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(p) as raw:
        assert raw.mode == "CMYK" and "adobe" in raw.info  # Pillow writes inverted Adobe CMYK
    r, g, b = _px(load_image(p), (8, 8))
    assert r > 240 and g < 15 and b < 15


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 257, 32768, 65535]] * 2, dtype=np.uint16)
    p = save_image(Image.fromarray(arr), tmp_path / "16.png")
    with Image.open(p) as raw:
        assert raw.mode.startswith("I")
    img = load_image(p)
    assert [_px(img, (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    full = load_image(save_image(Image.fromarray(np.full((4, 4), 65535, np.uint16)), tmp_path / "w.png"))
    assert _px(full) == (255, 255, 255)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16bit_modes(mode: str) -> None:
    assert _px(ki.to_rgb(Image.new(mode, (4, 4), 65535))) == (255, 255, 255)
    assert _px(ki.to_rgb(Image.new(mode, (4, 4), 32768))) == (128, 128, 128)


def test_float_images(tmp_path: Path) -> None:
    unit = load_image(save_image(Image.new("F", (4, 4), 0.5), tmp_path / "f.tif"))
    assert _px(unit) == (128, 128, 128)
    assert _px(ki.to_rgb(Image.new("F", (4, 4), 200.0))) == (200, 200, 200)


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
    r, g, b = _px(ki.to_rgb(img))
    assert r > 240 and g < 15 and b < 15


def test_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, (0, 0, 255))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert _px(load_image(p)) == RED


# --------------------------------------------------------------------------
# JPEG draft


def test_draft_decodes_large_jpeg_at_reduced_size(tmp_path: Path) -> None:
    p = save_image(noise_image(4000, 3000), tmp_path / "large.jpg", quality=80)
    small = load_image(p, target=256)
    assert min(small.size) >= 256
    assert small.size[0] <= 1000 and small.size[1] <= 750
    assert small.size[0] * 3 == small.size[1] * 4
    assert load_image(p).size == (4000, 3000)
    assert min(load_image(p, target=1000).size) >= 1000
    assert load_image(p, target=5000).size == (4000, 3000)  # never upsampled


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
        noise_image(200, 150).save(data, "JPEG" if name.endswith("jpg") else "PNG")
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
    p = save_image(noise_image(120, 90), tmp_path / "large.png")
    with _no_warnings():
        batch = prepare(p, Preprocess(input_size=64))
    assert batch.shape == (1, 3, 64, 64)
    with pytest.warns(Image.DecompressionBombWarning):  # Pillow on its own does warn
        Image.open(p).crop((0, 0, 120, 90))


def test_low_max_pixels(tmp_path: Path) -> None:
    p = save_image(Image.new("RGB", (64, 48), RED), tmp_path / "small.png")
    assert _error(p, max_pixels=1000) == f"{p}: image too large (64x48 = 3072 px > 1000 px limit)"
    assert load_image(p, max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(KlausImageError, match="too large"):
        prepare(p, Preprocess(), max_pixels=100)


def test_pillow_global_state_untouched(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    _error(_png_header_only(tmp_path / "bomb.png", 20000, 20000))
    load_image(save_image(Image.new("RGB", (8, 8)), tmp_path / "ok.png"))
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
    photo = save_image(Image.fromarray(noise), tmp_path / "photo.png")
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
    monkeypatch.setattr(ki, "MAX_STREAM_BYTES", 10)  # the in-memory cap
    path, thread = _piped(b"x" * 11)
    assert _error(path) == f"{path}: too large (more than 10 bytes)"
    thread.join(5)


def test_stream_cap_is_the_indexers_file_limit() -> None:
    from klaus.index.pipeline import MAX_FILE_BYTES

    assert ki.MAX_STREAM_BYTES == MAX_FILE_BYTES
