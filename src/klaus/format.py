"""The `.klaus` container: one SQLite3 database, specified in docs/format.md.

Reading never trusts the file: the whole file is read into memory (bounded),
its SQLite header is checked against its length, the database is deserialized
into a private in-memory connection (so no journal or WAL beside the file can be
replayed and nothing is written), ``PRAGMA quick_check`` must pass, the schema
must match this module's byte for byte, and every field of every row is checked
against the specification before any tensor is decoded. Any failure is one
:class:`KlausFormatError` naming the file and the problem.

The writer writes version 2 (label tables and graph xz-compressed, because they
were 4 % of the shipped model's bytes); the reader also reads version 1. Both
versions feed the same label checks and the same content digest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import lzma
import math
import os
import re
import sqlite3
import stat
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from operator import itemgetter
from typing import Any, NamedTuple, TypeGuard

import numpy as np

from . import codecs, limits, onnxwire, shapes
from .errors import KlausFormatError, KlausWriteError
from .preprocess import Preprocess

FORMAT_NAME = "klaus"
FORMAT_VERSION = 2  # what the writer writes
READ_VERSIONS = (1, 2)  # what the reader reads
APPLICATION_ID = 0x4B4C4155  # "KLAU"
PAGE_SIZE = 1024  # smaller pages waste less at the end of each blob's overflow chain
MAX_FILE_BYTES = 2 << 30
MAX_TENSOR_ELEMENTS = 1 << 31
MAX_DEPTH = 64
SQLITE_MAGIC = b"SQLite format 3\x00"
# Decompressed size cap for the v2 xz blobs, and the decoder's memory cap (dictionary
# included), so a crafted file cannot make the reader allocate more than this.
MAX_DECOMPRESSED_BYTES = 64 << 20
MAX_XZ_MEMORY = 128 << 20
LABELSET_CODEC = "json+xz"
GRAPH_CODEC = "onnx+xz"
LABELSET_KEYS = ("labels", "synsets")

SCHEMA_V1 = {
    "meta": "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL) WITHOUT ROWID",
    "labels": (
        "CREATE TABLE labels (idx INTEGER PRIMARY KEY NOT NULL, wnid TEXT NOT NULL, name TEXT NOT NULL, "
        "words TEXT NOT NULL)"
    ),
    "synsets": (
        "CREATE TABLE synsets (wnid TEXT PRIMARY KEY NOT NULL, name TEXT NOT NULL, parent TEXT NOT NULL) WITHOUT ROWID"
    ),
    "graph": (
        "CREATE TABLE graph (id INTEGER PRIMARY KEY NOT NULL CHECK (id = 0), onnx BLOB NOT NULL, sha256 TEXT NOT NULL)"
    ),
    "tensors": (
        "CREATE TABLE tensors (ord INTEGER PRIMARY KEY NOT NULL, name TEXT NOT NULL UNIQUE, "
        "dims TEXT NOT NULL, dtype TEXT NOT NULL, codec TEXT NOT NULL, bits INTEGER NOT NULL, "
        "palette BLOB, scales BLOB, scale_axis INTEGER, payload BLOB NOT NULL, sha256 TEXT NOT NULL)"
    ),
}
SCHEMA_V2 = {
    "meta": SCHEMA_V1["meta"],
    "labelset": (
        "CREATE TABLE labelset (id INTEGER PRIMARY KEY NOT NULL CHECK (id = 0), "
        "codec TEXT NOT NULL, payload BLOB NOT NULL)"
    ),
    "graph": (
        "CREATE TABLE graph (id INTEGER PRIMARY KEY NOT NULL CHECK (id = 0), "
        "codec TEXT NOT NULL, onnx BLOB NOT NULL, sha256 TEXT NOT NULL)"
    ),
    "tensors": SCHEMA_V1["tensors"],
}
SCHEMAS = {1: SCHEMA_V1, 2: SCHEMA_V2}
SCHEMA = SCHEMAS[FORMAT_VERSION]  # what the writer creates
# SQLite creates these for PRIMARY KEY / UNIQUE constraints; nothing else may exist.
AUTO_INDEXES = {"sqlite_autoindex_tensors_1"}
CONTENT_KEY = "content_sha256"
REQUIRED_META = (
    CONTENT_KEY,
    "format",
    "format_version",
    "model_name",
    "source",
    "license",
    "creator",
    "klaus_version",
    "preprocess",
    "output",
    "recipe",
)
OUTPUT_KINDS = ("logits", "probabilities")
_WNID = re.compile(r"^(n\d{8})?$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_WNID_RUN = re.compile(r"(?:n\d{8})*")  # wnids written one after another
_FIRST = itemgetter(0)


@dataclass(frozen=True)
class LabelRow:
    """One class: ``path`` is wnids root..leaf, ``hierarchy`` their display names."""

    index: int
    wnid: str
    name: str
    words: tuple[str, ...] = ()
    path: tuple[str, ...] = ()
    hierarchy: tuple[str, ...] = ()


@dataclass(frozen=True)
class TensorRecord:
    """One stored weight; ``palette`` and ``scales`` are little-endian fp16 bytes."""

    name: str
    dims: tuple[int, ...]
    codec: str
    bits: int
    payload: bytes
    palette: bytes | None = None
    scales: bytes | None = None
    scale_axis: int | None = None
    dtype: str = "float32"
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            object.__setattr__(self, "sha256", self.digest())

    def digest(self) -> str:
        h = hashlib.sha256()
        for blob in (self.payload, self.palette or b"", self.scales or b""):
            h.update(blob)
        return h.hexdigest()

    @property
    def stored_bytes(self) -> int:
        return len(self.payload) + len(self.palette or b"") + len(self.scales or b"")

    @property
    def size(self) -> int:
        """Elements in the tensor (``math.prod``: a reader asks for it a few times per tensor, and
        numpy's reduction costs several microseconds a call on a shape of a few numbers)."""
        return int(math.prod(self.dims))

    def palette_values(self) -> np.ndarray | None:
        return None if self.palette is None else np.frombuffer(self.palette, "<f2")

    def scale_values(self) -> np.ndarray | None:
        return None if self.scales is None else np.frombuffer(self.scales, "<f2")

    def indices(self) -> np.ndarray:
        rows, cols = codecs.index_map_shape(self.dims)
        return codecs.decode_png_indices(self.payload, rows, cols, self.bits).reshape(self.dims)

    def decode(self) -> np.ndarray:
        """The float32 tensor this record stands for."""
        if self.codec in codecs.RAW_DTYPES:
            return codecs.decode_raw(self.payload, self.dims, self.codec)
        palette = self.palette_values()
        if palette is None:
            raise KlausFormatError(f"tensor {self.name!r}: codec {self.codec} without a palette")
        indices = self.indices()
        if int(indices.max(initial=0)) >= len(palette):
            raise KlausFormatError(f"tensor {self.name!r}: index map refers past its {len(palette)}-entry palette")
        return codecs.dequantize(palette, indices, self.scale_values(), self.scale_axis or 0)


# Called by the reader with a file's graph and tensor records once they are checked (:func:`read_model`).
WeightsReady = Callable[[bytes, tuple[TensorRecord, ...]], None]


@dataclass(frozen=True)
class KlausModel:
    """Everything a `.klaus` file holds, validated."""

    meta: dict[str, str]
    preprocess: Preprocess
    labels: tuple[LabelRow, ...]
    graph: bytes
    tensors: tuple[TensorRecord, ...]
    source_path: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return self.meta["model_name"]

    @property
    def recipe(self) -> dict[str, object]:
        return json.loads(self.meta["recipe"])

    def decoded_weights(self) -> dict[str, np.ndarray]:
        out = {}
        for t in self.tensors:
            try:
                out[t.name] = t.decode()
            except KlausFormatError as exc:
                raise KlausFormatError(f"{self.source_path or '<model>'}: tensor {t.name!r}: {exc}") from None
        return out


# ---------------------------------------------------------------- writing


def write_model(model: KlausModel, path: str | os.PathLike[str]) -> int:
    """Write atomically (temp file + rename) and deterministically; returns the file size.

    Any failure is one :class:`KlausWriteError` naming ``path``; nothing is left behind.
    """
    try:
        data = serialize(model)
    except KlausWriteError as exc:
        raise KlausWriteError(f"{os.fspath(path)}: {exc}") from None
    return write_atomic(data, path)


def current_umask() -> int:
    """The process umask, read without changing it where the system tells it (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(mask)
    return mask


def write_atomic(data: bytes, path: str | os.PathLike[str]) -> int:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Missing parent folders are created. A file that replaces an existing one keeps that
    file's permission bits (as editors do, so a ``chmod 600`` output stays private);
    a new file gets the mode a plain ``open`` would give it (0o666 less the umask),
    not the temporary file's 0o600. A name ending in a slash names a folder and is
    refused. Any failure (a directory in the way, permissions, disk full, a file size
    limit) is one :class:`KlausWriteError` naming ``path`` (never the temporary file),
    and neither the temporary file nor a partial ``path`` is left behind.
    """
    from pathlib import Path  # here: reading a model (the classify path) does not need pathlib's imports

    where = os.fspath(path)
    target = Path(where)
    if not where:
        raise KlausWriteError("'': the output file name is empty")
    if where.endswith(("/", os.sep)):
        raise KlausWriteError(f"{where}: names a folder; give a file name")
    if target.is_dir():
        raise KlausWriteError(f"{where}: is a directory, not a file")
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode) & 0o777
    except OSError:  # no such file yet (or not one we can see): what open() would make
        mode = 0o666 & ~current_umask()
    import tempfile  # here rather than at the top: with shutil, a few ms that reading a model does not need

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".klaus-", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise KlausWriteError(f"{where}: cannot write ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise KlausWriteError(f"{where}: cannot write ({exc.strerror or exc})") from None
        raise
    return len(data)


def serialize(model: KlausModel) -> bytes:
    """The version-2 file image (deterministic: fixed row order, fixed xz settings, VACUUM)."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {FORMAT_VERSION}")
        for ddl in SCHEMA.values():
            conn.execute(ddl)
        meta = {k: v for k, v in model.meta.items() if k != CONTENT_KEY}
        meta.update(
            format=FORMAT_NAME, format_version=str(FORMAT_VERSION), preprocess=_dumps(model.preprocess.to_dict())
        )
        labels = [(r.index, r.wnid, r.name, _dumps(r.words)) for r in model.labels]
        tree = hierarchy_tree(model.labels)
        synsets = [(w, *tree[w]) for w in sorted(tree)]
        meta[CONTENT_KEY] = content_digest(sorted(meta.items()), labels, synsets)
        conn.executemany("INSERT INTO meta VALUES (?, ?)", sorted(meta.items()))
        conn.execute("INSERT INTO labelset VALUES (0, ?, ?)", (LABELSET_CODEC, encode_labelset(labels, synsets)))
        graph = (GRAPH_CODEC, xz_compress(model.graph), hashlib.sha256(model.graph).hexdigest())
        conn.execute("INSERT INTO graph VALUES (0, ?, ?, ?)", graph)
        conn.executemany(
            "INSERT INTO tensors VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    i,
                    t.name,
                    _dumps(list(t.dims)),
                    t.dtype,
                    t.codec,
                    t.bits,
                    t.palette,
                    t.scales,
                    t.scale_axis,
                    t.payload,
                    t.digest(),
                )
                for i, t in enumerate(model.tensors)
            ],
        )
        conn.commit()
        conn.execute("VACUUM")
        return conn.serialize()
    except sqlite3.Error as exc:  # VACUUM's temporary file: disk full, file size limit
        raise KlausWriteError(
            f"cannot build the model file (SQLite: {exc}; is the disk or the temporary folder full, or a file size limit set?)"
        ) from None
    finally:
        conn.close()


def encode_labelset(labels: Sequence[tuple], synsets: Sequence[tuple]) -> bytes:
    """The v2 ``labelset`` payload from v1-shaped rows (``words`` as JSON text): the same rows,
    with ``words`` as a JSON list, as canonical JSON, xz-compressed."""
    rows = {
        "labels": [[idx, wnid, name, json.loads(words)] for idx, wnid, name, words in labels],
        "synsets": [list(row) for row in synsets],
    }
    return xz_compress(_dumps(rows).encode("utf-8"))


def xz_compress(data: bytes) -> bytes:
    """xz at preset 9e, deterministic for a given liblzma. The dictionary is cut to the
    data's size (no loss: LZMA never looks further back) so readers allocate little."""
    dict_size = min(max(len(data), 4096), 64 << 20)
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}]
    return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=filters)


