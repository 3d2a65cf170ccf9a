"""The network in the browser: ONNX Runtime Web session choices against native ONNX Runtime, same photos, same run.

    python bench/browser_network.py [--only iso-t1,iso-t2,fixed-t2,...] [--photos N]

The built assets (src/klaus/web/ondevice/) and a web container of the embedded model are served from this
process (with COOP/COEP, so the page is cross-origin isolated and wasm threads work, or without them under
/plain/); headless Debian chromium loads the model once per case through klaus.js and classifies the same
development photos. ``network`` is session.run as klaus.js reports it (``network_ms``), ``end to end`` is
decode + resize + network (``elapsed_ms``). Native ONNX Runtime is klaus.runtime.Classifier with the same
number of intra-op threads on the same photos' tensors (``session.run``), measured in the same rounds, and the
same graph in native ONNX Runtime at ORT_ENABLE_EXTENDED (all fusions, not the x86 NCHWc layout).
Cases run in rounds of 10 photos each, in turn (one page alive at a time, its model loaded afresh each round and
run 4 times before the measured runs; each round starts with the next case), so that drift in the machine's load and
chromium's code caching hit them alike; decode / session are medians over the rounds'
loads (decodeMs: container bytes to weights; session creation: ONNX Runtime Web's InferenceSession.create once its
wasm has started, where graph optimization happens).
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from _common import KLAUS, ROOT, SAMPLE, cached, command, embedded_model, median, ratio, table

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
SPIN: dict[str, object] = {"extra": {"session": {"intra_op": {"allow_spinning": "1"}}}}
FIXED: dict[str, object] = {"freeDimensionOverrides": {"batch": 1}}  # the embedded model's batch dimension
PATTERN: dict[str, object] = {"enableCpuMemArena": True, "enableMemPattern": True}
# key: (description, isolated page, threads asked for, ONNX Runtime Web session options over klaus.js's: optimization
# 'all', idle intra-op threads do not spin, ONNX Runtime Web's defaults otherwise)
CASES: dict[str, tuple[str, bool, int, dict[str, object]]] = {
    "iso-t1": ("klaus.js's choices, 1 thread", True, 1, {}),
    "iso-t2": ("klaus.js's choices, 2 threads", True, 2, {}),
    "plain-t2": ("page without COOP/COEP, 2 threads asked (klaus.js runs 1)", False, 2, {}),
    "fixed-t1": ("batch dimension fixed at 1 (freeDimensionOverrides), 1 thread", True, 1, FIXED),
    "fixed-t2": ("batch dimension fixed at 1, 2 threads", True, 2, FIXED),
    "pattern-t1": ("memory arena and memory pattern on (native's defaults), 1 thread", True, 1, PATTERN),
    "pattern-t2": ("memory arena and memory pattern on, 2 threads", True, 2, PATTERN),
    "extended-t2": ("graphOptimizationLevel 'extended', 2 threads", True, 2, {"graphOptimizationLevel": "extended"}),
    "basic-t2": ("graphOptimizationLevel 'basic', 2 threads", True, 2, {"graphOptimizationLevel": "basic"}),
    "disabled-t2": ("graphOptimizationLevel 'disabled', 2 threads", True, 2, {"graphOptimizationLevel": "disabled"}),
    "parallel-t2": ("executionMode 'parallel', 2 threads", True, 2, {"executionMode": "parallel"}),
    "spin-t2": ("idle intra-op threads spin (session.intra_op.allow_spinning 1), 2 threads", True, 2, SPIN),
}  # fmt: skip
BLOCK = 10
WARMUP = 4  # runs per page before the measured ones


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
        " return {threads: model.threads, isolated: crossOriginIsolated && model.crossOriginIsolated,"
        " sab: typeof SharedArrayBuffer === 'function', decodeMs: model.decodeMs, createMs: model.timings.session}; }",
        [threads, options],
    )
    return page, info


def classify(page, name: str) -> tuple[float, float]:
    r = page.evaluate(
        "async (path) => { const b = await (await fetch(path)).blob(); return await api.classify(model, b); }",
        f"./photos/{name}",
    )
    return r["network_ms"], r["elapsed_ms"]


def exported_fp32() -> Path:
    """The embedded model as a plain fp32 ONNX file (`klaus export`), cached."""

    def build(tmp: Path) -> None:
        target = tmp.with_suffix(".onnx")
        subprocess.run([KLAUS, "export", str(embedded_model()), "-o", str(target)], check=True, capture_output=True)
        os.replace(target, tmp)

    return cached("browser-embedded-fp32.onnx", build)


def no_layout_sessions() -> dict[int, Any]:
    """Native ONNX Runtime on the same graph at ORT_ENABLE_EXTENDED: every fusion of 'all' but not its x86 layout
    transform (NCHWc blocked convolutions), which has no counterpart in ONNX Runtime Web's wasm build."""
    import onnxruntime as ort

    blob = exported_fp32().read_bytes()
    out = {}
    for t in (1, 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads = t
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        out[t] = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    return out


def measure(only: list[str] | None = None, photos: int = 50) -> dict:
    """Per case: network and end-to-end medians, load times, threads and isolation; native medians per threads."""
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
    plain = no_layout_sessions()
    tensors = [prepare(str(p), natives[1].preprocess) for p in chosen]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    native: dict[str, list[float]] = {f"{kind}-t{t}": [] for kind in ("all", "extended") for t in (1, 2)}
    infos: dict[str, dict] = {}
    loads: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for t, clf in natives.items():
            clf.run(tensors[0])
            plain[t].run(None, {clf.input_name: tensors[0]})
        for round_, start in enumerate(range(0, len(chosen), BLOCK)):
            block = chosen[start : start + BLOCK]
            turn = round_ % len(keys)  # each round starts with another case: no case always runs first
            for key in keys[turn:] + keys[:turn]:  # one page (one worker, one thread pool) alive at a time
                _, isolated, threads, options = CASES[key]
                page, infos[key] = open_case(browser, site, isolated, threads, options)
                loads[key].append((infos[key]["decodeMs"], infos[key]["createMs"]))
                for photo in chosen[:WARMUP]:  # first runs allocate and tier up the wasm code
                    classify(page, photo.name)
                times[key] += [classify(page, ph.name) for ph in block]
                page.close()
            time.sleep(0.2)  # the closed page's threads are gone before native runs
            for t, clf in natives.items():
                for kind, session in (("all", clf.session), ("extended", plain[t])):
                    for x in tensors[start : start + BLOCK]:
                        t0 = time.perf_counter()
                        session.run(None, {clf.input_name: x})
                        native[f"{kind}-t{t}"].append((time.perf_counter() - t0) * 1000)
        browser.close()
    site.server.shutdown()
    cases = {}
    for key in keys:
        cases[key] = {
            "description": CASES[key][0],
            "threads": infos[key]["threads"],
            "isolated": bool(infos[key]["isolated"]),
            "network": median([n for n, _ in times[key]]),
            "total": median([e for _, e in times[key]]),
            "decode": median([d for d, _ in loads[key]]),
            "create": median([c for _, c in loads[key]]),
        }
    return {"photos": len(chosen), "cases": cases, "native": {k: median(v) for k, v in native.items()}}


def render(result: dict) -> str:
    """The choices table: each case against native ONNX Runtime (with and without its x86 layout) and against
    klaus.js's own choices at the same threads."""
    native = result["native"]
    cases = result["cases"]
    rows = []
    for key, c in cases.items():
        t = c["threads"]
        base = cases.get(f"iso-t{t}")
        rows.append([
            c["description"], t, "yes" if c["isolated"] else "no", f"{c['network']:.1f}",
            ratio(c["network"], base["network"]) if base else "—",
            f"{native[f'all-t{t}']:.1f}", ratio(c["network"], native[f"all-t{t}"]),
            f"{native[f'extended-t{t}']:.1f}", ratio(c["network"], native[f"extended-t{t}"]),
            f"{c['total']:.1f}", f"{c['decode']:.0f} / {c['create']:.0f}", command("browser_network.py", "--only", key),
        ])  # fmt: skip
    headers = ["case", "threads", "isolated", "network ms", "vs klaus.js's choices", "native ms", "ratio",
               "native ms without NCHWc", "ratio", "end to end ms", "load: decode / session creation ms",
               "command"]  # fmt: skip
    return (
        f"ONNX Runtime Web in headless chromium against native ONNX Runtime on {result['photos']} development photos "
        "(medians, measured in the same rounds). Native: `klaus.runtime.Classifier` (optimization 'all', which on x86 "
        "includes the NCHWc layout transform to blocked AVX2 convolutions), and the same graph at ORT_ENABLE_EXTENDED "
        "(every fusion, no NCHWc layout), both with the same intra-op threads.\n\n" + table(headers, rows)
    )


def run(only: list[str] | None = None, photos: int = 50) -> str:
    return render(measure(only, photos))


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
