"""Images as a hostile or careless folder holds them, through the CLI as a user runs it.

One image-opening function (klaus.images.load_image / open_image) serves classify,
index and serve: one pixel limit ($KLAUS_MAX_PIXELS), Pillow's bomb check as our one-line
error and never a DecompressionBombWarning on stderr, devices refused, named pipes never
waited on, and file names with line breaks or control characters escaped in every line.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import klaus.images as ki
from conftest import EXAMPLES
from klaus.errors import KlausError, KlausImageError
from klaus.images import DEFAULT_MAX_PIXELS, load_image, pixel_limit
from test_index import klaus_cmd

CAT = EXAMPLES / "cat.jpg"
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="devices, pipes and file names are POSIX here")


def klaus(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*klaus_cmd(), *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def one_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """The only stderr line, which must be a klaus error containing every fragment."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("klaus: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares ``width`` x ``height`` and whose data is a few bytes: a bomb's header."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def gif_header_only(path: Path, width: int, height: int) -> Path:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00;"
    path.write_bytes(b"GIF89a" + screen + frame)
    return path


def jpeg_header_only(path: Path, width: int, height: int) -> Path:
    """A small real JPEG whose SOF0 frame header is rewritten to declare ``width`` x ``height``."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def large_png(tmp_path_factory) -> Path:
    """A 100 Mpx gray PNG (about 100 KB): above Pillow's warning threshold (89 Mpx), within our limit."""
    path = tmp_path_factory.mktemp("large") / "large-100mpx.png"
    Image.new("L", (10_000, 10_000), 90).save(path)
    return path


# ------------------------------------------------------------------ the pixel limit


def test_pixel_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(ki.MAX_PIXELS_ENV, raising=False)
    assert pixel_limit() == DEFAULT_MAX_PIXELS
    monkeypatch.setenv(ki.MAX_PIXELS_ENV, " 5000 ")
    assert pixel_limit() == 5000
    for bad in ("abc", "0", "-3", "1e6", str(DEFAULT_MAX_PIXELS + 1)):
        monkeypatch.setenv(ki.MAX_PIXELS_ENV, bad)
        with pytest.raises(KlausError, match=rf"^KLAUS_MAX_PIXELS={bad}: expected a whole number of pixels from 1 to"):
            pixel_limit()


def test_lower_pixel_limit_refuses_images_in_classify_and_index(tmp_path):
    env = {"KLAUS_MAX_PIXELS": "10000"}
    width, height = Image.open(CAT).size
    proc = klaus("classify", str(CAT), env=env)
    assert proc.returncode == 1 and proc.stdout == ""
    one_error(proc, f"{CAT}: image too large ({width}x{height} = {width * height} px > 10000 px limit)")

    library = tmp_path / "photos"
    library.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(library / "small.png")
    (library / "cat.jpg").write_bytes(CAT.read_bytes())
    proc = klaus("index", str(library), "--db", str(tmp_path / "lib.db"), "--json", env=env)
    assert proc.returncode == 0 and proc.stderr == ""
    summary = json.loads(proc.stdout)
    assert (summary["indexed"], summary["failed"]) == (1, 1)
    assert "image too large" in summary["errors"][0]["error"] and "10000 px limit" in summary["errors"][0]["error"]


def test_bad_pixel_limit_is_one_line_for_every_command(tmp_path):
    env = {"KLAUS_MAX_PIXELS": "lots"}
    expected = "klaus: error: KLAUS_MAX_PIXELS=lots: expected a whole number of pixels from 1 to 178956970"
    for args in (
        ["classify", str(CAT), str(CAT)],
        ["index", str(EXAMPLES), "--db", str(tmp_path / "x.db")],
        ["serve", "--db", str(tmp_path / "x.db"), "--port", "0"],
    ):
        proc = klaus(*args, env=env)
        assert proc.returncode == 1, args
        assert proc.stderr.splitlines() == [expected], (args, proc.stderr)


# ------------------------------------------------------------------ bombs