def content_digest(meta: Sequence[tuple], labels: Sequence[tuple], synsets: Sequence[tuple]) -> str:
    """SHA-256 over the small tables (meta except itself, labels, synsets), canonical JSON."""
    # JSON writes a tuple as a list, so the label and synset rows are encoded as they are, not copied
    rows = [[list(r) for r in meta if r[0] != CONTENT_KEY], list(labels), list(synsets)]
    return hashlib.sha256(_dumps(rows).encode("utf-8")).hexdigest()


class _LabelTables(NamedTuple):
    """The label and synset rows as stored, in v1's shape whatever the version: ``labels``
    (idx, wnid, name, words) by idx with ``words`` as JSON text, ``synsets`` (wnid, name,
    parent) by wnid, so that one digest and one set of checks serve both versions."""

    labels: list[tuple]
    synsets: list[tuple]
    words: list[object] | None = None  # v2: each row's words as parsed from the labelset, so not parsed twice


def _check_content(tables: _LabelTables, meta: dict[str, str], where: str) -> None:
    for table, rows in (("labels", tables.labels), ("synsets", tables.synsets)):
        if not set(map(type, itertools.chain.from_iterable(rows))) <= {str, int}:
            raise KlausFormatError(f"{where}: {table} table holds a value that is neither text nor an integer")
    digest = content_digest(sorted(meta.items()), tables.labels, tables.synsets)
    if digest != meta[CONTENT_KEY]:
        raise KlausFormatError(f"{where}: metadata or label checksum mismatch (file is corrupt)")


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _dumps(value: object) -> str:
    """Canonical JSON text: ``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``,
    through one shared encoder (a reader encodes a thousand label rows, and building an encoder per call
    costs more than encoding one)."""
    return _CANONICAL.encode(value)


