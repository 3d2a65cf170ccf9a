"""The photo index: one SQLite database in WAL mode, its schema and its migrations.

Tables (schema version 2, ``PRAGMA user_version``; version 1 is migrated on first write):

* ``photos`` — one row per file path: size, mtime (ns), SHA-256 of the content,
  upright width/height, image format, EXIF date, status (``ok``/``error``/``gone``),
  the error text, the model that classified it, timings (ms) and when.
* ``predictions`` — the top-5 (rank, class index, probability) of each ``ok`` photo.
* ``models`` — model identities: name + SHA-256 of the model file.
* ``classes`` — the label table of the current model (wnid, name, display path).
* ``concepts`` — the hypernym closure: (wnid, class) for *every* WordNet ancestor of
  every class (through all parents, not only the display path), so a search for
  "dog" is an index lookup on ``concepts`` joined to ``predictions(class)``.
* ``runs`` and ``claims`` (version 2) — the `klaus index` runs in progress and the photos
  each has claimed, so that concurrent runs share the work (:mod:`klaus.index.claims`).

Writers use ``BEGIN IMMEDIATE`` transactions (one per batch of photos) with a busy
timeout, so any number of processes may index into, or read, the same database; a
process killed at any moment leaves the last committed batch and nothing half-written.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from ..errors import KlausError
from ..names import shown

SCHEMA_VERSION = 2
APPLICATION_ID = 0x4B4C4958  # "KLIX"
BUSY_TIMEOUT_MS = 60_000
STATUSES = ("ok", "error", "gone")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what an SQLite INTEGER holds


def int64(value: int) -> int:
    """``value`` clamped to what an SQLite INTEGER column holds.

    A file's mtime can lie beyond it (``touch -d 2263-01-01``: more than 2^63 ns after
    1970). Such a photo is stored with the clamped mtime, which never equals the
    file's real one, so each run hashes it again and re-classifies it only if its
    content changed: incremental runs stay correct, at the price of one read.
    """
    return min(max(int(value), INT64_MIN), INT64_MAX)


class KlausIndexError(KlausError):
    """A photo index cannot be opened, is of an unknown version, or was asked something impossible."""


# Each entry upgrades the schema from version (key - 1) to version key, in one transaction.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL) WITHOUT ROWID",
        """CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            labels_sha256 TEXT NOT NULL,
            first_used TEXT NOT NULL,
            UNIQUE (name, sha256)
        )""",
        """CREATE TABLE classes (
            idx INTEGER PRIMARY KEY,
            wnid TEXT NOT NULL,
            name TEXT NOT NULL,
            path TEXT NOT NULL,
            hierarchy TEXT NOT NULL
        )""",
        "CREATE INDEX classes_name ON classes (name COLLATE NOCASE)",
        """CREATE TABLE concepts (
            wnid TEXT NOT NULL,
            class INTEGER NOT NULL,
            PRIMARY KEY (wnid, class)
        ) WITHOUT ROWID""",
        """CREATE TABLE photos (
            id INTEGER PRIMARY KEY,
            path TEXT NOT NULL UNIQUE,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            sha256 TEXT,
            width INTEGER,
            height INTEGER,
            format TEXT,
            taken TEXT,
            status TEXT NOT NULL CHECK (status IN ('ok', 'error', 'gone')),
            error TEXT,
            model_id INTEGER REFERENCES models (id),
            decode_ms REAL,
            infer_ms REAL,
            elapsed_ms REAL,
            indexed_at TEXT NOT NULL
        )""",
        "CREATE INDEX photos_status ON photos (status)",
        "CREATE INDEX photos_sha256 ON photos (sha256)",
        """CREATE TABLE predictions (
            photo_id INTEGER NOT NULL REFERENCES photos (id) ON DELETE CASCADE,
            rank INTEGER NOT NULL CHECK (rank BETWEEN 1 AND 5),
            class INTEGER NOT NULL,
            probability REAL NOT NULL,
            PRIMARY KEY (photo_id, rank)
        ) WITHOUT ROWID""",
        "CREATE INDEX predictions_class ON predictions (class, photo_id, probability)",
    ),
    2: (
        """CREATE TABLE runs (
            owner TEXT PRIMARY KEY NOT NULL,
            plan_seq INTEGER NOT NULL,
            heartbeat REAL NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE claims (
            path TEXT PRIMARY KEY NOT NULL,
            photo_id INTEGER,
            owner TEXT NOT NULL,
            model_id INTEGER,
            state TEXT NOT NULL CHECK (state IN ('claimed', 'done')),
            seq INTEGER NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX claims_owner ON claims (owner, state)",
    ),
}

