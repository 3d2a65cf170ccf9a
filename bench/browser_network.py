"""The network in the browser: ONNX Runtime Web session choices against native ONNX Runtime, same photos, same run.

    python bench/browser_network.py [--only iso-t1,iso-t2,plain-t2,basic-t2,disabled-t2,nospin-t2,fixed-t1,fixed-t2] [--photos N]

The built assets (src/klaus/web/ondevice/) and a web container of the embedded model are served from this
process (with COOP/COEP, so the page is cross-origin isolated and wasm threads work, or without them under
/plain/); headless Debian chromium loads the model once per case through klaus.js and classifies the same
development photos. ``network`` is session.run as klaus.js reports it (``network_ms``), ``end to end`` is
decode + resize + network (``elapsed_ms``). Native ONNX Runtime is klaus.runtime.Classifier with the same
number of intra-op threads on the same photos' tensors (``session.run``), measured in the same rounds.
Cases run in rounds of 10 photos each, in turn (one page alive at a time, its model loaded afresh each round), so
that drift in the machine's load hits them alike; decode / session are medians over the rounds'
loads (decodeMs: container bytes to weights; sessionMs: the rest of ONNX Runtime's wasm compile and the session).
"""

from __future__ import annotations

import http.server
import sys
import threading
import time
from pathlib import Path

from _common import ROOT, SAMPLE, command, embedded_model, median, ratio, table

ASSETS = ROOT / "src" / "klaus" / "web" / "ondevice"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
PAGE = b"""<!doctype html><meta charset="utf-8"><title>bench</title>
<script type="module">import * as klaus from './klaus.js'; window.api = klaus; window.apiReady = true;</script>"""
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
}
# key: (description, isolated page, threads asked for, ONNX Runtime Web session options)
CASES: dict[str, tuple[str, bool, int, dict[str, object]]] = {
    "iso-t1": ("isolated page, 1 thread, optimization 'all' (klaus.js default without threads)", True, 1, {}),
    "iso-t2": ("isolated page, 2 threads, optimization 'all' (klaus.js default on 2 cores)", True, 2, {}),
    "plain-t2": ("page without COOP/COEP, 2 threads asked (klaus.js runs 1)", False, 2, {}),
    "basic-t2": ("isolated, 2 threads, graphOptimizationLevel 'basic'", True, 2, {"graphOptimizationLevel": "basic"}),
    "disabled-t2": (
        "isolated, 2 threads, graphOptimizationLevel 'disabled'",
        True,
        2,
        {"graphOptimizationLevel": "disabled"},
    ),
    "nospin-t2": (
        "isolated, 2 threads, 'all', intra-op threads do not spin (session.intra_op.allow_spinning 0)",
        True,
        2,
        {"extra": {"session": {"intra_op": {"allow_spinning": "0"}}}},
    ),
    "fixed-t1": (
        "isolated, 1 thread, 'all', batch fixed at 1 (freeDimensionOverrides)",
        True,
        1,
        {"freeDimensionOverrides": {"batch": 1}},
    ),
    "fixed-t2": (
        "isolated, 2 threads, 'all', batch fixed at 1 (freeDimensionOverrides)",
        True,
        2,
        {"freeDimensionOverrides": {"batch": 1}},
    ),
}
BLOCK = 10