# ---------------------------------------------------------------- reading


def looks_like_klaus(path: str | os.PathLike[str]) -> bool:
    """Whether a file starts like an SQLite database (a `.klaus` model) rather than ONNX protobuf."""
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:
        return False


def read_model(path: str | os.PathLike[str], on_weights: WeightsReady | None = None) -> KlausModel:
    """Load and fully validate a `.klaus` file.

    ``on_weights`` is called with the graph and the tensor records as soon as they are checked
    (their checksums, operator policy, weight count, activation bounds), before the labels, the
    synsets and the checksum over them and the metadata are: a caller can start building a session
    while the reader goes on. The model is returned only when every check has passed, and a file
    that fails an earlier check is reported as corrupt when that checksum fails too."""
    where = str(path)
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise KlausFormatError(f"{where}: file is {size} bytes, larger than the {MAX_FILE_BYTES}-byte limit")
        with open(path, "rb") as f:
            data = f.read(size + 1)  # a file that grew since stat is caught by the header check
    except FileNotFoundError:
        raise KlausFormatError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise KlausFormatError(f"{where}: is a directory, not a .klaus file") from None
    except OSError as exc:
        raise KlausFormatError(f"{where}: cannot read ({exc.strerror})") from None
    return parse_model(data, where, on_weights)