#: Columns that change from run to run even for identical input (compare without them).
TIMING_COLUMNS = ("decode_ms", "infer_ms", "elapsed_ms", "indexed_at")


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def default_db_path() -> Path:
    """``$KLAUS_DB``, else ``$XDG_DATA_HOME/klaus/library.db`` (``~/.local/share/klaus/library.db``)."""
    env = os.environ.get("KLAUS_DB")
    if env:
        return Path(env)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "klaus" / "library.db"


def thumbs_dir(db_path: str | os.PathLike[str]) -> Path:
    """Thumbnail cache beside the database; hidden, so the walker never indexes it."""
    p = Path(db_path).resolve()
    return p.parent / f".{p.name}.thumbs"


class Database:
    """A connection to a photo index; ``readonly`` opens never create or migrate it."""

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False, create: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        where = shown(self.path)
        if self.path.exists() and not self.path.is_file():
            kind = "a directory" if self.path.is_dir() else "not a regular file"
            raise KlausIndexError(f"{where}: is {kind}, not a photo index file")
        if readonly or not create:
            if not self.path.is_file():
                raise KlausIndexError(f"{where}: no photo index here (run 'klaus index PATH --db {where}' first)")
        else:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise KlausIndexError(f"{where}: cannot create its folder ({exc.strerror or exc})") from None
        if not readonly:
            check_writable(self.path)
        with sqlite_errors(self.path):
            if readonly:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self.conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                self.conn.execute("PRAGMA foreign_keys = ON")
                self._check_or_create()
            except BaseException:
                self.conn.close()
                raise

    # -------------------------------------------------------------- schema

    def _check_or_create(self) -> None:
        where = shown(self.path)
        app_id, version = self._header()
        if app_id not in (0, APPLICATION_ID):
            raise KlausIndexError(f"{where}: not a klaus photo index (SQLite application id {app_id:#x})")
        if version < 0:  # no klaus ever wrote one; the migrations start at 0
            raise KlausIndexError(f"{where}: not a klaus photo index (schema version {version})")
        if version > SCHEMA_VERSION:
            raise KlausIndexError(
                f"{where}: photo index schema version {version} is newer than this klaus understands "
                f"(up to {SCHEMA_VERSION}); upgrade klaus"
            )
        if version == SCHEMA_VERSION and app_id == APPLICATION_ID:
            if not self.readonly:
                self._set_wal()
            return
        if self.readonly:
            if app_id == APPLICATION_ID and 1 <= version < SCHEMA_VERSION:
                return  # an older schema: readers use nothing the migrations since added
            raise KlausIndexError(f"{where}: not a klaus photo index (or an empty one)")
        self._check_foreign(version, app_id)  # before WAL mode changes anything in the file
        self._set_wal()
        with self.transaction():
            # Re-read inside the write lock: another process may have just created it.
            app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            self._check_foreign(version, app_id)
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    self.conn.execute(statement)
            if version < SCHEMA_VERSION:
                self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if version == 0:
                self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('created', ?)", (now_iso(),))

    def _header(self) -> tuple[int, int]:
        """The file's SQLite application id and schema version, read in one snapshot: another process
        creating the index commits both at once, and two separate reads could see one without the other."""
        self.conn.execute("BEGIN")
        try:
            app_id = self.conn.execute("PRAGMA application_id").fetchone()[0]
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        finally:
            self.conn.execute("COMMIT")
        return app_id, version

    def _check_foreign(self, version: int, app_id: int) -> None:
        where = shown(self.path)
        if version < 0:
            raise KlausIndexError(f"{where}: not a klaus photo index (schema version {version})")
        if version == 0:
            tables = self.conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise KlausIndexError(f"{where}: an SQLite database with other tables, not a klaus photo index")
        elif app_id != APPLICATION_ID:
            raise KlausIndexError(f"{where}: not a klaus photo index (user_version {version}, no klaus id)")

    def _set_wal(self) -> None:
        for attempt in range(50):
            try:
                mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.1)
        if mode.lower() != "wal":
            raise KlausIndexError(f"{shown(self.path)}: cannot switch the database to WAL mode (got {mode})")
        # In WAL mode NORMAL is safe against process crashes (SIGKILL); only an OS crash
        # or power loss may drop the last commits, never corrupt the file.
        self.conn.execute("PRAGMA synchronous = NORMAL")

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    # -------------------------------------------------------------- transactions

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``: takes the write lock first, waits for it (busy timeout)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            if self.conn.in_transaction:  # SQLite may have rolled back already (a full disk, an I/O error)
                self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- models and labels

    def model_id(self, name: str, sha256: str, labels_sha256: str) -> int:
        """The id of this model, registering it (in the caller's transaction)."""
        row = self.conn.execute(
            "SELECT id, labels_sha256 FROM models WHERE name = ? AND sha256 = ?", (name, sha256)
        ).fetchone()
        if row:
            return int(row[0])
        cur = self.conn.execute(
            "INSERT INTO models (name, sha256, labels_sha256, first_used) VALUES (?, ?, ?, ?)",
            (name, sha256, labels_sha256, now_iso()),
        )
        assert cur.lastrowid is not None  # an INSERT sets it
        return int(cur.lastrowid)

    def meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_labels(self, labels: Sequence, labels_sha256: str, concept_rows: Iterable[tuple[str, int]]) -> bool:
        """Install a label table and its hypernym closure (in the caller's transaction).

        If a different table was installed, predictions made with it no longer mean the
        same classes: they are dropped and those photos will be re-indexed. Returns
        True if anything changed.
        """
        if self.meta("labels_sha256") == labels_sha256:
            return False
        had_labels = self.meta("labels_sha256") is not None
        self.conn.execute("DELETE FROM classes")
        self.conn.execute("DELETE FROM concepts")
        self.conn.executemany(
            "INSERT INTO classes (idx, wnid, name, path, hierarchy) VALUES (?, ?, ?, ?, ?)",
            [
                (r.index, r.wnid, r.name, json.dumps(list(r.path)), json.dumps(list(r.hierarchy or (r.name,))))
                for r in labels
            ],
        )
        self.conn.executemany("INSERT OR IGNORE INTO concepts (wnid, class) VALUES (?, ?)", concept_rows)
        if had_labels:
            self.conn.execute("DELETE FROM predictions")
            self.conn.execute("UPDATE photos SET model_id = NULL WHERE status = 'ok'")
        self.conn.execute("INSERT OR REPLACE INTO meta VALUES ('labels_sha256', ?)", (labels_sha256,))
        return True

    # -------------------------------------------------------------- photos

    def rows_under(self, root: str) -> dict[str, tuple]:
        """{path: (id, size, mtime_ns, sha256, status, model_id)} for root itself and everything below."""
        cols = "path, id, size, mtime_ns, sha256, status, model_id"
        prefix = root.rstrip(os.sep) + os.sep
        upper = prefix[:-1] + chr(ord(os.sep) + 1)
        rows = self.conn.execute(
            f"SELECT {cols} FROM photos WHERE path = ? OR (path >= ? AND path < ?)", (root, prefix, upper)
        ).fetchall()
        return {r[0]: tuple(r[1:]) for r in rows}

    def mark_gone(self, ids: Sequence[int]) -> None:
        stamp = now_iso()
        for start in range(0, len(ids), 500):
            chunk = list(ids[start : start + 500])
            marks = ",".join("?" * len(chunk))
            self.conn.execute(f"DELETE FROM predictions WHERE photo_id IN ({marks})", chunk)
            self.conn.execute(
                f"UPDATE photos SET status = 'gone', error = NULL, indexed_at = ? WHERE id IN ({marks})",
                [stamp, *chunk],
            )

    def touch(self, path: str, size: int, mtime_ns: int) -> None:
        """The content is unchanged (same hash): remember the new mtime so the next run skips it."""
        self.conn.execute(
            "UPDATE photos SET size = ?, mtime_ns = ? WHERE path = ?", (int64(size), int64(mtime_ns), path)
        )

    def save(self, result, model_id: int, stamp: str, photo_id: int | None = None) -> int:
        """Insert or replace one photo and its predictions (in the caller's transaction).

        ``photo_id``: the id reserved for a new photo when it was claimed (:mod:`klaus.index.claims`);
        a photo already in the index keeps its id.
        """
        row = self.conn.execute(
            """INSERT INTO photos (id, path, size, mtime_ns, sha256, width, height, format, taken, status, error,
                                   model_id, decode_ms, infer_ms, elapsed_ms, indexed_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (path) DO UPDATE SET
                   size = excluded.size, mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256,
                   width = excluded.width, height = excluded.height, format = excluded.format,
                   taken = excluded.taken, status = excluded.status, error = excluded.error,
                   model_id = excluded.model_id, decode_ms = excluded.decode_ms, infer_ms = excluded.infer_ms,
                   elapsed_ms = excluded.elapsed_ms, indexed_at = excluded.indexed_at
               RETURNING id""",
            (
                photo_id,
                result.path,
                int64(result.size),
                int64(result.mtime_ns),
                result.sha256,
                result.width,
                result.height,
                result.format,
                result.taken,
                result.status,
                result.error,
                model_id,
                round(result.decode_ms, 3),
                round(result.infer_ms, 3),
                round(result.elapsed_ms, 3),
                stamp,
            ),
        ).fetchone()
        photo_id = int(row[0])
        self.conn.execute("DELETE FROM predictions WHERE photo_id = ?", (photo_id,))
        if result.status == "ok":
            self.conn.executemany(
                "INSERT INTO predictions (photo_id, rank, class, probability) VALUES (?, ?, ?, ?)",
                [(photo_id, rank, cls, prob) for rank, (cls, prob) in enumerate(result.predictions, 1)],
            )
        return photo_id

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for status, n in self.conn.execute("SELECT status, count(*) FROM photos GROUP BY status"):
            out[status] = n
        return out


