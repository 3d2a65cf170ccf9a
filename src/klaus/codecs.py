"""Tensor payload codecs: raw little-endian floats and k-means index maps as PNG.

An index map is stored as a grayscale PNG, one row per leading-axis slice of the
tensor (the output channels of a Conv/Gemm weight), so every PNG tool — oxipng,
zopfli, `pngcrush -brute` — can shrink it, and any image viewer can look at it.

PNG bit depth: indices of ``bits`` bits may be packed at the smallest legal
depth >= bits (1, 2, 4, 8) or stored one per byte (depth 8). Deflate codes
bytes, so packing two 4-bit indices per byte hides their distribution from its
Huffman coder; storing one index per byte lets Huffman coding approach the
order-0 entropy. Neither wins everywhere, so the encoder tries both and keeps
the smaller (measured in `bench/codec.py`); the decoder accepts either.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import NamedTuple

import numpy as np

from .errors import KlausFormatError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_DEPTHS = (1, 2, 4, 8)
RAW_DTYPES: dict[str, np.dtype[np.floating]] = {"raw-f32": np.dtype("<f4"), "raw-f16": np.dtype("<f2")}
PALETTE_CODECS = ("palette-png",)
CODECS = (*RAW_DTYPES, *PALETTE_CODECS)


class PngOptions(NamedTuple):
    """How hard to squeeze index maps: oxipng level (None = plain zlib -9), zopfli deflate."""

    level: int | None = 2
    zopfli: bool = False
    filters: tuple[str, ...] = ("NoOp", "Sub", "Up", "Paeth", "MinSum")


# ---------------------------------------------------------------- raw payloads


def encode_raw(array: np.ndarray, codec: str) -> bytes:
    dtype = RAW_DTYPES[codec]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def decode_raw(payload: bytes, dims: tuple[int, ...], codec: str) -> np.ndarray:
    dtype = RAW_DTYPES[codec]
    count = int(np.prod(dims, dtype=np.int64))
    if len(payload) != count * dtype.itemsize:
        raise KlausFormatError(
            f"{codec} payload has {len(payload)} bytes, expected {count * dtype.itemsize} for shape {list(dims)}"
        )
    array = np.frombuffer(payload, dtype=dtype).reshape(dims).astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise KlausFormatError(f"{codec} payload holds NaN or infinite values")
    return array


# ---------------------------------------------------------------- PNG index maps


def index_map_shape(dims: tuple[int, ...]) -> tuple[int, int]:
    """Rows = leading axis (output channels), columns = everything else."""
    if not dims:
        return 1, 1
    rows = int(dims[0])
    cols = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
    return rows, cols


def png_depth_candidates(bits: int) -> tuple[int, ...]:
    packed = next(d for d in PNG_DEPTHS if d >= bits)
    return (packed,) if packed == 8 else (packed, 8)


def _pack_rows(indices: np.ndarray, depth: int) -> np.ndarray:
    rows, cols = indices.shape
    if depth == 8:
        return indices.astype(np.uint8, copy=False)
    per_byte = 8 // depth
    padded = np.pad(indices.astype(np.uint8), ((0, 0), (0, (-cols) % per_byte)))
    groups = padded.reshape(rows, -1, per_byte)
    shifts = (8 - depth * (np.arange(per_byte, dtype=np.uint8) + 1)).astype(np.uint8)
    return np.bitwise_or.reduce(groups << shifts, axis=-1).astype(np.uint8)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _plain_png(indices: np.ndarray, depth: int) -> bytes:
    rows, cols = indices.shape
    packed = _pack_rows(indices, depth)
    scanlines = np.concatenate([np.zeros((rows, 1), np.uint8), packed], axis=1)
    header = struct.pack(">IIBBBBB", cols, rows, depth, 0, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 9))
        + _chunk(b"IEND", b"")
    )


def _optimize_png(data: bytes, options: PngOptions) -> bytes:
    if options.level is None:
        return data
    import oxipng  # optional speed/size helper; listed as a runtime dependency

    deflate = oxipng.Deflaters.zopfli(15) if options.zopfli else oxipng.Deflaters.libdeflater(12)
    return oxipng.optimize_from_memory(
        data,
        level=options.level,
        # Keep the file a plain grayscale index map that the reader validates.
        bit_depth_reduction=False,
        color_type_reduction=False,
        palette_reduction=False,
        grayscale_reduction=False,
        strip=oxipng.StripChunks.all(),
        deflate=deflate,
        filter=[getattr(oxipng.RowFilter, name) for name in options.filters],
    )


def encode_png_indices(indices: np.ndarray, bits: int, options: PngOptions = PngOptions()) -> bytes:
    """Smallest PNG over the legal bit depths for a 2-D map of ``bits``-bit indices."""
    if indices.ndim != 2 or indices.size == 0:
        raise ValueError("index map must be a non-empty 2-D array")
    if not 1 <= bits <= 8 or int(indices.max()) >= (1 << bits):
        raise ValueError(f"indices do not fit in {bits} bits")
    candidates = [_optimize_png(_plain_png(indices, d), options) for d in png_depth_candidates(bits)]
    return min(candidates, key=len)


def _walk_png(data: bytes) -> tuple[int, int, int, bytes]:
    """Check PNG structure and CRCs; return (width, height, depth, IDAT data) of a plain grayscale map."""
    if not data.startswith(PNG_SIGNATURE):
        raise KlausFormatError("index map is not a PNG (bad signature)")
    pos, header, seen_end = len(PNG_SIGNATURE), None, False
    idat: list[bytes] = []
    while pos < len(data):
        if pos + 12 > len(data):
            raise KlausFormatError("index map PNG is truncated")
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if length > len(data) or end > len(data):
            raise KlausFormatError("index map PNG is truncated")
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(kind + body) != crc:
            raise KlausFormatError(f"index map PNG chunk {kind!r} fails its CRC")
        if header is None and kind != b"IHDR":
            raise KlausFormatError("index map PNG does not start with IHDR")
        if kind == b"IHDR":
            if header is not None or length != 13:
                raise KlausFormatError("index map PNG has a malformed IHDR")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            seen_end = True
            if end != len(data):
                raise KlausFormatError("index map PNG has data after IEND")
        elif not kind[:1].islower():
            raise KlausFormatError(f"index map PNG has an unsupported critical chunk {kind!r}")
        pos = end
    if header is None or not idat or not seen_end:
        raise KlausFormatError("index map PNG is truncated (missing IHDR, IDAT or IEND)")
    width, height, depth, color, compression, filtering, interlace = header
    if color != 0 or depth not in PNG_DEPTHS or compression != 0 or filtering != 0 or interlace != 0:
        raise KlausFormatError(
            f"index map PNG must be 1/2/4/8-bit grayscale, not interlaced (got depth {depth}, color type {color})"
        )
    return width, height, depth, b"".join(idat)


def _inflate_image_data(idat: bytes, rows: int, cols: int, depth: int) -> bytes:
    """The scanlines, inflated once and never past their declared size: the zlib stream must end
    exactly after the last scanline (no missing rows, no trailing data)."""
    expected = rows * (1 + (cols * depth + 7) // 8)
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(idat, expected + 1)
    except zlib.error as exc:
        raise KlausFormatError(f"index map PNG data is corrupt ({exc})") from None
    if len(raw) != expected or not inflater.eof or inflater.unused_data:
        raise KlausFormatError(f"index map PNG holds {len(raw)} bytes of scanlines, expected {expected}")
    return raw


def _stored_png(width: int, height: int, depth: int, scanlines: bytes) -> bytes:
    """A PNG of already inflated scanlines in stored (level 0) deflate blocks: Pillow then only
    undoes the row filters, instead of inflating the map a second time."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(scanlines, 0)) + _chunk(b"IEND", b"")


