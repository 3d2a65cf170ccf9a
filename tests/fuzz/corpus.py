"""The seed inputs every mutation starts from, built once per run into a folder.

Models are made the way a user makes them (`klaus compress` on a small ONNX classifier built
here with the ``onnx`` package), so the harness does not depend on Klaus's internals; the
embedded EfficientNet-Lite0 is a seed too. Images are small files in every format and mode
Pillow writes. Bomb payloads (zlib streams that inflate to gigabytes, an xz stream that
inflates past the reader's cap) take seconds to compress, so they are built once.
"""

from __future__ import annotations

import lzma
import os
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .runner import klaus_command

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TINY_SIZE = 32
TINY_CLASSES = 10
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Index-map bombs: (rows, cols) of an 8-bit map whose zlib stream inflates to rows x (cols + 1)
#: bytes. 46340 x 46340 is just under 2^31 elements, the format's largest tensor.
BOMB_MAPS = ((13_000, 13_000), (46_340, 46_340))


@dataclass(frozen=True)
class Corpus:
    """Paths of the seed inputs (all under ``root``)."""

    root: Path
    models: tuple[Path, ...]  # seeds for model mutations, small ones first
    embedded: Path  # the embedded EfficientNet-Lite0 (a seed, and the model some image cases use)
    tiny: Path  # the model most image cases are classified with (fast to load)
    photo: Path  # the photo model cases are classified with
    images: tuple[Path, ...]  # seeds for image mutations
    bombs: Path  # folder of bomb payloads

    def bomb_map(self, rows: int, cols: int) -> Path:
        return self.bombs / f"map-{rows}x{cols}.png"

    @property
    def xz_bomb(self) -> Path:
        return self.bombs / "labels-zeros.xz"