def check_writable(path: Path) -> None:
    """Fail up front, in one line, if this user cannot write the index (or create its WAL files)."""
    where = shown(path)
    if path.exists() and not os.access(path, os.W_OK):
        raise KlausIndexError(
            f"{where}: the index file is not writable (its permissions, or a read-only file system); "
            "make it writable (chmod u+w) or use another --db"
        )
    folder = path.resolve().parent
    if os.access(folder, os.W_OK):
        return
    if not path.exists():
        raise KlausIndexError(f"{where}: cannot create the index: its folder is not writable; use another --db")
    if not all(Path(f"{path}{suffix}").is_file() for suffix in ("-wal", "-shm")):
        raise KlausIndexError(
            f"{where}: its folder is not writable, and SQLite must create {path.name}-wal and {path.name}-shm there "
            "to write a WAL database; make the folder writable or move the index"
        )


@contextmanager
def sqlite_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn any SQLite error inside the block into a one-line KlausIndexError naming the index file."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        raise KlausIndexError(error_message(exc, path)) from None


def error_message(exc: sqlite3.DatabaseError, path: str | os.PathLike[str]) -> str:
    """``DBFILE: problem`` in one line, with what to do about it where there is something to do."""
    return f"{shown(path)}: {_describe(exc, Path(path))}"


