"""`klaus serve`'s app through Starlette's TestClient: pages, JSON, thumbnails, uploads, and what it refuses."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="needs the 'web' extra")
try:  # Starlette's TestClient runs on httpx2 (newer Starlette) or httpx (older)
    import httpx2  # noqa: F401
except ImportError:
    pytest.importorskip("httpx", reason="Starlette's TestClient needs httpx2 (or httpx)")

from PIL import Image
from starlette.testclient import TestClient

from conftest import EXAMPLES
from klaus.errors import KlausError
from klaus.index.db import KlausIndexError, thumbs_dir
from klaus.index.indexer import index_paths
from klaus.web.app import create_app
from test_index import make_bad_files

MAX_UPLOAD = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A copy of the examples plus one bad file, indexed; returns (db, photo folder)."""
    from klaus.index.engine import Engine

    root = tmp_path_factory.mktemp("web")
    lib = root / "photos"
    lib.mkdir()
    for photo in EXAMPLES.glob("*.jpg"):
        shutil.copy(photo, lib / photo.name)
    make_bad_files(lib / "bad")
    db = root / "lib.db"
    index_paths([str(lib)], db, engine=Engine.load(), progress=False)
    return db, lib


@pytest.fixture(scope="module")
def client(library):
    app = create_app(library[0], max_upload=MAX_UPLOAD, allowed_hosts=["testserver"])
    with TestClient(app) as c:
        yield c


