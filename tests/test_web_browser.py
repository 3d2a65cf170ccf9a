"""`klaus serve` in a real headless browser: Debian's chromium driven by Playwright.

The server runs as a user would start it (`klaus serve --port 0` in a subprocess, on
127.0.0.1) over an index of examples/*.jpg. The page must load, a search must show the
cat, and uploading examples/cat.jpg must show a cat label without a page reload, with
no script or Content-Security-Policy error in the console.

Without a chromium binary the test skips (a user's machine); under CI it fails
instead, since .ci/run installs Debian's chromium.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from conftest import EXAMPLES
from test_index import klaus_cmd

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def find_chromium() -> str | None:
    candidates = [
        os.environ.get("KLAUS_CHROMIUM"),
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def require(thing: str, ok: bool) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{thing} is missing in CI (.ci/run installs it)")
        pytest.skip(f"{thing} not found; install Debian's chromium (apt-get install chromium) to run this test")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    require("a chromium binary", path is not None)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        require("the playwright Python package", False)
    assert path is not None  # require() skipped (or failed under CI) without one
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory, chromium):
    root = tmp_path_factory.mktemp("browser")
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
        assert url.startswith("http://127.0.0.1:")
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_browse_search_and_classify_in_chromium(server, chromium, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: problems.append(f"console: {msg.text}") if msg.type == "error" else None)

            page.goto(server)
            expect(page.locator("#count-ok")).to_have_text("4")
            expect(page).to_have_title("Library · Klaus")

            # Search from the header box.
            page.fill("#q", "cat")
            page.press("#q", "Enter")
            page.wait_for_url("**/search?q=cat*")
            expect(page.locator("#search-results .card")).to_have_count(1)
            expect(page.locator("#search-results")).to_contain_text("cat.jpg")
            page.wait_for_function(
                "() => { const i = document.querySelector('#search-results img'); return i && i.complete && i.naturalWidth > 0; }"
            )

            # The photo page: top-5 with hierarchy paths, bars drawn by the page script.
            page.click("#search-results a")
            expect(page.locator("#top5")).to_contain_text("tiger cat")
            expect(page.locator("#top5")).to_contain_text("domestic cat")
            width = page.eval_on_selector("#top5 .bar", "b => b.getBoundingClientRect().width")
            assert width > 0

            # Classify a new photo: the result appears without a page reload.
            page.goto(server)
            page.evaluate("window.__marker = 'same page'")
            page.set_input_files("#photo", str(EXAMPLES / "cat.jpg"))
            expect(page.locator("#result .prediction").first).to_contain_text("cat", timeout=60_000)
            expect(page.locator("#result")).to_contain_text("domestic cat")
            assert page.evaluate("window.__marker") == "same page"
            assert page.url == server
            page.screenshot(path=str(tmp_path / "classified.png"), full_page=True)
            assert problems == []

            # A bad upload shows its error in place (the 415 answer is expected in the console).
            bad = tmp_path / "notes.jpg"
            bad.write_text("not a photo")
            page.set_input_files("#photo", str(bad))
            expect(page.locator("#result .error")).to_contain_text("not an image")
            assert [p for p in problems if "status of 415" not in p] == []
        finally:
            browser.close()
