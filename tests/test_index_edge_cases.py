"""`klaus index` and `klaus search` at the edges: file names SQLite cannot store, names with control
characters, pipes and devices, read-only and locked indexes, unreadable folders, bad arguments.

Most tests drive the CLI as a user would (click's CliRunner, or a subprocess where a hang or file
permissions matter); the helpers underneath are tested directly too.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from conftest import EXAMPLES
from klaus.errors import KlausImageError
from klaus.index import db as dbm
from klaus.index.db import Database, KlausIndexError
from klaus.index.indexer import index_paths
from klaus.index.pipeline import Task, check_regular, decode, read_photo
from klaus.index.walker import UNSTORABLE, walk
from klaus.names import printable, shown, storable
from klaus.preprocess import Preprocess
from test_index import assert_one_line_error, integrity, klaus_cmd, query, run_cli, snapshot

NO_DAC_OVERRIDE = ["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search", "--"]


def unprivileged() -> list[str]:
    """A command prefix under which file permissions apply (root ignores them otherwise)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file permissions cannot be tested")
    return NO_DAC_OVERRIDE


def run_klaus(*args: str, prefix: list[str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), *klaus_cmd(), *args], capture_output=True, text=True, timeout=timeout)


def raw_name(folder: Path, name: bytes) -> str:
    """A path under ``folder`` whose last part is the raw bytes ``name`` (as Python sees it)."""
    return os.fsdecode(os.fsencode(folder) + b"/" + name)


def warnings_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("klaus: warning: ")]


# ------------------------------------------------------------------ names: undecodable bytes, control characters


def test_names_helpers():
    bad = raw_name(Path("/photos"), b"caf\xe9.jpg")
    assert not storable(bad) and storable("/photos/café.jpg")
    assert printable(bad) == "/photos/caf\\xe9.jpg"
    assert printable(bad).encode("utf-8")  # valid text, for JSON and SQLite
    assert printable("/photos/café.jpg") == "/photos/café.jpg"
    assert shown("a\nb\tc\x1bd\u2028e\u202ef.jpg") == "a\\nb\\tc\\x1bd\\u2028e\\u202ef.jpg"
    assert shown("/photos/Ünïcödé 写真.jpg") == "/photos/Ünïcödé 写真.jpg"  # printable text is left alone


def make_undecodable_library(lib: Path) -> dict[str, str]:
    lib.mkdir(parents=True)
    shutil.copy(EXAMPLES / "cat.jpg", lib / "ok.jpg")
    paths = {"file": raw_name(lib, b"caf\xe9.jpg"), "folder": raw_name(lib, b"dir\xff")}
    shutil.copy(EXAMPLES / "cat.jpg", paths["file"])
    os.mkdir(paths["folder"])
    shutil.copy(EXAMPLES / "coffee.jpg", os.path.join(paths["folder"], "inside.jpg"))
    return paths


def test_walk_leaves_out_names_that_are_not_utf8(tmp_path):
    lib = tmp_path / "photos"
    bad = make_undecodable_library(lib)
    found = walk([str(lib)])
    assert [e.path for e in found.entries] == [str(lib / "ok.jpg")]
    assert sorted(s.path for s in found.unstorable) == sorted(bad.values())
    assert all(s.error == UNSTORABLE for s in found.unstorable)
    with pytest.raises(KlausIndexError, match=r"dir\\xff: its name is not valid UTF-8"):
        walk([bad["folder"]])


def test_cli_index_goes_on_past_names_that_are_not_utf8(tmp_path):
    lib = tmp_path / "photos"
    make_undecodable_library(lib)
    db = tmp_path / "lib.db"
    first = run_cli("index", str(lib), "--db", str(db))
    assert first.exit_code == 0, first.output
    warnings = warnings_of(first.stderr)
    assert sorted(warnings) == sorted(
        f"klaus: warning: {lib}/{name}: {UNSTORABLE}" for name in ("caf\\xe9.jpg", "dir\\xff")
    )
    assert "indexed 1, skipped 0, failed 0, gone 0, left out 2" in first.stdout
    assert query(db, "SELECT path, status FROM photos") == [(str(lib / "ok.jpg"), "ok")]
    assert integrity(db) == "ok"
    again = run_cli("index", str(lib), "--db", str(db), "--json")  # no longer dies at the same spot
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert (summary["skipped"], summary["unstorable"]) == (1, 2)
    assert sorted(e["path"] for e in summary["unstorable_errors"]) == [f"{lib}/caf\\xe9.jpg", f"{lib}/dir\\xff"]
    assert "not valid UTF-8" in summary["unstorable_errors"][0]["error"]