def parse_model(data: bytes, where: str = "<bytes>", on_weights: WeightsReady | None = None) -> KlausModel:
    _check_sqlite_header(data, where)
    conn = sqlite3.connect(":memory:")
    try:
        try:
            conn.deserialize(data)
            conn.execute("PRAGMA query_only = ON")
            check = conn.execute("PRAGMA quick_check").fetchall()
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            raise KlausFormatError(f"{where}: corrupt database ({exc})") from None
        if check != [("ok",)]:
            raise KlausFormatError(f"{where}: corrupt database ({integrity_problem(check)})")
        try:
            return _read_tables(conn, where, on_weights)
        except (sqlite3.Error, UnicodeDecodeError) as exc:
            raise KlausFormatError(f"{where}: corrupt database ({exc})") from None
    finally:
        conn.close()


def integrity_problem(rows: Sequence[tuple]) -> str:
    """The first problem ``PRAGMA quick_check`` reports, on one line, plus how many more there are.

    SQLite returns one row per problem, or one row holding many lines (a
    ``*** in database main ***`` header, then a problem per line).
    """
    problems = [
        line.strip()
        for row in rows
        for line in str(row[0] if row else "").splitlines()
        if line.strip() and not line.strip().startswith("*** in database")
    ]
    if not problems:
        return "integrity check failed"
    return problems[0] + (f" ({len(problems) - 1} more)" if len(problems) > 1 else "")


def _check_sqlite_header(data: bytes, where: str) -> None:
    if len(data) < 100 or not data.startswith(SQLITE_MAGIC):
        raise KlausFormatError(f"{where}: not a .klaus model (not an SQLite database)")
    (page_size,) = struct.unpack_from(">H", data, 16)
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or page_size & (page_size - 1):
        raise KlausFormatError(f"{where}: corrupt database header (page size {page_size})")
    if data[18] != 1 or data[19] != 1:
        raise KlausFormatError(f"{where}: database is in WAL mode; .klaus files are written in rollback mode")
    (changes, pages) = struct.unpack_from(">II", data, 24)
    (valid_for,) = struct.unpack_from(">I", data, 92)
    if changes == valid_for and pages * page_size != len(data):
        raise KlausFormatError(
            f"{where}: file is {len(data)} bytes but its header says {pages * page_size}; it is truncated or padded"
        )
    if len(data) % page_size:
        raise KlausFormatError(f"{where}: file size is not a whole number of pages; it is truncated")


def _read_tables(conn: sqlite3.Connection, where: str, on_weights: WeightsReady | None = None) -> KlausModel:
    (app_id,) = conn.execute("PRAGMA application_id").fetchone()
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if app_id != APPLICATION_ID:
        raise KlausFormatError(f"{where}: SQLite database, but not a .klaus model (application_id {app_id:#x})")
    if version not in READ_VERSIONS:
        raise KlausFormatError(
            f"{where}: format version {version} is not supported by this Klaus "
            f"(reads versions {', '.join(map(str, READ_VERSIONS))}); upgrade Klaus or rebuild the model"
        )
    _check_schema(conn, version, where)
    meta = _read_meta(conn, version, where)
    try:
        preprocess = _read_preprocess(meta, where)
        graph = _read_graph_v1(conn, where) if version == 1 else _read_graph_v2(conn, where)
        skeleton = onnxwire.read_skeleton(graph, where, allowed_ops())
        tensors = _read_tensors(conn, where)
        _check_weight_count(tensors, where)
        shapes.check(graph, where, {t.name: t.dims for t in tensors}, preprocess.input_size, preprocess.layout)
    except KlausFormatError:
        _check_content(_label_tables(conn, version, where), meta, where)  # a corrupt file is reported as corrupt
        raise
    if on_weights is not None:
        on_weights(graph, tensors)
    tables = _label_tables(conn, version, where)
    _check_content(tables, meta, where)
    labels = _read_labels(tables, where)
    _check_graph_fits(skeleton, meta, labels, where)
    return KlausModel(meta, preprocess, labels, graph, tensors, source_path=where)


