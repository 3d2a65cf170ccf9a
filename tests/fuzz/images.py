"""Mutations of images (see the package docstring).

Each mutator writes one input into a case folder and returns (the path to give `klaus
classify`, a description). Besides bad bytes, an input may be a named pipe nobody writes
to, a folder, a link to ``/dev/zero``, or a file whose name holds a line break.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .corpus import PNG_SIGNATURE, Corpus, png_chunk

Mutator = Callable[[random.Random, Path, Corpus], tuple[Path, str]]


def _seed_image(rng: random.Random, corpus: Corpus, suffixes: tuple[str, ...] = ()) -> Path:
    choices = [p for p in corpus.images if not suffixes or p.suffix in suffixes]
    return rng.choice(choices)


def truncate(rng: random.Random, folder: Path, corpus: Corpus) -> tuple[Path, str]:
    source = _seed_image(rng, corpus)
    data = source.read_bytes()
    cut = rng.choice((rng.randrange(1, len(data)), len(data) // 2, len(data) - 1, 10, 1))
    path = folder / f"cut{source.suffix}"
    path.write_bytes(data[:cut])
    return path, f"{source.name} cut to {cut} of {len(data)} bytes"


def _fix_png_crcs(data: bytes) -> bytes:
    out, pos = bytearray(data[:8]), 8
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        body = data[pos + 4 : pos + 8 + length]
        if pos + 12 + length > len(data):
            out += data[pos:]
            return bytes(out)
        out += data[pos : pos + 8 + length] + struct.pack(">I", zlib.crc32(body))
        pos += 12 + length
    return bytes(out + data[pos:])


def flip(rng: random.Random, folder: Path, corpus: Corpus) -> tuple[Path, str]:
    source = _seed_image(rng, corpus)
    data = bytearray(source.read_bytes())
    n = rng.choice((1, 4, 16, 64))
    for _ in range(n):
        i = rng.randrange(min(len(data), 16), len(data)) if rng.random() < 0.8 else rng.randrange(len(data))
        data[i] = rng.randrange(256)
    out = bytes(data)
    fixed = source.suffix == ".png" and rng.random() < 0.7
    if fixed:
        out = _fix_png_crcs(out)
    path = folder / f"flipped{source.suffix}"
    path.write_bytes(out)
    return path, f"{source.name}: {n} bytes changed" + (" (PNG CRCs fixed)" if fixed else "")


def _png(width: int, height: int, depth: int = 8, color: int = 2, idat: bytes | None = None) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    body = idat if idat is not None else zlib.compress(b"\0" * 64)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def _jpeg_declaring(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 200)).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_declaring(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x4c\x01\x00;"
    return b"GIF89a" + screen + frame


def _bmp_declaring(width: int, height: int) -> bytes:
    header = struct.pack("<2sIHHI", b"BM", 54 + 16, 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 16, 2835, 2835, 0, 0)
    return header + info + b"\0" * 16


def _tiff_declaring(width: int, height: int) -> bytes:
    entries = [
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8 + 2 + 12 * 9 + 4),
        (277, 3, 1, 1),
        (278, 4, 1, height),
        (279, 4, 1, 16),
    ]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * 16


def _webp_declaring(width: int, height: int) -> bytes:
    vp8x = struct.pack("<B3x", 0) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


DECLARING = {
    ".png": _png,
    ".jpg": _jpeg_declaring,
    ".gif": _gif_declaring,
    ".bmp": _bmp_declaring,
    ".tif": _tiff_declaring,
    ".webp": _webp_declaring,
}


def header_bomb(rng: random.Random, folder: Path, corpus: Corpus) -> tuple[Path, str]:
    suffix = rng.choice(sorted(DECLARING))
    limit = {".jpg": 65_500, ".gif": 65_535, ".webp": 16_384}.get(suffix, 1 << 20)
    width = rng.choice((20_000, 46_341, 65_535, 1_000_000, 2**31 - 1))
    height = rng.choice((20_000, 65_535, 1_000_000, 1))
    width, height = min(width, limit), min(height, limit)
    path = folder / f"bomb{suffix}"
    path.write_bytes(DECLARING[suffix](width, height))
    return path, f"{suffix[1:]} header declaring {width}x{height}"


def large(rng: random.Random, folder: Path, corpus: Corpus) -> tuple[Path, str]:
    """A real image of 90..170 Mpx in a small file: within the pixel limit, above Pillow's warning."""
    mode, suffix = rng.choice([("L", ".png"), ("RGBA", ".png"), ("P", ".gif"), ("1", ".png"), ("RGB", ".png")])
    side = rng.choice((9_500, 11_000, 13_000))
    path = folder / f"large{suffix}"
    colors: dict[str, int | tuple[int, ...]] = {
        "L": 90,
        "RGBA": (10, 20, 30, 128),
        "P": 7,
        "1": 1,
        "RGB": (200, 10, 10),
    }
    color = colors[mode]
    Image.new(mode, (side, side), color).save(path)
    return path, f"{mode} {side}x{side} {suffix[1:]} ({path.stat().st_size} bytes)"