class Site:
    """Built assets plus in-memory files over HTTP; COOP/COEP on everything except under /plain/."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = {"/bench.html": PAGE, **files}
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                isolated = not path.startswith("/plain/")
                path = path if isolated else path[len("/plain") :]
                body = site.files.get(path)
                if body is None:
                    target = (ASSETS / path.lstrip("/")).resolve()
                    if not target.is_file() or ASSETS.resolve() not in target.parents:
                        self.send_error(404)
                        return
                    body = target.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", TYPES.get(Path(path).suffix, "application/octet-stream"))
                self.send_header("Content-Length", str(len(body)))
                if isolated:
                    self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                    self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def dev_photos(n: int) -> list[Path]:
    photos = sorted(SAMPLE.glob("*.JPEG"))
    if not photos:
        sys.exit(f"browser_network.py: error: development photos not found in {SAMPLE}")
    step = max(1, len(photos) // n)
    return photos[1::step][:n]


def open_case(browser, site: Site, isolated: bool, threads: int, options: dict[str, object]):
    page = browser.new_page()
    page.goto(f"{site.url}{'' if isolated else '/plain'}/bench.html")
    page.wait_for_function("window.apiReady === true", timeout=30_000)
    info = page.evaluate(
        "async ([threads, options]) => { window.model = await api.load('./model.klausweb', {threads, sessionOptions: options});"
        " return {threads: model.threads, isolated: crossOriginIsolated, decodeMs: model.decodeMs, sessionMs: model.sessionMs}; }",
        [threads, options],
    )
    return page, info


def classify(page, name: str) -> tuple[float, float]:
    r = page.evaluate(
        "async (path) => { const b = await (await fetch(path)).blob(); return await api.classify(model, b); }",
        f"./photos/{name}",
    )
    return r["network_ms"], r["elapsed_ms"]


def run(only: list[str] | None = None, photos: int = 50) -> str:
    from playwright.sync_api import sync_playwright

    from klaus.preprocess import prepare
    from klaus.runtime import Classifier
    from klaus.webmodel import to_web_container

    keys = [k for k in CASES if only is None or k in only]
    chosen = dev_photos(photos)
    files = {"/model.klausweb": to_web_container(embedded_model())}
    files.update({f"/photos/{p.name}": p.read_bytes() for p in chosen})
    site = Site(files)
    natives = {t: Classifier(embedded_model(), threads=t) for t in (1, 2)}
    tensors = [prepare(str(p), natives[1].preprocess) for p in chosen]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in [*keys, "native-t1", "native-t2"]}
    infos: dict[str, dict] = {}
    loads: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for clf in natives.values():
            clf.run(tensors[0])
        for start in range(0, len(chosen), BLOCK):
            block = chosen[start : start + BLOCK]
            for key in keys:  # one page (one worker, one thread pool) alive at a time
                _, isolated, threads, options = CASES[key]
                page, infos[key] = open_case(browser, site, isolated, threads, options)
                loads[key].append((infos[key]["decodeMs"], infos[key]["sessionMs"]))
                for photo in chosen[:2]:  # warm-up: first runs allocate and tier up the wasm code
                    classify(page, photo.name)
                times[key] += [classify(page, ph.name) for ph in block]
                page.close()
            for t, clf in natives.items():
                name = clf.session.get_inputs()[0].name
                for x in tensors[start : start + BLOCK]:
                    t0 = time.perf_counter()
                    clf.session.run(None, {name: x})
                    times[f"native-t{t}"].append(((time.perf_counter() - t0) * 1000, float("nan")))
        browser.close()
    site.server.shutdown()
    native = {t: median([n for n, _ in times[f"native-t{t}"]]) for t in (1, 2)}
    rows = []
    for key in keys:
        info = infos[key]
        net = median([n for n, _ in times[key]])
        e2e = median([e for _, e in times[key]])
        threads = info["threads"]
        rows.append([
            CASES[key][0], threads, "yes" if info["isolated"] else "no", f"{net:.1f}", f"{native[threads]:.1f}",
            ratio(net, native[threads]), f"{e2e:.1f}", f"{median([d for d, _ in loads[key]]):.0f} / {median([t for _, t in loads[key]]):.0f}",
            command("browser_network.py", "--only", key),
        ])  # fmt: skip
    headers = ["case", "threads", "isolated", "network ms (median)", "native ms, same threads", "ratio",
               "end to end ms (median)", "load: decode / session ms", "command"]  # fmt: skip
    return (
        f"ONNX Runtime Web in headless chromium vs native ONNX Runtime (klaus.runtime.Classifier) on {len(chosen)} "
        f"development photos, medians, measured in the same rounds.\n\n" + table(headers, rows)
    )


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated cases: {', '.join(CASES)}")
    parser.add_argument("--photos", type=int, default=50)
    args = parser.parse_args()
    only = [k.strip() for k in args.only.split(",")] if args.only else None
    unknown = sorted(set(only or ()) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    print(run(only, args.photos))


if __name__ == "__main__":
    main()
