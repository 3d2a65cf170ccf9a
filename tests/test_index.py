"""`klaus index`: schema, incremental runs, bad files, model identity, concurrency, CLI.

Helpers here (photo factories, DB snapshots) are imported by the other test_index*,
test_search and test_web* modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import EXAMPLES
from klaus.cli import main
from klaus.index import db as dbm
from klaus.index.db import Database, KlausIndexError
from klaus.index.engine import Engine
from klaus.index.indexer import concept_rows, index_paths
from klaus.index.pipeline import Task, classify_batch, decode, exif_date
from klaus.labels import ancestors, imagenet_labels
from klaus.preprocess import Preprocess
from klaus.runtime import default_model_path

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers (shared)


@pytest.fixture(scope="session")
def engine() -> Engine:
    """The embedded model, loaded once for the in-process tests."""
    return Engine.load()


def make_photos(folder: Path, n: int, size: int = 48, seed: int = 0) -> list[Path]:
    """n small, distinct JPEGs (smooth colour gradients plus noise), in nested folders."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        c0, c1, c2 = rng.uniform(0, 255, 3)
        img = np.stack([c0 * xx + (255 - c0) * yy, c1 * yy, c2 * (1 - xx)], axis=-1)
        img += rng.normal(0, 12, img.shape)
        sub = folder / f"set{i % 4}"
        sub.mkdir(exist_ok=True)
        path = sub / f"photo{i:04d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=85)
        paths.append(path)
    return paths