@pytest.mark.parametrize("make", [png_header_only, gif_header_only, jpeg_header_only])
def test_header_bombs_are_refused_in_one_line_before_decoding(tmp_path, make):
    bomb = make(tmp_path / f"bomb.{make.__name__[:3]}", 60_000, 60_000)
    start = time.monotonic()
    proc = klaus("classify", str(bomb), str(CAT), "--top", "1")
    assert time.monotonic() - start < 30
    assert proc.returncode == 1
    one_error(proc, f"{bomb}: image too large (3600.0 Mpx > 178.9 Mpx limit)")
    assert proc.stdout.startswith(f"{CAT}  (")  # the next image is still classified


def test_header_bomb_within_pillow_limit_but_over_ours(tmp_path):
    bomb = png_header_only(tmp_path / "wide.png", 20_000, 5_000)
    proc = klaus("classify", str(bomb), env={"KLAUS_MAX_PIXELS": "50000000"})
    one_error(proc, f"{bomb}: image too large (20000x5000 = 100.0 Mpx > 50.0 Mpx limit)")


def test_large_image_within_the_limit_prints_nothing_on_stderr(large_png, tmp_path):
    proc = klaus("classify", str(large_png), "--top", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no DecompressionBombWarning
    library = tmp_path / "lib"
    library.mkdir()
    (library / "large.png").symlink_to(large_png)
    proc = klaus("index", str(library), "--db", str(tmp_path / "lib.db"), "--json")
    assert proc.returncode == 0 and proc.stderr == ""
    assert json.loads(proc.stdout)["indexed"] == 1


def test_large_images_are_reduced_while_decoding(monkeypatch):
    """Above 16 Mpx, a decoded image is reduced keeping its shorter side at least 3x the target,
    converted band by band; the bands give exactly what converting the whole image gives."""
    rng = np.random.default_rng(3)
    rgba = Image.fromarray(rng.integers(0, 256, (600, 900, 4), dtype=np.uint8), "RGBA")
    whole = ki.to_rgb(rgba).reduce(5)
    monkeypatch.setattr(ki, "_BAND_PIXELS", 900 * 7)  # bands of 5 rows (a multiple of the factor)
    assert np.array_equal(np.asarray(ki._banded_rgb(rgba, 5)), np.asarray(whole))
    wide = Image.fromarray(rng.integers(0, 65536, (300, 1000), dtype=np.uint16))
    monkeypatch.setattr(ki, "_BAND_PIXELS", 300 * 8)  # column bands
    assert np.array_equal(np.asarray(ki._banded_rgb(wide, 1)), np.asarray(ki.to_rgb(wide)))
    floats = Image.fromarray((rng.random((200, 100)) * 0.9).astype(np.float32))
    floats.putpixel((50, 199), 0.95)
    monkeypatch.setattr(ki, "_BAND_PIXELS", 100 * 10)
    assert np.array_equal(np.asarray(ki._banded_rgb(floats, 2)), np.asarray(ki.to_rgb(floats).reduce(2)))
    assert ki._reduction((6000, 4000), 256) == 4000 // 768
    assert ki._reduction((4000, 4000), 256) == 1  # 16 Mpx: decoded as is
    assert ki._reduction((20000, 1000), 256) == 1


def test_large_png_decodes_to_a_reduced_upright_image(tmp_path):
    img = Image.new("RGB", (5000, 4000), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 1000, 1000))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    path = tmp_path / "rotated.png"
    img.save(path, exif=exif.tobytes())
    loaded = load_image(path, target=256)
    assert loaded.size == (800, 1000)  # 20 Mpx reduced by 5 (4000 // 768), then rotated
    r, _g, b = loaded.getpixel((790, 10))  # stored top-left is displayed top-right
    assert r > 200 and b < 60
    assert load_image(path).size == (4000, 5000)  # no target: full size


# ------------------------------------------------------------------ devices, pipes


def test_dev_zero_is_not_an_empty_file():
    proc = klaus("classify", "/dev/zero", str(CAT), "--top", "1")
    assert proc.returncode == 1
    one_error(proc, "/dev/zero: not a regular file (a character device)")
    assert proc.stdout.startswith(f"{CAT}  (")
    with pytest.raises(KlausImageError, match=r"^/dev/null: not a regular file"):
        load_image("/dev/null")


