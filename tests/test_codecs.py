"""Tensor payload codecs: raw floats and k-means index maps stored as grayscale PNG."""

from __future__ import annotations

import io
import math
import struct
import zlib
from itertools import pairwise

import numpy as np
import pytest
from PIL import Image

from klaus import codecs
from klaus.codecs import PngOptions
from klaus.errors import KlausFormatError

PLAIN = PngOptions(level=None)
OXI = PngOptions(level=2)


# ---------------------------------------------------------------- helpers


def chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """[(kind, body)] of a well-formed PNG (no validation beyond structure)."""
    assert png.startswith(codecs.PNG_SIGNATURE)
    pos, out = len(codecs.PNG_SIGNATURE), []
    while pos < len(png):
        (length,) = struct.unpack_from(">I", png, pos)
        out.append((png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    assert pos == len(png)
    return out


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def build(parts: list[tuple[bytes, bytes]]) -> bytes:
    return codecs.PNG_SIGNATURE + b"".join(chunk(k, b) for k, b in parts)


def ihdr(png: bytes) -> tuple[int, int, int, int, int, int, int]:
    kind, body = chunks(png)[0]
    assert kind == b"IHDR"
    return struct.unpack(">IIBBBBB", body)


def random_map(rows: int, cols: int, bits: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)


def independent_decode(png: bytes) -> np.ndarray:
    """Decode an unfiltered, non-interlaced grayscale PNG without Pillow or klaus."""
    width, height, depth, color, _, _, interlace = ihdr(png)
    assert color == 0 and interlace == 0
    raw = zlib.decompress(b"".join(b for k, b in chunks(png) if k == b"IDAT"))
    stride = (width * depth + 7) // 8
    lines = np.frombuffer(raw, np.uint8).reshape(height, stride + 1)
    assert np.all(lines[:, 0] == 0), "plain encoder must write filter type 0"
    body = lines[:, 1:]
    if depth == 8:
        return body.copy()
    bitsarr = np.unpackbits(body, axis=1).reshape(height, -1, depth)
    weights = 1 << np.arange(depth - 1, -1, -1)
    return (bitsarr * weights).sum(axis=-1)[:, :width].astype(np.uint8)


# ---------------------------------------------------------------- raw payloads


@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (10,), (), (2, 0, 3), (7, 13)])
def test_raw_f32_round_trip_is_exact(shape):
    array = (np.random.default_rng(1).standard_normal(shape) * 3).astype(np.float32)
    payload = codecs.encode_raw(array, "raw-f32")
    assert len(payload) == 4 * math.prod(shape)
    assert payload == array.astype("<f4").tobytes()
    out = codecs.decode_raw(payload, shape, "raw-f32")
    assert out.dtype == np.float32 and out.shape == shape
    assert np.array_equal(out, array)


@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (10,), (), (7, 13)])
def test_raw_f16_round_trip_rounds_to_half(shape):
    array = (np.random.default_rng(2).standard_normal(shape) * 3).astype(np.float32)
    payload = codecs.encode_raw(array, "raw-f16")
    assert len(payload) == 2 * math.prod(shape)
    out = codecs.decode_raw(payload, shape, "raw-f16")
    assert out.dtype == np.float32 and out.shape == shape
    assert np.array_equal(out, array.astype(np.float16).astype(np.float32))
    # values already representable in fp16 survive exactly
    exact = array.astype(np.float16).astype(np.float32)
    assert np.array_equal(codecs.decode_raw(codecs.encode_raw(exact, "raw-f16"), shape, "raw-f16"), exact)


def test_raw_encoding_is_little_endian():
    assert codecs.encode_raw(np.array([1.0], np.float32), "raw-f32") == b"\x00\x00\x80\x3f"
    assert codecs.encode_raw(np.array([1.0], np.float32), "raw-f16") == b"\x00\x3c"


