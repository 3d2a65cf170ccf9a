"""`klaus index --dask ADDRESS` on a LocalCluster of two worker processes: the same database as a
local run, the model loaded once per worker."""

from __future__ import annotations

import json
import subprocess

import pytest

from test_index import klaus_cmd, make_bad_files, make_photos, snapshot

distributed = pytest.importorskip("distributed", reason="needs the 'dask' extra")

from klaus.index.indexer import index_paths  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        protocol="tcp://",
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=50,
    ) as c:
        yield c


def test_dask_index_equals_a_local_run(tmp_path, cluster):
    lib = tmp_path / "photos"
    make_photos(lib, 24, seed=5)
    make_bad_files(lib / "bad")
    local_db, dask_db = tmp_path / "local.db", tmp_path / "dask.db"
    local = index_paths([str(lib)], local_db, batch=4, progress=False)
    reports: list[dict] = []
    remote = index_paths(
        [str(lib)], dask_db, batch=4, dask=cluster.scheduler_address, progress=False, dask_reports=reports
    )
    assert (remote.indexed, remote.failed) == (local.indexed, local.failed) == (24, 4)
    assert snapshot(dask_db) == snapshot(local_db)
    # Both workers took part, and each built its model exactly once.
    workers = {r["worker"] for r in reports}
    assert len(workers) == 2
    loads = [r["worker"] for r in reports if r["model_loaded"]]
    assert sorted(loads) == sorted(workers)
    # Incremental over Dask too.
    again = index_paths([str(lib)], dask_db, dask=cluster.scheduler_address, progress=False)
    assert (again.indexed, again.skipped, again.failed) == (0, 24, 4)


def test_cli_dask_option(tmp_path, cluster):
    lib = tmp_path / "photos"
    make_photos(lib, 6, seed=9)
    db = tmp_path / "lib.db"
    out = subprocess.run(
        [*klaus_cmd(), "index", str(lib), "--db", str(db), "--dask", cluster.scheduler_address, "--json"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["indexed"] == 6