def _read_preprocess(meta: dict[str, str], where: str) -> Preprocess:
    try:
        return Preprocess.from_dict(_loads(meta["preprocess"], where, "meta.preprocess"))
    except KlausFormatError as exc:
        raise KlausFormatError(f"{where}: {exc}") from None


def _label_tables(conn: sqlite3.Connection, version: int, where: str) -> _LabelTables:
    return _label_tables_v1(conn) if version == 1 else _label_tables_v2(conn, where)


def allowed_ops() -> frozenset[str] | None:
    """The operators a model file may use: image-classifier operators, or any when the user trusts
    the files (:mod:`klaus.limits`)."""
    return None if limits.trusted() else onnxwire.CLASSIFIER_OPS


def _check_graph_fits(
    skeleton: onnxwire.Skeleton, meta: dict[str, str], labels: Sequence[LabelRow], where: str
) -> None:
    """The label table and the declared output kind must match what the graph computes."""
    shape = skeleton.outputs[0].shape if skeleton.outputs else None
    width = shape[-1] if shape and len(shape) == 2 else None
    if isinstance(width, int) and width > 0 and width != len(labels):
        raise KlausFormatError(
            f"{where}: the label table has {len(labels)} classes but the graph outputs {width} scores"
        )
    if meta["output"] == "probabilities" and skeleton.output_op() != "Softmax":
        made = skeleton.output_op() or "no operator"
        raise KlausFormatError(
            f"{where}: meta says the output is probabilities, but the graph's output comes from {made}, not a Softmax"
        )


def _check_weight_count(tensors: Sequence[TensorRecord], where: str) -> None:
    """Refuse a file whose weights would decode to more than the limit, before decoding any."""
    limit = limits.max_weights()
    total = sum(t.size for t in tensors)
    if limit is not None and total > limit:
        raise KlausFormatError(
            f"{where}: the weights decode to {total:,} values, more than the {limit:,} Klaus loads from a file "
            f"(set {limits.TRUST_ENV}=1 to load it anyway, if you trust the file)"
        )


def _check_schema(conn: sqlite3.Connection, version: int, where: str) -> None:
    schema = SCHEMAS[version]
    rows = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    tables = {name: sql for kind, name, sql in rows if kind == "table"}
    others = {name for kind, name, _ in rows if kind != "table"} - AUTO_INDEXES
    if tables != schema or others:
        missing = sorted(set(schema) - set(tables))
        detail = f"missing tables {missing}" if missing else "unexpected schema"
        raise KlausFormatError(f"{where}: not a valid .klaus v{version} file ({detail})")


def _read_meta(conn: sqlite3.Connection, version: int, where: str) -> dict[str, str]:
    meta: dict[str, str] = {}
    for key, value in conn.execute("SELECT key, value FROM meta"):
        if not isinstance(key, str) or not isinstance(value, str):
            raise KlausFormatError(f"{where}: meta table holds a non-text entry")
        meta[key] = value
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise KlausFormatError(f"{where}: meta table lacks {', '.join(missing)}")
    if meta["format"] != FORMAT_NAME or meta["format_version"] != str(version):
        raise KlausFormatError(
            f"{where}: meta says format {meta['format']!r} v{meta['format_version']}, expected klaus v{version}"
        )
    if meta["output"] not in OUTPUT_KINDS:
        raise KlausFormatError(f"{where}: meta.output must be one of {OUTPUT_KINDS}, got {meta['output']!r}")
    if not isinstance(_loads(meta["recipe"], where, "meta.recipe"), dict):
        raise KlausFormatError(f"{where}: meta.recipe is not a JSON object")
    return meta


def _loads(text: object, where: str, what: str) -> object:
    if not isinstance(text, str):
        raise KlausFormatError(f"{where}: {what} is not text")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise KlausFormatError(f"{where}: {what} is not valid JSON") from None


def hierarchy_tree(labels: Sequence[LabelRow]) -> dict[str, tuple[str, str]]:
    """{wnid: (display name, parent wnid)} for every node on every label's path."""
    tree: dict[str, tuple[str, str]] = {}
    for row in labels:
        if len(row.path) != len(row.hierarchy):
            raise ValueError(f"label {row.index}: path and hierarchy differ in length")
        for depth, (wnid, name) in enumerate(zip(row.path, row.hierarchy, strict=True)):
            node = (name, row.path[depth - 1] if depth else "")
            if tree.setdefault(wnid, node) != node:
                raise ValueError(f"label {row.index}: synset {wnid} has two names or parents")
    return tree


def _label_tables_v1(conn: sqlite3.Connection) -> _LabelTables:
    labels = conn.execute("SELECT idx, wnid, name, words FROM labels ORDER BY idx").fetchall()
    synsets = conn.execute("SELECT wnid, name, parent FROM synsets ORDER BY wnid").fetchall()
    return _LabelTables(labels, synsets)