def odd(rng: random.Random, folder: Path, corpus: Corpus) -> tuple[Path, str]:
    """Odd modes, odd EXIF, odd sizes, written by Pillow (so they are valid files)."""
    width, height = rng.choice(((1, 1), (1, 5000), (5000, 1), (64, 48), (3, 2)))
    arr = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (height, width, 3), dtype=np.uint8)
    rgb = Image.fromarray(arr)
    kind = rng.choice(
        [
            "I;16",
            "I",
            "F",
            "LA",
            "PA",
            "P-trns",
            "1",
            "CMYK",
            "YCbCr",
            "LAB",
            "HSV",
            "exif",
            "bad-exif",
            "icc",
            "frames",
            "RGBa",
        ]
    )
    exif = None
    if kind == "I;16":
        image, suffix = Image.fromarray(arr[..., 0].astype(np.uint16) * 257), ".png"
    elif kind == "I":
        image, suffix = rgb.convert("I"), ".tif"
    elif kind == "F":
        values = arr[..., 0].astype(np.float32) * rng.choice((1 / 255, 1.0, 1e30, float("nan")))
        image, suffix = Image.fromarray(values), ".tif"
    elif kind == "LA":
        image, suffix = rgb.convert("LA"), ".png"
    elif kind == "PA":
        image, suffix = rgb.convert("P").convert("PA"), ".png"
    elif kind == "P-trns":
        image, suffix = rgb.convert("P"), ".gif"
    elif kind == "1":
        image, suffix = rgb.convert("1"), rng.choice((".png", ".bmp", ".tif"))
    elif kind == "CMYK":
        image, suffix = rgb.convert("CMYK"), rng.choice((".jpg", ".tif"))
    elif kind == "YCbCr":
        image, suffix = rgb.convert("YCbCr"), ".jpg"
    elif kind in ("LAB", "HSV"):
        image, suffix = rgb.convert(kind), ".tif"
    elif kind == "exif":
        image, suffix = rgb, ".jpg"
        tags = Image.Exif()
        tags[0x0112] = rng.choice((0, 1, 5, 8, 9, 255, 65535))
        exif = tags.tobytes()
    elif kind == "bad-exif":
        image, suffix = rgb, ".jpg"
        exif = rng.choice(
            (
                b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff",
                b"Exif\x00\x00II*\x00" + b"\xff" * 200,
                b"Exif\x00\x00" + rng.randbytes(300),
            )
        )
    elif kind == "icc":
        image, suffix = rgb, ".jpg"
    elif kind == "frames":
        image, suffix = rgb, ".gif"
    else:
        image, suffix = rgb.convert("RGBa").convert("RGBA"), ".png"
    path = folder / f"odd{suffix}"
    options: dict[str, Any] = {}
    if exif is not None:
        options["exif"] = exif
    if kind == "icc":
        options["icc_profile"] = rng.randbytes(rng.choice((10, 2000, 70_000)))
    if kind == "P-trns":
        options["transparency"] = 0
    if kind == "frames":
        frames = [rgb.convert("P")] * rng.choice((2, 50))
        frames[0].save(path, save_all=True, append_images=frames[1:])
    else:
        try:
            image.save(path, **options)
        except (OSError, ValueError, TypeError, KeyError):  # a mode this format cannot hold: as TIFF, or as pixels
            path = folder / "odd.tif"
            try:
                image.save(path)
            except (OSError, ValueError, TypeError, KeyError):
                path = folder / "odd.png"
                image.convert("RGB").save(path)
    return path, f"{kind} {width}x{height} {path.suffix[1:]}"


