"""Crash safety: `klaus index` killed with SIGKILL at random (seeded) moments, then resumed.

The final database must equal an uninterrupted run's: the same photo rows (ids
included; timing columns excluded), the same predictions, no duplicates, and SQLite's
integrity check passes.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

import pytest

from test_index import integrity, klaus_cmd, make_bad_files, make_photos, query, snapshot

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")

N_PHOTOS = 200
KILLS = 5
SEED = 20240611


def committed(db) -> int:
    """Photos committed so far (a WAL reader never blocks the writer)."""
    if not db.exists():
        return 0
    try:
        return query(db, "SELECT count(*) FROM photos")[0][0]
    except Exception:  # the schema is not there yet
        return 0


def index_args(lib, db) -> list[str]:
    return [*klaus_cmd(), "index", str(lib), "--db", str(db), "--batch", "4", "--workers", "2", "--json"]


def test_sigkill_at_random_moments_then_resume(tmp_path):
    lib = tmp_path / "photos"
    make_photos(lib, N_PHOTOS, size=40, seed=7)
    make_bad_files(lib / "bad")
    total = N_PHOTOS + 4

    reference = tmp_path / "reference.db"
    subprocess.run(index_args(lib, reference), check=True, capture_output=True, timeout=300)

    db = tmp_path / "killed.db"
    rng = random.Random(SEED)
    # The first kill lands at a random early moment (start-up, schema creation, the first
    # batch); the others once the run has committed a random number of new photos, plus a
    # random delay, so they hit every phase of a batch: decoding, inference, mid-transaction.
    proc = subprocess.Popen(index_args(lib, db), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.05, 0.6))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    interrupted = 0  # kills after some progress and before the end
    for _ in range(KILLS - 1):
        before = committed(db)
        target = before + rng.randint(1, max(1, (total - before) // 3))
        proc = subprocess.Popen(index_args(lib, db), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while committed(db) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        after = committed(db)
        interrupted += before < after < total
        assert integrity(db) == "ok"
        # Committed batches only: every ok photo has exactly its 5 predictions.
        assert query(
            db,
            "SELECT count(*) FROM photos ph WHERE status = 'ok' AND "
            "(SELECT count(*) FROM predictions p WHERE p.photo_id = ph.id) != 5",
        ) == [(0,)]
    assert interrupted >= 3, "the kills should interrupt runs half-way"

    subprocess.run(index_args(lib, db), check=True, capture_output=True, timeout=300)
    assert integrity(db) == "ok"
    assert snapshot(db) == snapshot(reference)
    assert query(db, "SELECT count(*), count(DISTINCT path), max(id) FROM photos") == [(total, total, total)]
    assert query(db, "SELECT count(*) FROM predictions") == [(N_PHOTOS * 5,)]
    assert query(db, "SELECT count(*) FROM models") == [(1,)]