def photo_id(db: Path, name: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT id FROM photos WHERE path LIKE ?", (f"%/{name}",)).fetchone()[0]
    finally:
        conn.close()


def test_home_page(client):
    page = client.get("/")
    assert page.status_code == 200
    assert '<strong id="count-ok">4</strong> photos indexed, 4 unreadable' in page.text
    assert 'accept="image/*" capture' in page.text
    assert "/browse/n00001930" in page.text  # physical entity
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"


def test_browse_the_tree(client):
    page = client.get("/browse/n02121620")  # cat
    assert page.status_code == 200
    assert "cat.jpg" in page.text and "domestic cat" in page.text
    assert ">feline</a>" in page.text  # breadcrumb up the tree
    assert client.get("/browse/n99999999").status_code == 404
    assert client.get("/browse/<script>").status_code == 404


def test_search_page_and_api(client):
    page = client.get("/search", params={"q": "cat"})
    assert page.status_code == 200 and "cat.jpg" in page.text and "coffee.jpg" not in page.text
    api = client.get("/api/search", params={"q": "vehicle"}).json()
    assert [Path(r["path"]).name for r in api["results"]] == ["rocket.jpg"]
    assert api["concepts"][0]["wnid"] == "n04524313"
    missing = client.get("/search", params={"q": "dgo"})
    assert missing.status_code == 404 and "did you mean" in missing.text
    assert client.get("/api/search", params={"q": "dgo"}).status_code == 404
    evil = client.get("/search", params={"q": "<script>alert(1)</script>"})
    assert "<script>alert(1)" not in evil.text and "&lt;script&gt;" in evil.text
    sql = client.get("/api/search", params={"q": "cat' OR 1=1 --"})
    assert sql.status_code == 404


def test_photo_page_thumbnail_and_file(client, library):
    db, lib = library
    pid = photo_id(db, "cat.jpg")
    page = client.get(f"/photo/{pid}")
    assert page.status_code == 200
    assert "tiger cat" in page.text and "domestic cat" in page.text and "decode" in page.text
    thumb = client.get(f"/thumb/{pid}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 320
    cached = list(thumbs_dir(db).glob(f"{pid}-320-*.jpg"))
    assert len(cached) == 1
    assert client.get(f"/thumb/{pid}").content == thumb.content  # served from the cache
    large = client.get(f"/thumb/{pid}", params={"size": "large"})
    assert large.status_code == 200
    assert client.get(f"/thumb/{pid}", params={"size": "../../x"}).status_code == 400
    original = client.get(f"/file/{pid}")
    assert original.status_code == 200 and original.content == (lib / "cat.jpg").read_bytes()
    assert original.headers["content-type"] == "image/jpeg"
    info = client.get(f"/api/photo/{pid}").json()
    assert info["predictions"][0]["label"] == "tiger cat" and info["status"] == "ok"


def test_only_indexed_files_are_served(client, library):
    db, _ = library
    bad = photo_id(db, "notes.jpg")  # an error row: in the index, but not a photo
    for url in (f"/file/{bad}", f"/thumb/{bad}", "/file/999999", "/thumb/999999", "/photo/999999"):
        assert client.get(url).status_code == 404, url
    for url in (
        "/file/../../etc/passwd",
        "/file/%2e%2e%2fetc%2fpasswd",
        "/static/../app.py",
        "/static/%2e%2e/app.py",
        "/file/-1",
        "/file/1.0",
        "/thumb/abc",
        "/file//etc/passwd",
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert "root:" not in response.text and "import" not in response.text
    assert client.get("/static/app.js").status_code == 200


def test_changed_or_deleted_files_are_not_served(client, library, tmp_path):
    db, lib = library
    extra = lib / "extra.jpg"
    shutil.copy(EXAMPLES / "coffee.jpg", extra)
    from klaus.index.engine import Engine

    index_paths([str(lib)], db, engine=Engine.load(), progress=False)
    pid = photo_id(db, "extra.jpg")
    assert client.get(f"/file/{pid}").status_code == 200
    extra.write_bytes((EXAMPLES / "cat.jpg").read_bytes())
    assert client.get(f"/file/{pid}").status_code == 409
    extra.unlink()
    assert client.get(f"/file/{pid}").status_code == 404
    index_paths([str(lib)], db, engine=Engine.load(), progress=False)  # marks it gone again
    assert client.get(f"/photo/{pid}").status_code == 200 and client.get(f"/thumb/{pid}").status_code == 404


def test_classify_upload(client):
    data = (EXAMPLES / "cat.jpg").read_bytes()
    response = client.post("/api/classify", files={"photo": ("cat.jpg", data, "image/jpeg")})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["predictions"][0]["index"] in range(281, 286)
    assert result["predictions"][0]["hierarchy"][-2] == "domestic cat"
    assert result["width"] == 451 and result["elapsed_ms"] > 0
    raw = client.post("/api/classify", content=data, headers={"content-type": "image/jpeg"})
    assert raw.status_code == 200 and raw.json()["predictions"][0]["index"] in range(281, 286)
    page = client.post("/classify", files={"photo": ("cat.jpg", data, "image/jpeg")})
    assert page.status_code == 200 and "tiger cat" in page.text


def test_uploads_are_validated(client, tmp_path):
    not_image = client.post("/api/classify", files={"photo": ("x.jpg", b"hello", "image/jpeg")})
    assert not_image.status_code == 415 and "not an image" in not_image.json()["error"]
    bomb = make_bad_files(tmp_path)["bomb"].read_bytes()
    too_big = client.post("/api/classify", files={"photo": ("bomb.png", bomb, "image/png")})
    assert too_big.status_code == 415 and "too large" in too_big.json()["error"]
    empty = client.post("/api/classify", files={"photo": ("e.jpg", b"", "image/jpeg")})
    assert empty.status_code == 400
    no_field = client.post("/api/classify", files={"other": ("x.jpg", b"abc", "image/jpeg")})
    assert no_field.status_code == 400
    assert client.get("/api/classify").status_code == 405


def test_oversize_uploads_are_refused(client):
    big = os.urandom(MAX_UPLOAD + 200_000)
    declared = client.post("/api/classify", files={"photo": ("big.jpg", big, "image/jpeg")})
    assert declared.status_code == 413 and "too large" in declared.json()["error"]

    def chunks():  # no Content-Length: the limit must hold while streaming
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    streamed = client.post("/api/classify", content=chunks(), headers={"content-type": "image/jpeg"})
    assert streamed.status_code == 413
    page = client.post("/classify", files={"photo": ("big.jpg", big, "image/jpeg")})
    assert page.status_code == 413 and "too large" in page.text


def test_foreign_host_headers_are_refused(library):
    app = create_app(library[0])  # the default: only 127.0.0.1 / localhost
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/").status_code == 200
        assert c.get("/", headers={"host": "attacker.example:8000"}).status_code == 400


def test_app_refuses_a_non_index(tmp_path):
    with pytest.raises(KlausIndexError, match="no photo index here"):
        create_app(tmp_path / "none.db")
    (tmp_path / "x.db").write_text("not sqlite " * 100)
    with pytest.raises(KlausIndexError):
        create_app(tmp_path / "x.db")


def test_cli_serve_errors_are_one_line(library, tmp_path):
    import socket

    from test_index import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("serve", "--db", str(tmp_path / "none.db")), "no photo index here")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(
            run_cli("serve", "--db", str(library[0]), "--port", str(port)), "cannot listen on 127.0.0.1"
        )


# ------------------------------------------------------------------ ids, stale thumbnails, a vanished index


@pytest.mark.parametrize("photo", [2**63 - 1, 2**63, 10**30])
def test_huge_ids_are_unknown_not_server_errors(client, photo):
    for url in (f"/photo/{photo}", f"/thumb/{photo}", f"/file/{photo}"):
        response = client.get(url)
        assert response.status_code == 404, url
        assert "no such photo in the index" in response.text
    api = client.get(f"/api/photo/{photo}")
    assert api.status_code == 404 and api.json() == {"error": "no such photo in the index"}


@pytest.fixture
def own_library(tmp_path):
    """A library of its own (these tests change and delete things): (db, folder, client)."""
    from klaus.index.engine import Engine

    lib = tmp_path / "photos"
    lib.mkdir()
    for name in ("cat.jpg", "coffee.jpg"):
        shutil.copy(EXAMPLES / name, lib / name)
    db = tmp_path / "lib.db"
    index_paths([str(lib)], db, engine=Engine.load(), progress=False)
    app = create_app(db, max_upload=MAX_UPLOAD, allowed_hosts=["testserver"])
    with TestClient(app) as c:
        yield db, lib, c


def test_cached_thumbnails_follow_the_file_on_disk(own_library):
    db, lib, client = own_library
    pid = photo_id(db, "coffee.jpg")
    assert client.get(f"/thumb/{pid}").status_code == 200
    assert list(thumbs_dir(db).glob(f"{pid}-320-*.jpg"))  # cached now
    photo = lib / "coffee.jpg"
    original, indexed = photo.read_bytes(), photo.stat()
    photo.write_bytes((EXAMPLES / "cat.jpg").read_bytes())  # changed on disk
    changed = client.get(f"/thumb/{pid}")
    assert changed.status_code == 409 and "changed since it was indexed" in changed.text
    photo.unlink()
    gone = client.get(f"/thumb/{pid}")
    assert gone.status_code == 404 and "file is gone" in gone.text
    photo.write_bytes(original)
    os.utime(photo, ns=(indexed.st_atime_ns, indexed.st_mtime_ns))
    assert client.get(f"/thumb/{pid}").status_code == 200  # the same file again: served from the cache


@pytest.mark.parametrize("damage", ["deleted", "overwritten", "malformed"])
def test_an_index_that_vanishes_while_serving_is_a_503(own_library, damage):
    db, _lib, client = own_library
    pid = photo_id(db, "cat.jpg")
    assert client.get("/").status_code == 200
    if damage == "deleted":
        db.unlink()
        expected = "no photo index here"
    elif damage == "overwritten":
        db.write_bytes(b"not a database " * 1000)
        expected = "not an SQLite database"
    else:  # the header survives, the tables do not
        data = bytearray(db.read_bytes())
        data[4096:] = b"\x5a" * (len(data) - 4096)
        db.write_bytes(bytes(data))
        expected = "damaged"
    for url in ("/", f"/photo/{pid}", "/search?q=cat", f"/file/{pid}", f"/thumb/{pid}"):
        page = client.get(url)
        assert page.status_code == 503, (url, page.text)
        assert page.headers["content-type"].startswith("text/html")
        assert f"{db}: " in page.text and expected in page.text, url
        assert "Traceback" not in page.text
    for url in (f"/api/photo/{pid}", "/api/search?q=cat"):
        api = client.get(url)
        assert api.status_code == 503, url
        message = api.json()["error"]
        assert message.startswith(f"{db}: ") and expected in message and "\n" not in message


# ------------------------------------------------------------------ unreadable files, HEAD, bad models, odd paths


@contextmanager
def unreadable(path: Path, monkeypatch):
    """``path`` cannot be opened by this process: chmod 000, or for root (whom permissions do not
    stop) every way of opening it raises the PermissionError an ordinary user would get."""
    if os.geteuid() != 0:
        path.chmod(0)
        try:
            yield
        finally:
            path.chmod(0o644)
        return
    import builtins

    real_os_open, real_open = os.open, builtins.open

    def denied(target) -> bool:
        return isinstance(target, (str, os.PathLike)) and os.path.abspath(os.fspath(target)) == str(path)

    def os_open(target, *args, **kwargs):
        if denied(target):
            raise PermissionError(13, "Permission denied", os.fspath(target))
        return real_os_open(target, *args, **kwargs)

    def open_(target, *args, **kwargs):
        if denied(target):
            raise PermissionError(13, "Permission denied", os.fspath(target))
        return real_open(target, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "open", os_open)
        m.setattr(builtins, "open", open_)
        yield


def test_an_unreadable_file_is_refused_before_the_response_starts(own_library, monkeypatch):
    db, lib, client = own_library
    pid = photo_id(db, "cat.jpg")
    assert client.get(f"/thumb/{pid}").status_code == 200  # cached now
    with unreadable(lib / "cat.jpg", monkeypatch):  # same size and mtime: only the permission changed
        for url in (f"/file/{pid}", f"/thumb/{pid}"):
            response = client.get(url)  # the test client re-raises a server error: none may happen
            assert response.status_code == 403, (url, response.status_code)
            assert "file cannot be read (permission denied)" in response.text
            assert response.headers["content-type"].startswith("text/html")
            assert int(response.headers["content-length"]) == len(response.content)
    assert client.get(f"/file/{pid}").content == (lib / "cat.jpg").read_bytes()


def test_head_mirrors_get(client, library):
    pid = photo_id(library[0], "cat.jpg")
    for url in ("/classify", "/", f"/file/{pid}", f"/photo/{pid}"):
        get = client.get(url, follow_redirects=False)
        head = client.head(url, follow_redirects=False)
        assert head.status_code == get.status_code, url
        assert head.content == b""
        assert head.headers.get("location") == get.headers.get("location"), url
    assert client.head("/classify", follow_redirects=False).headers["location"] == "/#classify"


@pytest.fixture(scope="module")
def mismatched_model(tmp_path_factory) -> Path:
    """A valid 1000-class ONNX model that loads but cannot run: it takes 32×32 photos, and
    an .onnx model gets the standard 224×224 preprocessing."""
    import onnx

    from conftest import make_tiny_onnx

    path = tmp_path_factory.mktemp("models") / "tiny32.onnx"
    onnx.save(make_tiny_onnx(classes=1000), path)
    return path


def bad_models(folder: Path, mismatched: Path) -> dict[str, Path]:
    (folder / "junk.klaus").write_bytes(b"hello, not a model\n")
    (folder / "adir.klaus").mkdir()
    return {
        "junk": folder / "junk.klaus",
        "missing": folder / "missing.klaus",
        "directory": folder / "adir.klaus",
        "cannot run": mismatched,
    }


@pytest.mark.parametrize("kind", ["junk", "missing", "directory", "cannot run"])
def test_cli_serve_refuses_a_bad_model_before_serving(library, tmp_path, mismatched_model, monkeypatch, kind):
    import uvicorn

    from test_index import assert_one_line_error, run_cli

    def started(*args, **kwargs):
        raise AssertionError("the server started with a bad model")

    monkeypatch.setattr(uvicorn.Server, "run", started)
    model = bad_models(tmp_path, mismatched_model)[kind]
    result = run_cli("serve", "--db", str(library[0]), "--port", "0", "--model", str(model))
    assert_one_line_error(result, f"klaus: error: {model}: ")
    with pytest.raises(KlausError, match=str(model)):
        create_app(library[0], model=str(model))


def test_classify_failures_of_the_model_are_503_not_500(library, mismatched_model):
    from klaus.index.engine import Engine

    app = create_app(library[0], engine=Engine.load(mismatched_model), allowed_hosts=["testserver"])
    data = (EXAMPLES / "cat.jpg").read_bytes()
    with TestClient(app) as c:  # re-raises any unhandled server error
        api = c.post("/api/classify", files={"photo": ("cat.jpg", data, "image/jpeg")})
        assert api.status_code == 503
        assert (
            api.json()["error"].startswith("the model failed (")
            and "ONNX Runtime failed ([ONNXRuntimeError]" in api.json()["error"]
        )
        page = c.post("/classify", files={"photo": ("cat.jpg", data, "image/jpeg")})
        assert page.status_code == 503 and "the model failed" in page.text and "Traceback" not in page.text
        bad_photo = c.post("/api/classify", files={"photo": ("x.jpg", b"hello", "image/jpeg")})
        assert bad_photo.status_code == 415  # the photo's fault is still the photo's


def test_a_model_that_cannot_be_loaded_on_first_use_is_503(library, tmp_path, monkeypatch):
    """create_app without a model loads the embedded one on first use; a broken install is a 503."""
    import klaus.runtime

    app = create_app(library[0], allowed_hosts=["testserver"])
    monkeypatch.setattr(klaus.runtime, "default_model_path", lambda: tmp_path / "vanished.klaus")
    data = (EXAMPLES / "cat.jpg").read_bytes()
    with TestClient(app) as c:
        api = c.post("/api/classify", content=data, headers={"content-type": "image/jpeg"})
        assert api.status_code == 503
        assert api.json()["error"] == f"the model cannot be loaded: {tmp_path}/vanished.klaus: no such model file"
        page = c.post("/classify", files={"photo": ("cat.jpg", data, "image/jpeg")})
        assert page.status_code == 503 and "no such model file" in page.text and "Traceback" not in page.text


def undecodable_db(folder: Path) -> Path:
    """An index whose folder's name is the raw bytes ``dbx\\xff`` (an old Latin-1 disk)."""
    from klaus.index.engine import Engine

    lib = folder / "photos"
    lib.mkdir()
    shutil.copy(EXAMPLES / "cat.jpg", lib / "cat.jpg")
    db = Path(os.fsdecode(os.fsencode(folder) + b"/dbx\xff")) / "lib.db"
    index_paths([str(lib)], db, engine=Engine.load(), progress=False)
    return db


def test_a_db_path_that_is_not_utf8_is_shown_escaped(tmp_path):
    db = undecodable_db(tmp_path)
    with TestClient(create_app(db, allowed_hosts=["testserver"])) as c:
        page = c.get("/")
        assert page.status_code == 200
        assert f"{tmp_path}/dbx\\xff/lib.db" in page.text
        assert c.get("/search", params={"q": "cat"}).status_code == 200


def test_cli_serve_json_with_a_db_path_that_is_not_utf8(tmp_path):
    import json
    import subprocess
    import urllib.request

    from test_index import klaus_cmd

    db = undecodable_db(tmp_path)
    server = subprocess.Popen(
        [*klaus_cmd(), "serve", "--db", str(db), "--port", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = server.stdout.readline()
        assert line, server.stderr.read()
        started = json.loads(line.decode("utf-8"))  # strict: no raw 0xff byte
        assert started["db"] == f"{tmp_path}/dbx\\xff/lib.db"
        with urllib.request.urlopen(started["url"], timeout=30) as response:
            assert response.status == 200
            assert f"{tmp_path}/dbx\\xff/lib.db" in response.read().decode("utf-8")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_photo_dated_after_2262_is_served(tmp_path):
    """Its mtime is stored clamped to SQLite's largest integer; the gallery compares it the same way."""
    from klaus.index.engine import Engine

    lib = tmp_path / "photos"
    lib.mkdir()
    photo = lib / "future.jpg"
    shutil.copy(EXAMPLES / "cat.jpg", photo)
    os.utime(photo, (9246182400, 9246182400))  # 2263-01-01
    db = tmp_path / "lib.db"
    assert index_paths([str(lib)], db, engine=Engine.load(), progress=False).indexed == 1
    pid = photo_id(db, "future.jpg")
    with TestClient(create_app(db, allowed_hosts=["testserver"])) as c:
        assert c.get(f"/file/{pid}").content == photo.read_bytes()
        assert c.get(f"/thumb/{pid}").status_code == 200
        photo.write_bytes((EXAMPLES / "coffee.jpg").read_bytes())
        os.utime(photo, (9246182400, 9246182400))
        assert c.get(f"/file/{pid}").status_code == 409  # another size: changed
