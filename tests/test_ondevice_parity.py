"""The model in the browser matches the Python runtime: weights, network, end to end, and tampering refused.

The shipped assets (src/klaus/web/ondevice/, built by webapp/build.mjs) and a web container of the embedded
model are served by a small HTTP server in this process, with the COOP/COEP headers that make the page
cross-origin isolated (wasm threads); a page that imports klaus.js is driven in Debian's chromium through
Playwright. Without chromium (or the development photos) the browser tests skip; under CI they fail instead.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import shutil
import struct
import subprocess
import threading
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import EXAMPLES, IMAGENET_SAMPLE, ROOT, TINY_RECIPE, tiny_klaus
from klaus.format import read_model
from klaus.preprocess import prepare
from klaus.runtime import Classifier, default_model_path
from klaus.webmodel import to_web_container

ASSETS = ROOT / "src" / "klaus" / "web" / "ondevice"
LOCK = ROOT / "webapp" / "package-lock.json"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PAGE = b"""<!doctype html><meta charset="utf-8"><title>parity</title>
<script type="module">import * as klaus from './klaus.js'; window.api = klaus; window.apiReady = true;</script>"""
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
}
# Page-side helpers: fetch a served file as a Blob or a Float32Array.
FETCH = "async (path) => await (await fetch(path)).blob()"


# ------------------------------------------------------------------------------------------------ shipped assets


def test_assets_json_lists_every_shipped_file_with_its_bytes_and_digest():
    manifest = json.loads((ASSETS / "assets.json").read_text())
    on_disk = {p.relative_to(ASSETS).as_posix() for p in ASSETS.rglob("*") if p.is_file()} - {"assets.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (ASSETS / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"]), name


def test_assets_json_versions_are_the_lock_files():
    manifest = json.loads((ASSETS / "assets.json").read_text())
    lock = json.loads(LOCK.read_text())["packages"]
    locked = {path.rsplit("node_modules/", 1)[1]: info["version"] for path, info in lock.items() if path}
    assert manifest["npm"], "no npm versions listed"
    for name, version in manifest["npm"].items():
        assert locked[name] == version, name
    assert (
        manifest["npm"]["onnxruntime-web"]
        == json.loads((ROOT / "webapp" / "package.json").read_text())["dependencies"]["onnxruntime-web"]
    )


def test_only_the_one_onnx_runtime_variant_ships_with_precompressed_copies():
    wasm = sorted(p.name for p in ASSETS.glob("ort-*") if not p.name.endswith((".br", ".gz")))
    assert wasm == ["ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm"]
    for path in [*ASSETS.glob("*.js"), *ASSETS.glob("*.wasm"), *ASSETS.glob("*.mjs")]:
        data = path.read_bytes()
        assert gzip.decompress((path.parent / (path.name + ".gz")).read_bytes()) == data, path.name
        assert (path.parent / (path.name + ".br")).stat().st_size < len(data), path.name
    assert "onnxruntime-web" in (ASSETS / "THIRD_PARTY_LICENSES.txt").read_text()


def test_resizing_is_bit_identical_to_pillow(tmp_path):
    """preprocess.js (run by node, which has no canvas: the RGB comes from Python) against klaus.preprocess."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not found; the browser tests below cover preprocess.js end to end")
    from PIL import Image

    from klaus.preprocess import Preprocess, to_tensor

    rng = np.random.default_rng(7)
    cases, blobs = [], bytearray()
    filters = ["bicubic", "bilinear", "nearest", "box", "lanczos", "hamming"]
    for i in range(36):
        w, h = (int(rng.integers(20, 700)) for _ in range(2))
        if i % 6 == 5:
            w, h = int(rng.integers(40, 150)), int(rng.integers(500, 1200))  # tall: Pillow 13 resamples columns first
        spec = Preprocess(
            input_size=int(rng.choice([224, 32, 17])),
            crop_ratio=float(rng.choice([0.875, 1.0, 0.6])),
            interpolation=filters[i % len(filters)],
            resize="stretch" if i % 4 == 3 else "shorter",
            channel_order="BGR" if i % 5 == 4 else "RGB",
            layout="NHWC" if i % 7 == 6 else "NCHW",
        )
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        crops = 10 if i % 3 == 0 else 1
        tensor = to_tensor(Image.fromarray(pixels), spec, crops)
        cases.append(
            {
                "w": w,
                "h": h,
                "at": len(blobs),
                "spec": spec.to_dict(),
                "crops": crops,
                "sha": hashlib.sha256(tensor.tobytes()).hexdigest(),
            }
        )
        blobs += pixels.tobytes()
    (tmp_path / "pixels.bin").write_bytes(bytes(blobs))
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    script = tmp_path / "check.mjs"
    script.write_text(
        f"""import {{ readFileSync }} from 'node:fs';
import {{ createHash }} from 'node:crypto';
import {{ toTensor }} from {json.dumps((ROOT / "webapp" / "src" / "preprocess.js").as_uri())};
const pixels = new Uint8Array(readFileSync({json.dumps(str(tmp_path / "pixels.bin"))}));
const cases = JSON.parse(readFileSync({json.dumps(str(tmp_path / "cases.json"))}, 'utf8'));
const out = cases.map((c) => {{
  const img = {{ width: c.w, height: c.h, data: pixels.subarray(c.at, c.at + c.w * c.h * 3) }};
  const t = toTensor(img, c.spec, c.crops);
  return createHash('sha256').update(new Uint8Array(t.data.buffer)).digest('hex');
}});
console.log(JSON.stringify(out));
"""
    )
    result = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=300, check=True)
    digests = json.loads(result.stdout)
    different = [
        (c["w"], c["h"], c["spec"]["interpolation"], c["crops"])
        for c, d in zip(cases, digests, strict=True)
        if d != c["sha"]
    ]
    assert not different