def _describe(exc: sqlite3.DatabaseError, path: Path | None = None) -> str:
    text = str(exc)
    code = getattr(exc, "sqlite_errorname", "") or ""
    if code in ("SQLITE_READONLY_DIRECTORY", "SQLITE_READONLY_CANTINIT") and path is not None:
        return (
            f"cannot read this WAL-mode index: its folder is not writable and SQLite must create {path.name}-shm "
            "there to read it; make the folder writable or copy the index to a writable folder"
        )
    if "file is not a database" in text:
        return "not an SQLite database (so not a klaus photo index)"
    if "unable to open" in text:
        return "cannot open the database file"
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "database is locked" in text:
        return (
            f"the index is locked by another process (waited {BUSY_TIMEOUT_MS // 1000} s); "
            "try again when it has finished"
        )
    if code.startswith("SQLITE_READONLY") or "readonly database" in text:
        return (
            "the index cannot be written (read-only file, folder or file system); make it writable or use another --db"
        )
    if code.startswith("SQLITE_FULL") or "database or disk is full" in text:
        return "the disk is full; free some space and run again (the committed photos are kept)"
    if code.startswith("SQLITE_CORRUPT") or "malformed" in text:
        return "the index file is damaged (database disk image is malformed); delete it and run 'klaus index' again"
    return f"database error ({' '.join(text.split())})"