def decode_png_indices(data: bytes, rows: int, cols: int, bits: int) -> np.ndarray:
    """Validate the PNG against the shape and bit width the tensor table declares, then decode."""
    width, height, depth, idat = _walk_png(data)
    if (height, width) != (rows, cols):
        raise KlausFormatError(f"index map is {width}x{height}, expected {cols}x{rows}")
    if depth < bits:
        raise KlausFormatError(f"index map has bit depth {depth}, too small for {bits}-bit indices")
    scanlines = _inflate_image_data(idat, rows, cols, depth)
    values = _unfiltered_bytes(scanlines, rows, cols) if depth == 8 else None
    if values is None:
        values = _unfiltered_by_pillow(_stored_png(width, height, depth, scanlines), depth)
    if int(values.max(initial=0)) >= (1 << bits):
        raise KlausFormatError(f"index map holds indices >= 2^{bits}")
    return values


def _unfiltered_bytes(scanlines: bytes, rows: int, cols: int) -> np.ndarray | None:
    """An 8-bit map's indices read straight from its scanlines when every row is unfiltered (filter
    type 0, as most maps are), skipping Pillow; None when some row needs unfiltering."""
    lines = np.frombuffer(scanlines, np.uint8).reshape(rows, 1 + cols)
    return None if lines[:, 0].any() else np.ascontiguousarray(lines[:, 1:])


def _unfiltered_by_pillow(stored: bytes, depth: int) -> np.ndarray:
    """The indices of a stored-deflate PNG (:func:`_stored_png`) as uint8, Pillow undoing the row filters."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # the size is the declared tensor's, already within bounds
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(stored), formats=["PNG"]) as image:
                image.load()
                pixels = np.asarray(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise KlausFormatError(f"index map PNG cannot be decoded ({exc})") from None
    # Pillow scales 1/2/4-bit gray to 0..255; undo it exactly.
    step = 1 if depth == 8 else 255 // ((1 << depth) - 1)
    values = pixels.astype(np.uint8) if depth == 1 else pixels // step
    if depth not in (1, 8) and np.any(pixels % step):
        raise KlausFormatError("index map PNG holds values that are not valid indices")
    return values.astype(np.uint8, copy=False)


# ---------------------------------------------------------------- measures


def order0_entropy_bytes(indices: np.ndarray) -> float:
    """Order-0 (memoryless) entropy bound of an index map, in bytes."""
    counts = np.bincount(indices.reshape(-1).astype(np.int64))
    counts = counts[counts > 0]
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum() / 8.0)


def dequantize(palette: np.ndarray, indices: np.ndarray, scales: np.ndarray | None, scale_axis: int) -> np.ndarray:
    """``palette[indices]`` in float32, times the fp16 ``scales`` along ``scale_axis`` when given.

    The product is taken in float32, in place on the one array the lookup makes, so a decoded
    tensor costs one float32 copy and any decoder doing the same float32 multiplication (the
    browser's included) gets the same bits.
    """
    values = palette.astype(np.float32)[indices]
    if scales is not None:
        shape = [1] * values.ndim
        shape[scale_axis] = -1
        values *= scales.astype(np.float32).reshape(shape)
    return values