def _label_tables_v2(conn: sqlite3.Connection, where: str) -> _LabelTables:
    """Decode the ``labelset`` row into v1-shaped rows; only the JSON's shape is checked here,
    its values get the same checks as v1's table cells."""
    rows = conn.execute("SELECT id, codec, payload FROM labelset").fetchall()
    if len(rows) != 1:
        raise KlausFormatError(f"{where}: labelset table must hold exactly one row")
    _, codec, payload = rows[0]
    if codec != LABELSET_CODEC:
        raise KlausFormatError(f"{where}: labelset codec {codec!r} is not supported (v2 uses {LABELSET_CODEC!r})")
    text = xz_decompress(payload, where, "labelset payload")
    try:
        value = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise KlausFormatError(f"{where}: labelset payload is not valid JSON") from None
    return _labelset_rows(value, where)


def _labelset_rows(value: object, where: str) -> _LabelTables:
    bad = KlausFormatError(
        f"{where}: labelset JSON must be an object with exactly 'labels' ([idx, wnid, name, words] rows, "
        "idx an integer) and 'synsets' ([wnid, name, parent] rows)"
    )
    if not isinstance(value, dict) or sorted(value) != sorted(LABELSET_KEYS):
        raise bad
    labels, synsets = value["labels"], value["synsets"]
    if not isinstance(labels, list) or not isinstance(synsets, list):
        raise bad
    if not _rows_shaped(labels, 4, int) or not _rows_shaped(synsets, 3, str):
        raise bad
    labels = sorted(labels, key=_FIRST)  # v1 reads its tables in key order too
    try:
        words_text = [_words_json(r[3]) for r in labels]  # v1's cell: words as canonical JSON text
    except RecursionError:
        raise bad from None
    return _LabelTables(
        [(idx, wnid, name, text) for (idx, wnid, name, _), text in zip(labels, words_text, strict=True)],
        list(map(tuple, sorted(synsets, key=_FIRST))),
        [r[3] for r in labels],
    )


def _rows_shaped(rows: list[Any], width: int, key: type) -> bool:
    """Whether every row is a list of ``width`` items whose first is exactly of type ``key``; checked
    a column at a time (``map`` over the rows), not by Python code per row."""
    return (
        all(map(isinstance, rows, itertools.repeat(list)))
        and set(map(len, rows)) <= {width}
        and set(map(type, map(_FIRST, rows))) <= {key}
    )


def _words_json(words: object) -> str:
    """``_dumps(words)``: a list of strings (every real label's words) is joined from its encoded
    strings, which gives the same text several times faster than an encoder call per label row;
    any other value goes through the encoder."""
    if type(words) is list and all(type(w) is str for w in words):
        return "[" + ",".join(map(encode_basestring, words)) + "]"
    return _dumps(words)


def _read_labels(tables: _LabelTables, where: str) -> tuple[LabelRow, ...]:
    """Label rows with their hierarchy paths; the same checks for every format version."""
    tree = _read_synsets(tables.synsets, where)
    lines: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
    rows = []
    for expected, (idx, wnid, name, words) in enumerate(tables.labels):
        if idx != expected:
            raise KlausFormatError(f"{where}: labels must be numbered 0..n-1 without gaps (found {idx} at {expected})")
        if not isinstance(wnid, str) or not _WNID.match(wnid) or not isinstance(name, str) or not name:
            raise KlausFormatError(f"{where}: labels row {idx} has a bad wnid or name")
        path, hierarchy = _path_to_root(tree, wnid, where, lines) if wnid else ((), ())
        # v2's words were parsed with the labelset, and their text is their canonical JSON: parsing it gives them back
        parsed = _loads(words, where, f"labels row {idx}") if tables.words is None else tables.words[expected]
        if not _is_str_list(parsed):
            raise KlausFormatError(f"{where}: labels row {idx} words must be a JSON list of strings")
        rows.append(LabelRow(idx, wnid, name, tuple(parsed), path, hierarchy))
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise KlausFormatError(f"{where}: label name {duplicate!r} is used twice; names must be unique")
    return tuple(rows)


def _is_str_list(value: object) -> TypeGuard[list[str]]:
    """Whether ``value`` is a list of strings (``map`` keeps the per-item test out of Python bytecode)."""
    return isinstance(value, list) and all(map(isinstance, value, itertools.repeat(str)))


def _read_synsets(rows: Sequence[tuple], where: str) -> dict[str, tuple[str, str]]:
    """{wnid: (display name, parent wnid)}; every row well formed, each wnid once, every parent listed."""
    tree = _synset_tree_at_once(rows)
    if tree is None:
        tree = _synset_tree(rows, where)
    if not {parent for _, parent in tree.values()} <= tree.keys() | {""}:
        for wnid, (_, parent) in tree.items():
            if parent and parent not in tree:
                raise KlausFormatError(f"{where}: synset {wnid} names a missing parent {parent}")
    return tree