def test_cli_index_refuses_a_named_path_that_is_not_utf8(tmp_path):
    bad = make_undecodable_library(tmp_path / "photos")
    db = tmp_path / "lib.db"
    assert_one_line_error(run_cli("index", bad["folder"], "--db", str(db)), "dir\\xff", "not valid UTF-8")
    assert not db.exists()


def test_control_characters_in_names_stay_on_one_line(tmp_path):
    lib = tmp_path / "photos"
    lib.mkdir()
    shutil.copy(EXAMPLES / "cat.jpg", lib / "new\nline\x1b[31m.jpg")
    (lib / "bad\nname.jpg").write_text("not a photo\n")
    db = tmp_path / "lib.db"
    indexed = run_cli("index", str(lib), "--db", str(db))
    assert indexed.exit_code == 0, indexed.output
    warnings = warnings_of(indexed.stderr)
    assert len(warnings) == 1 and warnings[0].startswith(f"klaus: warning: {lib}/bad\\nname.jpg: not an image")
    assert indexed.stderr.splitlines() == ["2 photos: 2 to classify, 0 unchanged", *warnings]
    found = run_cli("search", "cat", "--db", str(db))
    assert found.exit_code == 0, found.output
    lines = found.stdout.splitlines()
    assert len(lines) == 2 and f"{lib}/new\\nline\\x1b[31m.jpg" in lines[1]
    as_json = json.loads(run_cli("search", "cat", "--db", str(db), "--json").stdout)
    assert as_json["path"] == str(lib / "new\nline\x1b[31m.jpg")  # JSON keeps the real name


# ------------------------------------------------------------------ pipes, devices


def test_check_regular_and_read_photo_refuse_what_is_not_a_file(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(KlausImageError, match=r"not a regular file \(a named pipe\)"):
        check_regular(os.stat(fifo))
    with pytest.raises(KlausImageError, match=r"not a regular file \(a character device\)"):
        check_regular(os.stat("/dev/null"))
    data, st = read_photo(str(EXAMPLES / "cat.jpg"))
    assert data == (EXAMPLES / "cat.jpg").read_bytes() and stat.S_ISREG(st.st_mode)
    # Decoding a pipe must return at once (run in a daemon thread: a regression hangs, not the suite).
    out: list = []
    worker = threading.Thread(target=lambda: out.append(decode(Task(str(fifo), 0, 0), Preprocess())), daemon=True)
    worker.start()
    worker.join(10)
    assert out and out[0].error == "not a regular file (a named pipe)"


def test_cli_index_records_pipes_and_devices_without_reading_them(tmp_path):
    lib = tmp_path / "photos"
    lib.mkdir()
    shutil.copy(EXAMPLES / "cat.jpg", lib / "cat.jpg")
    os.mkfifo(lib / "pipe.jpg")
    (lib / "zero.jpg").symlink_to("/dev/zero")
    db = tmp_path / "lib.db"
    result = run_klaus("index", str(lib), "--db", str(db), "--json", timeout=120)  # hung forever before
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["indexed"], summary["failed"]) == (1, 2)
    assert {Path(e["path"]).name: e["error"] for e in summary["errors"]} == {
        "pipe.jpg": "not a regular file (a named pipe)",
        "zero.jpg": "not a regular file (a character device)",
    }
    assert dict(query(db, "SELECT path, status FROM photos")) == {
        str(lib / "cat.jpg"): "ok",
        str(lib / "pipe.jpg"): "error",
        str(lib / "zero.jpg"): "error",
    }


# ------------------------------------------------------------------ read-only and locked indexes


@pytest.fixture
def indexed(tmp_path) -> tuple[Path, Path]:
    """(db, photo folder): the examples, indexed through the CLI."""
    lib = tmp_path / "photos"
    shutil.copytree(EXAMPLES, lib, ignore=shutil.ignore_patterns("*.md"))
    db = tmp_path / "lib.db"
    assert run_cli("index", str(lib), "--db", str(db)).exit_code == 0
    return db, lib


def test_cli_index_refuses_a_read_only_index_up_front(indexed):
    db, lib = indexed
    prefix = unprivileged()
    before = snapshot(db)
    db.chmod(0o444)
    try:
        for reason in ("nothing to write", "a new photo"):
            if reason == "a new photo":
                shutil.copy(EXAMPLES / "cat.jpg", lib / "new.jpg")
            result = run_klaus("index", str(lib), "--db", str(db), prefix=prefix)
            assert result.returncode == 1, (reason, result.stderr)
            assert result.stderr.splitlines() == [
                f"klaus: error: {db}: the index file is not writable (its permissions, or a read-only file system); "
                "make it writable (chmod u+w) or use another --db"
            ], reason
    finally:
        db.chmod(0o644)
    assert snapshot(db) == before and integrity(db) == "ok"