def make_bad_files(folder: Path) -> dict[str, Path]:
    """Files that must be recorded as errors without stopping a run."""
    folder.mkdir(parents=True, exist_ok=True)
    good = (EXAMPLES / "cat.jpg").read_bytes()
    files = {
        "truncated": folder / "truncated.jpg",
        "not_image": folder / "notes.jpg",
        "empty": folder / "empty.png",
        "bomb": folder / "bomb.png",
    }
    files["truncated"].write_bytes(good[: len(good) // 3])
    files["not_image"].write_text("this is not a photo\n")
    files["empty"].write_bytes(b"")
    Image.new("1", (14000, 13000)).save(files["bomb"])  # 182 Mpx > the 179 Mpx limit; a small file
    return files


def snapshot(db_path: Path) -> tuple[list, list]:
    """Every photo and prediction row, without the timing columns, in a canonical order."""
    conn = sqlite3.connect(db_path)
    try:
        cols = [r[1] for r in conn.execute("PRAGMA table_info(photos)") if r[1] not in dbm.TIMING_COLUMNS]
        photos = conn.execute(f"SELECT {', '.join(cols)} FROM photos ORDER BY path").fetchall()
        preds = conn.execute(
            "SELECT ph.path, p.rank, p.class, p.probability FROM predictions AS p "
            "JOIN photos AS ph ON ph.id = p.photo_id ORDER BY ph.path, p.rank"
        ).fetchall()
    finally:
        conn.close()
    return photos, preds


def integrity(db_path: Path) -> str:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


def klaus_cmd() -> list[str]:
    exe = shutil.which("klaus", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "klaus.cli"]


def run_cli(*args: str):
    result = CliRunner().invoke(main, list(args), prog_name="klaus")
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("klaus: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def query(db_path: Path, sql: str, params: tuple = ()) -> list:
    conn = sqlite3.connect(db_path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------ schema


def test_new_database_is_wal_and_versioned(tmp_path):
    path = tmp_path / "lib.db"
    Database(path).close()
    assert query(path, "PRAGMA journal_mode") == [("wal",)]
    assert query(path, "PRAGMA user_version") == [(dbm.SCHEMA_VERSION,)]
    assert query(path, "PRAGMA application_id") == [(dbm.APPLICATION_ID,)]
    tables = {r[0] for r in query(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"photos", "predictions", "models", "classes", "concepts", "meta"} <= tables
    Database(path).close()  # reopening an up-to-date index changes nothing
    assert query(path, "PRAGMA user_version") == [(dbm.SCHEMA_VERSION,)]


def test_newer_schema_is_refused_in_one_line(tmp_path):
    path = tmp_path / "lib.db"
    Database(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {dbm.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(KlausIndexError, match="newer than this klaus"):
        Database(path)
    result = run_cli("search", "dog", "--db", str(path))
    assert_one_line_error(result, f"schema version {dbm.SCHEMA_VERSION + 1}", "upgrade klaus")


@pytest.mark.parametrize("kind", ["other-sqlite", "text", "klaus-model"])
def test_foreign_files_are_not_indexes(tmp_path, kind):
    path = tmp_path / "lib.db"
    if kind == "other-sqlite":
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE t (x)")
        conn.close()
    elif kind == "text":
        path.write_text("hello " * 200)
    else:
        shutil.copy(default_model_path(), path)
    before = path.read_bytes()
    with pytest.raises(KlausIndexError, match=r"not a|klaus photo index"):
        Database(path)
    assert path.read_bytes() == before  # never converted or migrated


def test_missing_index_for_search_is_one_line(tmp_path):
    result = run_cli("search", "dog", "--db", str(tmp_path / "none.db"))
    assert_one_line_error(result, "no photo index here")
    assert not (tmp_path / "none.db").exists()


# ------------------------------------------------------------------ indexing


def test_index_examples(tmp_path, engine):
    db = tmp_path / "lib.db"
    summary = index_paths([str(EXAMPLES)], db, engine=engine, progress=False)
    assert (summary.photos, summary.indexed, summary.skipped, summary.failed, summary.gone) == (4, 4, 0, 0, 0)
    rows = query(db, "SELECT path, status, size, width, height, format, sha256, model_id FROM photos ORDER BY path")
    assert [Path(r[0]).name for r in rows] == ["astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg"]
    for path, status, size, width, height, fmt, sha, _model_id in rows:
        data = Path(path).read_bytes()
        assert status == "ok" and fmt == "JPEG" and size == len(data)
        assert sha == hashlib.sha256(data).hexdigest()
        assert (width, height) == Image.open(path).size
    cat = query(
        db,
        "SELECT p.rank, p.class, p.probability FROM predictions p JOIN photos ph ON ph.id = p.photo_id "
        "WHERE ph.path LIKE '%cat.jpg' ORDER BY p.rank",
    )
    assert [r[0] for r in cat] == [1, 2, 3, 4, 5]
    assert cat[0][1] in range(281, 286)
    probs = [r[2] for r in cat]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    name, sha = query(db, "SELECT name, sha256 FROM models")[0]
    assert name == "efficientnet-lite0"
    assert sha == hashlib.sha256(default_model_path().read_bytes()).hexdigest()
    timing = query(db, "SELECT decode_ms, infer_ms, elapsed_ms, indexed_at FROM photos")
    assert all(d > 0 and i > 0 and abs(e - d - i) < 0.01 and at.endswith("Z") for d, i, e, at in timing)


def test_index_and_classify_agree(tmp_path, engine):
    """The index preprocesses like `klaus classify` (same decode, window, normalization), in
    batches of its own: the same top-5 classes, probabilities equal but for float noise."""
    from klaus.runtime import Classifier

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in EXAMPLES.glob("*.jpg"):
        shutil.copy(p, photos / p.name)
    Image.open(EXAMPLES / "cat.jpg").rotate(90, expand=True).save(photos / "cat-portrait.png")
    db = tmp_path / "lib.db"
    assert index_paths([str(photos)], db, engine=engine, batch=3, progress=False).indexed == 5
    clf = Classifier()
    for path in sorted(photos.iterdir()):
        stored = query(
            db,
            "SELECT p.class, p.probability FROM predictions p JOIN photos ph ON ph.id = p.photo_id "
            "WHERE ph.path = ? ORDER BY p.rank",
            (str(path),),
        )
        direct = clf.classify(str(path), top=5).predictions
        assert [c for c, _ in stored] == [p.index for p in direct], path.name
        np.testing.assert_allclose([pr for _, pr in stored], [p.probability for p in direct], atol=1e-4)


def test_model_calls_of_a_few_photos_give_the_batch_result(tmp_path, engine):
    paths = [*sorted(EXAMPLES.glob("*.jpg")), tmp_path / "missing.jpg"]
    results = {}
    for step in (1, 3, 16):
        batch = [decode(Task(str(p), 0, 0), engine.preprocess) for p in paths]
        assert [r.pixels.dtype if r.pixels is not None else None for r in batch] == [np.uint8] * 4 + [None]
        assert batch[0].pixels.shape == (1, 224, 224, 3) and batch[-1].error
        classify_batch(engine, batch, model_batch=step)
        assert all(r.pixels is None for r in batch) and batch[-1].predictions == []
        results[step] = [r.predictions for r in batch[:4]]
    for step in (1, 3):
        for got, want in zip(results[step], results[16], strict=True):
            assert [c for c, _ in got] == [c for c, _ in want]
            np.testing.assert_allclose([p for _, p in got], [p for _, p in want], atol=1e-5)


def test_concepts_hold_the_whole_hypernym_closure(tmp_path, engine):
    db = tmp_path / "lib.db"
    index_paths([str(EXAMPLES / "cat.jpg")], db, engine=engine, progress=False)
    labels = imagenet_labels()
    # A class with more than one parent somewhere above it: its closure is larger than its display path.
    multi = next(lb for lb in labels if len(ancestors(lb.wnid)) > len(lb.path))
    stored = {w for (w,) in query(db, "SELECT wnid FROM concepts WHERE class = ?", (multi.index,))}
    assert stored == set(ancestors(multi.wnid))
    assert stored > set(multi.path)
    dogs = {c for (c,) in query(db, "SELECT class FROM concepts WHERE wnid = 'n02084071'")}
    assert dogs == set(range(151, 269))
    assert len(concept_rows(labels)) == query(db, "SELECT count(*) FROM concepts")[0][0]


def test_incremental_runs(tmp_path, engine):
    lib = tmp_path / "photos"
    lib.mkdir()
    for name in ("cat.jpg", "coffee.jpg", "rocket.jpg"):
        shutil.copy(EXAMPLES / name, lib / name)
    db = tmp_path / "lib.db"
    first = index_paths([str(lib)], db, engine=engine, progress=False)
    assert (first.indexed, first.skipped) == (3, 0)
    before = snapshot(db)

    again = index_paths([str(lib)], db, engine=engine, progress=False)
    assert (again.indexed, again.skipped, again.failed, again.gone) == (0, 3, 0, 0)
    assert snapshot(db) == before

    # Touched, same content: hashed ("in doubt"), not re-classified; the new mtime is remembered.
    stamp = query(db, "SELECT indexed_at, elapsed_ms FROM photos WHERE path LIKE '%cat.jpg'")
    os.utime(lib / "cat.jpg", ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    touched = index_paths([str(lib)], db, engine=engine, progress=False)
    assert (touched.indexed, touched.skipped) == (0, 3)
    assert query(db, "SELECT mtime_ns FROM photos WHERE path LIKE '%cat.jpg'") == [(1_600_000_000_000_000_000,)]
    assert query(db, "SELECT indexed_at, elapsed_ms FROM photos WHERE path LIKE '%cat.jpg'") == stamp

    # Changed content: re-indexed under the same id.
    cat_id = query(db, "SELECT id FROM photos WHERE path LIKE '%cat.jpg'")[0][0]
    shutil.copy(EXAMPLES / "astronaut.jpg", lib / "cat.jpg")
    changed = index_paths([str(lib)], db, engine=engine, progress=False)
    assert (changed.indexed, changed.skipped) == (1, 2)
    row = query(db, "SELECT id, sha256 FROM photos WHERE path LIKE '%cat.jpg'")[0]
    assert row == (cat_id, hashlib.sha256((EXAMPLES / "astronaut.jpg").read_bytes()).hexdigest())
    top1 = query(db, "SELECT class FROM predictions WHERE photo_id = ? AND rank = 1", (cat_id,))[0][0]
    assert top1 not in range(281, 286)

    # Deleted: marked gone, its predictions dropped; back again: re-indexed.
    (lib / "rocket.jpg").unlink()
    gone = index_paths([str(lib)], db, engine=engine, progress=False)
    assert (gone.gone, gone.indexed, gone.photos) == (1, 0, 2)
    rocket = query(db, "SELECT id, status FROM photos WHERE path LIKE '%rocket.jpg'")[0]
    assert rocket[1] == "gone"
    assert query(db, "SELECT count(*) FROM predictions WHERE photo_id = ?", (rocket[0],)) == [(0,)]
    again_gone = index_paths([str(lib)], db, engine=engine, progress=False)
    assert again_gone.gone == 0  # already gone
    shutil.copy(EXAMPLES / "rocket.jpg", lib / "rocket.jpg")
    back = index_paths([str(lib)], db, engine=engine, progress=False)
    assert back.indexed == 1
    assert query(db, "SELECT status FROM photos WHERE id = ?", (rocket[0],)) == [("ok",)]


def test_indexing_a_subfolder_leaves_the_rest_alone(tmp_path, engine):
    lib = tmp_path / "photos"
    make_photos(lib, 8)
    db = tmp_path / "lib.db"
    index_paths([str(lib)], db, engine=engine, progress=False)
    summary = index_paths([str(lib / "set1")], db, engine=engine, progress=False)
    assert (summary.photos, summary.skipped, summary.gone) == (2, 2, 0)
    assert query(db, "SELECT count(*) FROM photos WHERE status = 'ok'") == [(8,)]


def test_a_new_model_reindexes(tmp_path, engine):
    from klaus.format import read_model, write_model

    lib = tmp_path / "photos"
    make_photos(lib, 3)
    db = tmp_path / "lib.db"
    index_paths([str(lib)], db, engine=engine, progress=False)
    model = read_model(default_model_path())
    other = tmp_path / "other.klaus"
    write_model(dataclasses.replace(model, meta={**model.meta, "creator": "klaus tests"}), other)
    summary = index_paths([str(lib)], db, model=str(other), progress=False)
    assert (summary.indexed, summary.skipped) == (3, 0)
    sha = hashlib.sha256(other.read_bytes()).hexdigest()
    assert query(db, "SELECT DISTINCT m.sha256 FROM photos ph JOIN models m ON m.id = ph.model_id") == [(sha,)]
    assert query(db, "SELECT count(*) FROM models") == [(2,)]
    assert index_paths([str(lib)], db, model=str(other), progress=False).skipped == 3


def test_a_model_with_other_classes_replaces_the_label_tables(tmp_path, engine, tiny_klaus_path):
    lib = tmp_path / "photos"
    make_photos(lib, 3)
    db = tmp_path / "lib.db"
    index_paths([str(lib)], db, engine=engine, progress=False)
    summary = index_paths([str(lib)], db, model=str(tiny_klaus_path), progress=False)
    assert summary.indexed == 3
    assert query(db, "SELECT count(*) FROM classes") == [(10,)]
    assert query(db, "SELECT max(class) FROM predictions")[0][0] < 10
    back = index_paths([str(lib)], db, engine=engine, progress=False)
    assert back.indexed == 3 and query(db, "SELECT count(*) FROM classes") == [(1000,)]


def test_bad_files_are_recorded_and_the_run_goes_on(tmp_path, engine, monkeypatch):
    lib = tmp_path / "photos"
    make_photos(lib, 3)
    bad = make_bad_files(lib / "bad")
    locked = lib / "bad" / "locked.jpg"
    shutil.copy(EXAMPLES / "cat.jpg", locked)
    if os.geteuid() == 0:  # root reads anything: make the open fail as it would for a user
        real_open = os.open

        def fake_open(file, *args, **kwargs):
            if os.fspath(file) == str(locked):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(os, "open", fake_open)
    else:
        locked.chmod(0)
    db = tmp_path / "lib.db"
    summary = index_paths([str(lib)], db, engine=engine, progress=False)
    assert (summary.indexed, summary.failed) == (3, 5)
    errors = dict(query(db, "SELECT path, error FROM photos WHERE status = 'error'"))
    assert "truncated" in errors[str(bad["truncated"])]
    assert "not an image" in errors[str(bad["not_image"])]
    assert "empty" in errors[str(bad["empty"])]
    assert "too large" in errors[str(bad["bomb"])]
    assert "permission denied" in errors[str(locked)]
    assert all("\n" not in e for e in errors.values())
    assert {e["path"] for e in summary.errors} == set(errors)
    assert query(
        db, "SELECT count(*) FROM predictions p JOIN photos ph ON ph.id = p.photo_id WHERE ph.status = 'error'"
    ) == [(0,)]
    # Failed photos are tried again on the next run (a fixed permission takes effect).
    monkeypatch.undo()
    locked.chmod(0o644)
    again = index_paths([str(lib)], db, engine=engine, progress=False)
    assert (again.indexed, again.failed, again.skipped) == (1, 4, 3)


def test_hidden_files_and_the_thumbnail_cache_are_not_photos(tmp_path, engine):
    lib = tmp_path / "photos"
    make_photos(lib, 2)
    (lib / ".hidden").mkdir()
    shutil.copy(EXAMPLES / "cat.jpg", lib / ".hidden" / "cat.jpg")
    shutil.copy(EXAMPLES / "cat.jpg", lib / ".cat.jpg")
    (lib / "readme.txt").write_text("not a photo suffix")
    db = lib / "library.db"  # the index inside the library
    dbm.thumbs_dir(db).mkdir()
    shutil.copy(EXAMPLES / "cat.jpg", dbm.thumbs_dir(db) / "1-320-x.jpg")
    summary = index_paths([str(lib)], db, engine=engine, progress=False)
    assert summary.photos == 2


def test_exif_date_and_orientation(tmp_path):
    img = Image.new("RGB", (64, 32), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the upright photo is 32 x 64
    exif.get_ifd(0x8769)[0x9003] = "2021:06:05 14:03:09"
    path = tmp_path / "dated.jpg"
    img.save(path, exif=exif)
    result = decode(Task(str(path), 0, 0), Preprocess())
    assert result.error is None
    assert (result.width, result.height, result.taken, result.format) == (32, 64, "2021-06-05T14:03:09", "JPEG")
    assert exif_date("0000:00:00 00:00:00") is None and exif_date(b"2020:01:02 03:04:05\x00") == "2020-01-02T03:04:05"


def test_two_index_processes_on_one_database(tmp_path):
    lib = tmp_path / "photos"
    make_photos(lib, 40, seed=3)
    make_bad_files(lib / "bad")
    ref_db, db = tmp_path / "ref.db", tmp_path / "lib.db"
    args = ["index", str(lib), "--batch", "4", "--json"]
    subprocess.run([*klaus_cmd(), *args, "--db", str(ref_db)], check=True, capture_output=True, timeout=180)
    procs = [
        subprocess.Popen(
            [*klaus_cmd(), *args, "--db", str(db)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert json.loads(out)["photos"] == 44
    assert integrity(db) == "ok"
    assert snapshot(db)[0] == snapshot(ref_db)[0]
    assert query(db, "SELECT count(*), count(DISTINCT path) FROM photos") == [(44, 44)]
    assert query(
        db, "SELECT count(*) FROM (SELECT photo_id, rank FROM predictions GROUP BY 1, 2 HAVING count(*) > 1)"
    ) == [(0,)]
    # Same photos, same model: same top-5 (probabilities to float precision).
    ours, ref = snapshot(db)[1], snapshot(ref_db)[1]
    assert [r[:3] for r in ours] == [r[:3] for r in ref]
    assert np.allclose([r[3] for r in ours], [r[3] for r in ref], atol=1e-6)


# ------------------------------------------------------------------ CLI


def test_cli_index_json_and_text(tmp_path):
    db = tmp_path / "lib.db"
    result = run_cli("index", str(EXAMPLES), "--db", str(db), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {k: summary[k] for k in ("photos", "indexed", "skipped", "failed", "gone")} == {
        "photos": 4,
        "indexed": 4,
        "skipped": 0,
        "failed": 0,
        "gone": 0,
    }
    assert summary["images_per_second"] > 0 and summary["model"].startswith("efficientnet-lite0@")
    text = run_cli("index", str(EXAMPLES), "--db", str(db))
    assert text.exit_code == 0
    assert "indexed 0, skipped 4, failed 0, gone 0" in text.stdout
    assert "4 photos: 0 to classify, 4 unchanged" in text.stderr


def test_cli_index_errors_are_one_line(tmp_path):
    assert_one_line_error(
        run_cli("index", str(tmp_path / "missing"), "--db", str(tmp_path / "x.db")), "no such file or folder"
    )
    assert not (tmp_path / "x.db").exists()
    (tmp_path / "folder.db").mkdir()
    assert_one_line_error(run_cli("index", str(EXAMPLES), "--db", str(tmp_path / "folder.db")), "is a directory")
    assert_one_line_error(
        run_cli("index", str(EXAMPLES), "--db", str(tmp_path / "y.db"), "--model", str(tmp_path / "nope.klaus")),
        "no such model file",
    )
    assert_one_line_error(run_cli("index", str(EXAMPLES), "--db", str(tmp_path / "y.db"), "--workers", "0"))
    assert_one_line_error(
        run_cli("index", str(EXAMPLES), "--db", str(tmp_path / "y.db"), "--dask", "tcp://127.0.0.1:9"), "Dask"
    )


def test_cli_reports_failed_photos_as_warnings(tmp_path):
    lib = tmp_path / "photos"
    make_bad_files(lib)
    shutil.copy(EXAMPLES / "cat.jpg", lib / "cat.jpg")
    result = run_cli("index", str(lib), "--db", str(tmp_path / "lib.db"))
    assert result.exit_code == 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("klaus: warning: ")]
    assert len(warnings) == 4
    assert "indexed 1, skipped 0, failed 4" in result.stdout