@pytest.mark.parametrize("codec", ["raw-f32", "raw-f16"])
@pytest.mark.parametrize("delta", [-1, 1, -2, 2, 4])
def test_raw_wrong_payload_length_is_rejected(codec, delta):
    array = np.ones((4, 5), np.float32)
    payload = codecs.encode_raw(array, codec)
    bad = payload[:delta] if delta < 0 else payload + b"\x00" * delta
    with pytest.raises(KlausFormatError, match="expected"):
        codecs.decode_raw(bad, (4, 5), codec)


@pytest.mark.parametrize("codec", ["raw-f32", "raw-f16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_raw_non_finite_values_are_rejected(codec, bad):
    array = np.zeros(6, np.float32)
    array[3] = bad
    with pytest.raises(KlausFormatError, match="NaN or infinite"):
        codecs.decode_raw(codecs.encode_raw(array, codec), (6,), codec)


def test_raw_f16_inf_bit_pattern_is_rejected():
    # 0x7c00 is fp16 +inf (what 1e6 becomes); the decoder must not let it through
    payload = b"\x00\x3c\x00\x7c"
    with pytest.raises(KlausFormatError):
        codecs.decode_raw(payload, (2,), "raw-f16")


# ---------------------------------------------------------------- PNG layout


def test_index_map_shape():
    assert codecs.index_map_shape((16, 3, 3, 3)) == (16, 27)
    assert codecs.index_map_shape((10, 64)) == (10, 64)
    assert codecs.index_map_shape((64, 16, 1, 1)) == (64, 16)
    assert codecs.index_map_shape((5,)) == (5, 1)
    assert codecs.index_map_shape(()) == (1, 1)


@pytest.mark.parametrize(
    ("bits", "expected"),
    [(1, (1, 8)), (2, (2, 8)), (3, (4, 8)), (4, (4, 8)), (5, (8,)), (6, (8,)), (7, (8,)), (8, (8,))],
)
def test_png_depth_candidates(bits, expected):
    assert codecs.png_depth_candidates(bits) == expected


# ---------------------------------------------------------------- PNG round trips


@pytest.mark.parametrize("options", [PLAIN, OXI], ids=["zlib", "oxipng2"])
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("kind", ["random", "constant-zero", "constant-max"])
def test_png_round_trip(bits, options, kind):
    rows, cols = 7, 13  # odd width: rows do not fill whole bytes at depths 1, 2, 4
    if kind == "random":
        indices = random_map(rows, cols, bits, seed=bits)
        indices[0, 0], indices[-1, -1] = 0, (1 << bits) - 1  # both extremes present
    elif kind == "constant-zero":
        indices = np.zeros((rows, cols), np.uint8)
    else:
        indices = np.full((rows, cols), (1 << bits) - 1, np.uint8)
    png = codecs.encode_png_indices(indices, bits, options)
    width, height, depth, color, _, _, _ = ihdr(png)
    assert (width, height, color) == (cols, rows, 0)
    assert depth in codecs.png_depth_candidates(bits)
    out = codecs.decode_png_indices(png, rows, cols, bits)
    assert out.dtype == np.uint8
    assert np.array_equal(out, indices)


@pytest.mark.parametrize("cols", [1, 3, 13, 64])
@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_plain_png_packs_bits_msb_first(depth, cols):
    """Check the encoder's bit packing with a decoder that shares no code with it."""
    indices = random_map(5, cols, depth, seed=cols)
    png = codecs._plain_png(indices, depth)
    assert ihdr(png) == (cols, 5, depth, 0, 0, 0, 0)
    assert np.array_equal(independent_decode(png), indices)
    assert np.array_equal(codecs.decode_png_indices(png, 5, cols, depth), indices)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_decoder_accepts_one_index_per_byte(bits):
    indices = random_map(9, 13, bits, seed=3)
    png = codecs._plain_png(indices, 8)
    assert ihdr(png)[2] == 8
    assert np.array_equal(codecs.decode_png_indices(png, 9, 13, bits), indices)


@pytest.mark.parametrize("options", [PLAIN, OXI], ids=["zlib", "oxipng2"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_encoder_keeps_the_smallest_depth_candidate(bits, options):
    # skewed data, where packed and one-per-byte sizes genuinely differ
    rng = np.random.default_rng(bits)
    k = 1 << bits
    p = np.exp(-np.arange(k) / max(1.0, k / 6))
    indices = rng.choice(k, size=(40, 51), p=p / p.sum()).astype(np.uint8)
    sizes = {
        d: len(codecs._optimize_png(codecs._plain_png(indices, d), options)) for d in codecs.png_depth_candidates(bits)
    }
    png = codecs.encode_png_indices(indices, bits, options)
    assert len(png) == min(sizes.values())
    assert sizes[ihdr(png)[2]] == len(png)
    assert np.array_equal(codecs.decode_png_indices(png, 40, 51, bits), indices)


def test_oxipng_output_is_no_larger_than_plain_zlib():
    indices = random_map(64, 144, 4, seed=9) // 3  # values 0..5 in 4 bits
    plain = codecs.encode_png_indices(indices, 4, PLAIN)
    oxi = codecs.encode_png_indices(indices, 4, OXI)
    assert len(oxi) <= len(plain)
    # oxipng must leave a plain grayscale map the strict reader accepts
    assert ihdr(oxi)[3] == 0
    assert {k for k, _ in chunks(oxi)} <= {b"IHDR", b"IDAT", b"IEND"}
    assert np.array_equal(codecs.decode_png_indices(oxi, 64, 144, 4), indices)


def test_encoding_is_deterministic():
    indices = random_map(16, 27, 6, seed=4)
    assert codecs.encode_png_indices(indices, 6, OXI) == codecs.encode_png_indices(indices, 6, OXI)
    assert codecs.encode_png_indices(indices, 6, PLAIN) == codecs.encode_png_indices(indices, 6, PLAIN)


def test_png_is_a_real_image_other_tools_can_open():
    indices = random_map(8, 13, 8, seed=5)
    png = codecs.encode_png_indices(indices, 8, OXI)
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.mode == "L" and image.size == (13, 8)
        assert np.array_equal(np.asarray(image), indices)


@pytest.mark.parametrize(
    ("array", "bits"),
    [
        (np.zeros((0, 3), np.uint8), 4),
        (np.zeros(5, np.uint8), 4),
        (np.zeros((2, 2, 2), np.uint8), 4),
        (np.full((2, 3), 16, np.uint8), 4),
        (np.full((2, 3), 2, np.uint8), 1),
        (np.zeros((2, 3), np.uint8), 0),
        (np.zeros((2, 3), np.uint8), 9),
    ],
)
def test_encoder_rejects_bad_maps(array, bits):
    with pytest.raises(ValueError):
        codecs.encode_png_indices(array, bits, PLAIN)


# ---------------------------------------------------------------- PNG decoder rejects


@pytest.fixture
def good_png() -> tuple[bytes, np.ndarray]:
    indices = random_map(6, 13, 4, seed=11)
    return codecs._plain_png(indices, 4), indices


def test_reference_png_decodes(good_png):
    png, indices = good_png
    assert np.array_equal(codecs.decode_png_indices(png, 6, 13, 4), indices)


@pytest.mark.parametrize(("rows", "cols"), [(13, 6), (6, 12), (6, 14), (5, 13), (7, 13), (1, 78)])
def test_decode_rejects_wrong_shape(good_png, rows, cols):
    png, _ = good_png
    with pytest.raises(KlausFormatError, match="expected"):
        codecs.decode_png_indices(png, rows, cols, 4)


@pytest.mark.parametrize(("depth", "bits"), [(1, 2), (2, 3), (4, 5), (4, 8), (1, 8)])
def test_decode_rejects_depth_below_bits(depth, bits):
    png = codecs._plain_png(random_map(3, 13, depth), depth)
    with pytest.raises(KlausFormatError, match="bit depth"):
        codecs.decode_png_indices(png, 3, 13, bits)


@pytest.mark.parametrize(("bits", "value"), [(1, 2), (2, 4), (3, 8), (4, 16), (7, 128), (5, 255)])
def test_decode_rejects_index_out_of_range(bits, value):
    indices = np.zeros((3, 13), np.uint8)
    indices[2, 7] = value
    png = codecs._plain_png(indices, 8)
    with pytest.raises(KlausFormatError, match=f"2\\^{bits}"):
        codecs.decode_png_indices(png, 3, 13, bits)


def test_decode_rejects_packed_value_out_of_range():
    # depth 4 holds up to 15, but the table says the indices are 3-bit
    indices = np.zeros((2, 13), np.uint8)
    indices[1, 12] = 9
    png = codecs._plain_png(indices, 4)
    with pytest.raises(KlausFormatError):
        codecs.decode_png_indices(png, 2, 13, 3)


def _pillow_png(mode: str, array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("mode", "array"),
    [
        ("RGB", np.zeros((4, 13, 3), np.uint8)),
        ("RGBA", np.zeros((4, 13, 4), np.uint8)),
        ("LA", np.zeros((4, 13, 2), np.uint8)),
    ],
)
def test_decode_rejects_color_png(mode, array):
    png = _pillow_png(mode, array)
    assert ihdr(png)[3] != 0
    with pytest.raises(KlausFormatError, match="grayscale"):
        codecs.decode_png_indices(png, 4, 13, 4)


def test_decode_rejects_palette_png():
    image = Image.fromarray(np.zeros((4, 13), np.uint8), mode="L").convert("P")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    png = buf.getvalue()
    assert ihdr(png)[3] == 3
    with pytest.raises(KlausFormatError):
        codecs.decode_png_indices(png, 4, 13, 4)


def test_decode_rejects_16_bit_png():
    buf = io.BytesIO()
    Image.fromarray(np.arange(52, dtype=np.uint16).reshape(4, 13)).save(buf, format="PNG")
    png = buf.getvalue()
    assert ihdr(png)[2] == 16 and ihdr(png)[3] == 0
    with pytest.raises(KlausFormatError, match="grayscale"):
        codecs.decode_png_indices(png, 4, 13, 8)


def test_decode_rejects_bad_crc(good_png):
    png, _ = good_png
    parts = chunks(png)
    idat_at = png.index(b"IDAT")
    for offset in (idat_at + 4, idat_at + 4 + len(parts[1][1]) - 1, idat_at + 4 + len(parts[1][1])):
        bad = bytearray(png)
        bad[offset] ^= 0x20
        with pytest.raises(KlausFormatError, match="CRC"):
            codecs.decode_png_indices(bytes(bad), 6, 13, 4)
    bad = bytearray(png)
    bad[png.index(b"IHDR") + 5] ^= 0x01  # inside IHDR's width
    with pytest.raises(KlausFormatError, match="CRC"):
        codecs.decode_png_indices(bytes(bad), 6, 13, 4)


def test_decode_rejects_every_truncation(good_png):
    png, _ = good_png
    for n in range(len(png)):
        with pytest.raises(KlausFormatError):
            codecs.decode_png_indices(png[:n], 6, 13, 4)


def test_decode_rejects_data_after_iend(good_png):
    png, _ = good_png
    for tail in (b"\x00", b"garbage", chunk(b"tEXt", b"k\x00v"), chunk(b"IEND", b"")):
        with pytest.raises(KlausFormatError):
            codecs.decode_png_indices(png + tail, 6, 13, 4)


def test_decode_rejects_missing_iend(good_png):
    png, _ = good_png
    parts = chunks(png)
    assert parts[-1][0] == b"IEND"
    with pytest.raises(KlausFormatError, match="IEND"):
        codecs.decode_png_indices(build(parts[:-1]), 6, 13, 4)


def test_decode_rejects_missing_idat(good_png):
    png, _ = good_png
    parts = [p for p in chunks(png) if p[0] != b"IDAT"]
    with pytest.raises(KlausFormatError):
        codecs.decode_png_indices(build(parts), 6, 13, 4)


def test_decode_rejects_chunk_before_ihdr(good_png):
    png, _ = good_png
    parts = chunks(png)
    with pytest.raises(KlausFormatError, match="IHDR"):
        codecs.decode_png_indices(build([(b"tEXt", b"a\x00b"), *parts]), 6, 13, 4)


def test_decode_rejects_duplicate_ihdr(good_png):
    png, _ = good_png
    parts = chunks(png)
    with pytest.raises(KlausFormatError, match="IHDR"):
        codecs.decode_png_indices(build([parts[0], *parts]), 6, 13, 4)


@pytest.mark.parametrize("kind", [b"ABCD", b"PLTE", b"XxXx"])
def test_decode_rejects_unknown_critical_chunk(good_png, kind):
    png, _ = good_png
    parts = chunks(png)
    with pytest.raises(KlausFormatError, match="critical"):
        codecs.decode_png_indices(build([*parts[:-1], (kind, b"\x00\x01"), parts[-1]]), 6, 13, 4)


def test_decode_ignores_ancillary_chunks(good_png):
    png, indices = good_png
    parts = chunks(png)
    extra = build([parts[0], (b"tEXt", b"Comment\x00hi"), *parts[1:-1], (b"abcd", b""), parts[-1]])
    assert np.array_equal(codecs.decode_png_indices(extra, 6, 13, 4), indices)


def test_decode_rejects_bad_signature(good_png):
    png, _ = good_png
    with pytest.raises(KlausFormatError, match="signature"):
        codecs.decode_png_indices(b"\x88" + png[1:], 6, 13, 4)
    with pytest.raises(KlausFormatError):
        codecs.decode_png_indices(b"", 6, 13, 4)


def test_decode_rejects_corrupt_deflate_stream(good_png):
    png, _ = good_png
    parts = chunks(png)
    body = bytearray(parts[1][1])
    body[len(body) // 2] ^= 0xFF
    bad = build([parts[0], (b"IDAT", bytes(body)), parts[-1]])  # CRC recomputed: only zlib can notice
    with pytest.raises(KlausFormatError):
        codecs.decode_png_indices(bad, 6, 13, 4)


@pytest.mark.parametrize("missing", [1, 5, 8, 20, 40], ids=lambda n: f"{n}B")
def test_decode_rejects_short_image_data(good_png, missing):
    """An IDAT stream that ends early (cleanly, with a valid CRC) must not decode.

    Each scanline of the 6x13 depth-4 map is 1 + 7 bytes, so 8 and 40 missing
    bytes drop whole rows (a stream truncated at a row boundary); 1, 5 and 20 end mid-row.
    """
    png, _ = good_png
    parts = chunks(png)
    raw = zlib.decompress(parts[1][1])
    assert len(raw) == 6 * 8
    short = zlib.compress(raw[:-missing])
    with pytest.raises(KlausFormatError, match=f"holds {48 - missing} bytes of scanlines, expected 48"):
        codecs.decode_png_indices(build([parts[0], (b"IDAT", short), parts[-1]]), 6, 13, 4)


def _idat_stream(good_png, change) -> bytes:
    png, _ = good_png
    parts = chunks(png)
    raw = zlib.decompress(parts[1][1])
    assert len(raw) == 6 * 8
    return build([parts[0], (b"IDAT", change(raw)), parts[-1]])


@pytest.mark.parametrize(
    "change",
    [
        lambda raw: zlib.compress(raw + b"\x00"),  # one byte more than 6 scanlines
        lambda raw: zlib.compress(raw + raw[:8]),  # a whole extra (valid) scanline
        lambda raw: zlib.compress(raw + raw),  # twice the rows
    ],
    ids=["1B", "row", "double"],
)
def test_decode_rejects_long_image_data(good_png, change):
    """The inflated data must be exactly height * (1 + ceil(width * depth / 8)) bytes."""
    with pytest.raises(KlausFormatError, match="bytes of scanlines, expected 48"):
        codecs.decode_png_indices(_idat_stream(good_png, change), 6, 13, 4)


def _unterminated(raw: bytes) -> bytes:
    z = zlib.compressobj(9)
    return z.compress(raw) + z.flush(zlib.Z_SYNC_FLUSH)  # every byte is there, the stream never ends


@pytest.mark.parametrize(
    "change",
    [
        _unterminated,
        lambda raw: zlib.compress(raw) + b"\x00",  # bytes after the end of the zlib stream
        lambda raw: zlib.compress(raw) + zlib.compress(b""),  # a second zlib stream
    ],
    ids=["unterminated", "trailing-byte", "second-stream"],
)
def test_decode_rejects_zlib_stream_not_ending_after_the_last_scanline(good_png, change):
    png = _idat_stream(good_png, change)
    assert len(zlib.decompressobj().decompress(b"".join(b for k, b in chunks(png) if k == b"IDAT"))) == 48
    with pytest.raises(KlausFormatError, match="expected 48"):
        codecs.decode_png_indices(png, 6, 13, 4)


@pytest.mark.parametrize("pieces", [2, 3, 7])
def test_decode_accepts_image_data_split_over_several_idat_chunks(good_png, pieces):
    png, indices = good_png
    parts = chunks(png)
    stream = parts[1][1]
    cuts = np.linspace(0, len(stream), pieces + 1).astype(int)
    idats = [(b"IDAT", stream[a:b]) for a, b in pairwise(cuts)]
    assert len(idats) == pieces and b"".join(b for _, b in idats) == stream
    assert np.array_equal(codecs.decode_png_indices(build([parts[0], *idats, parts[-1]]), 6, 13, 4), indices)


@pytest.mark.parametrize(("rows", "cols", "depth"), [(5, 1, 1), (3, 8, 1), (3, 9, 1), (4, 7, 2), (2, 3, 4), (1, 17, 8)])
def test_image_data_length_rule_at_row_padding_edges(rows, cols, depth):
    """height * (1 + ceil(width * depth / 8)) holds for widths that do and do not fill the last byte."""
    indices = random_map(rows, cols, depth, seed=rows * cols)
    png = codecs._plain_png(indices, depth)
    raw = zlib.decompress(b"".join(b for k, b in chunks(png) if k == b"IDAT"))
    assert len(raw) == rows * (1 + math.ceil(cols * depth / 8))
    assert np.array_equal(codecs.decode_png_indices(png, rows, cols, depth), indices)
    header = chunks(png)[0]
    for bad in (raw[: -(1 + math.ceil(cols * depth / 8))], raw + b"\x00"):
        with pytest.raises(KlausFormatError, match="bytes of scanlines"):
            codecs.decode_png_indices(build([header, (b"IDAT", zlib.compress(bad)), (b"IEND", b"")]), rows, cols, depth)


def test_decode_rejects_bad_filter_type(good_png):
    png, _ = good_png
    parts = chunks(png)
    raw = bytearray(zlib.decompress(parts[1][1]))
    raw[8] = 7  # second scanline: filter types are 0..4
    with pytest.raises(KlausFormatError):
        codecs.decode_png_indices(build([parts[0], (b"IDAT", zlib.compress(bytes(raw))), parts[-1]]), 6, 13, 4)


def test_decode_rejects_unsupported_header_fields(good_png):
    png, _ = good_png
    parts = chunks(png)
    width, height = struct.unpack(">II", parts[0][1][:8])
    for depth, color, comp, filt, interlace in [
        (3, 0, 0, 0, 0),
        (4, 0, 1, 0, 0),
        (4, 0, 0, 1, 0),
        (4, 0, 0, 0, 1),
        (4, 0, 0, 0, 2),
        (4, 4, 0, 0, 0),
    ]:
        header = struct.pack(">IIBBBBB", width, height, depth, color, comp, filt, interlace)
        with pytest.raises(KlausFormatError, match="must be 1/2/4/8-bit grayscale, not interlaced"):
            codecs.decode_png_indices(build([(b"IHDR", header), *parts[1:]]), 6, 13, 4)


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def adam7_png(indices: np.ndarray, depth: int) -> bytes:
    """A genuinely interlaced grayscale PNG (Pillow cannot write one)."""
    rows, cols = indices.shape
    raw = b""
    for x0, y0, dx, dy in ADAM7:
        sub = indices[y0::dy, x0::dx]
        if sub.size:
            packed = codecs._pack_rows(np.ascontiguousarray(sub), depth)
            raw += np.concatenate([np.zeros((sub.shape[0], 1), np.uint8), packed], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", cols, rows, depth, 0, 0, 0, 1)
    return build([(b"IHDR", header), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")])


@pytest.mark.parametrize("depth", [1, 4, 8])
def test_decode_rejects_interlaced_png(depth):
    """docs/format.md: interlace must be 0. The map below is a valid Adam7 PNG (Pillow
    reads back the indices), so only the interlace rule can reject it."""
    indices = random_map(11, 13, depth, seed=12)
    png = adam7_png(indices, depth)
    assert ihdr(png)[6] == 1
    with Image.open(io.BytesIO(png)) as image:
        pixels = np.asarray(image).astype(np.uint8)
    scale = 1 if depth in (1, 8) else 255 // ((1 << depth) - 1)
    assert np.array_equal(pixels, indices * scale)
    with pytest.raises(KlausFormatError, match="not interlaced"):
        codecs.decode_png_indices(png, 11, 13, depth)


# ---------------------------------------------------------------- entropy


def test_order0_entropy_matches_hand_computation():
    assert codecs.order0_entropy_bytes(np.zeros((4, 7), np.uint8)) == 0.0
    assert codecs.order0_entropy_bytes(np.array([[0, 0, 1, 1]], np.uint8)) == pytest.approx(0.5)
    # 3/4, 1/4: H = 0.811278 bits per symbol, 4 symbols
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert codecs.order0_entropy_bytes(np.array([[0, 3, 0, 0]], np.uint8)) == pytest.approx(4 * h / 8)
    # uniform over 16 symbols, each used 8 times: 4 bits per symbol
    uniform = np.repeat(np.arange(16, dtype=np.uint8), 8).reshape(8, 16)
    assert codecs.order0_entropy_bytes(uniform) == pytest.approx(128 * 4 / 8)
    # counts 1, 2, 5 (gaps in the alphabet do not matter)
    counts = {2: 1, 5: 2, 200: 5}
    values = np.array([v for v, c in counts.items() for _ in range(c)], np.uint8).reshape(2, 4)
    total = sum(counts.values())
    expect = -sum(c * math.log2(c / total) for c in counts.values()) / 8
    assert codecs.order0_entropy_bytes(values) == pytest.approx(expect)


def _skewed_map(bits: int, rows: int, cols: int, seed: int) -> np.ndarray:
    """Laplacian-shaped index distribution, like k-means indices of a weight tensor."""
    k = 1 << bits
    p = np.exp(-np.abs(np.arange(k) - k / 2) / (k / 8))
    return np.random.default_rng(seed).choice(k, size=(rows, cols), p=p / p.sum()).astype(np.uint8)


@pytest.mark.parametrize(
    ("bits", "options", "bound"), [(4, OXI, 1.05), (6, OXI, 1.05), (4, PLAIN, 1.10), (6, PLAIN, 1.10)]
)
def test_png_size_is_close_to_order0_entropy(bits, options, bound):
    indices = _skewed_map(bits, 256, 1152, seed=bits)
    entropy = codecs.order0_entropy_bytes(indices)
    png = codecs.encode_png_indices(indices, bits, options)
    ratio = len(png) / entropy
    print(f"bits={bits} level={options.level}: png {len(png)} B, entropy {entropy:.0f} B, ratio {ratio:.4f}")
    assert 1.0 <= ratio < bound
    assert np.array_equal(codecs.decode_png_indices(png, 256, 1152, bits), indices)
