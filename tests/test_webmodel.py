"""The web container (klaus.webmodel): deterministic, small, and holding exactly the .klaus content.

The container's reader is the browser's (webapp/src/model.js, tested in test_ondevice_parity.py);
here a few lines of Python read it back to check what the writer put where.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
import struct
from pathlib import Path

import pytest

from conftest import tiny_klaus
from klaus import format as fmt
from klaus.errors import KlausFormatError
from klaus.runtime import default_model_path
from klaus.webmodel import MAGIC, VERSION, canonical_json, to_web_container


def unpack(blob: bytes) -> tuple[dict, memoryview]:
    """Header and data area, checking the layout rules the browser's reader enforces."""
    magic, version, length = struct.unpack_from("<8sII", blob)
    assert (magic, version) == (MAGIC, VERSION)
    text = blob[16 : 16 + length]
    header = json.loads(text)
    assert canonical_json(header) == text, "the header is canonical JSON"
    return header, memoryview(blob)[16 + length :]


def ranges(header: dict) -> list[list[int]]:
    out = [[header[k]["offset"], header[k]["length"]] for k in ("labelset", "graph")]
    for t in header["tensors"]:
        out += [t[k] for k in ("payload", "palette", "scales") if t[k] is not None]
    return out


def stored_label_rows(path: Path) -> dict:
    conn = sqlite3.connect(path)
    try:
        (payload,) = conn.execute("SELECT payload FROM labelset").fetchone()
    finally:
        conn.close()
    return json.loads(fmt.xz_decompress(payload, str(path), "labelset"))


@pytest.fixture(scope="module")
def embedded() -> tuple[Path, bytes]:
    path = default_model_path()
    return path, to_web_container(path)


def test_same_model_same_bytes(embedded, tiny_klaus_path):
    path, blob = embedded
    assert to_web_container(path) == blob
    assert to_web_container(tiny_klaus_path) == to_web_container(tiny_klaus_path)


def test_a_model_object_packs_like_its_file(tiny_klaus_path):
    model = fmt.read_model(tiny_klaus_path)
    assert to_web_container(model) == to_web_container(tiny_klaus_path)


@pytest.mark.parametrize("which", ["embedded", "tiny"])
def test_at_most_5_percent_larger_than_the_klaus_file(which, embedded, tiny_klaus_path):
    path, blob = embedded if which == "embedded" else (tiny_klaus_path, to_web_container(tiny_klaus_path))
    assert len(blob) <= 1.05 * path.stat().st_size


def test_blobs_tile_the_data_area(embedded):
    header, data = unpack(embedded[1])
    position = 0
    for offset, length in sorted(ranges(header)):
        assert offset == position
        position += length
    assert position == len(data)


def test_every_field_round_trips(embedded):
    path, blob = embedded
    model = fmt.read_model(path)
    header, data = unpack(blob)
    assert dict(header["meta"]) == model.meta
    assert [k for k, _ in header["meta"]] == sorted(model.meta)

    graph = header["graph"]
    skeleton = gzip.decompress(data[graph["offset"] : graph["offset"] + graph["length"]])
    assert skeleton == model.graph and graph["size"] == len(skeleton) and graph["codec"] == "onnx+gzip"
    assert graph["sha256"] == hashlib.sha256(model.graph).hexdigest()

    labelset = header["labelset"]
    text = gzip.decompress(data[labelset["offset"] : labelset["offset"] + labelset["length"]])
    assert labelset["size"] == len(text) and labelset["codec"] == "json+gzip"
    assert json.loads(text) == stored_label_rows(path)
    assert canonical_json(json.loads(text)) == text

    assert [t["name"] for t in header["tensors"]] == [t.name for t in model.tensors]
    for entry, record in zip(header["tensors"], model.tensors, strict=True):
        assert entry["dims"] == list(record.dims)
        assert (entry["dtype"], entry["codec"], entry["bits"], entry["scale_axis"]) == (
            record.dtype,
            record.codec,
            record.bits,
            record.scale_axis,
        )
        assert entry["sha256"] == record.sha256 == record.digest()
        for key in ("payload", "palette", "scales"):
            stored = getattr(record, key)
            if stored is None:
                assert entry[key] is None
            else:
                offset, length = entry[key]
                assert bytes(data[offset : offset + length]) == stored