def test_named_pipe_without_writer_does_not_block(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    start = time.monotonic()
    proc = klaus("classify", str(fifo), str(CAT), "--top", "1", timeout=60)
    assert time.monotonic() - start < 30
    assert proc.returncode == 1
    one_error(proc, f"{fifo}: empty file")
    assert proc.stdout.startswith(f"{CAT}  (")


def test_named_pipe_with_a_writer_is_read(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [*klaus_cmd(), "classify", "--json", "--top", "1", str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The writer arrives a moment later, as `klaus classify p & cat photo.jpg > p` would.
    with open(fifo, "wb") as pipe:  # blocks until klaus has opened the pipe for reading
        pipe.write(CAT.read_bytes())
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    direct = json.loads(klaus("classify", "--json", "--top", "1", str(CAT)).stdout)
    assert json.loads(out)["predictions"] == direct["predictions"]


# ------------------------------------------------------------------ names with control characters


def test_names_with_line_breaks_stay_on_one_line(tmp_path):
    odd = tmp_path / "two\nlines\x1b[31m.jpg"
    odd.write_bytes(CAT.read_bytes())
    shown_name = str(tmp_path) + "/two\\nlines\\x1b[31m.jpg"
    proc = klaus("classify", str(odd), "--top", "2")
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith(f"{shown_name}  (")
    assert "\x1b" not in proc.stdout

    missing = tmp_path / "gone\n.jpg"
    proc = klaus("classify", str(missing))
    assert one_error(proc) == f"klaus: error: {tmp_path}/gone\\n.jpg: no such file"

    broken = tmp_path / "bad\r\nphoto.jpg"
    broken.write_bytes(b"not a photo")
    proc = klaus("classify", str(broken))
    one_error(proc, f"{tmp_path}/bad\\r\\nphoto.jpg: not an image")

    model = tmp_path / "model\n.klaus"
    model.write_bytes(b"junk")
    for args in (
        ["inspect", str(model)],
        ["classify", "-m", str(model), str(CAT)],
        ["export", str(model), "-o", str(tmp_path / "o.onnx")],
    ):
        proc = klaus(*args)
        one_error(proc, f"{tmp_path}/model\\n.klaus: ")

    library = tmp_path / "lib"
    library.mkdir()
    (library / "bad\nname.jpg").write_bytes(b"not a photo")
    proc = klaus("index", str(library), "--db", str(tmp_path / "lib.db"))
    assert proc.returncode == 0
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("klaus: warning: ")]
    assert warnings == [f"klaus: warning: {library}/bad\\nname.jpg: not an image (cannot identify image file)"]


# ------------------------------------------------------------------ serve


def start_server(db: Path, *extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """`klaus serve --port 0 --json` in the background; its process and URL."""
    proc = subprocess.Popen(
        [*klaus_cmd(), "serve", "--db", str(db), "--port", "0", "--json", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"klaus serve did not start: {proc.communicate()[1]}")
    return proc, json.loads(line)["url"]


def stop_server(proc: subprocess.Popen) -> str:
    """Stop the server; its stderr."""
    proc.terminate()
    try:
        _out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
    return err


def test_serve_thumbnails_and_uploads_of_large_images_print_nothing(large_png, tmp_path):
    library = tmp_path / "lib"
    library.mkdir()
    (library / "large.png").symlink_to(large_png)
    db = tmp_path / "lib.db"
    assert klaus("index", str(library), "--db", str(db)).returncode == 0
    proc, url = start_server(db)
    try:
        with urllib.request.urlopen(f"{url}thumb/1?size=large", timeout=60) as response:
            assert response.status == 200
            thumb = Image.open(io.BytesIO(response.read()))
            assert max(thumb.size) <= 1024
        request = urllib.request.Request(
            f"{url}api/classify", data=large_png.read_bytes(), headers={"Content-Type": "image/png"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["width"] == 10_000
    finally:
        err = stop_server(proc)
    assert "Warning" not in err and "Traceback" not in err, err


def test_libtiff_errors_do_not_reach_stderr(tmp_path):
    """libtiff prints its decoding errors on the process's stderr; only our one line may show."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (30, 90, 150)).save(buffer, "TIFF", compression="jpeg")
    data = bytearray(buffer.getvalue())
    sos = data.index(b"\xff\xda")
    data[sos + 5] = 66  # the first scan component names a component the frame does not have
    bad = tmp_path / "bad.tif"
    bad.write_bytes(bytes(data))
    proc = klaus("classify", str(bad))
    assert proc.returncode == 1
    one_error(proc, f"{bad}: corrupt image")