# ------------------------------------------------------------------------------------------------ browser harness


def find_chromium() -> str | None:
    candidates = [
        os.environ.get("KLAUS_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def require(thing: str, ok: bool) -> None:
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{thing} is missing in CI (.ci/run installs it)")
        pytest.skip(f"{thing} not found; install Debian's chromium (apt-get install chromium) to run this test")


class Site:
    """The built assets plus in-memory files (the model container, photos, tensors), over HTTP on 127.0.0.1.

    Every response carries COOP/COEP (a cross-origin isolated page, as `klaus serve` sends for /app/), except
    under /plain/, which serves the same files without them.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {"/parity.html": PAGE}
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
                self.send_header("Cache-Control", "no-store")
                if isolated:
                    self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                    self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def container() -> bytes:
    return to_web_container(default_model_path())


@pytest.fixture(scope="module")
def site(container) -> Iterator[Site]:
    served = Site()
    served.files["/model.klausweb"] = container
    yield served
    served.close()


@pytest.fixture(scope="module")
def browser(site):
    path = find_chromium()
    require("a chromium binary", path is not None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require("the playwright Python package", False)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def open_page(browser, site: Site, prefix: str = ""):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{site.url}{prefix}/parity.html")
    page.wait_for_function("window.apiReady === true", timeout=30_000)
    page.errors = errors
    return page


@pytest.fixture(scope="module")
def page(browser, site):
    """An isolated page with the embedded model loaded on 2 threads as ``window.model``."""
    opened = open_page(browser, site)
    opened.evaluate("async () => { window.model = await api.load('./model.klausweb', {threads: 2}); }")
    yield opened
    assert not opened.errors, opened.errors
    opened.close()


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    if not IMAGENET_SAMPLE.is_dir():
        pytest.skip(f"development photos not present ({IMAGENET_SAMPLE}); CI has them")
    return sorted(IMAGENET_SAMPLE.glob("*.JPEG"))[1::20][:50]  # 50 classes spread over the sample


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(threads=1)


# ------------------------------------------------------------------------------------------------ parity


def test_the_model_loads_with_its_labels_and_threads(page, container):
    info = page.evaluate(
        "() => ({name: model.name, classes: model.classes, sha256: model.sha256, threads: model.threads,"
        " isolated: model.crossOriginIsolated, decodeMs: model.decodeMs, sessionMs: model.sessionMs,"
        " hierarchy: model.labels[1].hierarchy, preprocess: model.preprocess})"
    )
    model = read_model(default_model_path())
    assert info["name"] == model.name and info["classes"] == len(model.labels)
    assert info["sha256"] == hashlib.sha256(container).hexdigest()
    assert (info["threads"], info["isolated"]) == (2, True)
    assert info["hierarchy"] == list(model.labels[1].hierarchy)
    assert info["preprocess"] == model.preprocess.to_dict()
    assert info["decodeMs"] > 0 and info["sessionMs"] > 0


def test_without_isolation_the_model_runs_on_one_thread(browser, site):
    plain = open_page(browser, site, "/plain")
    try:
        info = plain.evaluate(
            "async () => { const m = await api.load('./model.klausweb', {threads: 2}); m.close();"
            " return {threads: m.threads, isolated: crossOriginIsolated}; }"
        )
    finally:
        plain.close()
    assert info == {"threads": 1, "isolated": False}


def test_every_decoded_tensor_is_bit_identical_to_pythons(page):
    weights = read_model(default_model_path()).decoded_weights()
    expected = {
        name: hashlib.sha256(np.ascontiguousarray(a, "<f4").tobytes()).hexdigest() for name, a in weights.items()
    }
    assert page.evaluate("async () => await api.weightDigests(model)") == expected


def test_same_input_tensor_same_probabilities(page, site, photos, classifier):
    spec = classifier.preprocess
    batch = np.concatenate([prepare(str(p), spec) for p in photos[:20]])
    site.files["/tensors.bin"] = batch.astype("<f4").tobytes()
    probs = page.evaluate(
        """async (dims) => {
            const data = new Float32Array(await (await fetch('./tensors.bin')).arrayBuffer());
            return Array.from(await api.runTensor(model, data, dims));
        }""",
        list(batch.shape),
    )
    browser_probs = np.asarray(probs, np.float32).reshape(len(batch), -1)
    python_probs = classifier.run(batch)
    assert browser_probs.shape == python_probs.shape
    assert float(np.abs(browser_probs - python_probs).max()) <= 1e-4


SMALL_RECIPES = {
    "4/6-bit palettes, per tensor": TINY_RECIPE,
    "1/2/3-bit palettes, per channel, raw fp32": replace(
        TINY_RECIPE, fc_bits=1, conv_bits=2, depthwise_bits=3, granularity="channel", float_codec="raw-f32"
    ),
}


@pytest.mark.parametrize("recipe", sorted(SMALL_RECIPES))
def test_other_models_decode_and_run_like_python(page, site, recipe):
    """Packed 1/2/4-bit index maps, palettes without scales, raw fp32: the paths the embedded model does not take."""
    model = tiny_klaus(SMALL_RECIPES[recipe])
    site.files["/small.klausweb"] = to_web_container(model)
    expected = {
        n: hashlib.sha256(np.ascontiguousarray(a, "<f4").tobytes()).hexdigest()
        for n, a in model.decoded_weights().items()
    }
    x = np.random.default_rng(3).standard_normal((4, 3, 32, 32)).astype(np.float32)
    site.files["/small.bin"] = x.tobytes()
    digests, probs = page.evaluate(
        """async (dims) => {
            const m = await api.load('./small.klausweb', {threads: 1});
            const data = new Float32Array(await (await fetch('./small.bin')).arrayBuffer());
            const out = [await api.weightDigests(m), Array.from(await api.runTensor(m, data, dims))];
            m.close();
            return out;
        }""",
        list(x.shape),
    )
    assert digests == expected
    python = Classifier(model, threads=1).run(x)
    assert float(np.abs(np.asarray(probs, np.float32).reshape(python.shape) - python).max()) <= 1e-4


def classify_in_page(page, site, photo: Path, crops: int = 1) -> dict:
    site.files[f"/photos/{photo.name}"] = photo.read_bytes()
    return page.evaluate(
        f"async (path) => {{ const b = await ({FETCH})(path); return await api.classify(model, new File([b], {json.dumps(photo.name)}), {{top: 5, crops: {crops}}}); }}",
        f"./photos/{photo.name}",
    )


def test_end_to_end_from_jpeg_files_agrees_with_klaus_classify(page, site, photos, classifier):
    same_top1 = shared = 0
    for photo in photos:
        result = classify_in_page(page, site, photo)
        ours = [p["index"] for p in result["predictions"]]
        python = [p.index for p in classifier.classify(str(photo), top=5).predictions]
        same_top1 += ours[0] == python[0]
        shared += len(set(ours) & set(python))
        assert result["network_ms"] > 0 and result["elapsed_ms"] >= result["network_ms"]
    assert same_top1 >= 0.95 * len(photos)
    assert shared / len(photos) >= 4


def test_predictions_have_the_cli_json_shape(page, site, photos, classifier):
    result = classify_in_page(page, site, photos[0])
    python = classifier.classify(str(photos[0]), top=5).to_dict()
    assert [sorted(p) for p in result["predictions"]] == [sorted(p) for p in python["predictions"]]
    first, expected = result["predictions"][0], python["predictions"][0]
    assert (first["rank"], first["wnid"], first["label"], first["hierarchy"]) == (
        1,
        expected["wnid"],
        expected["label"],
        expected["hierarchy"],
    )


def test_ten_crops_agree_with_klaus_classify(page, site, photos, classifier):
    chosen = photos[::5]
    same = 0
    for photo in chosen:
        ours = classify_in_page(page, site, photo, crops=10)["predictions"][0]["index"]
        same += ours == classifier.classify(str(photo), top=1, crops=10).predictions[0].index
    assert same >= 0.9 * len(chosen)


def large_jpegs(tmp: Path) -> list[Path]:
    """Photos Python decodes at reduced size (draft): 1/2 and 1/8 scale, one with an EXIF rotation."""
    from PIL import Image

    cat = Image.open(EXAMPLES / "cat.jpg").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    out = []
    cases: list[tuple[str, tuple[int, int], dict[str, Any]]] = [
        ("rotated.jpg", (1600, 1200), {"exif": exif.tobytes()}),
        ("huge.jpg", (12000, 12000), {}),
    ]
    for name, size, extra in cases:
        path = tmp / name
        cat.resize(size, Image.Resampling.BILINEAR).save(path, quality=85, **extra)
        out.append(path)
    return out


def test_large_photos_are_decoded_at_reduced_size_as_python_does(page, site, classifier, tmp_path):
    """ImageDecoder's scaled JPEG decode gives Pillow's draft pixels, so the probabilities agree as for the same
    tensor; the 12000 x 12000 photo is never decoded at full size (about 30 MB instead of 600)."""
    for photo in large_jpegs(tmp_path):
        ours = classify_in_page(page, site, photo)["predictions"]
        python = classifier.classify(str(photo), top=5).predictions
        assert [p["index"] for p in ours] == [p.index for p in python], photo.name
        assert max(abs(p["probability"] - q.probability) for p, q in zip(ours, python, strict=True)) <= 1e-4, photo.name


# ------------------------------------------------------------------------------------------------ tampering


def header_of(blob: bytes) -> tuple[dict, int]:
    (length,) = struct.unpack_from("<I", blob, 12)
    return json.loads(blob[16 : 16 + length]), 16 + length


def with_header(blob: bytes, header: dict) -> bytes:
    _, start = header_of(blob)
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return blob[:12] + struct.pack("<I", len(text)) + text + blob[start:]


def flip_png_byte(blob: bytes) -> bytes:
    header, start = header_of(blob)
    entry = next(t for t in header["tensors"] if t["codec"] == "palette-png")
    offset, length = entry["payload"]
    data = bytearray(blob)
    data[start + offset + length // 2] ^= 0x01
    return bytes(data)


def flip_png_byte_and_fix_digest(blob: bytes) -> bytes:
    """A tensor row whose sha256 matches its tampered payload: the PNG's own CRC must catch it."""
    tampered = flip_png_byte(blob)
    header, start = header_of(tampered)
    entry = next(t for t in header["tensors"] if t["codec"] == "palette-png")
    parts = [entry[k] for k in ("payload", "palette", "scales") if entry[k] is not None]
    entry["sha256"] = hashlib.sha256(b"".join(tampered[start + o : start + o + n] for o, n in parts)).hexdigest()
    return with_header(tampered, header)


def fake_idat(blob: bytes) -> bytes:
    """A valid PNG (CRCs right, digest right) whose image data inflates to more than its scanlines."""
    header, start = header_of(blob)
    index = next(i for i, t in enumerate(header["tensors"]) if t["codec"] == "palette-png")
    entry = header["tensors"][index]
    offset, length = entry["payload"]
    png = blob[start + offset : start + offset + length]
    width, height = struct.unpack(">II", png[16:24])
    body = zlib.compress(b"\x00" * (height * (1 + width) + 1000))
    idat = struct.pack(">I", len(body)) + b"IDAT" + body + struct.pack(">I", zlib.crc32(b"IDAT" + body))
    new_png = png[:33] + idat + png[-12:]
    data = blob[:start] + blob[start : start + offset] + new_png + blob[start + offset + length :]
    shift = len(new_png) - length
    for t in header["tensors"]:
        for key in ("payload", "palette", "scales"):
            if t[key] is not None and t[key][0] > offset:
                t[key][0] += shift
    entry["payload"] = [offset, len(new_png)]
    parts = [entry[k] for k in ("payload", "palette", "scales") if entry[k] is not None]
    entry["sha256"] = hashlib.sha256(b"".join(data[start + o : start + o + n] for o, n in parts)).hexdigest()
    return with_header(data, header)


def spaced_header(blob: bytes) -> bytes:
    header, start = header_of(blob)
    text = json.dumps(header, sort_keys=True, ensure_ascii=False).encode()  # ", " and ": " separators
    return blob[:12] + struct.pack("<I", len(text)) + text + blob[start:]


def meta_edited(blob: bytes) -> bytes:
    header, _ = header_of(blob)
    header["meta"] = [[k, "someone else" if k == "creator" else v] for k, v in header["meta"]]
    return with_header(blob, header)


def blob_moved(blob: bytes) -> bytes:
    header, _ = header_of(blob)
    header["tensors"][3]["payload"][0] += 1
    return with_header(blob, header)


def tensor_renamed(blob: bytes) -> bytes:
    header, _ = header_of(blob)
    header["tensors"][0]["name"] += "x"
    return with_header(blob, header)


def gzip_mtime_set(blob: bytes) -> bytes:
    header, start = header_of(blob)
    data = bytearray(blob)
    data[start + header["graph"]["offset"] + 4] = 1
    return bytes(data)


TAMPERED = {
    "png byte": (flip_png_byte, "checksum mismatch"),
    "png byte, digest fixed": (flip_png_byte_and_fix_digest, "fails its CRC"),
    "oversized image data": (fake_idat, "scanline"),
    "bad magic": (lambda b: b"KLAUSWEX" + b[8:], "bad magic"),
    "unknown version": (lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "version 2"),
    "header longer than the file": (lambda b: b[:12] + struct.pack("<I", len(b)) + b[16:], "header length"),
    "non-canonical header": (spaced_header, "canonical"),
    "meta edited": (meta_edited, "checksum mismatch"),
    "blob moved": (blob_moved, "blob"),
    "truncated": (lambda b: b[: len(b) - 1000], "past the end"),
    "tensor renamed": (tensor_renamed, "not an input of any node"),
    "graph gzip header changed": (gzip_mtime_set, "plain gzip member"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_container_is_refused_in_one_line(page, site, container, case):
    tamper, problem = TAMPERED[case]
    site.files["/tampered.klausweb"] = tamper(container)
    message = page.evaluate(
        "async () => { try { (await api.load('./tampered.klausweb')).close(); return 'loaded'; } catch (e) { return e.message; } }"
    )
    assert message.startswith("tampered.klausweb: "), message
    assert "\n" not in message
    assert problem in message, message