def test_cli_read_only_folder_says_why_a_wal_index_cannot_be_read(indexed):
    db, _lib = indexed
    prefix = unprivileged()
    for extra in (Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert not extra.exists()  # closed cleanly: SQLite must create -shm to read it
    db.chmod(0o444)
    db.parent.chmod(0o555)
    try:
        for command in (["search", "cat"], ["serve", "--port", "0"]):
            result = run_klaus(*command, "--db", str(db), prefix=prefix, timeout=60)
            assert result.returncode == 1, result.stderr
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"klaus: error: {db}: "), result.stderr
            assert "folder is not writable" in lines[0] and "lib.db-shm" in lines[0], lines[0]
    finally:
        db.parent.chmod(0o755)
        db.chmod(0o644)


def test_cli_index_reports_a_lock_held_too_long_in_one_line(indexed, monkeypatch):
    db, lib = indexed
    shutil.copy(EXAMPLES / "cat.jpg", lib / "new.jpg")  # something to write
    before = snapshot(db)
    monkeypatch.setattr(dbm, "BUSY_TIMEOUT_MS", 300)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = run_cli("index", str(lib), "--db", str(db))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_one_line_error(result, f"{db}: the index is locked by another process")
    assert snapshot(db) == before and integrity(db) == "ok"
    monkeypatch.undo()
    after = run_cli("index", str(lib), "--db", str(db))
    assert after.exit_code == 0 and "indexed 1, skipped 4" in after.stdout


def test_sqlite_errors_become_one_line_index_errors(tmp_path):
    with pytest.raises(KlausIndexError, match=r"x\.db: the disk is full"), dbm.sqlite_errors(tmp_path / "x.db"):
        raise sqlite3.OperationalError("database or disk is full")
    with (
        pytest.raises(KlausIndexError, match=r"x\.db: the index file is damaged"),
        dbm.sqlite_errors(tmp_path / "x.db"),
    ):
        raise sqlite3.DatabaseError("database disk image is malformed")
    with dbm.sqlite_errors(tmp_path / "x.db"):  # nothing to convert
        pass


# ------------------------------------------------------------------ unreadable folders


def test_cli_index_names_each_unreadable_folder(tmp_path, monkeypatch):
    lib = tmp_path / "photos"
    (lib / "open").mkdir(parents=True)
    locked = lib / "locked"
    locked.mkdir()
    shutil.copy(EXAMPLES / "cat.jpg", lib / "open" / "cat.jpg")
    shutil.copy(EXAMPLES / "coffee.jpg", locked / "coffee.jpg")
    db = tmp_path / "lib.db"
    assert run_cli("index", str(lib), "--db", str(db)).exit_code == 0
    if os.geteuid() == 0:  # root lists anything: make the listing fail as it would for a user
        real_scandir = os.scandir

        def fake_scandir(path="."):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", os.fspath(path))
            return real_scandir(path)

        monkeypatch.setattr(os, "scandir", fake_scandir)
    else:
        locked.chmod(0)
    try:
        text = run_cli("index", str(lib), "--db", str(db))
        as_json = run_cli("index", str(lib), "--db", str(db), "--json")
    finally:
        locked.chmod(0o755)
    assert text.exit_code == 0, text.output
    assert "1 folder(s) could not be read" in text.stderr
    assert warnings_of(text.stderr) == [f"klaus: warning: {locked}: folder cannot be read (Permission denied)"]
    summary = json.loads(as_json.stdout)
    assert summary["unreadable_folders"] == 1  # the count stays, for compatibility
    assert summary["unreadable_folder_errors"] == [
        {"path": str(locked), "error": "folder cannot be read (Permission denied)"}
    ]
    assert summary["gone"] == 0 and query(db, "SELECT count(*) FROM photos WHERE status = 'gone'") == [(0,)]


# ------------------------------------------------------------------ bad arguments change nothing


def test_cli_index_refuses_an_empty_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLES / "cat.jpg", tmp_path / "cat.jpg")
    db = tmp_path / "x.db"
    assert_one_line_error(run_cli("index", "", "--db", str(db)), "PATH is empty")
    assert not db.exists()
    with pytest.raises(KlausIndexError, match="PATH is empty"):
        walk([""])


@pytest.mark.parametrize("kind", ["text.klaus", "junk.onnx", "empty.onnx"])
def test_cli_index_bad_model_leaves_no_index_behind(tmp_path, kind):
    model = tmp_path / kind
    model.write_bytes({"text.klaus": b"hello, not a model\n", "junk.onnx": b"junk", "empty.onnx": b""}[kind])
    db = tmp_path / "new" / "lib.db"
    assert_one_line_error(run_cli("index", str(EXAMPLES), "--db", str(db), "--model", str(model)), str(model))
    assert not db.exists() and not db.parent.exists()


