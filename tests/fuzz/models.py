"""Mutations of `.klaus` model files (see the package docstring).

Each mutator takes a seeded :class:`random.Random`, the copy of a seed model to change in
place, and the corpus, and returns a one-line description of what it did. SQLite-level
mutations edit rows with ``sqlite3`` and then, most of the time, recompute the checksums
(tensor digests, the graph digest and the content digest, as docs/format.md defines them),
so the mutation reaches the checks behind them.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import random
import shutil
import sqlite3
import struct
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .corpus import BOMB_MAPS, PNG_SIGNATURE, Corpus, map_png, png_chunk, zeros_deflated

FIXUP_PROBABILITY = 0.85
Mutator = Callable[[random.Random, Path, Corpus], str]

HOSTILE_TEXT = [
    "",
    " ",
    "x" * 100_000,
    "\n",
    "two\nlines",
    "\x1b[31mred\x1b[0m",
    "\u202eevil",
    "null",
    "[]",
    "{}",
    "0",
    "-1",
    "1e999",
    "NaN",
    "Infinity",
    "99999999999999999999999",
    "🙂" * 1000,
    "[" * 10_000 + "]" * 10_000,
    '{"a":' * 5000 + "1" + "}" * 5000,
    "\x00",
    "\ufeff{}",
]
HOSTILE_JSON_VALUES: list[object] = [
    0,
    -1,
    1,
    3.5,
    10**9,
    2**63,
    -(2**63),
    1e308,
    1e-300,
    5e-324,
    True,
    False,
    None,
    "",
    "224",
    [],
    {},
    [1, 2],
    [0, 0, 0],
    [5e-324] * 3,
    [1e-300] * 3,
    [1e300] * 3,
    [-1, 1, 1],
    ["a", "b", "c"],
    [[1], [2], [3]],
    "\n",
]


# ---------------------------------------------------------------- helpers


def _dumps(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def xz(data: bytes) -> bytes:
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=6)


@contextmanager
def edit(path: Path):
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA ignore_check_constraints = ON")
        conn.execute("BEGIN")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


def _blob(value: object) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


def fixup(conn: sqlite3.Connection) -> None:
    """Recompute every checksum of the file, as the writer would (what cannot be parsed is left)."""
    for ord_, payload, palette, scales in conn.execute("SELECT ord, payload, palette, scales FROM tensors").fetchall():
        digest = hashlib.sha256(_blob(payload) + _blob(palette) + _blob(scales)).hexdigest()
        conn.execute("UPDATE tensors SET sha256 = ? WHERE ord = ?", (digest, ord_))
    try:
        (blob,) = conn.execute("SELECT onnx FROM graph").fetchone()
        conn.execute(
            "UPDATE graph SET sha256 = ?", (hashlib.sha256(lzma.decompress(blob, format=lzma.FORMAT_XZ)).hexdigest(),)
        )
    except (TypeError, lzma.LZMAError, sqlite3.Error, MemoryError):
        pass
    try:
        (payload,) = conn.execute("SELECT payload FROM labelset").fetchone()
        data = json.loads(lzma.decompress(payload, format=lzma.FORMAT_XZ, memlimit=1 << 27)[: 64 << 20])
        labels = sorted(([r[0], r[1], r[2], _dumps(r[3])] for r in data["labels"]), key=lambda r: r[0])
        synsets = sorted((list(r) for r in data["synsets"]), key=lambda r: r[0])
        meta = sorted([list(r) for r in conn.execute("SELECT key, value FROM meta") if r[0] != "content_sha256"])
        digest = hashlib.sha256(_dumps([meta, labels, synsets]).encode("utf-8")).hexdigest()
        conn.execute("UPDATE meta SET value = ? WHERE key = 'content_sha256'", (digest,))
    except Exception:  # a mutated label set: its digest cannot be made, which is a case too
        pass


def _maybe_fixup(rng: random.Random, path: Path) -> str:
    if rng.random() >= FIXUP_PROBABILITY:
        return " (checksums left stale)"
    with edit(path) as conn:
        fixup(conn)
    return ""


def _tensor_rows(conn: sqlite3.Connection, codec: str | None = None) -> list[tuple]:
    sql = "SELECT ord, name, dims, codec, bits, palette, scales, scale_axis, payload FROM tensors"
    rows = conn.execute(sql).fetchall()
    return [r for r in rows if codec is None or r[3] == codec]


def _set(conn: sqlite3.Connection, ord_: int, column: str, value: object) -> None:
    try:
        conn.execute(f"UPDATE tensors SET {column} = ? WHERE ord = ?", (value, ord_))
    except sqlite3.IntegrityError:  # NOT NULL: store the nearest thing the schema allows
        conn.execute(f"UPDATE tensors SET {column} = ? WHERE ord = ?", (b"" if column in ("payload",) else "", ord_))


# ---------------------------------------------------------------- raw bytes


def bytes_flip(rng: random.Random, path: Path, corpus: Corpus) -> str:
    data = bytearray(path.read_bytes())
    n = rng.choice((1, 2, 4, 16, 64))
    for _ in range(n):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"{n} bytes flipped"


def bytes_truncate(rng: random.Random, path: Path, corpus: Corpus) -> str:
    data = path.read_bytes()
    cut = rng.choice((rng.randrange(len(data)), (len(data) // 1024) * 1024 - 1024, 100, 16, 0))
    path.write_bytes(data[: max(0, cut)])
    return f"truncated to {max(0, cut)} bytes"


def bytes_splice(rng: random.Random, path: Path, corpus: Corpus) -> str:
    data = bytearray(path.read_bytes())
    start = rng.randrange(len(data))
    length = rng.choice((8, 100, 1024, 4096))
    fill = rng.choice(("zero", "ff", "random"))
    chunk = bytes(length) if fill == "zero" else b"\xff" * length if fill == "ff" else rng.randbytes(length)
    data[start : start + length] = chunk
    path.write_bytes(bytes(data))
    return f"{length} {fill} bytes at {start}"


def bytes_extend(rng: random.Random, path: Path, corpus: Corpus) -> str:
    extra = rng.choice((b"\0" * 1024, rng.randbytes(1000), b"SQLite format 3\0" * 64))
    with open(path, "ab") as f:
        f.write(extra)
    return f"{len(extra)} bytes appended"


# ---------------------------------------------------------------- meta


def meta_value(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        keys = [r[0] for r in conn.execute("SELECT key FROM meta")]
        key = rng.choice(keys)
        value = rng.choice(HOSTILE_TEXT)
        conn.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
    return f"meta {key} = {value[:30]!r}" + _maybe_fixup(rng, path)


def meta_preprocess(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        spec = json.loads(conn.execute("SELECT value FROM meta WHERE key = 'preprocess'").fetchone()[0])
        field = rng.choice(
            ["input_size", "resize", "crop_ratio", "interpolation", "mean", "std", "channel_order", "layout", "extra"]
        )
        choice = rng.random()
        if choice < 0.1:
            spec.pop(field, None)
            text = _dumps(spec)
        elif choice < 0.25:  # values JSON allows but no encoder writes
            text = _dumps(spec).replace(
                "}", f',"{field}":' + rng.choice(["NaN", "-Infinity", "1e400", "[NaN,1,1]"]) + "}"
            )
        else:
            spec[field] = rng.choice(HOSTILE_JSON_VALUES)
            text = _dumps(spec)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'preprocess'", (text,))
    return f"preprocess {text[:80]}" + _maybe_fixup(rng, path)


def meta_drop(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        if rng.random() < 0.5:
            key = rng.choice([r[0] for r in conn.execute("SELECT key FROM meta")])
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            what = f"meta {key} dropped"
        else:
            key = rng.choice(["unknown", "x\ny", "", "description"])
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, rng.choice(HOSTILE_TEXT)))
            what = f"meta {key!r} added"
    return what + _maybe_fixup(rng, path)


def meta_output(rng: random.Random, path: Path, corpus: Corpus) -> str:
    value = rng.choice(["probabilities", "probabilities", "logits", "softmax", "", "PROBABILITIES"])
    with edit(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'output'", (value,))
        if rng.random() < 0.3:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'format_version'", (rng.choice(["1", "3", "two", ""]),))
    return f"output = {value!r}" + _maybe_fixup(rng, path)


# ---------------------------------------------------------------- label set


def _labelset(conn: sqlite3.Connection) -> dict:
    return json.loads(lzma.decompress(conn.execute("SELECT payload FROM labelset").fetchone()[0]))


def labels_json(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        data = _labelset(conn)
        labels, synsets = data["labels"], data["synsets"]
        kind = rng.choice(
            [
                "drop",
                "add",
                "dup-name",
                "gap",
                "float-idx",
                "words",
                "newline",
                "huge-name",
                "wnid",
                "cycle",
                "deep",
                "shape",
                "truncated",
                "not-utf8",
            ]
        )
        payload: bytes | None = None
        if kind == "drop":
            del labels[-rng.randint(1, max(1, len(labels) // 2)) :]
        elif kind == "add":
            labels.append([len(labels), "", f"extra {len(labels)}", ["extra"]])
        elif kind == "dup-name" and len(labels) > 1:
            labels[1][2] = labels[0][2]
        elif kind == "gap":
            labels[-1][0] += 5
        elif kind == "float-idx":
            labels[0][0] = 0.0 if rng.random() < 0.5 else True
        elif kind == "words":
            labels[0][3] = rng.choice(["text", None, [1, 2], {"a": 1}])
        elif kind == "newline":
            labels[0][2] = rng.choice(["two\nlines", "\x1b[2Jclear", "tab\tbed", "\u2028sep"])
        elif kind == "huge-name":
            labels[0][2] = "n" * rng.choice((10_000, 1_000_000))
        elif kind == "wnid":
            labels[0][1] = rng.choice(["n123", "x00000000", "n00000000", "n02084071"])
        elif kind == "cycle" and synsets:
            synsets[0][2] = synsets[-1][0]
            synsets[-1][2] = synsets[0][0]
        elif kind == "deep":
            chain = [[f"n9{i:07d}", f"level {i}", f"n9{i - 1:07d}" if i else ""] for i in range(100)]
            synsets.extend(chain)
            labels[0][1] = chain[-1][0]
        elif kind == "shape":
            shapes: list[Any] = [[], {"labels": labels}, {"labels": labels, "synsets": synsets, "more": 1}, "x", None]
            data = rng.choice(shapes)
        elif kind == "truncated":
            payload = xz(_dumps(data).encode()[: rng.randrange(1, 200)])
        elif kind == "not-utf8":
            payload = xz(b'{"labels": [[0, "", "\xff\xfe", []]], "synsets": []}')
        if payload is None:
            payload = xz(_dumps(data).encode("utf-8", "surrogatepass"))
        conn.execute("UPDATE labelset SET payload = ?", (payload,))
    return f"labels: {kind}" + _maybe_fixup(rng, path)


def labels_bomb(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        conn.execute("UPDATE labelset SET payload = ?", (corpus.xz_bomb.read_bytes(),))
    return "labels: xz stream of 128 MiB of spaces" + _maybe_fixup(rng, path)


# ---------------------------------------------------------------- tensors


def tensor_dims(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        row = rng.choice(_tensor_rows(conn))
        dims = json.loads(row[2])
        value = rng.choice(
            [
                "[]",
                "[0]",
                "[-1]",
                "[1e9]",
                "[1.5]",
                "[true]",
                "not json",
                "[65536,65536]",
                "[46340,46340]",
                "[2,2,2,2,2,2,2,2,2]",
                _dumps(dims[::-1]),
                _dumps([*dims, 1]),
                _dumps([d * 2 for d in dims]),
                _dumps([2**62, 4]),
                "[" + "9" * 400 + "]",
                _dumps(dims[:-1]) if len(dims) > 1 else "[1,1]",
            ]
        )
        _set(conn, row[0], "dims", value)
    return f"{row[1]} dims {value[:40]}" + _maybe_fixup(rng, path)


def tensor_codec(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        row = rng.choice(_tensor_rows(conn))
        codec = rng.choice(["raw-f32", "raw-f16", "palette-png", "png", "", "raw-f64", "PALETTE-PNG"])
        _set(conn, row[0], "codec", codec)
        if rng.random() < 0.3:
            _set(conn, row[0], "dtype", rng.choice(["float16", "int8", "", "float32 "]))
    return f"{row[1]} codec {codec!r}" + _maybe_fixup(rng, path)


def tensor_bits(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        row = rng.choice(_tensor_rows(conn))
        bits = rng.choice([0, 1, 2, 7, 8, 9, 16, -1, 255, 2**40, "8", 4.5])
        _set(conn, row[0], "bits", bits)
    return f"{row[1]} bits {bits!r}" + _maybe_fixup(rng, path)


def _fp16(values: list[float]) -> bytes:
    return np.asarray(values, dtype="<f2").tobytes()


def tensor_palette(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        rows = _tensor_rows(conn, "palette-png") or _tensor_rows(conn)
        row = rng.choice(rows)
        palette = row[5] or b""
        value = rng.choice(
            [
                None,
                b"",
                b"\x00",
                palette[:-2],
                palette + palette,
                palette * 64,
                _fp16([np.nan] * 4),
                _fp16([np.inf, 1.0]),
                _fp16([65504.0] * 256),
                rng.randbytes(len(palette) or 8),
                "text",
            ]
        )
        _set(conn, row[0], "palette", value)
    return f"{row[1]} palette {len(value) if isinstance(value, (bytes, str)) else value}" + _maybe_fixup(rng, path)


def tensor_scales(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        row = rng.choice(_tensor_rows(conn))
        scales = row[6] or _fp16([1.0] * 4)
        choice = rng.randrange(6)
        if choice == 0:
            _set(conn, row[0], "scales", scales[:-2])
        elif choice == 1:
            _set(conn, row[0], "scales", _fp16([np.nan] * (len(scales) // 2)))
        elif choice == 2:
            _set(conn, row[0], "scale_axis", rng.choice([-1, 4, 99, 2**40, None, "0"]))
        elif choice == 3:
            _set(conn, row[0], "scales", None)
        elif choice == 4:
            _set(conn, row[0], "scales", scales * 3)
        else:
            _set(conn, row[0], "scales", _fp16([0.0] * (len(scales) // 2)))
    return f"{row[1]} scales/axis change {choice}" + _maybe_fixup(rng, path)


def tensor_payload(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        rows = _tensor_rows(conn)
        row = rng.choice(rows)
        payload = row[8] or b""
        other = rng.choice(rows)[8]
        value = rng.choice(
            [
                b"",
                payload[: len(payload) // 2],
                payload + b"\0" * 8,
                rng.randbytes(len(payload) or 16),
                other,
                bytes(10 << 20),
                np.full(max(1, len(payload) // 4), np.nan, np.float32).tobytes(),
                np.full(max(1, len(payload) // 2), np.inf, np.float16).tobytes(),
                "text payload",
            ]
        )
        _set(conn, row[0], "payload", value)
    return f"{row[1]} payload of {len(value)} bytes" + _maybe_fixup(rng, path)


def tensor_row(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        rows = _tensor_rows(conn)
        row = rng.choice(rows)
        kind = rng.choice(["delete", "duplicate-name", "rename", "newline-name", "gap", "insert"])
        if kind == "delete":
            conn.execute("DELETE FROM tensors WHERE ord = ?", (row[0],))
        elif kind == "duplicate-name":
            other = rng.choice(rows)
            try:
                conn.execute("UPDATE tensors SET name = ? WHERE ord = ?", (other[1], row[0]))
            except sqlite3.IntegrityError:
                kind = "duplicate-name (refused by UNIQUE)"
        elif kind == "rename":
            conn.execute("UPDATE tensors SET name = ? WHERE ord = ?", ("no.such.initializer", row[0]))
        elif kind == "newline-name":
            conn.execute("UPDATE tensors SET name = ? WHERE ord = ?", (row[1] + "\n\x1b[31m", row[0]))
        elif kind == "gap":
            conn.execute("UPDATE tensors SET ord = ord + 100 WHERE ord = ?", (row[0],))
        else:
            conn.execute(
                "INSERT INTO tensors SELECT ord + 1000, name || '.copy', dims, dtype, codec, bits, palette, scales, "
                "scale_axis, payload, sha256 FROM tensors WHERE ord = ?",
                (row[0],),
            )
    return f"{row[1]}: {kind}" + _maybe_fixup(rng, path)


# ---------------------------------------------------------------- PNG index maps


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], len(PNG_SIGNATURE)
    while pos + 8 <= len(png):
        (length,) = struct.unpack_from(">I", png, pos)
        kind = png[pos + 4 : pos + 8]
        out.append((kind, png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return out


def _assemble(chunks: list[tuple[bytes, bytes]], good_crc: bool = True) -> bytes:
    data = PNG_SIGNATURE
    for kind, body in chunks:
        chunk = png_chunk(kind, body)
        data += chunk if good_crc else chunk[:-4] + b"\0\0\0\0"
    return data


def _palette_tensor(conn: sqlite3.Connection, rng: random.Random) -> tuple | None:
    rows = _tensor_rows(conn, "palette-png")
    return rng.choice(rows) if rows else None


def png_header(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        row = _palette_tensor(conn, rng)
        if row is None:
            return "no index map"  # (png mutations start from seeds with index maps)
        chunks = _chunks(row[8])
        width, height, depth, color, comp, filt, inter = struct.unpack(">IIBBBBB", chunks[0][1])
        field = rng.choice(["width", "height", "both", "depth", "color", "compression", "filter", "interlace"])
        if field == "width":
            width = rng.choice([0, width + 1, width - 1, width * 1000, 2**31 - 1])
        elif field == "height":
            height = rng.choice([0, height + 1, height * 1000, 2**31 - 1])
        elif field == "both":
            width, height = height, width
        elif field == "depth":
            depth = rng.choice([1, 2, 4, 8, 16, 3, 0])
        elif field == "color":
            color = rng.choice([2, 3, 4, 6, 7])
        elif field == "compression":
            comp = 1
        elif field == "filter":
            filt = 1
        else:
            inter = 1
        chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, comp, filt, inter))
        _set(conn, row[0], "payload", _assemble(chunks, rng.random() < 0.9))
    return f"{row[1]} IHDR {field}" + _maybe_fixup(rng, path)


def png_data(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        row = _palette_tensor(conn, rng)
        if row is None:
            return "no index map"  # (png mutations start from seeds with index maps)
        chunks = _chunks(row[8])
        idat = b"".join(body for kind, body in chunks if kind == b"IDAT")
        raw = zlib.decompress(idat)
        kind = rng.choice(["flip", "short", "long", "filter", "split", "empty", "raw-deflate", "values"])
        if kind == "flip":
            data = bytearray(idat)
            data[rng.randrange(len(data))] ^= 0xFF
            new = bytes(data)
        elif kind == "short":
            new = zlib.compress(raw[: len(raw) // 2])
        elif kind == "long":
            new = zlib.compress(raw + raw)
        elif kind == "filter":
            data = bytearray(raw)
            data[0] = rng.choice([5, 255])
            new = zlib.compress(bytes(data))
        elif kind == "values":
            new = zlib.compress(bytes(b if i % 7 else 0xFF for i, b in enumerate(raw)))
        elif kind == "raw-deflate":
            new = zlib.compress(raw)[2:-4]
        else:
            new = b"" if kind == "empty" else idat
        rest = [(k, b) for k, b in chunks if k not in (b"IDAT", b"IEND")]
        pieces = [(b"IDAT", new[i : i + 7]) for i in range(0, len(new), 7)] if kind == "split" else [(b"IDAT", new)]
        _set(conn, row[0], "payload", _assemble([*rest, *pieces, (b"IEND", b"")]))
    return f"{row[1]} IDAT {kind}" + _maybe_fixup(rng, path)


def png_chunks(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        row = _palette_tensor(conn, rng)
        if row is None:
            return "no index map"  # (png mutations start from seeds with index maps)
        chunks = _chunks(row[8])
        kind = rng.choice(
            ["text", "ztxt-bomb", "critical", "dup-ihdr", "no-iend", "after-iend", "reorder", "signature"]
        )
        payload = None
        if kind == "text":
            chunks.insert(1, (b"tEXt", b"Comment\0" + b"x" * 100_000))
        elif kind == "ztxt-bomb":
            chunks.insert(1, (b"zTXt", b"Comment\0\0" + zeros_deflated(50 << 20)))
        elif kind == "critical":
            chunks.insert(1, (b"ABCD", b"data"))
        elif kind == "dup-ihdr":
            chunks.insert(1, chunks[0])
        elif kind == "no-iend":
            chunks = chunks[:-1]
        elif kind == "after-iend":
            payload = _assemble(chunks) + b"trailing"
        elif kind == "reorder":
            chunks = chunks[1:] + chunks[:1]
        else:
            payload = b"\x89PNG\r\n\x1a\x00" + _assemble(chunks)[8:]
        _set(conn, row[0], "payload", payload if payload is not None else _assemble(chunks))
    return f"{row[1]} chunks {kind}" + _maybe_fixup(rng, path)


def png_bomb(rng: random.Random, path: Path, corpus: Corpus) -> str:
    """An index map whose zlib stream inflates to gigabytes: either declared (dims and IHDR say so)
    or hidden (the header declares the real small map, the stream holds far more)."""
    rows, cols = rng.choice(BOMB_MAPS)
    declared = rng.random() < 0.6
    with edit(path) as conn:
        row = _palette_tensor(conn, rng) or rng.choice(_tensor_rows(conn))
        what = _install_bomb_map(conn, row, corpus, rows, cols, declared)
    return f"{row[1]}: {what}" + _maybe_fixup(rng, path)


def _install_bomb_map(
    conn: sqlite3.Connection, row: tuple, corpus: Corpus, rows: int, cols: int, declared: bool
) -> str:
    bomb = corpus.bomb_map(rows, cols).read_bytes()
    if declared:
        _set(conn, row[0], "payload", bomb)
        _set(conn, row[0], "dims", _dumps([rows, cols]))
        _set(conn, row[0], "codec", "palette-png")
        _set(conn, row[0], "bits", 8)
        _set(conn, row[0], "palette", _fp16([0.0] * 256))
        _set(conn, row[0], "scales", None)
        _set(conn, row[0], "scale_axis", None)
        return f"declared {cols}x{rows} map"
    dims = json.loads(row[2])
    map_rows, map_cols = dims[0], int(np.prod(dims[1:])) if len(dims) > 1 else 1
    idat = b"".join(body for kind, body in _chunks(bomb) if kind == b"IDAT")
    _set(conn, row[0], "payload", map_png(map_rows, map_cols, idat))
    return f"{map_cols}x{map_rows} map whose stream inflates to {rows * (cols + 1) >> 20} MiB"


# ---------------------------------------------------------------- the graph


def _skeleton(conn: sqlite3.Connection):
    import onnx

    (blob,) = conn.execute("SELECT onnx FROM graph").fetchone()
    return onnx.load_from_string(lzma.decompress(blob))


def _store_graph(conn: sqlite3.Connection, model_bytes: bytes) -> None:
    conn.execute("UPDATE graph SET onnx = ?, sha256 = ?", (xz(model_bytes), hashlib.sha256(model_bytes).hexdigest()))


def graph_bytes(rng: random.Random, path: Path, corpus: Corpus) -> str:
    with edit(path) as conn:
        (blob,) = conn.execute("SELECT onnx FROM graph").fetchone()
        data = bytearray(lzma.decompress(blob))
        n = rng.choice((1, 3, 10))
        for _ in range(n):
            data[rng.randrange(len(data))] = rng.randrange(256)
        _store_graph(conn, bytes(data))
    return f"{n} graph bytes changed" + _maybe_fixup(rng, path)


def graph_proto(rng: random.Random, path: Path, corpus: Corpus) -> str:
    from onnx import TensorProto, helper

    with edit(path) as conn:
        model = _skeleton(conn)
        graph = model.graph
        node = rng.choice(list(graph.node))
        kind = rng.choice(
            [
                "op",
                "attribute",
                "input-dims",
                "opset",
                "domain",
                "remove",
                "duplicate",
                "elem-type",
                "function",
                "metadata",
                "rename-output",
            ]
        )
        if kind == "op":
            node.op_type = rng.choice(
                [
                    "Loop",
                    "If",
                    "Scan",
                    "NonZero",
                    "Unique",
                    "Identity",
                    "Softmax",
                    "Foo",
                    "",
                    "MaxPool",
                    "Relu",
                    "Resize",
                    "TopK",
                    "Tile",
                    "Expand",
                ]
            )
        elif kind == "attribute" and node.attribute:
            attribute = rng.choice(list(node.attribute))
            if attribute.ints:
                attribute.ints[rng.randrange(len(attribute.ints))] = rng.choice([0, -1, 2**31, 10**12, 100_000])
            elif attribute.type == attribute.INT:
                attribute.i = rng.choice([0, -1, 2**31, 10**12])
            elif attribute.type == attribute.FLOAT:
                attribute.f = rng.choice([float("nan"), float("inf"), -1e30])
            else:
                attribute.name = "bogus"
        elif kind == "input-dims":
            dims = graph.input[0].type.tensor_type.shape.dim
            if dims:
                dim = dims[rng.randrange(len(dims))]
                choice = rng.choice([0, -1, 10**9, 4097, 1, "n"])
                if isinstance(choice, str):
                    dim.dim_param = choice
                else:
                    dim.dim_value = choice
        elif kind == "opset":
            model.opset_import[0].version = rng.choice([1, 6, 7, 11, 23, 24, 99])
        elif kind == "domain":
            node.domain = rng.choice(["com.microsoft", "custom", "ai.onnx.ml"])
        elif kind == "remove":
            graph.node.remove(node)
        elif kind == "duplicate":
            graph.node.append(node)
        elif kind == "elem-type":
            graph.output[0].type.tensor_type.elem_type = rng.choice([TensorProto.STRING, TensorProto.INT64, 0, 99])
        elif kind == "function":
            model.functions.append(
                helper.make_function(
                    "custom",
                    "F",
                    ["x"],
                    ["y"],
                    [helper.make_node("Identity", ["x"], ["y"])],
                    [helper.make_opsetid("", 17)],
                )
            )
        elif kind == "metadata":
            entry = model.metadata_props.add()
            entry.key, entry.value = "k\n", "v\x1b" * 1000
        else:
            graph.output[0].name = "renamed\noutput"
        _store_graph(conn, model.SerializeToString())
    return f"graph: {kind} ({node.name or node.op_type})" + _maybe_fixup(rng, path)


def _const(name: str, array: np.ndarray):
    from onnx import helper, numpy_helper

    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name), name=name)


def _reduce_to_zero(source: str, prefix: str) -> list:
    """``source`` summed to a scalar and multiplied by 0: the output depends on the bomb, unchanged."""
    from onnx import helper

    return [
        helper.make_node("ReduceSum", [source], [f"{prefix}/sum"], keepdims=0, name=f"{prefix}/sum"),
        _const(f"{prefix}/zero", np.array(0.0, np.float32)),
        helper.make_node("Mul", [f"{prefix}/sum", f"{prefix}/zero"], [f"{prefix}/z"], name=f"{prefix}/mul"),
    ]


def bomb_nodes(kind: str, image: str) -> tuple[list, str]:
    """Nodes doing unbounded (or gigabytes of) work, and the scalar 0 they end in."""
    from onnx import TensorProto, helper

    p = f"bomb_{kind}"
    if kind == "loop-1e15":
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                helper.make_node("Identity", ["v_in"], ["v_out"]),
            ],
            "body",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("v_in", TensorProto.FLOAT, []),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("v_out", TensorProto.FLOAT, []),
            ],
        )
        nodes = [
            _const(f"{p}/trip", np.array(10**15, np.int64)),
            _const(f"{p}/cond", np.array(True)),
            _const(f"{p}/v0", np.array(0.0, np.float32)),
            helper.make_node("Loop", [f"{p}/trip", f"{p}/cond", f"{p}/v0"], [f"{p}/v"], body=body, name=f"{p}/loop"),
        ]
        return nodes + _reduce_to_zero(f"{p}/v", p), f"{p}/z"
    if kind == "constantofshape-30000":
        nodes = [
            _const(f"{p}/shape", np.array([30000, 30000], np.int64)),
            helper.make_node(
                "ConstantOfShape",
                [f"{p}/shape"],
                [f"{p}/big"],
                name=f"{p}/cos",
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
            ),
        ]
        return nodes + _reduce_to_zero(f"{p}/big", p), f"{p}/z"
    if kind == "range-1e10":
        nodes = [
            _const(f"{p}/start", np.array(0.0, np.float32)),
            _const(f"{p}/limit", np.array(1e10, np.float32)),
            _const(f"{p}/delta", np.array(1.0, np.float32)),
            helper.make_node("Range", [f"{p}/start", f"{p}/limit", f"{p}/delta"], [f"{p}/big"], name=f"{p}/range"),
        ]
        return nodes + _reduce_to_zero(f"{p}/big", p), f"{p}/z"
    if kind == "resize-x1000":
        nodes = [
            _const(f"{p}/scales", np.array([1, 1, 1000, 1000], np.float32)),
            helper.make_node("Resize", [image, "", f"{p}/scales"], [f"{p}/big"], name=f"{p}/resize"),
        ]
        return nodes + _reduce_to_zero(f"{p}/big", p), f"{p}/z"
    if kind == "conv-pads-100000":
        nodes = [
            _const(f"{p}/w", np.ones((1, 3, 1, 1), np.float32)),
            helper.make_node("Conv", [image, f"{p}/w"], [f"{p}/big"], pads=[100_000] * 4, name=f"{p}/conv"),
        ]
        return nodes + _reduce_to_zero(f"{p}/big", p), f"{p}/z"
    if kind == "pad-100000":
        nodes = [
            _const(f"{p}/pads", np.array([0, 0, 100_000, 100_000, 0, 0, 100_000, 100_000], np.int64)),
            helper.make_node("Pad", [image, f"{p}/pads"], [f"{p}/big"], name=f"{p}/pad"),
        ]
        return nodes + _reduce_to_zero(f"{p}/big", p), f"{p}/z"
    if kind == "expand-100000":
        nodes = [
            _const(f"{p}/one", np.array([1.0], np.float32)),
            _const(f"{p}/shape", np.array([100_000, 100_000], np.int64)),
            helper.make_node("Expand", [f"{p}/one", f"{p}/shape"], [f"{p}/big"], name=f"{p}/expand"),
        ]
        return nodes + _reduce_to_zero(f"{p}/big", p), f"{p}/z"
    if kind == "tile-3000":
        nodes = [
            _const(f"{p}/repeats", np.array([1, 1, 3000, 3000], np.int64)),
            helper.make_node("Tile", [image, f"{p}/repeats"], [f"{p}/big"], name=f"{p}/tile"),
        ]
        return nodes + _reduce_to_zero(f"{p}/big", p), f"{p}/z"
    raise ValueError(f"unknown bomb {kind!r}")


GRAPH_BOMBS = (
    "loop-1e15",
    "constantofshape-30000",
    "range-1e10",
    "resize-x1000",
    "conv-pads-100000",
    "pad-100000",
    "expand-100000",
    "tile-3000",
)


def insert_bomb(model, kind: str) -> None:
    """Make the graph's first output depend on a bomb (output + 0 * sum(bomb))."""
    from onnx import helper

    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    image = next(i.name for i in graph.input if i.name not in initializers)
    out = graph.output[0].name
    producer = next(n for n in graph.node if out in n.output)
    position = list(producer.output).index(out)
    producer.output[position] = f"{out}__before_bomb"
    nodes, z = bomb_nodes(kind, image)
    graph.node.extend([*nodes, helper.make_node("Add", [f"{out}__before_bomb", z], [out], name=f"bomb_{kind}/add")])