def tiny_onnx(seed: int = 0):
    """Conv(3->16, stride 2) + ReLU + Conv1x1(16->64) + ReLU + GAP + Flatten + Gemm(64->10): a real classifier."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    inits = [
        init("stem.weight", 16, 3, 3, 3),
        init("stem.bias", 16, scale=0.1),
        init("pw.weight", 64, 16, 1, 1),
        init("pw.bias", 64, scale=0.1),
        init("fc.weight", TINY_CLASSES, 64, scale=0.2),
        init("fc.bias", TINY_CLASSES, scale=0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "stem.weight", "stem.bias"], ["s"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["s"], ["s_act"]),
        helper.make_node("Conv", ["s_act", "pw.weight", "pw.bias"], ["p"]),
        helper.make_node("Relu", ["p"], ["p_act"]),
        helper.make_node("GlobalAveragePool", ["p_act"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, TINY_SIZE, TINY_SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", TINY_CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="klaus-fuzz")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


#: The seed models: name -> extra `klaus compress` options.
SEED_MODELS = {
    "tiny-channel.klaus": ["--bits", "4", "--min-elements", "64", "--granularity", "channel"],
    "tiny-tensor.klaus": ["--bits", "2", "--min-elements", "64", "--granularity", "tensor"],
    "tiny-lossless.klaus": ["--lossless"],
}


def build(root: Path) -> Corpus:
    """Build the corpus in ``root`` (kept if already there: every file is made deterministically)."""
    root.mkdir(parents=True, exist_ok=True)
    models = _models(root / "models")
    from klaus.runtime import default_model_path

    embedded = default_model_path()
    images = _images(root / "images")
    photo = root / "photo.jpg"
    if not photo.exists():
        Image.open(EXAMPLES / "cat.jpg").convert("RGB").resize((96, 72)).save(photo, quality=90)
    bombs = root / "bombs"
    _bombs(bombs)
    return Corpus(root, (*models, embedded), embedded, models[0], photo, tuple(images), bombs)


def _models(folder: Path) -> list[Path]:
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "tiny.onnx"
    names = folder / "names.txt"
    if not source.exists():
        onnx.save(tiny_onnx(), source)
        names.write_text("".join(f"thing {i}\n" for i in range(TINY_CLASSES)), encoding="utf-8")
    paths = []
    for name, options in SEED_MODELS.items():
        path = folder / name
        if not path.exists():
            subprocess.run(
                [
                    *klaus_command(),
                    "compress",
                    str(source),
                    "-o",
                    str(path),
                    "--labels",
                    str(names),
                    "--input-size",
                    str(TINY_SIZE),
                    *options,
                ],
                check=True,
                capture_output=True,
                timeout=600,
            )
        paths.append(path)
    return paths


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def _images(folder: Path) -> list[Path]:
    """Small images in the formats and modes Pillow writes (64 x 48)."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_pattern(64, 48, 1))
    gray = rgb.convert("L")
    exif = Image.Exif()
    exif[0x0112] = 6
    made: dict[str, tuple[Image.Image, dict]] = {
        "rgb.jpg": (rgb, {"quality": 90}),
        "rotated.jpg": (rgb, {"quality": 90, "exif": exif.tobytes()}),
        "progressive.jpg": (rgb, {"quality": 80, "progressive": True}),
        "gray.jpg": (gray, {}),
        "cmyk.jpg": (rgb.convert("CMYK"), {}),
        "rgb.png": (rgb, {}),
        "rgba.png": (rgb.convert("RGBA"), {}),
        "la.png": (gray.convert("LA"), {}),
        "palette.png": (rgb.convert("P"), {}),
        "palette-trns.png": (rgb.convert("P"), {"transparency": 0}),
        "bilevel.png": (gray.convert("1"), {}),
        "sixteen.png": (Image.fromarray(np.asarray(gray).astype(np.uint16) * 257), {}),
        "optimized.png": (rgb, {"optimize": True}),
        "still.gif": (rgb.convert("P"), {}),
        "rgb.bmp": (rgb, {}),
        "rgb.tif": (rgb, {}),
        "float.tif": (Image.fromarray(np.asarray(gray, dtype=np.float32) / 255.0), {}),
        "ycbcr.tif": (rgb, {"compression": "jpeg"}),
        "rgb.webp": (rgb, {"quality": 80}),
        "rgba.webp": (rgb.convert("RGBA"), {"lossless": True}),
        "rgb.ppm": (rgb, {}),
        "rgb.ico": (rgb, {}),
    }
    paths = []
    for name, (image, options) in made.items():
        path = folder / name
        if not path.exists():
            image.save(path, **options)
        paths.append(path)
    animated = folder / "animated.gif"
    if not animated.exists():
        frames = [Image.fromarray(_pattern(64, 48, s)).convert("P") for s in range(3)]
        frames[0].save(animated, save_all=True, append_images=frames[1:], duration=50, loop=0)
    paths.append(animated)
    apng = folder / "animated.png"
    if not apng.exists():
        frames = [Image.fromarray(_pattern(64, 48, s)) for s in range(3)]
        frames[0].save(apng, save_all=True, append_images=frames[1:], duration=50)
    paths.append(apng)
    for example in ("cat.jpg", "coffee.jpg"):
        paths.append(EXAMPLES / example)
    return paths


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def zeros_deflated(total: int, level: int = 9) -> bytes:
    """A zlib stream of ``total`` zero bytes, built without compressing them all.

    After a full flush a deflate compressor starts afresh, so the compressed form of one
    MiB of zeros repeats byte for byte; the stream is the first piece (with the zlib header),
    copies of the next, a final block for the rest, and the Adler-32 of the zeros (a = 1,
    b = n mod 65521).
    """
    block = 1 << 20
    compressor = zlib.compressobj(level)
    first = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    full, rest = divmod(total, block)
    tail = compressor.compress(bytes(rest)) + compressor.flush(zlib.Z_FINISH)
    body = (first + again * (full - 1) if full else first[:2]) + tail[:-4]
    return body + struct.pack(">I", ((total % 65521) << 16) | 1)


def map_png(rows: int, cols: int, idat: bytes, depth: int = 8) -> bytes:
    ihdr = struct.pack(">IIBBBBB", cols, rows, depth, 0, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def _bombs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for rows, cols in BOMB_MAPS:
        path = folder / f"map-{rows}x{cols}.png"
        if not path.exists():
            data = map_png(rows, cols, zeros_deflated(rows * (cols + 1)))
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
    xz = folder / "labels-zeros.xz"
    if not xz.exists():  # 128 MiB of spaces: valid JSON whitespace, twice the reader's 64 MiB cap
        compressor = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=1)
        block = b" " * (1 << 24)
        data = b"".join(compressor.compress(block) for _ in range(8)) + compressor.flush()
        xz.write_bytes(data)
