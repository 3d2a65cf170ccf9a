"""Opening and decoding images safely: a file, bytes or a stream -> an upright 8-bit RGB image.

Loading is defensive because the input is whatever a user points the CLI at:
every failure becomes a one-line :class:`KlausImageError`, oversized images are
rejected from their header before any pixel is decoded, and large JPEGs are
decoded at reduced size (DCT scaling) when the caller says how small the image
will end up anyway.

Every image Klaus opens — `klaus classify`, `index`, `serve` (thumbnails and
uploads), calibration and evaluation photos — goes through :func:`load_image` or,
for its header only, :func:`open_image`: one pixel limit (:func:`pixel_limit`,
``$KLAUS_MAX_PIXELS``), Pillow's warnings silenced, devices refused, pipes read
without blocking, file names escaped in messages, and decoding memory bounded by
the decoded image plus one band. Turning the image into a model's input tensor
is :mod:`klaus.preprocess`.

No global Pillow state is changed.  Pillow's own decompression-bomb guard
(``2 * PIL.Image.MAX_IMAGE_PIXELS``, i.e. :data:`DEFAULT_MAX_PIXELS` unless
someone changed it) still runs inside ``Image.open`` as a backstop, so a
``max_pixels`` above it only takes effect if ``Image.MAX_IMAGE_PIXELS`` is
raised too; its error becomes our one-line message.
``ImageFile.LOAD_TRUNCATED_IMAGES`` is left alone.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import select
import stat
import struct
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import IO, TYPE_CHECKING

import numpy as np

from klaus.errors import KlausError, KlausImageError
from klaus.names import shown

if TYPE_CHECKING:
    from PIL import Image

# Pillow is imported where an image is first opened, not with this module: a `.klaus` model's session
# builds on its own thread meanwhile (klaus.runtime), so Pillow's import is taken off the start's path.

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "MAX_RESIZED_PIXELS",
    "Source",
    "decode_bytes",
    "load_image",
    "open_image",
    "pillow_quiet",
    "pixel_limit",
    "to_rgb",
]

#: Pillow's hard decompression-bomb threshold with its default settings
#: (2 * 89_478_485 px, about 13400 x 13400).  Hard-coded rather than read from
#: ``Image.MAX_IMAGE_PIXELS`` so that our limit holds even if that is ``None``.
DEFAULT_MAX_PIXELS = 178_956_970

#: File name suffixes of the images a folder of photos is searched for (calibration, evaluation).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

#: Most bytes read into memory from a source that cannot seek (a pipe, ``/dev/stdin``,
#: a socket): the same limit as the photo indexer's ``MAX_FILE_BYTES``.
MAX_STREAM_BYTES = 1 << 30

#: Environment variable that lowers the pixel limit (:func:`pixel_limit`).
MAX_PIXELS_ENV = "KLAUS_MAX_PIXELS"

#: Seconds a pipe's writer may send nothing before reading the pipe is given up.
STREAM_IDLE_SECONDS = 10.0

#: Largest image (16 Mpx, ~48 MB as RGB) resized whole: above it :func:`load_image` reduces a
#: decoded image when given a ``target``, and :func:`klaus.preprocess.to_tensor` resamples windows.
MAX_RESIZED_PIXELS = 4096 * 4096

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]


# What Pillow raises for unreadable data (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError)
_EXIF_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError)
_DRAFT_FORMATS = ("JPEG", "MPO")
_SIXTEEN_BIT = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
_WHITE = (255, 255, 255, 255)
_ORIENTATION = 0x0112
# EXIF orientation -> the transposition that displays the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}  # names of Image.Transpose members
# Decoded images above this many pixels are converted to RGB one band of about this many
# pixels at a time (see _banded_rgb).
_BAND_PIXELS = 1 << 22
# A decoded image above MAX_RESIZED_PIXELS is reduced by an integer factor that keeps its
# shorter side at least this many times the caller's target (Pillow's "reducing gap": from 3
# on, resizing the reduced image is indistinguishable from resizing the whole one in most cases).
_REDUCING_GAP = 3
_FILE_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def pixel_limit() -> int:
    """The pixel limit (width x height) every image Klaus opens is held to.

    ``$KLAUS_MAX_PIXELS`` if set: a whole number from 1 to :data:`DEFAULT_MAX_PIXELS`
    (Pillow's own hard limit, which Klaus does not lift), else :data:`DEFAULT_MAX_PIXELS`.
    An environment variable, so that one setting reaches `klaus classify`, `index` and
    `serve` (and their worker threads and processes) alike; a value that is not such a
    number is a one-line :class:`KlausError`.
    """
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= DEFAULT_MAX_PIXELS:
        raise KlausError(
            f"{MAX_PIXELS_ENV}={shown(text)}: expected a whole number of pixels from 1 to {DEFAULT_MAX_PIXELS}"
        )
    return value


def load_image(
    source: Source,
    *,
    target: int | None = None,
    max_pixels: int | None = None,
) -> Image.Image:
    """Decode ``source`` (path, bytes or binary file) into an upright 8-bit RGB image.

    ``target`` promises the caller will downscale until the shorter side is
    ``target``: JPEGs may then be decoded at 1/2, 1/4 or 1/8 scale, never
    below ``target`` on either side, and an image that decodes to more than
    16 Mpx is reduced by an integer factor (box average) that keeps its shorter
    side at least three times ``target``. Only the first frame of animations is
    used. Transparent pixels are composited over white. ``max_pixels`` defaults
    to :func:`pixel_limit`.

    Memory: the decoded image (at most 4 bytes a pixel, so 716 MB at the default
    limit) plus one band of a few Mpx: large images are converted and reduced a
    band at a time (:func:`_banded_rgb`), and the EXIF rotation is applied last.
    """
    if target is not None and target < 1:
        raise ValueError(f"target must be >= 1, got {target}")
    with _opened(source, max_pixels) as (img, label, limit):
        return _decode(img, label, target, limit)


@contextmanager
def open_image(source: Source, *, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """``source`` opened with Pillow but not decoded, for reading its header (size, format, EXIF).

    The same opening as :func:`load_image`: the pixel limit is checked, Pillow's warnings are
    silenced, and any failure within the block is a one-line :class:`KlausImageError`.
    """
    with _opened(source, max_pixels) as (img, _label, _limit):
        yield img


@contextmanager
def _opened(source: Source, max_pixels: int | None) -> Iterator[tuple[Image.Image, str, int]]:
    from PIL import Image

    limit = pixel_limit() if max_pixels is None else max_pixels
    if limit < 1:
        raise ValueError(f"max_pixels must be >= 1, got {limit}")
    _quiet_libtiff()
    with ExitStack() as stack:
        fp, label = _open_source(source, stack)
        try:
            with pillow_quiet(), Image.open(fp) as img:
                _check_pixels(img.size, label, limit)
                yield img, label, limit
        except Image.DecompressionBombError as exc:
            raise KlausImageError(_bomb_message(label, exc, limit)) from exc
        except MemoryError:
            raise KlausImageError(f"{label}: not enough memory to decode it") from None
        except _DECODE_ERRORS as exc:
            raise KlausImageError(f"{label}: {_describe(exc)}") from exc


@contextmanager
def pillow_quiet() -> Iterator[None]:
    """Silence Pillow's warnings while it works on one image: they would print stray lines.

    Our own pixel limit is authoritative over Pillow's bomb warning (``DecompressionBombWarning``
    from 89 Mpx), and a corrupt EXIF block ("Corrupt EXIF data") is already tolerated
    (:func:`_orientation`). Other modules that hand Pillow an image use it too.
    """
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


@functools.cache
def _quiet_libtiff() -> None:
    """libtiff prints its decoding errors ("JPEGLib: Invalid component ID 66 in SOS.") straight to
    the process's stderr, where Pillow installs no handler of its own; Pillow then raises its own
    error, which becomes our one line. Clear libtiff's global error handler, once, in the copy of
    libtiff this process has loaded (found in /proc/self/maps; elsewhere nothing is done)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "libtiff" in line}
    except OSError:
        return
    import ctypes

    for path in sorted(p for p in paths if os.path.basename(p).startswith("libtiff")):
        try:
            library = ctypes.CDLL(path)
            library.TIFFSetErrorHandler.restype = ctypes.c_void_p
            library.TIFFSetErrorHandler.argtypes = [ctypes.c_void_p]
            library.TIFFSetErrorHandler(None)
        except (OSError, AttributeError):
            continue


