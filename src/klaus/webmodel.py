"""The web container: a `.klaus` model repacked for browsers, specified in docs/format.md ("Web container").

A browser cannot open SQLite or xz without shipping a decoder for each, but it has
``DecompressionStream`` (gzip, zlib) and can hash and parse JSON. The web container
holds exactly the `.klaus` file's content — its meta rows with ``content_sha256``,
label rows, ONNX skeleton and tensor rows with the same digests — as a small binary
header, one canonical JSON header and the blobs, with the labels and graph gzip-
compressed instead of xz. Tensor payloads (PNG index maps, fp16 palettes and scales,
raw floats) are copied byte for byte, so the browser verifies the same SHA-256 values
as `klaus.format` and decodes the same weights.

Only :func:`to_web_container` lives here: the reader is the browser's
(``webapp/src/model.js``), which checks every field before use.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sqlite3
import struct
from typing import Any

from .errors import KlausFormatError
from .format import KlausModel, TensorRecord, parse_model, serialize, xz_decompress

MAGIC = b"KLAUSWEB"
VERSION = 1
# The fixed part: magic, u32 version, u32 header length (little-endian).
PREAMBLE = struct.Struct("<8sII")
MAX_HEADER_BYTES = 16 << 20
MAX_FILE_BYTES = 2 << 30
GRAPH_CODEC = "onnx+gzip"
LABELSET_CODEC = "json+gzip"


class _Layout:
    """Appends blobs to the data area in order and hands out their [offset, length]."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, data: bytes) -> list[int]:
        where = [self.size, len(data)]
        self.parts.append(data)
        self.size += len(data)
        return where


def to_web_container(source: str | os.PathLike[str] | KlausModel) -> bytes:
    """The web container of a `.klaus` file (or of a model as :func:`klaus.format.serialize` writes it).

    The file is validated by :func:`klaus.format.parse_model` first (every field, every
    tensor decoded), so a container is only ever made from a valid model. The same
    input gives the same bytes: canonical JSON, gzip with mtime 0 at level 9.
    """
    if isinstance(source, KlausModel):
        data, where = serialize(source), source.source_path or source.name
    else:
        where = os.fspath(source)
        data = _read_file(where)
    model = parse_model(data, where)
    model.decoded_weights()  # index maps and raw values are checked when decoded: refuse a bad file here
    meta_rows, labelset = _stored_rows(data, where)
    return _pack(model, meta_rows, labelset)


def _read_file(where: str) -> bytes:
    try:
        with open(where, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KlausFormatError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise KlausFormatError(f"{where}: is a directory, not a .klaus file") from None
    except OSError as exc:
        raise KlausFormatError(f"{where}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_FILE_BYTES:
        raise KlausFormatError(f"{where}: file is larger than the {MAX_FILE_BYTES}-byte limit")
    return data


def _stored_rows(data: bytes, where: str) -> tuple[list[list[str]], dict[str, list[list[Any]]]]:
    """The meta rows and the label/synset rows exactly as the (already validated) file stores them.

    Taken from the file rather than from :class:`KlausModel` so that ``content_sha256``,
    computed over these rows, stays valid: a file may list synsets no label path uses.
    """
    conn = sqlite3.connect(":memory:")
    try:
        conn.deserialize(data)
        conn.execute("PRAGMA query_only = ON")
        meta = [[k, v] for k, v in conn.execute("SELECT key, value FROM meta ORDER BY key")]
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == 1:
            labels = [
                [idx, wnid, name, json.loads(words)]
                for idx, wnid, name, words in conn.execute("SELECT idx, wnid, name, words FROM labels ORDER BY idx")
            ]
            synsets = [list(r) for r in conn.execute("SELECT wnid, name, parent FROM synsets ORDER BY wnid")]
        else:
            (payload,) = conn.execute("SELECT payload FROM labelset").fetchone()
            value = json.loads(xz_decompress(payload, where, "labelset payload").decode("utf-8"))
            labels = sorted(value["labels"], key=lambda r: r[0])
            synsets = sorted(value["synsets"], key=lambda r: r[0])
    except sqlite3.Error as exc:  # parse_model read the same bytes; kept for a clear message all the same
        raise KlausFormatError(f"{where}: corrupt database ({exc})") from None
    finally:
        conn.close()
    meta.sort(key=lambda row: row[0])
    return meta, {"labels": labels, "synsets": synsets}


def canonical_json(value: object) -> bytes:
    """Sorted keys, no spaces, UTF-8 without ASCII escaping: the form `klaus.format` hashes and the
    browser's reader demands (it re-serializes what it parsed and refuses any difference)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=9, mtime=0)


def _tensor_entry(t: TensorRecord, layout: _Layout) -> dict[str, object]:
    return {
        "name": t.name,
        "dims": list(t.dims),
        "dtype": t.dtype,
        "codec": t.codec,
        "bits": t.bits,
        "payload": layout.add(t.payload),
        "palette": None if t.palette is None else layout.add(t.palette),
        "scales": None if t.scales is None else layout.add(t.scales),
        "scale_axis": t.scale_axis,
        "sha256": t.sha256,
    }


def _pack(model: KlausModel, meta_rows: list[list[str]], labelset: dict[str, list[list[Any]]]) -> bytes:
    layout = _Layout()
    labels_json = canonical_json(labelset)
    labels_at = layout.add(_gzip(labels_json))
    graph_at = layout.add(_gzip(model.graph))
    graph_row = {"codec": GRAPH_CODEC, "offset": graph_at[0], "length": graph_at[1], "size": len(model.graph)}
    header = {
        "meta": meta_rows,
        "labelset": {"codec": LABELSET_CODEC, "offset": labels_at[0], "length": labels_at[1], "size": len(labels_json)},
        "graph": {**graph_row, "sha256": hashlib.sha256(model.graph).hexdigest()},  # the .klaus graph row's value
        "tensors": [_tensor_entry(t, layout) for t in model.tensors],
    }
    text = canonical_json(header)
    if len(text) > MAX_HEADER_BYTES:
        raise KlausFormatError(
            f"{model.source_path or model.name}: web container header is over {MAX_HEADER_BYTES} bytes"
        )
    return PREAMBLE.pack(MAGIC, VERSION, len(text)) + text + b"".join(layout.parts)