def test_content_digest_holds_over_the_container_rows(embedded):
    header, data = unpack(embedded[1])
    meta = header["meta"]
    labelset = header["labelset"]
    rows = json.loads(gzip.decompress(data[labelset["offset"] : labelset["offset"] + labelset["length"]]))
    labels = [
        (i, w, n, json.dumps(words, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
        for i, w, n, words in rows["labels"]
    ]
    synsets = [tuple(r) for r in rows["synsets"]]
    assert fmt.content_digest([tuple(r) for r in meta], labels, synsets) == dict(meta)[fmt.CONTENT_KEY]


def v1_copy(source: Path, target: Path) -> Path:
    """``source`` (a v2 file) rewritten as a version-1 file: label tables uncompressed, raw graph."""
    model = fmt.read_model(source)
    rows = stored_label_rows(source)
    conn = sqlite3.connect(":memory:")
    conn.execute(f"PRAGMA page_size = {fmt.PAGE_SIZE}")
    conn.execute(f"PRAGMA application_id = {fmt.APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    for ddl in fmt.SCHEMA_V1.values():
        conn.execute(ddl)
    meta = {**model.meta, "format_version": "1"}
    labels = [
        (i, w, n, json.dumps(words, separators=(",", ":"), ensure_ascii=False)) for i, w, n, words in rows["labels"]
    ]
    synsets = [tuple(r) for r in rows["synsets"]]
    meta[fmt.CONTENT_KEY] = fmt.content_digest(sorted(meta.items()), labels, synsets)
    conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
    conn.executemany("INSERT INTO labels VALUES (?, ?, ?, ?)", labels)
    conn.executemany("INSERT INTO synsets VALUES (?, ?, ?)", synsets)
    conn.execute("INSERT INTO graph VALUES (0, ?, ?)", (model.graph, hashlib.sha256(model.graph).hexdigest()))
    conn.executemany(
        "INSERT INTO tensors VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                i,
                t.name,
                json.dumps(list(t.dims)),
                t.dtype,
                t.codec,
                t.bits,
                t.palette,
                t.scales,
                t.scale_axis,
                t.payload,
                t.sha256,
            )
            for i, t in enumerate(model.tensors)
        ],
    )
    conn.commit()
    conn.execute("VACUUM")
    target.write_bytes(conn.serialize())
    conn.close()
    return target


def test_a_version_1_file_keeps_its_rows_and_digest(tmp_path, tiny_klaus_path):
    old = v1_copy(tiny_klaus_path, tmp_path / "v1.klaus")
    model = fmt.read_model(old)
    header, data = unpack(to_web_container(old))
    assert dict(header["meta"])["format_version"] == "1"
    assert dict(header["meta"])[fmt.CONTENT_KEY] == model.meta[fmt.CONTENT_KEY]
    labelset = header["labelset"]
    rows = json.loads(gzip.decompress(data[labelset["offset"] : labelset["offset"] + labelset["length"]]))
    assert rows == stored_label_rows(tiny_klaus_path)


def test_a_corrupt_model_is_refused_naming_the_file(tmp_path, tiny_klaus_path):
    bad = tmp_path / "bad.klaus"
    data = bytearray(tiny_klaus_path.read_bytes())
    data[-200] ^= 0xFF  # inside the last page: a tensor blob or the tables that index it
    bad.write_bytes(bytes(data))
    with pytest.raises(KlausFormatError, match=r"bad\.klaus"):
        to_web_container(bad)
    with pytest.raises(KlausFormatError, match="no such file"):
        to_web_container(tmp_path / "missing.klaus")


def test_a_tiny_model_with_palettes_is_packed(tmp_path):
    model = tiny_klaus()
    header, data = unpack(to_web_container(model))
    palettized = [t for t in header["tensors"] if t["codec"] == "palette-png"]
    assert palettized and all(t["palette"] is not None for t in palettized)
    assert sum(length for _, length in ranges(header)) == len(data)