def test_index_paths_loads_the_model_before_creating_the_index(tmp_path):
    db = tmp_path / "lib.db"
    model = tmp_path / "bad.onnx"
    model.write_bytes(b"junk")
    with pytest.raises(Exception, match="not a readable ONNX model"):
        index_paths([str(EXAMPLES)], db, model=str(model), progress=False)
    assert not db.exists()


def test_a_database_path_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.db"
    os.mkfifo(fifo)
    for readonly in (False, True):
        with pytest.raises(KlausIndexError, match=r"pipe\.db: is not a regular file"):
            Database(fifo, readonly=readonly)


# ------------------------------------------------------------------ values SQLite cannot hold


def same_size_bmps(folder: Path) -> tuple[bytes, bytes]:
    """Two different photos whose files have the same size (uncompressed BMPs of one size)."""
    from PIL import Image

    blobs = []
    for colour in ((200, 40, 40), (40, 40, 200)):
        path = folder / "scratch.bmp"
        Image.new("RGB", (48, 40), colour).save(path)
        blobs.append(path.read_bytes())
        path.unlink()
    assert len(blobs[0]) == len(blobs[1]) and blobs[0] != blobs[1]
    return blobs[0], blobs[1]


def test_cli_index_stores_a_photo_dated_after_2262(tmp_path):
    """An mtime past 2^63 ns (year 2262) is stored clamped; re-runs skip it unless its content changes."""
    lib = tmp_path / "photos"
    lib.mkdir()
    red, blue = same_size_bmps(lib)
    future = lib / "future.bmp"
    future.write_bytes(red)
    shutil.copy(EXAMPLES / "cat.jpg", lib / "cat.jpg")
    year_2263 = 9246182400  # 2263-01-01, as `touch -d 2263-01-01` sets it
    os.utime(future, (year_2263, year_2263))
    assert future.stat().st_mtime_ns > 2**63 - 1  # beyond SQLite's INTEGER
    db = tmp_path / "lib.db"

    first = run_cli("index", str(lib), "--db", str(db), "--json")
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert (summary["indexed"], summary["failed"], summary["errors"]) == (2, 0, [])
    rows = dict(query(db, "SELECT path, mtime_ns FROM photos WHERE status = 'ok'"))
    assert rows[str(future)] == 2**63 - 1  # clamped
    stored = query(db, "SELECT sha256 FROM photos WHERE path = ?", (str(future),))

    again = json.loads(run_cli("index", str(lib), "--db", str(db), "--json").stdout)
    assert (again["indexed"], again["skipped"], again["failed"]) == (0, 2, 0)  # hashed, found unchanged
    assert query(db, "SELECT sha256 FROM photos WHERE path = ?", (str(future),)) == stored

    future.write_bytes(blue)  # same size, same (out of range) mtime, new content
    os.utime(future, (year_2263, year_2263))
    changed = json.loads(run_cli("index", str(lib), "--db", str(db), "--json").stdout)
    assert (changed["indexed"], changed["skipped"]) == (1, 1)
    assert query(db, "SELECT sha256 FROM photos WHERE path = ?", (str(future),)) != stored
    assert integrity(db) == "ok"


def test_int64_clamps_to_sqlite_integers():
    assert dbm.int64(2**70) == 2**63 - 1 and dbm.int64(-(2**70)) == -(2**63) and dbm.int64(12) == 12


@pytest.mark.parametrize("version", [-1, -(2**31)])
def test_cli_refuses_an_index_with_a_negative_schema_version(indexed, version):
    db, lib = indexed
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    before = snapshot(db)
    expected = f"{db}: not a klaus photo index (schema version {version})"
    assert_one_line_error(run_cli("index", str(lib), "--db", str(db)), expected)
    assert_one_line_error(run_cli("search", "cat", "--db", str(db)), expected)
    assert snapshot(db) == before


def test_cli_index_json_is_valid_utf8_for_a_db_path_that_is_not(tmp_path):
    shutil.copy(EXAMPLES / "cat.jpg", tmp_path / "cat.jpg")
    db = raw_name(tmp_path, b"dbx\xff") + "/lib.db"
    result = subprocess.run(
        [*klaus_cmd(), "index", str(tmp_path / "cat.jpg"), "--db", db, "--json"], capture_output=True, timeout=180
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.decode("utf-8"))  # strict: a raw 0xff byte would fail here
    assert summary["db"] == f"{tmp_path}/dbx\\xff/lib.db" == printable(db)
    assert summary["indexed"] == 1
