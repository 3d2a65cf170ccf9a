"""On the phone (browser): the on-device app in headless Debian chromium, with native ONNX Runtime in the same run.

    python bench/browser.py [--only wire,first,photos,choices] [--write]

`klaus serve` runs as a user starts it (over an index of examples/), behind a byte-counting
TCP relay, so "bytes on the wire" are what the server really sent (brotli where chromium takes
it, HTTP headers included), service-worker traffic included:

* wire: a first visit in an empty browser profile until the first photo's top-5 is shown and the
  service worker has filled its cache; per file from Playwright's request sizes (runtime = ONNX
  Runtime Web's .wasm/.mjs, model = model.klausweb, app = the rest), total from the relay. Beside
  it, the same app with the decoded fp32 ONNX (`klaus export`) or an int8 ONNX
  (onnxruntime.quantization.quantize_dynamic) in place of the container (their brotli size at
  the build's settings: computed, not loaded), and MediaPipe's web image classifier (cited).
* first: time from navigation start to the first photo's top-5 on screen (window.klaus.marks),
  cold (new profile, empty caches) and warm (cached by the service worker, network off); the
  model's decode (container bytes -> weights) and session creation as klaus.js reports them.
* photos: per-photo network time (session.run) and end to end (decode, resize, network) over
  50 development photos with 1 and 2 wasm threads, against native ONNX Runtime in Python
  (Classifier with the same threads: session.run, and classify() end to end) on the same photos, in
  alternating blocks of photos.
* choices: bench/browser_network.py's cases (each ONNX Runtime Web session choice against klaus.js's
  own, native ONNX Runtime with and without its x86 NCHWc layout), the operators of graphs native
  ONNX Runtime optimizes offline, and the wasm builds the pinned onnxruntime-web package holds.

With --write the section replaces BENCHMARKS.md's "On the phone (browser)" section.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import browser_network
from _common import CACHE, EXAMPLES, KLAUS, ROOT, SAMPLE, cached, command, median, table
from browser_network import exported_fp32

KEYS = ("wire", "first", "photos", "choices")
HEADING = "## On the phone (browser)"
PHOTOS = 50
ROUNDS = 5  # cold and warm first results
THREADS = (1, 2)
BLOCK = 10  # photos per turn, browser then native
QUIET = 0.2  # seconds between turns: the other side's threads stop spinning
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
TARGETS = {"total_mb": 6.0, "model_mib": 2.6, "cold_s": 2.5, "warm_s": 1.2, "decode_s": 0.5, "network_x": 4.0}
# MediaPipe's web image classifier: its published wasm sizes, cited, not measured here.
MEDIAPIPE_WASM = (13.0e6, 3.95e6)  # tasks-vision wasm: raw, gzip
ORT_WASM_MB = (ROOT / "src" / "klaus" / "web" / "ondevice" / "ort-wasm-simd-threaded.wasm").stat().st_size / 1e6


# ---------------------------------------------------------------- a byte-counting relay in front of klaus serve


class Relay:
    """A TCP relay on 127.0.0.1 that counts the bytes each way and, per request path, the bytes of each response
    (status line, headers and body as sent; 'down' is server -> browser)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._lock = threading.Lock()
        self.reset()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> None:
        with self._lock:
            self.down = self.up = 0
            self.paths: dict[str, int] = {}  # request path -> response bytes

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            conn = _Exchange(self)
            threading.Thread(target=self._pump, args=(client, server, conn.request_bytes), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, conn.response_bytes), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, seen) -> None:
        try:
            while data := source.recv(65536):
                seen(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def count(self, way: str, n: int, path: str | None = None) -> None:
        with self._lock:
            setattr(self, way, getattr(self, way) + n)
            if path is not None:
                self.paths[path] = self.paths.get(path, 0) + n

    def close(self) -> None:
        self.sock.close()


class _Exchange:
    """One keep-alive connection's HTTP/1.1 requests (GET/HEAD, no body) and responses (Content-Length bodies)."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.pending: list[str] = []  # request paths awaiting their response
        self.up = b""
        self.down = b""
        self.body_left = 0
        self.path = "?"
        self.lock = threading.Lock()

    def request_bytes(self, data: bytes) -> None:
        self.relay.count("up", len(data))
        self.up += data
        while b"\r\n\r\n" in self.up:
            head, self.up = self.up.split(b"\r\n\r\n", 1)
            parts = head.split(b"\r\n", 1)[0].split()
            with self.lock:
                self.pending.append(parts[1].decode("latin-1") if len(parts) > 1 else "?")

    def response_bytes(self, data: bytes) -> None:
        while data:
            if self.body_left:
                n = min(self.body_left, len(data))
                self.relay.count("down", n, self.path)
                self.body_left -= n
                data = data[n:]
                continue
            self.down += data
            data = b""
            if b"\r\n\r\n" not in self.down:
                return
            head, rest = self.down.split(b"\r\n\r\n", 1)
            self.down = b""
            with self.lock:
                self.path = self.pending.pop(0) if self.pending else "?"
            self.relay.count("down", len(head) + 4, self.path)
            match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            status = head.split(b" ", 2)[1] if head.count(b" ") >= 1 else b""
            self.body_left = int(match.group(1)) if match and status not in (b"304", b"204") else 0
            data = rest


class Server:
    """`klaus serve --port 0` over an index of examples/, and a relay in front of it."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="klaus-browser-bench-")
        db = Path(self.tmp.name) / "lib.db"
        subprocess.run([KLAUS, "index", str(EXAMPLES), "--db", str(db), "--json"], check=True, capture_output=True)
        self.proc = subprocess.Popen(
            [KLAUS, "serve", "--db", str(db), "--port", "0", "--json"], stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        url = json.loads(self.proc.stdout.readline())["url"]
        found = re.search(r":(\d+)/$", url)
        assert found is not None, url
        port = int(found.group(1))
        self.relay = Relay(("127.0.0.1", port))
        self.app = f"http://127.0.0.1:{self.relay.port}/app/"

    def close(self) -> None:
        self.relay.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.tmp.cleanup()


# ---------------------------------------------------------------- measurements in chromium


def first_result(context, url: str, photo: Path) -> dict[str, float]:
    """Open the app, pick one photo at once, wait for its top-5: the page's own marks (ms from navigation)."""
    page = context.pages[0] if context.pages else context.new_page()
    page.goto(url, wait_until="commit")
    page.wait_for_function("() => Boolean(window.klaus)", timeout=120_000)  # app.js has attached its listeners
    page.set_input_files("#pick-files", str(photo))
    page.wait_for_selector("#photos .photo .prediction", timeout=120_000)
    marks = page.evaluate(
        """async () => { const m = await window.klaus.ready;
             return {first: window.klaus.marks.firstResult, ready: window.klaus.marks.ready,
                     decode: m.decodeMs, session: m.sessionMs, start: m.timings.warmUp, create: m.timings.session,
                     download: m.downloadMs}; }"""
    )
    page.click("#clear")  # the next round walks the photo again
    page.wait_for_function("() => document.querySelectorAll('#photos .photo').length === 0")
    return marks


def sw_ready(page) -> None:
    page.evaluate("navigator.serviceWorker.ready.then(() => true)")
    page.wait_for_function("() => navigator.serviceWorker.controller !== null", timeout=120_000)
    page.wait_for_function(
        """async () => { for (const n of await caches.keys()) {
               if (n.startsWith('klaus-') && await (await caches.open(n)).match('model.klausweb', {ignoreVary: true})) return true; }
             return false; }""",
        timeout=120_000,
    )


def category(url: str) -> str:
    name = url.rsplit("/", 1)[-1].split("?", 1)[0]
    if name.startswith("ort-wasm"):
        return "runtime"
    return "model" if name == "model.klausweb" else "app"


def measure_wire_and_first(browser, server: Server, rounds: int) -> dict[str, object]:
    cat = EXAMPLES / "cat.jpg"
    keys = ("first", "decode", "session", "start", "create", "download")
    out: dict[str, Any] = {f"{when}_{k}": [] for when in ("cold", "warm") for k in keys}
    for i in range(rounds):
        context = browser.new_context()
        server.relay.reset()
        page = context.new_page()
        marks = first_result(context, server.app, cat)
        for k in keys:
            out[f"cold_{k}"].append(marks[k])
        sw_ready(page)
        if i == 0:
            page.wait_for_timeout(500)  # let the last revalidations finish
            out["wire_total"] = server.relay.down
            out["wire_up"] = server.relay.up
            out["files"] = dict(server.relay.paths)
        context.set_offline(True)
        page.reload(wait_until="commit")
        marks = first_result(context, server.app, cat)
        for k in keys:
            out[f"warm_{k}"].append(marks[k])
        context.close()
    return out


def measure_photos(browser, server: Server, photos: list[Path], threads: int) -> tuple[dict, dict]:
    """Browser and native times per photo, in alternating blocks of BLOCK photos (drift in the machine's load hits
    both alike). Not photo by photo: each side's idle threads spin for a while after a run and would take a core
    from the other side's next run."""
    from klaus.runtime import Classifier

    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{server.app}?threads={threads}")
    info = page.evaluate(
        """window.klaus.ready.then(m => ({threads: m.threads ?? null, page: crossOriginIsolated,
             worker: m.crossOriginIsolated, sab: typeof SharedArrayBuffer === 'function'}))"""
    )
    clf = Classifier(threads=threads)
    web: dict[str, Any] = {"network": [], "total": [], **info}
    native: dict[str, list] = {"network": [], "total": []}
    warmup = photos[:3]
    for i in range(0, len(photos), BLOCK):
        block = photos[i : i + BLOCK]
        for n, path in enumerate([*(warmup if i == 0 else []), *block]):
            r = page.evaluate(
                """async ([name, b64]) => {
                    const model = await window.klaus.ready;
                    const file = new File([Uint8Array.from(atob(b64), c => c.charCodeAt(0))], name, {type: 'image/jpeg'});
                    const r = await window.klaus.classify(model, file);
                    return [r.network_ms, r.elapsed_ms];
                }""",
                [path.name, base64.b64encode(path.read_bytes()).decode()],
            )
            if i > 0 or n >= len(warmup):
                web["network"].append(r[0])
                web["total"].append(r[1])
        time.sleep(QUIET)
        for n, path in enumerate([*(warmup if i == 0 else []), *block]):
            x = _tensor(clf, path)
            start = time.perf_counter()
            clf.session.run(None, {clf.input_name: x})
            network = (time.perf_counter() - start) * 1000.0
            total = clf.classify(path).elapsed_ms
            if i > 0 or n >= len(warmup):
                native["network"].append(network)
                native["total"].append(total)
        time.sleep(QUIET)
    context.close()
    return web, native


def _tensor(clf, path: Path):
    from klaus.preprocess import to_tensor

    return to_tensor(clf.load(path), clf.preprocess, 1)


def dev_photos(n: int = PHOTOS) -> list[Path]:
    """n development photos spread over the classes (every k-th of the sorted sample)."""
    files = sorted(SAMPLE.glob("*.JPEG"))
    if len(files) < n:
        raise SystemExit(f"bench/browser.py needs {n} photos in {SAMPLE}")
    step = len(files) // n
    return files[::step][:n]


# ---------------------------------------------------------------- other models on the wire (sizes)


def brotli_size(path: Path) -> int:
    """Bytes of the file at build.mjs's brotli settings (quality 11, window 24), by node's zlib."""
    script = (
        "const z=require('zlib'),fs=require('fs');const d=fs.readFileSync(process.argv[1]);"
        "process.stdout.write(String(z.brotliCompressSync(d,{params:{[z.constants.BROTLI_PARAM_QUALITY]:11,"
        "[z.constants.BROTLI_PARAM_LGWIN]:24,[z.constants.BROTLI_PARAM_SIZE_HINT]:d.length}}).length))"
    )
    return int(subprocess.run(["node", "-e", script, str(path)], check=True, capture_output=True, text=True).stdout)


def int8_onnx() -> Path:
    def build(tmp: Path) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target = tmp.with_suffix(".onnx")
        quantize_dynamic(str(exported_fp32()), str(target), weight_type=QuantType.QInt8)
        os.replace(target, tmp)

    return cached("browser-embedded-int8.onnx", build)


# ---------------------------------------------------------------- the section


def mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def run(only: list[str] | None = None, photos: int = PHOTOS, rounds: int = ROUNDS) -> str:
    from playwright.sync_api import sync_playwright

    wanted = set(only or KEYS)
    load_before = os.getloadavg()[0]
    server = Server()
    parts = [HEADING, ""]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                first = measure_wire_and_first(browser, server, rounds) if wanted & {"wire", "first"} else None
                per_photo = {}
                if "photos" in wanted:
                    chosen = dev_photos(photos)
                    for t in THREADS:
                        per_photo[t] = measure_photos(browser, server, chosen, t)
            finally:
                browser.close()
    finally:
        server.close()
    choices = browser_network.measure(None, photos) if "choices" in wanted else None
    parts += [
        "The on-device app (`klaus serve` → `/app/`, or `klaus export --web DIR`) in headless Debian chromium "
        f"({_chromium_version()}) on this machine, ONNX Runtime Web's wasm SIMD build; the native baseline is "
        "ONNX Runtime in Python in the same run. Targets: the app's size and time goals (total ≤ 6 MB, model ≤ 2.6 MiB, first result ≤ 2.5 s cold and ≤ 1.2 s warm, decode + session ≤ 0.5 s, network ≤ 4× native).",
        "",
    ]
    if first is not None and "wire" in wanted:
        parts += wire_section(first)
    if first is not None and "first" in wanted:
        parts += first_section(first, rounds)
    if per_photo:
        parts += photo_section(per_photo, photos)
    if choices is not None:
        parts += choices_section(choices)
    parts += load_note(load_before, os.getloadavg()[0])
    return "\n".join(parts).rstrip()


def load_note(before: float, after: float) -> list[str]:
    """A warning when other work shared the CPUs: absolute times are then inflated, the interleaved ratios less so."""
    cores = os.cpu_count() or 1
    if max(before, after) <= cores:
        return []
    return [
        f"This run shared the machine with other work (1-minute load average {before:.1f} → {after:.1f} on {cores} "
        "cores), so the absolute times above (first results, decode, session, per-photo ms) are inflated and 2 threads "
        "can be slower than 1; the ratios, browser and native measured in alternating blocks of photos, are the "
        "comparable figures. The time targets need a run on an idle machine to be judged.",
        "",
    ]


def _chromium_version() -> str:
    try:
        return subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        return "chromium"


def wire_section(first: dict) -> list[str]:
    files: dict[str, int] = first["files"]
    split = {"runtime": 0, "model": 0, "app": 0}
    for url, n in files.items():
        split[category(url)] += n
    counted = sum(split.values())
    total = first["wire_total"]
    other = max(0, total - counted)  # bytes the relay could not attribute to a request (none expected)
    runtime_app = split["runtime"] + split["app"] + other
    fp32, int8 = exported_fp32(), int8_onnx()
    fp32_br, int8_br = brotli_size(fp32), brotli_size(int8)
    model_ok = split["model"] <= TARGETS["model_mib"] * 2**20
    total_ok = total <= TARGETS["total_mb"] * 1e6
    rows = [
        [
            "Klaus container (`model.klausweb`, measured)",
            mb(split["runtime"]),
            f"{mb(split['model'])} ({mib(split['model'])})",
            mb(split["app"] + other),
            f"**{mb(total)}**",
            command("browser.py", "--only", "wire"),
        ],
        [
            "fp32 ONNX (`klaus export` of the embedded model) in its place",
            mb(split["runtime"]),
            f"{mb(fp32_br)} ({mib(fp32_br)}); {mb(fp32.stat().st_size)} raw",
            mb(split["app"] + other),
            mb(runtime_app + fp32_br),
            f"`klaus export src/klaus/data/efficientnet-lite0.klaus -o {fp32.relative_to(ROOT)}`",
        ],
        [
            "int8 ONNX (`quantize_dynamic`, QInt8 weights) in its place",
            mb(split["runtime"]),
            f"{mb(int8_br)} ({mib(int8_br)}); {mb(int8.stat().st_size)} raw",
            mb(split["app"] + other),
            mb(runtime_app + int8_br),
            "`python -c 'from onnxruntime.quantization import quantize_dynamic, QuantType; "
            f'quantize_dynamic("{fp32.relative_to(ROOT)}", "{int8.relative_to(ROOT)}", weight_type=QuantType.QInt8)\'`',
        ],
        [
            "MediaPipe web image classifier (cited, not measured)",
            f"{mb(MEDIAPIPE_WASM[1])} gzip ({mb(MEDIAPIPE_WASM[0])} raw)",
            f"≈ {mib(fp32.stat().st_size)} fp32 / ≈ {mib(int8.stat().st_size)} int8 (estimated: the same network's fp32 and int8 ONNX above)",
            "—",
            f"≥ {mb(MEDIAPIPE_WASM[1] + int8.stat().st_size)}",
            "tasks-vision wasm sizes (13.0 MB raw, 3.95 MB gzip), cited, not measured here",
        ],
    ]
    per_file = sorted(((path.rsplit("/app/", 1)[-1] or "./", n) for path, n in files.items()), key=lambda r: -r[1])
    return [
        "### First visit: bytes on the wire",
        "",
        "An empty chromium profile opens `/app/`, picks `examples/cat.jpg` and waits for its top-5 and for the service "
        "worker's cache; the relay in front of `klaus serve` counts every byte the server sent (HTTP headers included; "
        "the service worker revalidates what the page already loaded, so its install costs 304s), and splits them by "
        "request: ONNX Runtime Web's wasm and .mjs are the runtime; the app is everything else (HTML, CSS, the bundled "
        "klaus.js and worker.js with ONNX Runtime Web's JS API and the container decoder, concepts, icons, version.json "
        "and the service worker's requests).",
        "",
        table(["what", "runtime", "model", "app", "total", "reproduce"], rows),
        "",
        f"Targets: total ≤ {TARGETS['total_mb']:.0f} MB — {verdict(total_ok)} ({mb(total)}); model ≤ "
        f"{TARGETS['model_mib']} MiB — {verdict(model_ok)} ({mib(split['model'])}). Requests from the browser: "
        f"{mb(first['wire_up'])}.",
        "",
        "<details><summary>Per request path (status line, headers and body as sent, summed over its requests)</summary>",
        "",
        table(["file", "bytes"], [[f"`{name}`", f"{n:,}"] for name, n in per_file]),
        "",
        "</details>",
        "",
    ]


def first_section(first: dict, rounds: int) -> list[str]:
    m = {k: median(v) for k, v in first.items() if k.startswith(("cold_", "warm_"))}
    reproduce = command("browser.py", "--only", "first")
    budget = TARGETS["decode_s"] * 1000
    cold_load = m["cold_decode"] + m["cold_session"]
    warm_load = m["warm_decode"] + m["warm_session"]
    rows = [
        ["first result, cold: empty profile, over the network", f"{m['cold_first']:.0f}", "",
         f"≤ {TARGETS['cold_s'] * 1000:.0f}", verdict(m["cold_first"] <= TARGETS["cold_s"] * 1000), reproduce],
        ["first result, warm: cached by the service worker, network off", "", f"{m['warm_first']:.0f}",
         f"≤ {TARGETS['warm_s'] * 1000:.0f}", verdict(m["warm_first"] <= TARGETS["warm_s"] * 1000), reproduce],
        ["model decode (container bytes → verified float32 weights)", f"{m['cold_decode']:.0f}",
         f"{m['warm_decode']:.0f}", "", "", reproduce],
        ["session (decoded weights → session ready: what is left of ONNX Runtime Web's start, then the session)",
         f"{m['cold_session']:.0f}", f"{m['warm_session']:.0f}", "", "", reproduce],
        ["**decode + session** (container bytes → session ready)", f"{cold_load:.0f}", f"{warm_load:.0f}",
         f"≤ {budget:.0f}", f"cold {verdict(cold_load <= budget)}, warm {verdict(warm_load <= budget)}", reproduce],
        ["beside it: ONNX Runtime Web's start (fetching, compiling and starting its wasm and threads), from the "
         "download's start", f"{m['cold_start']:.0f}", f"{m['warm_start']:.0f}", "", "", reproduce],
        ["part of the session row: creating the session once ONNX Runtime has started", f"{m['cold_create']:.0f}",
         f"{m['warm_create']:.0f}", "", "", reproduce],
    ]  # fmt: skip
    lines = [
        "### Time to first result and model decode",
        "",
        f"Milliseconds from navigation start to the first photo's top-5 on screen (`examples/cat.jpg` picked at once), "
        f"median of {rounds} rounds, each in a new profile: cold, then in the same profile after the service worker "
        "installed, with the network off (warm). Decode and session times are klaus.js's own (`model.decodeMs`, "
        "`model.sessionMs`, split in `model.timings`), counted from the moment the container's last byte has arrived. "
        "The worker starts ONNX Runtime Web (fetching, compiling and starting its wasm, a one-node session) as soon as "
        "it is asked to load, so that start runs beside the download and the decoding; a warm start uses the compiled "
        "code chromium cached.",
        "",
        table(["what", "cold ms", "warm ms", "target ms", "", "reproduce"], rows),
        "",
    ]
    if cold_load > budget:
        waits = m["cold_start"] > m["cold_download"] + m["cold_decode"]
        lines += [
            f"Why cold misses {budget:.0f} ms: ONNX Runtime Web's first start alone takes {m['cold_start']:.0f} ms in "
            f"an empty profile (chromium compiles the {ORT_WASM_MB:.1f} MB wasm lazily, so its start-up code runs "
            f"while it is being compiled), against {m['warm_start']:.0f} ms from chromium's code cache. It runs beside "
            f"the download ({m['cold_download']:.0f} ms over this machine's loopback) and the decoding "
            f"({m['cold_decode']:.0f} ms), so decode + session cannot end before it: "
            + (
                f"here the start ends {m['cold_start'] - m['cold_download'] - m['cold_decode']:.0f} ms after the "
                "decoding, so it is the runtime's start that is waited for, not the decoding."
                if waits
                else "here the decoding ends after the start, so the decoding is what is waited for."
            ),
            "",
        ]
    return lines


def photo_section(per_photo: dict, photos: int) -> list[str]:
    rows = []
    notes = []
    for t, (web, native) in per_photo.items():
        wn, nn = median(web["network"]), median(native["network"])
        wt, nt = median(web["total"]), median(native["total"])
        rows.append(
            [
                f"{t}",
                f"{wn:.1f}",
                f"{nn:.1f}",
                f"{wn / nn:.2f}×",
                verdict(wn / nn <= TARGETS["network_x"]),
                f"{wt:.1f}",
                f"{nt:.1f}",
                f"{wt / nt:.2f}×",
                command("browser.py", "--only", "photos"),
            ]
        )
        yes = {True: "yes", False: "no"}
        notes.append(
            f"{t} thread{'s' if t > 1 else ''} asked: the worker ran {web.get('threads')}; cross-origin isolated: "
            f"page {yes.get(web.get('page'), '?')}, worker {yes.get(web.get('worker'), '?')}; SharedArrayBuffer: "
            f"{yes.get(web.get('sab'), '?')}."
        )
    return [
        "### Per photo: network and end to end",
        "",
        f"Median over {photos} development photos (every k-th of `../shared/data/imagenet-sample`), after 3 warm-up "
        "photos. Browser: `window.klaus.classify` (network = `session.run` in the worker; end to end = decode, "
        "resize, crop, network); native: `klaus.runtime.Classifier` with the same intra-op threads (network = "
        f"`session.run` on the same photo's tensor; end to end = `classify()` from the file). Target: network ≤ "
        f"{TARGETS['network_x']:.0f}× native.",
        "",
        table(
            [
                "threads",
                "browser network ms",
                "native network ms",
                "ratio",
                "≤ 4×",
                "browser end to end ms",
                "native end to end ms",
                "ratio",
                "reproduce",
            ],
            rows,
        ),
        "",
        "Under `klaus serve` (COOP/COEP on `/app/`): " + " ".join(notes),
        "",
        *(
            [
                "Where the browser's network time goes beyond native: the same graph, weights and threads, but ONNX "
                "Runtime Web runs its wasm build's kernels (128-bit SIMD, no fused multiply-add) where native ONNX "
                f"Runtime runs its MLAS kernels for this CPU ({_cpu_flags()}) on the NCHWc blocked layout; the next "
                "part measures each session choice and that layout.",
                "",
            ]
            if any(median(w["network"]) / median(n["network"]) > TARGETS["network_x"] for w, n in per_photo.values())
            else []
        ),
    ]


def offline_graphs() -> dict[str, dict[str, int]]:
    """Operators (domain:op -> count) of the graph native ONNX Runtime writes out at each optimization level
    (SessionOptions.optimized_model_filepath): what a container could carry if it shipped a pre-optimized graph."""
    import onnx
    import onnxruntime as ort

    levels = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    out = {}
    with tempfile.TemporaryDirectory(prefix="klaus-browser-bench-") as tmp:
        for name, level in levels.items():
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            options.optimized_model_filepath = str(Path(tmp) / f"{name}.onnx")
            options.log_severity_level = 3
            ort.InferenceSession(str(exported_fp32()), options, providers=["CPUExecutionProvider"])
            counts: dict[str, int] = {}
            for node in onnx.load(options.optimized_model_filepath).graph.node:
                key = f"{node.domain or 'ai.onnx'}:{node.op_type}"
                counts[key] = counts.get(key, 0) + 1
            out[name] = counts
    return out


def relaxed_madd_count(wasm: Path) -> int:
    """How often the wasm holds the bytes of f32x4.relaxed_madd (0xfd 0x85 0x02), relaxed SIMD's fused multiply-add."""
    return wasm.read_bytes().count(bytes([0xFD, 0x85, 0x02]))


def choices_section(result: dict) -> list[str]:
    cases, native = result["cases"], result["native"]
    lines = [
        "### The network: what each choice measures",
        "",
        browser_network.render(result),
        "",
    ]
    best = {}
    for t in THREADS:
        isolated = [c for c in cases.values() if c["threads"] == t and c["isolated"]]
        if isolated:
            best[t] = min(isolated, key=lambda c: c["network"])
    notes = []
    for t, c in best.items():
        x = c["network"] / native[f"all-t{t}"]
        notes.append(
            f"{t} thread{'s' if t > 1 else ''}: the fastest case is “{c['description']}” at {c['network']:.1f} ms, "
            f"{x:.2f}× native ({verdict(x <= TARGETS['network_x'])} against ≤ {TARGETS['network_x']:.0f}×) and "
            f"{c['network'] / native[f'extended-t{t}']:.2f}× native without its NCHWc layout"
        )
    for t in THREADS:
        gain = native[f"extended-t{t}"] / native[f"all-t{t}"]
        notes.append(
            f"native ONNX Runtime with {t} thread{'s' if t > 1 else ''} is {gain:.2f}× faster with its x86 NCHWc "
            f"layout ({native[f'all-t{t}']:.1f} ms) than without it ({native[f'extended-t{t}']:.1f} ms)"
        )
    if "iso-t1" in cases and "iso-t2" in cases:
        notes.append(
            f"with 2 threads the network takes {cases['iso-t2']['network'] / cases['iso-t1']['network']:.2f}× the "
            f"time it takes with 1 in the browser, {native['all-t2'] / native['all-t1']:.2f}× natively"
        )
    graphs = offline_graphs()
    shown = {name: ", ".join(f"{k} ×{v}" for k, v in sorted(ops.items())) for name, ops in graphs.items()}
    wasm = ROOT / "src" / "klaus" / "web" / "ondevice" / "ort-wasm-simd-threaded.wasm"
    dist = ROOT / "webapp" / "node_modules" / "onnxruntime-web" / "dist"
    builds = sorted(p.name for p in dist.glob("*.wasm")) if dist.is_dir() else []
    lines += [
        "What the figures say: " + "; ".join(notes) + ".",
        "",
        "A graph optimized offline by native ONNX Runtime (`optimized_model_filepath`) for the container to carry: "
        f"at ORT_ENABLE_BASIC it holds the exported graph's operators unchanged ({shown['basic']}), so it saves "
        f"nothing; at ORT_ENABLE_EXTENDED it holds {shown['extended']} — the fusions ONNX Runtime Web makes itself "
        "at load (its 'extended' and 'all' rows above), with Microsoft-domain operators the container's "
        f"standard-ONNX-only rule refuses; at ORT_ENABLE_ALL it holds {shown['all']}, x86 layout operators the wasm "
        "build does not have. The graph's optimization at load costs what the session creation column shows "
        "('all' against 'disabled').",
        "",
        f"ONNX Runtime Web {_ort_web_version()}'s wasm builds in its npm package: "
        f"{', '.join(f'`{b}`' for b in builds) or 'not installed here'}; the other three add WebGPU/JSEP, JSPI or "
        "asyncify around the same CPU kernels, and none is a relaxed-SIMD build (`env.wasm.simd = 'relaxed'` only "
        "checks that the browser could run one): the shipped wasm holds "
        f"{relaxed_madd_count(wasm)} `f32x4.relaxed_madd` instructions, so its convolutions multiply and add in "
        "separate 128-bit steps where native ONNX Runtime uses 256-bit AVX2 fused multiply-adds "
        f"({_cpu_flags()}).",
        "",
    ]
    return lines


def _ort_web_version() -> str:
    assets = json.loads((ROOT / "src" / "klaus" / "web" / "ondevice" / "assets.json").read_text(encoding="utf-8"))
    return str(assets["npm"]["onnxruntime-web"])


def _cpu_flags() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "flags unknown"
    wanted = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    return ", ".join(wanted) or "no AVX2"


def write_section(text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace BENCHMARKS.md's On the phone section (its heading up to the next '## ' heading) with ``text``."""
    old = path.read_text(encoding="utf-8")
    start = old.find(f"\n{HEADING}\n") + 1
    if start == 0:
        raise SystemExit(f"bench/browser.py: error: {path}: no '{HEADING}' section to replace")
    end = old.find("\n## ", start + len(HEADING))
    end = len(old) if end < 0 else end + 1
    path.write_text(old[:start] + text.rstrip() + "\n\n" + old[end:].lstrip("\n"), encoding="utf-8")


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(KEYS)}")
    parser.add_argument("--photos", type=int, default=PHOTOS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--write", action="store_true", help="also put the section into BENCHMARKS.md (all parts only)")
    args = parser.parse_args()
    if args.write and args.only:
        parser.error("--write rewrites the whole section: run it without --only")
    start, load = time.perf_counter(), os.getloadavg()[0]
    body = run(args.only.split(",") if args.only else None, photos=args.photos, rounds=args.rounds)
    text = (
        f"{body}\n\n_Section time: {time.perf_counter() - start:.0f} s; 1-minute load average {load:.1f} → "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores._"
    )
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote the '{HEADING}' section of {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    CACHE.mkdir(parents=True, exist_ok=True)
    main()
