"""Two `klaus index` runs on one database share the work and end as one run would.

The runs claim batches of photos in plan order under SQLite's write lock
(klaus.index.claims): each photo is classified by one of them, ids are reserved in plan
order, and the final database equals an uninterrupted single run's (ids included, timing
columns excluded).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from klaus.index import claims
from klaus.index import db as dbm
from klaus.index.db import Database
from test_index import integrity, klaus_cmd, make_bad_files, make_photos, query, snapshot

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="process liveness through /proc or kill(0)")

N_PHOTOS = 300
N_BAD = 4


def index_args(lib, db) -> list[str]:
    return [*klaus_cmd(), "index", str(lib), "--db", str(db), "--batch", "8", "--workers", "2", "--json"]


def committed(db) -> int:
    try:
        return query(db, "SELECT count(*) FROM photos")[0][0]
    except sqlite3.Error:
        return 0


def test_two_concurrent_runs_share_the_work_and_match_one_run(tmp_path):
    lib = tmp_path / "photos"
    make_photos(lib, N_PHOTOS, size=40, seed=11)
    make_bad_files(lib / "bad")
    reference = tmp_path / "reference.db"
    subprocess.run(index_args(lib, reference), check=True, capture_output=True, timeout=300)

    db = tmp_path / "shared.db"
    first = subprocess.Popen(index_args(lib, db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while committed(db) < 8 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the second run starts once the first is under way
    second = subprocess.Popen(index_args(lib, db), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [proc.communicate(timeout=300) for proc in (first, second)]
    for proc, (_out, err) in zip((first, second), outputs, strict=True):
        assert proc.returncode == 0, err
        assert err == ""
    a, b = (json.loads(out) for out, _err in outputs)

    assert integrity(db) == "ok"
    assert snapshot(db) == snapshot(reference)
    total = N_PHOTOS + N_BAD
    assert query(db, "SELECT count(*), count(DISTINCT path), max(id) FROM photos") == [(total, total, total)]
    # Every good photo was classified by exactly one of the runs, and both did some.
    assert a["indexed"] + b["indexed"] == N_PHOTOS
    assert a["indexed"] > 0 and b["indexed"] > 0
    # Failed photos are retried by a run that planned after they failed, as one more run would.
    assert N_BAD <= a["failed"] + b["failed"] <= 2 * N_BAD
    assert b["photos"] == total and b["indexed"] + b["failed"] + b["skipped"] == total
    # Nothing is left claimed, no run is registered, and the last run to leave dropped the done marks.
    assert query(db, "SELECT count(*) FROM claims") == [(0,)]
    assert query(db, "SELECT count(*) FROM runs") == [(0,)]


def test_claims_of_a_killed_run_are_taken_over_with_their_ids(tmp_path):
    lib = tmp_path / "photos"
    make_photos(lib, 40, size=32, seed=5)
    reference = tmp_path / "reference.db"
    subprocess.run(index_args(lib, reference), check=True, capture_output=True, timeout=300)

    db = tmp_path / "killed.db"
    subprocess.run(index_args(lib, db), check=True, capture_output=True, timeout=300)
    # Leave the database as a run killed after claiming (and reserving ids for) ten new photos would.
    conn = sqlite3.connect(db)
    with conn:
        rows = conn.execute("SELECT id, path FROM photos ORDER BY id DESC LIMIT 10").fetchall()
        dead = f"{claims.socket.gethostname()}:{dead_pid()}:1"
        conn.execute("INSERT INTO runs VALUES (?, 1, ?)", (dead, time.time()))
        for photo_id, path in rows:
            conn.execute("DELETE FROM predictions WHERE photo_id = ?", (photo_id,))
            conn.execute("DELETE FROM photos WHERE id = ?", (photo_id,))
            conn.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, 1, 'claimed', 1)", (path, photo_id, dead))
    conn.close()
    out = subprocess.run(index_args(lib, db), check=True, capture_output=True, text=True, timeout=300).stdout
    assert json.loads(out)["indexed"] == 10
    assert snapshot(db) == snapshot(reference)
    assert query(db, "SELECT count(*) FROM claims") == [(0,)]
    assert query(db, "SELECT count(*) FROM runs") == [(0,)]


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_liveness_of_a_run():
    now = time.time()
    me = claims.owner_id()
    assert claims.alive(me, now, now)
    assert not claims.alive(me, now - claims.STALE_SECONDS - 1, now)  # alive but silent too long: stopped
    assert not claims.alive(claims.owner_id(dead_pid()), now, now)
    host, pid, _start = me.split(":")
    assert not claims.alive(f"{host}:{pid}:1", now, now)  # the same pid, another process (reused pid)
    assert claims.alive(f"elsewhere.example:{pid}:1", now, now)  # another machine: its heartbeat decides
    assert not claims.alive(f"elsewhere.example:{pid}:1", None, now)


def test_version_1_index_is_migrated_and_still_readable(tmp_path):
    lib = tmp_path / "photos"
    make_photos(lib, 12, size=32, seed=2)
    db = tmp_path / "lib.db"
    subprocess.run(index_args(lib, db), check=True, capture_output=True, timeout=300)
    before = snapshot(db)
    created = query(db, "SELECT value FROM meta WHERE key = 'created'")
    conn = sqlite3.connect(db, isolation_level=None)  # as version 1 left it: no runs or claims tables
    conn.execute("DROP TABLE claims")
    conn.execute("DROP TABLE runs")
    conn.execute("DELETE FROM meta WHERE key = 'claim_seq'")
    conn.execute("PRAGMA user_version = 1")
    conn.close()

    with Database(db, readonly=True) as database:  # readers need nothing version 2 added
        assert database.schema_version == 1
    search = subprocess.run(
        [*klaus_cmd(), "search", "entity", "--min-prob", "0", "--db", str(db), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert search.returncode == 0 and search.stderr == ""
    assert len(search.stdout.splitlines()) == 12

    make_photos(tmp_path / "more", 3, size=32, seed=9)
    os.rename(tmp_path / "more" / "set0" / "photo0000.jpg", lib / "set0" / "new.jpg")
    out = subprocess.run(index_args(lib, db), check=True, capture_output=True, text=True, timeout=300).stdout
    assert json.loads(out)["indexed"] == 1
    assert query(db, "PRAGMA user_version") == [(dbm.SCHEMA_VERSION,)] == [(2,)]
    assert query(db, "SELECT value FROM meta WHERE key = 'created'") == created
    after_photos, _ = snapshot(db)
    assert [row for row in after_photos if not row[1].endswith("new.jpg")] == before[0]
    assert query(db, "SELECT max(id) FROM photos WHERE path LIKE '%new.jpg'") == [(13,)]
