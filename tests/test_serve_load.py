"""`klaus serve` under load, at a small scale: every answer is 200 or 503 with Retry-After, and the
server still answers afterwards (bench/serve_load.py measures memory and time at full scale).

Plus the work pool itself (klaus.web.pool.WorkGate): jobs at once, a memory budget, a queue in
arrival order, and 503 beyond it.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import threading
import time

import pytest

pytest.importorskip("starlette", reason="needs the 'web' extra")

from conftest import ROOT
from klaus.index.db import thumbs_dir
from klaus.web import app as web
from klaus.web import pool

sys.path.insert(0, str(ROOT / "bench"))
import serve_load


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("load")
    photos = serve_load.make_photos(folder / "photos", 6, size=(1600, 1200), seed=4)
    db = folder / "library.db"
    serve_load.index(folder / "photos", db)
    return db, [p.read_bytes() for p in photos[:3]]


def test_every_answer_is_200_or_503_with_retry_after_and_the_server_still_answers(library):
    db, uploads = library
    server = serve_load.Server.start(db, "--jobs", "1", "--queue", "2")
    try:
        out = serve_load.run_clients(server, list(range(1, 7)), uploads, clients=8, requests=64, seconds=180, seed=1)
        assert out.errors == []
        assert out.requests == 64
        assert set(out.statuses) <= {"thumb 200", "thumb 503", "upload 200", "upload 503"}
        assert out.count(200) > 0
        # Afterwards: pages, a thumbnail and an upload all work.
        assert server.get("/")[0] == 200
        status, body = server.get("/thumb/2?size=large")
        assert status == 200 and body.startswith(b"\xff\xd8")
        conn = server.connection()
        conn.request("POST", "/api/classify", body=uploads[0], headers={"Content-Type": "image/jpeg"})
        response = conn.getresponse()
        assert response.status == 200 and b"predictions" in response.read()
        conn.close()
    finally:
        err = server.stop()
    assert err == "", err


def test_odd_multipart_bodies_print_nothing_on_the_servers_stderr(library):
    """python-multipart logs odd bodies as warnings; they must never reach stderr."""
    db, uploads = library
    server = serve_load.Server.start(db)
    try:
        body, content_type = serve_load.multipart(uploads[1])
        for data in (body + b"trailing junk after the last boundary", body.replace(b"\r\n\r\n", b"\r\n", 1)):
            conn = server.connection()
            conn.request("POST", "/api/classify", body=data, headers={"Content-Type": content_type})
            response = conn.getresponse()
            response.read()
            assert response.status in (200, 400, 415), response.status
            conn.close()
        conn = server.connection()
        conn.request("POST", "/api/classify", body=b"--x\r\n\r\n", headers={"Content-Type": "multipart/form-data"})
        response = conn.getresponse()
        response.read()
        assert response.status in (400, 415)
        conn.close()
    finally:
        err = server.stop()
    assert err == "", err


# ------------------------------------------------------------------ the work pool


def test_work_gate_runs_jobs_within_limits_in_arrival_order(monkeypatch):
    monkeypatch.setattr(pool, "release_free_heap", lambda: None)
    order: list[str] = []
    running: list[str] = []
    peak = {"jobs": 0}
    lock = threading.Lock()

    def job(name: str, seconds: float) -> str:
        with lock:
            running.append(name)
            peak["jobs"] = max(peak["jobs"], len(running))
        time.sleep(seconds)
        with lock:
            running.remove(name)
            order.append(name)
        return name

    async def scenario() -> list[object]:
        gate = pool.WorkGate(jobs=2, queue=3, budget=100)
        tasks = [asyncio.create_task(gate.run(10, job, "a", 0.2)), asyncio.create_task(gate.run(10, job, "b", 0.2))]
        await asyncio.sleep(0.05)
        # Larger than the budget: waits until nothing runs, and is not overtaken by "d".
        tasks.append(asyncio.create_task(gate.run(500, job, "big", 0.05)))
        await asyncio.sleep(0.01)
        tasks.append(asyncio.create_task(gate.run(10, job, "d", 0.01)))
        tasks.append(asyncio.create_task(gate.run(10, job, "e", 0.01)))
        await asyncio.sleep(0.01)
        with pytest.raises(pool.Busy):  # three are waiting: the queue is full
            await gate.run(10, job, "refused", 0.01)
        results = await asyncio.gather(*tasks)
        assert gate.running == 0
        return results

    assert asyncio.run(scenario()) == ["a", "b", "big", "d", "e"]
    assert order.index("big") < order.index("d") and peak["jobs"] == 2


def test_work_gate_wait_is_bounded(monkeypatch):
    monkeypatch.setattr(pool, "MAX_WAIT_SECONDS", 0.1)
    monkeypatch.setattr(pool, "release_free_heap", lambda: None)

    async def scenario() -> None:
        gate = pool.WorkGate(jobs=1, queue=4, budget=100)
        first = asyncio.create_task(gate.run(1, time.sleep, 0.5))
        await asyncio.sleep(0.02)
        with pytest.raises(pool.Busy):
            await gate.run(1, time.sleep, 0.01)
        await first
        assert gate.running == 0
        await gate.run(1, time.sleep, 0.01)  # the line is clear again

    asyncio.run(scenario())


def test_upload_bytes_have_a_budget():
    budget = pool.ByteBudget(100)
    with budget.hold(60), budget.hold(40), pytest.raises(pool.Busy), budget.hold(1):
        pass
    with budget.hold(500):  # one upload larger than the budget is let in when nothing else is held
        pass


def test_busy_thumbnail_is_503_with_retry_after(library, monkeypatch):
    """A thumbnail refused by a full pool is 503 with Retry-After, for pages and the API alike."""
    from starlette.testclient import TestClient

    db, uploads = library
    shutil.rmtree(thumbs_dir(db), ignore_errors=True)  # the load test may have cached this thumbnail already
    app = web.create_app(db, allowed_hosts=["testserver"], jobs=1, queue=0)

    async def refuse(cost, fn, *args):
        raise pool.Busy()

    monkeypatch.setattr(app.state.gallery.gate, "run", refuse)
    with TestClient(app) as client:
        response = client.get("/thumb/3?size=small")
        assert response.status_code == 503 and response.headers["retry-after"] == str(pool.RETRY_AFTER_SECONDS)
        response = client.post("/api/classify", content=uploads[0], headers={"Content-Type": "image/jpeg"})
        assert response.status_code == 503 and response.headers["retry-after"] == str(pool.RETRY_AFTER_SECONDS)
        assert "busy" in response.json()["error"]
        response = client.post("/classify", files={"photo": ("p.jpg", uploads[0], "image/jpeg")})
        assert response.status_code == 503 and response.headers["retry-after"] == str(pool.RETRY_AFTER_SECONDS)