def _synset_tree_at_once(rows: Sequence[tuple]) -> dict[str, tuple[str, str]] | None:
    """The tree when every row plainly passes :func:`_synset_tree`'s checks (text cells, wnids of
    exactly ``n`` and 8 digits and each listed once, parents such wnids or empty), found by a few
    passes over whole columns rather than Python work per row; None otherwise, so that the
    row-by-row check names the first bad row."""
    if not rows:
        return {}
    if set(map(type, itertools.chain.from_iterable(rows))) != {str}:
        return None
    wnids, names, parents = zip(*rows, strict=True)
    # Every wnid 9 characters long and the run of them n+8 digits at each 9th character: each is a wnid.
    if set(map(len, wnids)) != {9} or not _WNID_RUN.fullmatch("".join(wnids)):
        return None
    if not set(map(len, parents)) <= {0, 9} or not _WNID_RUN.fullmatch("".join(parents)):
        return None
    tree = dict(zip(wnids, zip(names, parents, strict=True), strict=True))
    return tree if len(tree) == len(rows) else None


def _synset_tree(rows: Sequence[tuple], where: str) -> dict[str, tuple[str, str]]:
    """The tree, row by row: refuses the first malformed or repeated row."""
    tree: dict[str, tuple[str, str]] = {}
    for wnid, name, parent in rows:
        if (
            not (isinstance(wnid, str) and isinstance(name, str) and isinstance(parent, str))
            or not _WNID.match(wnid)
            or not wnid
            or not _WNID.match(parent)
        ):
            raise KlausFormatError(f"{where}: synsets table holds a malformed row")
        if wnid in tree:  # only possible in v2 (wnid is v1's primary key)
            raise KlausFormatError(f"{where}: synset {wnid} is listed twice")
        tree[wnid] = (name, parent)
    return tree