def graph_bomb(rng: random.Random, path: Path, corpus: Corpus, kind: str | None = None) -> str:
    kind = kind or rng.choice(GRAPH_BOMBS)
    with edit(path) as conn:
        model = _skeleton(conn)
        insert_bomb(model, kind)
        _store_graph(conn, model.SerializeToString())
        fixup(conn)  # bombs are about the graph, not the checksums
    return f"graph bomb {kind}"


MUTATORS: dict[str, Mutator] = {
    "bytes.flip": bytes_flip,
    "bytes.truncate": bytes_truncate,
    "bytes.splice": bytes_splice,
    "bytes.extend": bytes_extend,
    "meta.value": meta_value,
    "meta.preprocess": meta_preprocess,
    "meta.drop": meta_drop,
    "meta.output": meta_output,
    "labels.json": labels_json,
    "labels.bomb": labels_bomb,
    "tensor.dims": tensor_dims,
    "tensor.codec": tensor_codec,
    "tensor.bits": tensor_bits,
    "tensor.palette": tensor_palette,
    "tensor.scales": tensor_scales,
    "tensor.payload": tensor_payload,
    "tensor.row": tensor_row,
    "png.header": png_header,
    "png.data": png_data,
    "png.chunks": png_chunks,
    "png.bomb": png_bomb,
    "graph.bytes": graph_bytes,
    "graph.proto": graph_proto,
    "graph.bomb": graph_bomb,
}
#: Mutators that start from a small seed only (the embedded model would only make them slower).
SMALL_ONLY = {"png.bomb", "labels.bomb", "graph.bomb", "bytes.extend"}
#: Share of the other mutations that start from the embedded EfficientNet-Lite0.
EMBEDDED_SHARE = 0.15