JUNK = [
    b"",
    b"\0",
    b"hello, I am not a photo\n",
    b"<html><body>not an image</body></html>",
    b"PK\x03\x04" + bytes(100),
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"BM",
    b"II*\0",
    b"RIFF\0\0\0\0WEBP",
    b"SQLite format 3\0" * 4,
]


def junk(rng: random.Random, folder: Path, corpus: Corpus) -> tuple[Path, str]:
    choice = rng.randrange(len(JUNK) + 3)
    if choice < len(JUNK):
        data = JUNK[choice]
        what = f"{len(data)} bytes {data[:12]!r}"
    elif choice == len(JUNK):
        data = rng.randbytes(rng.choice((10, 1000, 100_000)))
        what = f"{len(data)} random bytes"
    elif choice == len(JUNK) + 1:
        data = corpus.tiny.read_bytes()
        what = "a .klaus file"
    else:
        data = (Path(__file__)).read_bytes()
        what = "Python source"
    path = folder / f"junk{rng.choice(('.jpg', '.png', '.gif', '', '.webp'))}"
    path.write_bytes(data)
    return path, what


def special(rng: random.Random, folder: Path, corpus: Corpus) -> tuple[Path, str]:
    """Not a regular file, or a regular file with a hostile name."""
    kind = rng.choice(
        ["fifo", "folder", "dev-zero", "dev-null", "newline-name", "escape-name", "missing", "symlink-loop"]
    )
    if kind == "fifo":
        path = folder / "pipe.jpg"
        os.mkfifo(path)
    elif kind == "folder":
        path = folder / "folder.jpg"
        path.mkdir()
    elif kind in ("dev-zero", "dev-null"):
        path = folder / "device.jpg"
        path.symlink_to("/dev/zero" if kind == "dev-zero" else "/dev/null")
    elif kind in ("newline-name", "escape-name"):
        name = "two\nlines.jpg" if kind == "newline-name" else "\x1b[2J\x1b[31mred\u202e.jpg"
        path = folder / name
        data = _seed_image(rng, corpus, (".jpg",)).read_bytes()
        path.write_bytes(data if rng.random() < 0.5 else data[: len(data) // 3])
    elif kind == "missing":
        path = folder / "missing\n.jpg"
    else:
        path = folder / "loop.jpg"
        path.symlink_to(path)
    return path, kind


MUTATORS: dict[str, Mutator] = {
    "image.truncate": truncate,
    "image.flip": flip,
    "image.header-bomb": header_bomb,
    "image.large": large,
    "image.odd": odd,
    "image.junk": junk,
    "image.special": special,
}


#: Hand-built image bombs by name: headers declaring huge sizes, and one real large image.
BOMBS = {
    "png-60000": (".png", 60_000, 60_000),
    "gif-65535": (".gif", 65_535, 65_535),
    "jpeg-65500": (".jpg", 65_500, 65_500),
    "bmp-1000000": (".bmp", 1_000_000, 1_000_000),
    "tiff-1000000": (".tif", 1_000_000, 1_000_000),
    "webp-16384": (".webp", 16_384, 16_384),
}


def bomb(name: str, folder: Path) -> tuple[Path, str]:
    if name == "large-100mpx":
        path = folder / "large.png"
        Image.new("L", (10_000, 10_000), 90).save(path)
        return path, "L 10000x10000 png (within the pixel limit)"
    suffix, width, height = BOMBS[name]
    path = folder / f"bomb{suffix}"
    path.write_bytes(DECLARING[suffix](width, height))
    return path, f"{suffix[1:]} header declaring {width}x{height}"


def mutate(mutator: str, seed: int, corpus: Corpus, folder: Path) -> tuple[Path, str]:
    """Write the input for (``mutator``, ``seed``) into ``folder``; its path and description."""
    if mutator.startswith("bomb:"):
        return bomb(mutator[len("bomb:") :], folder)
    rng = random.Random(f"image/{mutator}/{seed}")
    return MUTATORS[mutator](rng, folder, corpus)
