"""The on-device app (/app/ of `klaus serve`, `klaus export --web`): its page in Debian's chromium, its
HTTP answers, the static export and the concept search it ships.

The server runs as a user starts it (`klaus serve --port 0` in a subprocess, over an index of
examples/*.jpg); one chromium serves the whole module, each test gets a fresh browser context
(empty IndexedDB, caches and service workers). Without chromium the browser tests skip; under CI
they fail instead (see test_web_browser.py).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import EXAMPLES, ROOT
from klaus.webmodel import to_web_container
from test_index import klaus_cmd
from test_web_browser import CHROMIUM_ARGS, find_chromium, require

SHIPPED = ROOT / "src" / "klaus" / "web" / "ondevice"
WEBAPP = ROOT / "webapp"
# Files of webapp/src/ that build.mjs copies as they are.
STATIC_FILES = [
    "index.html", "app.js", "concepts.js", "concepts.json", "store.js", "style.css", "sw.js", "manifest.webmanifest",
    "icons/icon-192.png", "icons/icon-512.png", "icons/icon-maskable-512.png", "icons/apple-touch-icon.png",
]  # fmt: skip
PHOTOS = sorted(EXAMPLES.glob("*.jpg"))
CONCEPT_QUERIES = [
    "dog", "vehicle", "cat", "tabby", "n02084071", "Tiger_Cat", "  domestic   cat ", "entity", "crane", "ENTITY",
    "big cat", "n04266014", "maillot", "musical instrument", "xyzzy",
]  # fmt: skip


# ---------------------------------------------------------------- fixtures


def _wait_for(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`klaus serve --port 0` over an index of the example photos: the gallery's URL."""
    root = tmp_path_factory.mktemp("ondevice")
    db = root / "lib.db"
    subprocess.run(
        [*klaus_cmd(), "index", str(EXAMPLES), "--db", str(db), "--json"], check=True, capture_output=True, timeout=120
    )
    proc = subprocess.Popen(
        [*klaus_cmd(), "serve", "--db", str(db), "--port", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        url = json.loads(line)["url"]
        _wait_for(url + "app/", proc)
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def app_url(server) -> str:
    return server + "app/"


@pytest.fixture(scope="module")
def browser():
    path = find_chromium()
    require("a chromium binary", path is not None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require("the playwright Python package", False)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


class Page:
    """A fresh context and page that records console errors and page errors."""

    def __init__(self, browser) -> None:
        self.context = browser.new_context()
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on(
            "console", lambda msg: self.problems.append(f"console: {msg.text}") if msg.type == "error" else None
        )

    def open(self, url: str):
        self.page.goto(url)
        name = self.page.evaluate("window.klaus.ready.then(m => m.name)")
        assert name
        return self.page

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def web(browser):
    page = Page(browser)
    try:
        yield page
    finally:
        page.close()


@pytest.fixture(scope="module")
def native_top1() -> dict[str, str]:
    """`klaus classify --json`'s top-1 label for each example photo."""
    out = subprocess.run(
        [*klaus_cmd(), "classify", "--json", *map(str, PHOTOS)], check=True, capture_output=True, text=True, timeout=120
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {Path(r["path"]).name: r["predictions"][0]["label"] for r in rows}


def bad_files(tmp_path: Path) -> list[Path]:
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8)
    text = tmp_path / "notes.txt"
    text.write_text("not a photo\n")
    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    return [corrupt, text, heic]


def cards(page):
    return page.locator("#photos .photo")


def walk(page, files: list[Path], expected: int) -> None:
    from playwright.sync_api import expect

    page.set_input_files("#pick-files", [str(f) for f in files])
    expect(cards(page)).to_have_count(expected, timeout=60_000)
    page.wait_for_function("() => document.getElementById('stop').hidden", timeout=60_000)


def card(page, name: str):
    return page.locator("#photos .photo", has=page.locator(".name", has_text=re.compile(f"^{re.escape(name)}$")))


# ---------------------------------------------------------------- the page in chromium


def test_page_loads_clean_and_exposes_the_api(web, app_url):
    from playwright.sync_api import expect

    page = web.open(app_url)
    assert page.evaluate(
        "['load', 'classify', 'runTensor', 'weightDigests'].every(k => typeof window.klaus[k] === 'function')"
    )
    assert page.evaluate("crossOriginIsolated") is True  # COOP/COEP from klaus serve: wasm threads allowed
    expect(page.locator("#model-status")).to_contain_text("decoded in")
    assert page.title() == "Klaus on the phone"
    assert web.problems == []


def test_walk_shows_top5_hierarchy_and_ms_then_search_filters(web, app_url, native_top1):
    from playwright.sync_api import expect

    page = web.open(app_url)
    walk(page, PHOTOS, len(PHOTOS))
    assert page.locator("#photos .photo.failed").count() == 0
    assert page.inner_text("#walk-status").startswith(f"{len(PHOTOS)} photos walked · ")
    assert re.search(r"[\d.]+ photos/s", page.inner_text("#walk-status"))
    for photo in PHOTOS:
        one = card(page, photo.name)
        expect(one.locator(".prediction")).to_have_count(5)
        assert one.locator(".prediction .label").first.inner_text() == native_top1[photo.name]
        assert re.match(r"network [\d.]+ ms · total [\d.]+ ms · 1 crop$", one.locator(".timing").inner_text())
        hierarchy = one.locator(".prediction .hierarchy").first.inner_text()
        assert hierarchy.startswith("entity › ") and hierarchy.endswith(native_top1[photo.name])
        assert one.locator("img").evaluate("img => img.complete && img.naturalWidth > 0")
    width = card(page, "cat.jpg").locator(".bar").first.evaluate("b => b.getBoundingClientRect().width")
    assert width > 0

    page.fill("#search", "cat")
    expect(page.locator("#search-status")).to_contain_text("of 4 photos")
    expect(page.locator("#photos .photo:visible")).to_have_count(1)
    expect(card(page, "cat.jpg")).to_be_visible()
    assert card(page, "cat.jpg").locator(".prediction.match").count() >= 1

    page.fill("#search", "vehicle")
    expect(card(page, "rocket.jpg")).to_be_visible()
    expect(card(page, "cat.jpg")).to_be_hidden()

    page.fill("#search", "xyzzy")
    expect(page.locator("#search-status")).to_contain_text("No class or WordNet concept called")
    expect(page.locator("#photos .photo:visible")).to_have_count(0)

    page.fill("#search", "")
    expect(page.locator("#photos .photo:visible")).to_have_count(len(PHOTOS))
    assert web.problems == []


def test_results_survive_a_reload_and_clear_empties_them(web, app_url):
    from playwright.sync_api import expect

    page = web.open(app_url)
    walk(page, PHOTOS[:2], 2)
    names = sorted(page.locator("#photos .photo .name").all_inner_texts())
    page.reload()
    page.evaluate("window.klaus.ready.then(() => true)")
    expect(cards(page)).to_have_count(2)
    assert sorted(page.locator("#photos .photo .name").all_inner_texts()) == names
    expect(cards(page).first.locator(".prediction")).to_have_count(5)

    # The same photos again are recognised as walked already.
    page.set_input_files("#pick-files", [str(f) for f in PHOTOS[:2]])
    expect(page.locator("#walk-status")).to_contain_text("2 already walked")
    assert cards(page).count() == 2

    page.click("#clear")
    expect(cards(page)).to_have_count(0)
    page.reload()
    page.evaluate("window.klaus.ready.then(() => true)")
    page.wait_for_timeout(300)
    expect(cards(page)).to_have_count(0)
    assert page.inner_text("#walk-status") == "No photos walked yet."


def test_bad_files_are_one_line_each_and_the_walk_goes_on(web, app_url, tmp_path):
    page = web.open(app_url)
    corrupt, text, heic = bad_files(tmp_path)
    cat, rocket = EXAMPLES / "cat.jpg", EXAMPLES / "rocket.jpg"
    walk(page, [cat, corrupt, text, heic, rocket], 5)
    failed = page.locator("#photos .photo.failed .error").all_inner_texts()
    assert len(failed) == 3
    assert any(line.startswith("corrupt.jpg: ") for line in failed)
    assert any(line.startswith("notes.txt: ") for line in failed)
    assert any(line.startswith("IMG_0001.HEIC: ") and "HEIC" in line[len("IMG_0001.HEIC") :] for line in failed)
    assert all("\n" not in line for line in failed)
    assert card(page, "rocket.jpg").locator(".prediction").count() == 5  # after the bad ones
    assert "3 could not be read" in page.inner_text("#walk-status")


def test_ten_crop_switch(web, app_url):
    page = web.open(app_url)
    page.check("#ten-crops")
    walk(page, [EXAMPLES / "cat.jpg"], 1)
    assert card(page, "cat.jpg").locator(".timing").inner_text().endswith("· 10 crops")


def test_concept_search_resolves_like_klaus_search(web, app_url, tmp_path):
    """The page's concept resolution gives the same class indices as `klaus search` for the same model."""
    from klaus.index.db import Database
    from klaus.index.indexer import concept_rows
    from klaus.index.search import resolve
    from klaus.runtime import Classifier

    page = web.open(app_url)
    in_browser = page.evaluate(
        """async (queries) => {
            const model = await window.klaus.ready;
            const c = await import('./concepts.js');
            const table = await c.Concepts.load('./concepts.json');
            const labels = c.labelRecords(model);
            const out = {};
            for (const q of queries) out[q] = [...c.resolve(table, labels, q).classes].sort((a, b) => a - b);
            return out;
        }""",
        CONCEPT_QUERIES,
    )
    labels = Classifier().labels
    db = Database(tmp_path / "concepts.db")
    with db.conn:
        db.set_labels(labels, "test", concept_rows(labels))
    for query in CONCEPT_QUERIES:
        wnids, plain = resolve(db.conn, query)
        expected = set(plain)
        for wnid in wnids:
            expected |= {c for (c,) in db.conn.execute("SELECT class FROM concepts WHERE wnid = ?", (wnid,))}
        assert in_browser[query] == sorted(expected), query
    db.close()
    assert len(in_browser["dog"]) == 118 and in_browser["xyzzy"] == []


def test_offline_after_the_first_visit(web, app_url):
    from playwright.sync_api import expect

    page = web.open(app_url)
    page.evaluate("navigator.serviceWorker.ready.then(() => true)")
    page.wait_for_function("() => navigator.serviceWorker.controller !== null", timeout=30_000)
    page.wait_for_function(
        """async () => {
            for (const name of await caches.keys()) {
                if (!name.startsWith('klaus-')) continue;
                const cache = await caches.open(name);
                if (await cache.match('model.klausweb', {ignoreVary: true})) return true;
            }
            return false;
        }""",
        timeout=60_000,
    )
    web.context.set_offline(True)
    page.reload()
    page.evaluate("window.klaus.ready.then(m => m.name)")
    expect(page.locator("#offline-status")).to_contain_text("Offline")
    walk(page, [EXAMPLES / "cat.jpg"], 1)
    assert "cat" in card(page, "cat.jpg").locator(".prediction .label").first.inner_text()
    web.context.set_offline(False)


def test_a_new_model_replaces_the_cached_one(web, tmp_path, tiny_klaus_path):
    """The service worker's cache is named by the model: a new model file on the server is fetched on the next
    online visit, the old cache is deleted, the page offers a reload, and the reload runs the new model."""
    import shutil

    from playwright.sync_api import expect

    from klaus.runtime import default_model_path

    model = tmp_path / "model.klaus"
    shutil.copyfile(default_model_path(), model)
    db, empty = tmp_path / "lib.db", tmp_path / "empty"
    empty.mkdir()
    subprocess.run([*klaus_cmd(), "index", str(empty), "--db", str(db)], check=True, capture_output=True, timeout=120)
    proc = subprocess.Popen(
        [*klaus_cmd(), "serve", "--db", str(db), "--model", str(model), "--port", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        url = json.loads(line)["url"] + "app/"
        _wait_for(url, proc)
        page = web.open(url)
        page.wait_for_function("() => navigator.serviceWorker.controller !== null", timeout=30_000)
        old = page.evaluate("caches.keys()")
        assert len(old) == 1 and old[0].startswith("klaus-")

        shutil.copyfile(tiny_klaus_path, model)  # a new model on the server
        page.reload()
        assert page.evaluate("window.klaus.ready.then(m => m.name)") == "efficientnet-lite0"  # this visit: the cache
        expect(page.locator("#update")).to_be_visible(timeout=60_000)
        # The worker deletes the old cache while it activates (the page hears of the new worker at its start).
        page.wait_for_function(
            "async (old) => { const k = await caches.keys(); return k.length === 1 && k[0] !== old; }", arg=old[0]
        )
        page.click("#reload")
        page.wait_for_load_state()
        assert page.evaluate("window.klaus.ready.then(m => m.name)") == "tiny"
    finally:
        _stop(proc)


def test_export_web_works_from_a_plain_static_server(web, tmp_path, native_top1):
    out = tmp_path / "site"
    result = subprocess.run(
        [*klaus_cmd(), "export", "--web", str(out), "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["path"] == str(out) and (out / "index.html").is_file() and (out / "model.klausweb").is_file()
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        port = re.search(r"port (\d+)", proc.stdout.readline()).group(1)
        url = f"http://127.0.0.1:{port}/"
        _wait_for(url, proc)
        page = web.open(url)
        walk(page, [EXAMPLES / "cat.jpg"], 1)
        assert card(page, "cat.jpg").locator(".prediction .label").first.inner_text() == native_top1["cat.jpg"]
        assert [p for p in web.problems if "favicon" not in p] == []
        # The static server sends no COOP/COEP; the service worker adds them to what it serves (wasm threads).
        assert page.evaluate("crossOriginIsolated") is False
        page.wait_for_function("() => navigator.serviceWorker.controller !== null", timeout=30_000)
        page.reload()
        page.evaluate("window.klaus.ready.then(() => true)")
        assert page.evaluate("crossOriginIsolated") is True
    finally:
        _stop(proc)


# ---------------------------------------------------------------- HTTP answers


def get(url: str, **headers: str):
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers, err.read()


def test_app_responses_carry_isolation_headers_types_and_encodings(app_url):
    status, headers, body = get(app_url)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cross-Origin-Opener-Policy"] == "same-origin"
    assert headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert headers["Cross-Origin-Resource-Policy"] == "same-origin"
    assert (
        "'wasm-unsafe-eval'" in headers["Content-Security-Policy"]
        and "unsafe-inline" not in headers["Content-Security-Policy"]
    )
    assert body == (SHIPPED / "index.html").read_bytes()

    status, headers, body = get(app_url + "ort-wasm-simd-threaded.wasm", **{"Accept-Encoding": "gzip, br"})
    assert (status, headers["Content-Type"], headers["Content-Encoding"]) == (200, "application/wasm", "br")
    assert headers["Vary"] == "Accept-Encoding"
    assert body == (SHIPPED / "ort-wasm-simd-threaded.wasm.br").read_bytes()

    status, headers, body = get(app_url + "klaus.js", **{"Accept-Encoding": "gzip, br;q=0"})
    assert (headers["Content-Type"], headers["Content-Encoding"]) == ("text/javascript; charset=utf-8", "gzip")
    assert gzip.decompress(body) == (SHIPPED / "klaus.js").read_bytes()

    status, headers, body = get(app_url + "ort-wasm-simd-threaded.mjs", **{"Accept-Encoding": "identity"})
    assert headers["Content-Type"] == "text/javascript; charset=utf-8" and "Content-Encoding" not in headers
    assert body == (SHIPPED / "ort-wasm-simd-threaded.mjs").read_bytes()

    status, headers, _ = get(app_url + "manifest.webmanifest")
    assert headers["Content-Type"] == "application/manifest+json"
    etag = headers["ETag"]
    assert get(app_url + "manifest.webmanifest", **{"If-None-Match": etag})[0] == 304

    status, headers, body = get(app_url + "model.klausweb")
    assert status == 200 and headers["Cross-Origin-Embedder-Policy"] == "require-corp"
    assert body == to_web_container(ROOT / "src" / "klaus" / "data" / "efficientnet-lite0.klaus")

    status, headers, body = get(app_url + "version.json")
    version = json.loads(body)
    assert headers["Cache-Control"] == "no-store"
    assert version["model_sha256"] == hashlib.sha256(get(app_url + "model.klausweb")[2]).hexdigest()
    assert version["cache"].startswith("klaus-") and "model.klausweb" in version["files"] and "./" in version["files"]
    for file in version["files"]:
        assert get(urllib.parse.urljoin(app_url, file))[0] == 200, file

    for missing in ("nothing.js", "../lib.db", "klaus.js.br", "assets.json/.."):
        status, headers, _ = get(app_url + missing)
        assert status == 404 and headers["Cross-Origin-Embedder-Policy"] == "require-corp", missing


def test_the_gallery_links_to_the_app(server):
    status, _, body = get(server)
    assert status == 200 and b'href="/app/"' in body
    status, headers, _ = get(server.rstrip("/") + "/app")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"  # redirected to /app/


# ---------------------------------------------------------------- export and the model check


def test_export_web_is_deterministic_and_refuses_foreign_folders(tmp_path):
    from klaus.web.ondevice import Assets

    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        result = subprocess.run(
            [*klaus_cmd(), "export", "--web", str(out)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
    files = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assets = Assets.load()
    assert set(files) == {*assets.files, "model.klausweb", "version.json", "_headers"}

    # An earlier export is replaced; any other non-empty folder is refused in one line.
    assert (
        subprocess.run([*klaus_cmd(), "export", "--web", str(first)], capture_output=True, timeout=120).returncode == 0
    )
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.jpg").write_bytes(b"x")
    result = subprocess.run(
        [*klaus_cmd(), "export", "--web", str(foreign)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"klaus: error: {foreign}: not empty and not an earlier 'klaus export --web' folder"
    ]
    assert (foreign / "keep.jpg").read_bytes() == b"x"


def test_export_web_refuses_a_model_onnx_runtime_web_cannot_run(tmp_path, monkeypatch):
    """Were Gemm missing from the operators ONNX Runtime Web runs, the embedded model is refused in one line."""
    from click.testing import CliRunner

    from klaus.cli import main
    from klaus.web import ondevice

    monkeypatch.setattr(ondevice, "WEB_OPERATORS", ondevice.WEB_OPERATORS - {"Gemm"})
    out = tmp_path / "site"
    result = CliRunner().invoke(main, ["export", "--web", str(out)], prog_name="klaus")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("klaus: error: ") and lines[0].endswith(
        "efficientnet-lite0.klaus: ONNX Runtime Web cannot run this model: ONNX Runtime Web has no kernel for its "
        "operator Gemm"
    )
    assert not out.exists()


def test_every_operator_a_model_file_may_hold_runs_in_the_browser():
    from klaus.onnxwire import CLASSIFIER_OPS
    from klaus.web.ondevice import WEB_OPERATORS

    assert CLASSIFIER_OPS <= WEB_OPERATORS


def test_web_problem_names_the_operator_domain_or_opset():
    import onnx
    from onnx import TensorProto, helper

    from klaus.web.ondevice import web_problem

    def graph(op: str, domain: str = "", opset: int = 17, extra: tuple = ()) -> bytes:
        node = helper.make_node(op, ["x"], ["y"], domain=domain)
        value = helper.make_tensor_value_info
        g = helper.make_graph([node], "g", [value("x", TensorProto.FLOAT, [1])], [value("y", TensorProto.FLOAT, [1])])
        imports = [helper.make_opsetid("", opset), *extra]
        return helper.make_model(g, opset_imports=imports).SerializeToString()

    assert web_problem(graph("Relu")) is None
    assert "FancyOp" in web_problem(graph("FancyOp"))
    assert "opset 6" in web_problem(graph("Relu", opset=6))
    assert "opset 24" in web_problem(graph("Relu", opset=24))
    assert "'com.example'" in web_problem(graph("Relu", extra=(helper.make_opsetid("com.example", 1),)))
    assert "not valid ONNX" in web_problem(b"\xff\xff")
    # Operators inside subgraphs count too.
    inner = helper.make_graph([helper.make_node("FancyOp", ["x"], ["z"])], "then", [], [])
    node = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=inner)
    value = helper.make_tensor_value_info
    g = helper.make_graph([node], "g", [value("c", TensorProto.BOOL, [])], [value("y", TensorProto.FLOAT, [1])])
    assert "FancyOp" in web_problem(
        onnx.helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )


# ---------------------------------------------------------------- shipped data is current


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, WEBAPP / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concept_data_is_generated_from_the_label_table():
    data = _load_script("make_concepts").concepts_bytes()
    assert (WEBAPP / "src" / "concepts.json").read_bytes() == data, "run: python webapp/make_concepts.py"
    doc = json.loads(data)
    assert len(doc["classes"]) == 1000 and doc["version"] == 1


def test_shipped_app_files_are_the_sources():
    for name in STATIC_FILES:
        assert (SHIPPED / name).read_bytes() == (WEBAPP / "src" / name).read_bytes(), (
            f"{name}: run cd webapp && node build.mjs"
        )
    build = (WEBAPP / "build.mjs").read_text()
    listed = re.search(r"export const STATIC_FILES = \[(.*?)\];", build, re.S).group(1)
    assert sorted(re.findall(r"'([^']+)'", listed)) == sorted(STATIC_FILES)


def test_manifest_and_icons():
    from PIL import Image

    manifest = json.loads((SHIPPED / "manifest.webmanifest").read_bytes())
    assert manifest["start_url"] == "./" and manifest["display"] == "standalone"
    purposes = set()
    for icon in manifest["icons"]:
        with Image.open(SHIPPED / icon["src"]) as image:
            assert f"{image.width}x{image.height}" == icon["sizes"]
        purposes.add(icon["purpose"])
    assert {"any", "maskable"} <= purposes
    with Image.open(SHIPPED / "icons" / "apple-touch-icon.png") as image:
        assert image.size == (180, 180)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "say where to write: -o OUT.onnx and/or --web DIR"),
        (["-o", "x.onnx"], "-o needs the MODEL to decode"),
        (["a.klaus", "--model", "b.klaus", "--web", "site"], "give the model once: MODEL a.klaus or --model b.klaus"),
        (["--web", ""], "'': the folder name (--web) is empty"),
    ],
)
def test_export_usage_errors_are_one_line(args, message, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from klaus.cli import main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", *args], prog_name="klaus")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"klaus: error: {message}"]
    assert list(tmp_path.iterdir()) == []