#: Hand-built bombs, one by name (tests/test_fuzz.py runs each; bench/fuzz.py times them).
BOMBS = (
    *(f"graph:{kind}" for kind in GRAPH_BOMBS),
    "png:declared-13000",
    "png:declared-46340",
    "png:hidden-13000",
    "png:hidden-46340",
    "labels:xz-128MiB",
)


def bomb(name: str, corpus: Corpus, out: Path) -> str:
    """Write the bomb ``name`` (one of :data:`BOMBS`), built on the small palettized seed, to ``out``."""
    shutil.copyfile(corpus.tiny, out)
    family, _, variant = name.partition(":")
    if family == "graph":
        return graph_bomb(random.Random(0), out, corpus, variant)
    if family == "png":
        how, _, side = variant.partition("-")
        with edit(out) as conn:
            row = next(r for r in _tensor_rows(conn, "palette-png") if r[1] == "fc.weight")
            what = _install_bomb_map(conn, row, corpus, int(side), int(side), how == "declared")
            fixup(conn)
        return f"fc.weight: {what}"
    if family == "labels":
        with edit(out) as conn:
            conn.execute("UPDATE labelset SET payload = ?", (corpus.xz_bomb.read_bytes(),))
            fixup(conn)
        return "labels: xz stream of 128 MiB of spaces"
    raise ValueError(f"unknown bomb {name!r}")


def mutate(mutator: str, seed: int, corpus: Corpus, out: Path) -> str:
    """Write the mutated model for (``mutator``, ``seed``) to ``out``; its description."""
    if mutator.startswith("bomb:"):
        return bomb(mutator[len("bomb:") :], corpus, out)
    if mutator == "seed":  # the baseline: the small seed, unmodified
        shutil.copyfile(corpus.tiny, out)
        return f"{corpus.tiny.name}, unmodified"
    rng = random.Random(f"model/{mutator}/{seed}")
    small = [m for m in corpus.models if m != corpus.embedded]
    if mutator.startswith("png."):  # index maps: a seed that has some
        small = [m for m in small if "lossless" not in m.name]
    big = mutator.split(":")[0] not in SMALL_ONLY and rng.random() < EMBEDDED_SHARE
    source = corpus.embedded if big else rng.choice(small)
    shutil.copyfile(source, out)
    return f"{source.name}: " + MUTATORS[mutator](rng, out, corpus)