def _path_to_root(
    tree: dict[str, tuple[str, str]],
    wnid: str,
    where: str,
    known: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Root..``wnid`` by the parent links, as wnids and as display names; ``known`` remembers the
    lines already walked (labels share ancestors, so each synset is climbed once)."""
    if wnid not in tree:
        raise KlausFormatError(f"{where}: label {wnid} is missing from the synsets table")
    known = {} if known is None else known
    node, climbed = wnid, []
    while node not in known:
        climbed.append(node)
        parent = tree[node][1]
        if not parent:
            break
        if len(climbed) == MAX_DEPTH:
            raise KlausFormatError(f"{where}: synset hierarchy above {wnid} is cyclic or deeper than {MAX_DEPTH}")
        node = parent
    if node in known:
        path, names = known[node]
    else:  # the climb ended at the root
        climbed.pop()
        path, names = (node,), (tree[node][0],)
        known[node] = (path, names)
    for w in reversed(climbed):
        path, names = (*path, w), (*names, tree[w][0])
        if len(path) > MAX_DEPTH:
            raise KlausFormatError(f"{where}: synset hierarchy above {wnid} is cyclic or deeper than {MAX_DEPTH}")
        known[w] = (path, names)
    return path, names


def _read_graph_v1(conn: sqlite3.Connection, where: str) -> bytes:
    rows = conn.execute("SELECT id, onnx, sha256 FROM graph").fetchall()
    if len(rows) != 1 or not isinstance(rows[0][1], bytes):
        raise KlausFormatError(f"{where}: graph table must hold exactly one ONNX blob")
    _, blob, digest = rows[0]
    return _check_graph(blob, digest, where)


def _read_graph_v2(conn: sqlite3.Connection, where: str) -> bytes:
    """v2 stores the graph xz-compressed; ``sha256`` is over the decompressed ONNX bytes."""
    rows = conn.execute("SELECT id, codec, onnx, sha256 FROM graph").fetchall()
    if len(rows) != 1 or not isinstance(rows[0][2], bytes):
        raise KlausFormatError(f"{where}: graph table must hold exactly one ONNX blob")
    _, codec, blob, digest = rows[0]
    if codec != GRAPH_CODEC:
        raise KlausFormatError(f"{where}: graph codec {codec!r} is not supported (v2 uses {GRAPH_CODEC!r})")
    return _check_graph(xz_decompress(blob, where, "graph"), digest, where)


def _check_graph(blob: bytes, digest: object, where: str) -> bytes:
    if hashlib.sha256(blob).hexdigest() != digest:
        raise KlausFormatError(f"{where}: graph checksum mismatch (file is corrupt)")
    return blob


def xz_decompress(blob: object, where: str, what: str) -> bytes:
    """One whole xz stream, at most MAX_DECOMPRESSED_BYTES out and MAX_XZ_MEMORY of decoder
    state, nothing after it: a crafted blob cannot exhaust memory or hide data."""
    if not isinstance(blob, bytes):
        raise KlausFormatError(f"{where}: {what} is not a blob")
    decoder = lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=MAX_XZ_MEMORY)
    try:
        data = decoder.decompress(blob, max_length=MAX_DECOMPRESSED_BYTES + 1)
    except lzma.LZMAError as exc:
        raise KlausFormatError(f"{where}: {what} is not valid xz data ({exc})") from None
    if len(data) > MAX_DECOMPRESSED_BYTES:
        raise KlausFormatError(f"{where}: {what} decompresses to more than {MAX_DECOMPRESSED_BYTES} bytes")
    if not decoder.eof:
        raise KlausFormatError(f"{where}: {what} is not valid xz data (truncated stream)")
    if decoder.unused_data:
        raise KlausFormatError(f"{where}: {what} has data after its xz stream")
    return data


def _read_tensors(conn: sqlite3.Connection, where: str) -> tuple[TensorRecord, ...]:
    records = []
    query = "SELECT ord, name, dims, dtype, codec, bits, palette, scales, scale_axis, payload, sha256 FROM tensors ORDER BY ord"
    for expected, row in enumerate(conn.execute(query)):
        records.append(_tensor_record(row, expected, where))
    return tuple(records)


def _tensor_record(row: tuple, expected: int, where: str) -> TensorRecord:
    ordinal, name, dims_text, dtype, codec, bits, palette, scales, scale_axis, payload, digest = row
    if ordinal != expected or not isinstance(name, str) or not name:
        raise KlausFormatError(f"{where}: tensors table row {ordinal} has a bad ordinal or name")
    what = f"{where}: tensor {name!r}"
    dims = _loads(dims_text, where, f"tensor {name!r} dims")
    if not isinstance(dims, list) or len(dims) > 8 or not all(type(d) is int and d >= 0 for d in dims):
        raise KlausFormatError(f"{what}: dims must be a list of at most 8 non-negative integers")
    if math.prod(dims) > MAX_TENSOR_ELEMENTS:
        raise KlausFormatError(f"{what}: {math.prod(dims)} elements is over the limit")
    if dtype != "float32":
        raise KlausFormatError(f"{what}: dtype {dtype!r} is not supported (float32 only)")
    if codec not in codecs.CODECS:
        raise KlausFormatError(f"{what}: unknown codec {codec!r} (known: {', '.join(codecs.CODECS)})")
    if not isinstance(payload, bytes) or not isinstance(digest, str) or not _HEX64.match(digest):
        raise KlausFormatError(f"{what}: payload or checksum missing")
    if not all(blob is None or isinstance(blob, bytes) for blob in (palette, scales)):
        raise KlausFormatError(f"{what}: palette and scales must be blobs")
    record = TensorRecord(name, tuple(dims), codec, bits, payload, palette, scales, scale_axis, dtype, digest)
    if record.digest() != digest:
        raise KlausFormatError(f"{what}: checksum mismatch (file is corrupt)")
    if codec in codecs.RAW_DTYPES:
        if bits != 0 or palette is not None or scales is not None or scale_axis is not None:
            raise KlausFormatError(f"{what}: raw tensors carry no bits, palette or scales")
        if len(payload) != record.size * codecs.RAW_DTYPES[codec].itemsize:
            raise KlausFormatError(
                f"{what}: payload is {len(payload)} bytes, expected {record.size * codecs.RAW_DTYPES[codec].itemsize}"
            )
        return record
    _check_palette_fields(record, what)
    return record


def _check_palette_fields(r: TensorRecord, what: str) -> None:
    if type(r.bits) is not int or not 1 <= r.bits <= 8:
        raise KlausFormatError(f"{what}: bits must be 1..8, got {r.bits!r}")
    if not r.dims or r.size == 0:
        raise KlausFormatError(f"{what}: a palettized tensor needs a non-empty shape")
    if not isinstance(r.palette, bytes) or len(r.palette) % 2 or not 2 <= len(r.palette) <= 2 << r.bits:
        raise KlausFormatError(f"{what}: palette must hold 1..2^bits fp16 values")
    if not np.isfinite(np.frombuffer(r.palette, "<f2")).all():
        raise KlausFormatError(f"{what}: palette holds NaN or infinite values")
    if r.scales is None:
        if r.scale_axis is not None:
            raise KlausFormatError(f"{what}: scale_axis given without scales")
        return
    if type(r.scale_axis) is not int or not 0 <= r.scale_axis < len(r.dims):
        raise KlausFormatError(f"{what}: scale_axis {r.scale_axis!r} is not an axis of shape {list(r.dims)}")
    if not isinstance(r.scales, bytes) or len(r.scales) != 2 * r.dims[r.scale_axis]:
        raise KlausFormatError(f"{what}: scales must hold one fp16 value per slice of axis {r.scale_axis}")
    if not np.isfinite(np.frombuffer(r.scales, "<f2")).all():
        raise KlausFormatError(f"{what}: scales hold NaN or infinite values")
