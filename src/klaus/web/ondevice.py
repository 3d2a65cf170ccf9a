"""The on-device app: served at /app/ by `klaus serve`, written as a static folder by `klaus export --web`.

The browser downloads the app (built by ``webapp/build.mjs`` into ``klaus/web/ondevice/``, listed
with sizes and SHA-256 in its ``assets.json``), ONNX Runtime Web and the model as a web container
(:func:`klaus.webmodel.to_web_container`), decodes the model itself and classifies photos without
sending them anywhere. This module serves those files:

* only files listed in ``assets.json`` (no path from a request ever reaches the file system),
  with the MIME types browsers insist on (``application/wasm`` for streaming compilation,
  ``text/javascript`` for module scripts, ``application/manifest+json``);
* the precompressed ``.br`` / ``.gz`` twin when the request's ``Accept-Encoding`` takes it
  (``Vary: Accept-Encoding``), an ETag from the SHA-256 and ``Cache-Control: no-cache`` (the
  service worker keeps the offline copy; HTTP revalidates cheaply);
* ``Cross-Origin-Opener-Policy: same-origin`` + ``Cross-Origin-Embedder-Policy: require-corp``
  (and CORP) on every response, so the page is cross-origin isolated and wasm can use threads,
  and a Content-Security-Policy that allows wasm compilation but no inline or foreign script;
* ``model.klausweb`` converted from the ``.klaus`` file once per file content (SHA-256) and kept
  in memory; ``version.json`` naming the service worker's cache (app version + assets.json
  digest + model SHA-256) and the files it keeps.

:func:`export_web` writes the same files (plus a ``_headers`` file with the isolation headers
for static hosts that read one) into a folder; :func:`web_problem` is the check that a model's
operators and opset are ones ONNX Runtime Web runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import KlausError, KlausFormatError, KlausModelError, KlausWriteError, first_line
from ..names import shown

if TYPE_CHECKING:  # serving needs the 'web' extra; export_web does not
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import BaseRoute

ASSETS_DIR = Path(__file__).resolve().parent / "ondevice"
ASSETS_FORMAT = "klaus-ondevice-assets"
VERSION_FORMAT = "klaus-ondevice-version"
MODEL_FILE = "model.klausweb"
VERSION_FILE = "version.json"
# Precompressed twins, best first, by their Accept-Encoding token.
ENCODINGS = (("br", ".br"), ("gzip", ".gz"))
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".map": "application/json",
    ".klausweb": "application/octet-stream",
}
# Files the service worker does not keep: the listings, index.html (kept once, as "./"), the worker itself, and the
# large icons, which only the browser fetches when it installs the app (online).
NOT_CACHED = {
    "assets.json", "THIRD_PARTY_LICENSES.txt", "index.html", "sw.js",
    "icons/icon-512.png", "icons/icon-maskable-512.png", "icons/apple-touch-icon.png",
}  # fmt: skip
CSP = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; worker-src 'self'; connect-src 'self'; "
    "img-src 'self' blob: data:; style-src 'self'; manifest-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
}
APP_HEADERS = {
    **ISOLATION_HEADERS,
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_SAFE_PATH = re.compile(r"^(?!.*\.\.)[A-Za-z0-9_][A-Za-z0-9_.\-/]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

# ---------------------------------------------------------------- which models ONNX Runtime Web runs

# ONNX Runtime Web's wasm build carries ONNX Runtime's CPU kernels and its graph code. These are the ai.onnx
# operators with a CPU kernel at opset <= 21 (onnxruntime's get_all_opkernel_def(), provider CPUExecutionProvider,
# domain ''), the ai.onnx operators defined by a function body, which ONNX Runtime expands into kernels it has
# (HardSwish, Mish, GroupNormalization, ...), and Constant, which it folds into an initializer. Opsets 7..23 are the
# `.klaus` graph rule; a classifier at opset 21, 22 and 23 was run in chromium with the bundled ONNX Runtime Web.
WEB_MIN_OPSET = 7
WEB_MAX_OPSET = 23
_FUNCTION_OPERATORS = """AffineGrid Attention Bernoulli BlackmanWindow CastLike Celu CenterCropPad Clip DynamicQuantizeLinear
    Elu Gelu GreaterOrEqual GroupNormalization HammingWindow HannWindow HardSigmoid HardSwish LayerNormalization LeakyRelu
    LessOrEqual LogSoftmax MeanVarianceNormalization Mish PRelu RMSNormalization Range ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare Relu RotaryEmbedding Selu Shrink Softmax Softplus Softsign ThresholdedRelu"""
_OPERATOR_NAMES = """Abs Acos Acosh Add Affine AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor BlackmanWindow Cast Ceil Celu Clip Col2Im Compress Concat
    ConcatFromSequence Constant ConstantOfShape Conv ConvInteger ConvTranspose Cos Cosh Crop CumSum DFT DeformConv
    DepthToSpace DequantizeLinear Det Div Dropout DynamicQuantizeLinear DynamicSlice Einsum Elu Equal Erf Exp Expand
    EyeLike Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample HammingWindow HannWindow HardSigmoid Hardmax Identity If ImageScaler
    InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop
    LpNormalization LpPool MatMul MatMulInteger Max MaxPool MaxRoiPool MaxUnpool Mean MeanVarianceNormalization
    MelWeightMatrix Min Mod Mul Multinomial Neg NonMaxSuppression NonZero Not OneHot Optional OptionalGetElement
    OptionalHasElement Or PRelu Pad ParametricSoftplus Pow QLinearConv QLinearMatMul QuantizeLinear RNN RandomNormal
    RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
    ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare RegexFullMatch Relu Reshape Resize
    ReverseSequence RoiAlign Round STFT Scale ScaledTanh Scan Scatter ScatterElements ScatterND Selu SequenceAt
    SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength Shape Shrink Sigmoid Sign
    SimplifiedLayerNormalization Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split SplitToSequence Sqrt
    Squeeze StringConcat StringNormalizer StringSplit Sub Sum Tan Tanh TfIdfVectorizer ThresholdedRelu Tile TopK
    Transpose Trilu Unique Unsqueeze Upsample Where Xor"""
WEB_OPERATORS = frozenset(_OPERATOR_NAMES.split()) | frozenset(_FUNCTION_OPERATORS.split())


def web_problem(graph: bytes) -> str | None:
    """Why ONNX Runtime Web cannot run this ONNX graph (its opset or an operator), or None if it can."""
    import onnx

    try:
        model = onnx.load_from_string(graph)
    except Exception as exc:  # protobuf's DecodeError and friends
        return f"its graph is not valid ONNX ({first_line(exc)})"
    opset = None
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            opset = int(entry.version)
        else:
            return f"it uses the operator domain {entry.domain!r}, which ONNX Runtime Web does not run"
    if opset is None:
        return "its graph imports no ai.onnx opset"
    if not WEB_MIN_OPSET <= opset <= WEB_MAX_OPSET:
        return (
            f"its graph uses ONNX opset {opset}; the bundled ONNX Runtime Web runs opsets "
            f"{WEB_MIN_OPSET}-{WEB_MAX_OPSET} (re-export the model with an opset in that range)"
        )
    unknown = sorted({node.op_type for node in _nodes(model.graph) if node.op_type not in WEB_OPERATORS})
    if unknown:
        return f"ONNX Runtime Web has no kernel for its operator{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
    odd_domain = sorted({node.domain for node in _nodes(model.graph) if node.domain not in ("", "ai.onnx")})
    if odd_domain:
        return f"it uses the operator domain {odd_domain[0]!r}, which ONNX Runtime Web does not run"
    return None


def _nodes(graph) -> Iterable:
    """Every node, including those of subgraphs (If / Loop / Scan bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _nodes(sub)


def check_web_model(model_path: str | os.PathLike[str]) -> None:
    """KlausModelError (one line naming the file) if ONNX Runtime Web cannot run the model."""
    from ..format import read_model

    problem = web_problem(read_model(model_path).graph)
    if problem:
        raise KlausModelError(f"{shown(model_path)}: ONNX Runtime Web cannot run this model: {problem}")


# ---------------------------------------------------------------- the built assets


@dataclass(frozen=True)
class Asset:
    path: str  # relative to the assets folder, '/'-separated
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Assets:
    """The built app as ``assets.json`` lists it; every field checked before use."""

    root: Path
    files: dict[str, Asset]
    digest: str  # SHA-256 of assets.json itself

    @classmethod
    def load(cls, root: Path = ASSETS_DIR) -> Assets:
        listing = root / "assets.json"
        try:
            data = listing.read_bytes()
        except OSError:
            raise KlausFormatError(
                f"{shown(listing)}: the on-device app is not built (cd webapp && npm ci && node build.mjs)"
            ) from None
        try:
            doc = json.loads(data)
        except ValueError:
            raise KlausFormatError(f"{shown(listing)}: not valid JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != ASSETS_FORMAT or doc.get("version") != 1:
            raise KlausFormatError(f"{shown(listing)}: not a version-1 {ASSETS_FORMAT} listing")
        raw = doc.get("files")
        if not isinstance(raw, dict) or "index.html" not in raw:
            raise KlausFormatError(f"{shown(listing)}: 'files' must list index.html and the other assets")
        files = {}
        for path, info in raw.items():
            if not isinstance(path, str) or not _SAFE_PATH.match(path) or path in (MODEL_FILE, VERSION_FILE):
                raise KlausFormatError(f"{shown(listing)}: bad file name {path!r}")
            if (
                not isinstance(info, dict)
                or type(info.get("bytes")) is not int
                or info["bytes"] < 0
                or not isinstance(info.get("sha256"), str)
                or not _SHA256.match(info["sha256"])
            ):
                raise KlausFormatError(f"{shown(listing)}: {path}: needs 'bytes' and a hex 'sha256'")
            files[path] = Asset(path, info["bytes"], info["sha256"])
        return cls(root, files, hashlib.sha256(data).hexdigest())

    def app_files(self) -> list[str]:
        """What the service worker keeps: every asset the page loads (not the precompressed twins or NOT_CACHED)."""
        return sorted(p for p in self.files if not p.endswith((".br", ".gz")) and p not in NOT_CACHED)

    def file(self, path: str) -> Path:
        return self.root / path


def version_document(assets: Assets, model_sha256: str) -> dict[str, object]:
    """version.json: the service worker's cache name and the files it keeps for offline use."""
    cache = f"klaus-{__version__}-{assets.digest[:12]}-{model_sha256[:12]}"
    return {
        "format": VERSION_FORMAT,
        "version": 1,
        "app": __version__,
        "assets_sha256": assets.digest,
        "model_sha256": model_sha256,
        "cache": cache,
        "files": ["./", *assets.app_files(), MODEL_FILE],
    }


def version_bytes(assets: Assets, model_sha256: str) -> bytes:
    return (json.dumps(version_document(assets, model_sha256), indent=1, sort_keys=True) + "\n").encode()


# ---------------------------------------------------------------- the model container


@dataclass(frozen=True)
class WebModel:
    source_sha256: str  # of the .klaus file
    data: bytes  # the web container
    sha256: str  # of the container


class ModelCache:
    """The web container of one .klaus file, rebuilt only when the file's content changes.

    A changed size, mtime or inode makes it hash the file again; the container is rebuilt only if
    that SHA-256 differs from the one it was built from.
    """

    def __init__(self, model_path: str | os.PathLike[str] | None) -> None:
        from ..runtime import default_model_path

        self.path = Path(model_path) if model_path is not None else default_model_path()
        self._lock = threading.Lock()
        self._stat: tuple[int, int, int] | None = None
        self._model: WebModel | None = None

    def get(self) -> WebModel:
        with self._lock:
            try:
                st = self.path.stat()
            except OSError as exc:
                raise KlausModelError(f"{shown(self.path)}: cannot read the model ({exc.strerror or exc})") from None
            key = (st.st_size, st.st_mtime_ns, st.st_ino)
            if self._model is not None and key == self._stat:
                return self._model
            try:
                source = self.path.read_bytes()
            except OSError as exc:
                raise KlausModelError(f"{shown(self.path)}: cannot read the model ({exc.strerror or exc})") from None
            digest = hashlib.sha256(source).hexdigest()
            if self._model is None or self._model.source_sha256 != digest:
                self._model = _web_model(self.path, digest)
            self._stat = key
            return self._model


def _web_model(path: Path, source_sha256: str) -> WebModel:
    from ..webmodel import to_web_container

    data = to_web_container(path)
    return WebModel(source_sha256, data, hashlib.sha256(data).hexdigest())


# ---------------------------------------------------------------- serving


def accepted_encodings(header: str | None) -> set[str]:
    """The content codings an Accept-Encoding header takes (q > 0); ``*`` means any."""
    out = set()
    for part in (header or "").split(","):
        name, _, params = part.strip().partition(";")
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if name and q > 0:
            out.add(name.strip().lower())
    return out


def media_type(path: str) -> str:
    return MEDIA_TYPES.get(os.path.splitext(path)[1].lower(), "application/octet-stream")


def _not_modified(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match", "")
    return any(tag.strip() in (etag, f"W/{etag}", "*") for tag in header.split(","))


class OnDeviceApp:
    """The /app/ endpoints over one assets folder and one model."""

    def __init__(self, model_path: str | os.PathLike[str] | None, assets_dir: Path = ASSETS_DIR) -> None:
        self.assets_dir = assets_dir
        self.models = ModelCache(model_path)
        self._assets: Assets | None = None

    def assets(self) -> Assets:
        if self._assets is None:
            self._assets = Assets.load(self.assets_dir)
        return self._assets

    @staticmethod
    def _respond(response: Response) -> Response:
        """The response with the app's isolation and security headers."""
        for name, value in APP_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    def _error(self, status: int, message: str) -> Response:
        from starlette.responses import Response

        return self._respond(Response(message + "\n", status_code=status, media_type="text/plain; charset=utf-8"))

    async def asset(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self._asset, request, request.path_params.get("path", "") or "index.html")

    def _asset(self, request: Request, path: str) -> Response:
        from starlette.responses import FileResponse, Response

        try:
            assets = self.assets()
        except KlausError as exc:
            return self._error(503, str(exc))
        asset = assets.files.get(path)
        if asset is None or path.endswith((".br", ".gz")):
            return self._error(404, "not part of the on-device app")
        chosen, coding = asset, None
        codings = accepted_encodings(request.headers.get("accept-encoding"))
        for token, suffix in ENCODINGS:
            twin = assets.files.get(path + suffix)
            if twin is not None and (token in codings or "*" in codings):
                chosen, coding = twin, token
                break
        etag = f'"{chosen.sha256[:32]}"'
        headers = {"Cache-Control": "no-cache", "ETag": etag, "Vary": "Accept-Encoding"}
        if coding:
            headers["Content-Encoding"] = coding
        if _not_modified(request, etag):
            return self._respond(Response(status_code=304, headers=headers))
        file = assets.file(chosen.path)
        if not file.is_file():
            return self._error(503, f"{shown(file)}: missing from the built app (rebuild it)")
        return self._respond(FileResponse(file, media_type=media_type(path), headers=headers))

    async def model(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import Response

        try:
            model = await run_in_threadpool(self.models.get)
        except KlausError as exc:
            return self._error(503, f"the model cannot be converted for the browser: {shown(first_line(exc))}")
        etag = f'"{model.sha256[:32]}"'
        headers = {"Cache-Control": "no-cache", "ETag": etag}
        if _not_modified(request, etag):
            return self._respond(Response(status_code=304, headers=headers))
        body = b"" if request.method == "HEAD" else model.data
        response = Response(body, media_type=media_type(MODEL_FILE), headers=headers)
        if request.method == "HEAD":
            response.headers["Content-Length"] = str(len(model.data))
        return self._respond(response)

    async def version(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool
        from starlette.responses import Response

        try:
            assets = await run_in_threadpool(self.assets)
            model = await run_in_threadpool(self.models.get)
        except KlausError as exc:
            return self._error(503, shown(first_line(exc)))
        return self._respond(
            Response(
                version_bytes(assets, model.sha256),
                media_type="application/json",
                headers={"Cache-Control": "no-store"},
            )
        )


def routes(model_path: str | os.PathLike[str] | None = None, *, assets_dir: Path = ASSETS_DIR) -> list[BaseRoute]:
    """The on-device app's routes for a Starlette app: /app/ and everything below it."""
    from starlette.responses import RedirectResponse
    from starlette.routing import Mount, Route

    app = OnDeviceApp(model_path, assets_dir)

    async def to_slash(request: Request) -> Response:
        return OnDeviceApp._respond(RedirectResponse("/app/", status_code=308))

    return [
        Route("/app", to_slash, methods=["GET", "HEAD"]),
        Mount(
            "/app",
            routes=[
                Route(f"/{MODEL_FILE}", app.model, methods=["GET", "HEAD"]),
                Route(f"/{VERSION_FILE}", app.version, methods=["GET", "HEAD"]),
                Route("/{path:path}", app.asset, methods=["GET", "HEAD"]),
            ],
        ),
    ]


# ---------------------------------------------------------------- a static folder


@dataclass(frozen=True)
class WebExport:
    path: str
    files: int
    bytes: int
    model_bytes: int
    model_sha256: str


HEADERS_FILE = "_headers"


def headers_file() -> bytes:
    """A ``_headers`` file (the format several static hosts read) asking for cross-origin isolation."""
    lines = ["/*", *(f"  {k}: {v}" for k, v in APP_HEADERS.items())]
    return ("\n".join(lines) + "\n").encode()


def export_web(
    model_path: str | os.PathLike[str] | None, out_dir: str | os.PathLike[str], *, assets_dir: Path = ASSETS_DIR
) -> WebExport:
    """Write the on-device app for ``model_path`` into ``out_dir``, a folder any static host can serve.

    The model is checked first (KlausModelError if ONNX Runtime Web cannot run it). ``out_dir`` must
    be absent, empty, or an earlier export (it has our version.json); it is replaced as a whole
    (written beside it, then renamed), so a failure leaves the old folder as it was.
    """
    models = ModelCache(model_path)
    check_web_model(models.path)
    assets = Assets.load(assets_dir)
    model = models.get()
    out = Path(out_dir)
    _check_target(out)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as exc:
        raise KlausWriteError(f"{shown(out)}: cannot write here ({exc.strerror or exc})") from None
    total = 0
    try:
        for path, asset in sorted(assets.files.items()):
            data = assets.file(path).read_bytes()
            if len(data) != asset.bytes or hashlib.sha256(data).hexdigest() != asset.sha256:
                raise KlausFormatError(f"{shown(assets.file(path))}: differs from assets.json (rebuild or reinstall)")
            total += _write(staging / path, data)
        total += _write(staging / MODEL_FILE, model.data)
        total += _write(staging / VERSION_FILE, version_bytes(assets, model.sha256))
        total += _write(staging / HEADERS_FILE, headers_file())
        _set_folder_modes(staging)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=parent))
            os.replace(out, old / "previous")
        os.replace(staging, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise KlausWriteError(f"{shown(out)}: cannot write the app ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return WebExport(str(out), len(assets.files) + 3, total, len(model.data), model.sha256)


def _check_target(out: Path) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise KlausWriteError(f"{shown(out)}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        try:
            doc = json.loads((out / VERSION_FILE).read_bytes())
            ours = isinstance(doc, dict) and doc.get("format") == VERSION_FORMAT
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise KlausWriteError(f"{shown(out)}: not empty and not an earlier 'klaus export --web' folder")


def _write(path: Path, data: bytes) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


def _set_folder_modes(root: Path) -> None:
    """mkdtemp makes a 0700 folder; the export should be readable as any folder the user makes."""
    from ..format import current_umask

    os.chmod(root, 0o777 & ~current_umask())