# Bytes a pixel takes in Pillow's memory, by mode (every other mode: 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}


def decode_bytes(img: Image.Image, target: int | None = None) -> int:
    """About the most memory :func:`load_image` takes to decode the opened ``img`` for ``target``.

    For admission control (`klaus serve` runs decoding jobs within a memory budget), from the
    header alone: the decoded image at its draft scale (JPEG) in Pillow's bytes per pixel,
    the converted result, and the conversion of one band (or of the whole image, if small).
    """
    width, height = img.size
    if target is not None and img.format in _DRAFT_FORMATS:
        ratio = min(width // target, height // target)
        scale = next((s for s in (8, 4, 2) if ratio >= s), 1)  # as Pillow's JPEG draft chooses
        width, height = -(-width // scale), -(-height // scale)
    pixels = width * height
    factor = _reduction((width, height), target)
    result = (-(-width // factor)) * (-(-height // factor)) * 4
    return pixels * _MODE_BYTES.get(img.mode, 4) + result + min(pixels, _BAND_PIXELS) * 4 * 3


def _check_pixels(size: tuple[int, int], label: str, limit: int) -> None:
    width, height = size
    if width * height > limit:
        text = f"{width}x{height} = {_pixels(width * height, limit, up=True)}"
        raise KlausImageError(f"{label}: image too large ({text} > {_pixels(limit, limit)} limit)")


def _open_source(source: Source, stack: ExitStack) -> tuple[IO[bytes], str]:
    """Turn any accepted source into a seekable, non-empty binary stream plus a label.

    The label is the file name as one line of text (:func:`klaus.names.shown`: control
    characters and undecodable bytes escaped), so every message naming it stays one line.
    """
    fp: IO[bytes]
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp, label = io.BytesIO(bytes(source)), "<bytes>"
    elif isinstance(source, (str, os.PathLike)):
        path = os.fsdecode(source)
        label = shown(path)
        fp = stack.enter_context(_open_path(path, label))
    elif hasattr(source, "read"):
        name = getattr(source, "name", None)
        label = shown(name) if isinstance(name, str) else "<bytes>"
        fp = source
    else:
        raise TypeError(f"cannot load an image from {type(source).__name__}")
    try:
        start = fp.tell() if _seekable(fp) else None
        end = None if start is None else fp.seek(0, io.SEEK_END)
    except OSError:  # claims to seek but cannot
        start = end = None
    if start is None or end is None:
        fp = _in_memory(fp, label)  # a pipe or /dev/stdin: read it whole, up to the limit
        start, end = 0, len(fp.getbuffer())
    if end == 0:
        raise KlausImageError(f"{label}: empty file")
    fp.seek(start)
    return fp, label


def _in_memory(fp: IO[bytes], label: str) -> io.BytesIO:
    """A non-seekable stream's bytes (at most :data:`MAX_STREAM_BYTES`) as a seekable buffer."""
    try:
        data = fp.read(MAX_STREAM_BYTES + 1)
    except OSError as exc:
        raise KlausImageError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if data is None:  # a non-blocking stream with nothing ready
        raise KlausImageError(f"{label}: cannot read (no data available)")
    if len(data) > MAX_STREAM_BYTES:
        raise KlausImageError(f"{label}: too large (more than {MAX_STREAM_BYTES} bytes)")
    return io.BytesIO(data)


def _open_path(path: str, label: str) -> IO[bytes]:
    """A regular file, or a pipe's bytes, opened without ever blocking.

    Devices and sockets are refused before they are opened (``/dev/zero`` never ends, a
    terminal waits for typing), and again on the opened descriptor in case the name was
    swapped in between. The open itself is non-blocking, so a named pipe nobody writes to
    does not hang; a pipe is read whole (:func:`_read_pipe`).
    """
    try:
        _check_kind(os.stat(path), label)
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise KlausImageError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise KlausImageError(f"{label}: is a directory") from None
    except PermissionError:
        raise KlausImageError(f"{label}: permission denied") from None
    except OSError as exc:
        raise KlausImageError(f"{label}: cannot open ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        _check_kind(st, label)
        if not stat.S_ISFIFO(st.st_mode):
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return _read_pipe(fd, label)  # closes fd


def _check_kind(st: os.stat_result, label: str) -> None:
    """KlausImageError unless ``st`` is a regular file's or a pipe's."""
    if stat.S_ISREG(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return
    if stat.S_ISDIR(st.st_mode):
        raise KlausImageError(f"{label}: is a directory")
    kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "of an unknown kind")
    raise KlausImageError(f"{label}: not a regular file ({kind})")


def _read_pipe(fd: int, label: str) -> io.BytesIO:
    """All of a pipe's bytes (at most :data:`MAX_STREAM_BYTES`); closes ``fd``.

    Read without blocking: a named pipe with no writer reads as empty at once, and a writer
    that sends nothing for :data:`STREAM_IDLE_SECONDS` is given up on.
    """
    buffer = io.BytesIO()
    with open(fd, "rb", buffering=0) as pipe:
        idle_since = time.monotonic()
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:  # a writer is there but has sent nothing yet
                if time.monotonic() - idle_since > STREAM_IDLE_SECONDS:
                    raise KlausImageError(f"{label}: the pipe sent nothing for {STREAM_IDLE_SECONDS:g} s") from None
                select.select([pipe], [], [], 0.1)
                continue
            except OSError as exc:
                raise KlausImageError(f"{label}: cannot read ({exc.strerror or exc})") from None
            if not chunk:
                break
            if buffer.tell() + len(chunk) > MAX_STREAM_BYTES:
                raise KlausImageError(f"{label}: too large (more than {MAX_STREAM_BYTES} bytes)")
            buffer.write(chunk)
            idle_since = time.monotonic()
    buffer.seek(0)
    return buffer


def _seekable(fp: IO[bytes]) -> bool:
    try:
        return bool(fp.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _decode(img: Image.Image, label: str, target: int | None, limit: int) -> Image.Image:
    if target is not None and img.format in _DRAFT_FORMATS:
        img.draft("RGB", (target, target))
    img.load()
    _check_pixels(img.size, label, limit)  # a frame larger than the header said (icons)
    upright = _UPRIGHT.get(_orientation(img))
    factor = _reduction(img.size, target)
    small = factor == 1 and img.width * img.height <= _BAND_PIXELS
    rgb = to_rgb(img) if small else _banded_rgb(img, factor)
    if upright is not None:  # after the conversion: a transposed copy of a large image would double it
        from PIL import Image

        rgb = rgb.transpose(Image.Transpose[upright])
    # Closing `img` destroys its pixel data: never hand it out.
    return rgb if rgb is not img else img.copy()


def _orientation(img: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 if absent or unreadable: a corrupt EXIF block must not
    make a photo unreadable."""
    try:
        value = img.getexif().get(_ORIENTATION, 1)
        return value if isinstance(value, int) and value in _UPRIGHT else 1
    except _EXIF_ERRORS:
        return 1


def _reduction(size: tuple[int, int], target: int | None) -> int:
    """Integer factor a decoded image of ``size`` is reduced by (1: not at all); see :func:`load_image`."""
    width, height = size
    if target is None or width * height <= MAX_RESIZED_PIXELS:
        return 1
    return max(1, min(width, height) // (_REDUCING_GAP * target))


def _banded_rgb(img: Image.Image, factor: int) -> Image.Image:
    """RGB of a large decoded image, reduced by ``factor``, converted one band at a time.

    Converting a whole 170 Mpx image would add a full-size RGB copy (Pillow keeps 4 bytes a
    pixel) and, for alpha or 16-bit images, two or three more; band by band, memory stays at
    the decoded image plus one band. Bands cut across the longer side and are a whole number
    of ``factor`` pixels thick, so the result is the same as converting and reducing whole.
    """
    from PIL import Image

    width, height = img.size
    scale = _float_scale(img) if img.mode == "F" else None
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    along_rows = height >= width
    across = width if along_rows else height
    length = height if along_rows else width
    step = max(factor, _BAND_PIXELS // max(1, across) // factor * factor)
    for start in range(0, length, step):
        stop = min(length, start + step)
        box = (0, start, width, stop) if along_rows else (start, 0, stop, height)
        band = to_rgb(img.crop(box), scale)
        if factor > 1:
            band = band.reduce(factor)
        out.paste(band, (0, start // factor) if along_rows else (start // factor, 0))
    return out


def _float_scale(img: Image.Image) -> float:
    """255 if a float image's values are 0..1 (the common case), else 1; see :func:`to_rgb`."""
    step = max(1, _BAND_PIXELS // max(1, img.width))
    peak = 0.0
    for top in range(0, img.height, step):
        band = np.nan_to_num(
            np.asarray(img.crop((0, top, img.width, min(img.height, top + step))), dtype=np.float64), nan=0.0
        )
        peak = max(peak, float(band.max(initial=0.0)))
    return 255.0 if peak <= 1.0 else 1.0


def to_rgb(img: Image.Image, float_scale: float | None = None) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping or black backgrounds.

    Float images come as 0..1 or 0..255 (the former far more common): ``float_scale`` says
    which for the whole image when only a band of it is given; by default this image decides.
    """
    if img.mode == "RGB" and img.info.get("transparency") is None:
        return img
    if img.mode in _SIXTEEN_BIT:
        return _gray_to_rgb(np.asarray(img).astype(np.float64) * (255.0 / 65535.0))
    if img.mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        if float_scale is None:
            float_scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return _gray_to_rgb(values * float_scale)
    if img.mode in _ALPHA or img.info.get("transparency") is not None:
        return _over_white(img)
    return img.convert("RGB")


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    from PIL import Image

    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _over_white(img: Image.Image) -> Image.Image:
    from PIL import Image

    if img.mode == "La":  # premultiplied; Pillow cannot convert it directly
        lum, alpha = img.split()
        img = Image.merge("RGBa", (lum, lum, lum, alpha))
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _describe(exc: BaseException) -> str:
    from PIL import Image

    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    text = " ".join(str(exc).split())
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return "truncated image"
    return f"corrupt image ({shown(text) or type(exc).__name__})"


def _bomb_message(label: str, exc: Image.DecompressionBombError, max_pixels: int) -> str:
    """Pillow's backstop fired before our check; rephrase its message like ours."""
    numbers = [int(n) for n in re.findall(r"(\d+) pixels", str(exc))]
    if len(numbers) != 2:
        return f"{label}: image too large ({shown(' '.join(str(exc).split()))})"
    pixels, limit = numbers[0], min(numbers[1], max_pixels)
    size, limit_text = _pixels(pixels, limit, up=True), _pixels(limit, limit)
    return f"{label}: image too large ({size} > {limit_text} limit)"


def _pixels(count: int, limit: int, *, up: bool = False) -> str:
    """Megapixels to one decimal, rounded away from the limit so "x > limit" reads true."""
    if limit < 1_000_000:
        return f"{count} px"
    tenths = math.ceil(count / 1e5) if up else math.floor(count / 1e5)
    return f"{tenths / 10:.1f} Mpx"
