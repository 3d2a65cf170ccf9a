"""Image loading and preprocessing: file -> RGB image -> normalized float32 tensor.

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
the decoded image plus one band.

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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import IO, Any

import numpy as np
from PIL import Image

from klaus.errors import KlausError, KlausFormatError, KlausImageError, KlausModelError
from klaus.names import shown

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "INTERPOLATIONS",
    "Preprocess",
    "crop_boxes",
    "decode_bytes",
    "load_image",
    "normalize",
    "open_image",
    "pillow_quiet",
    "pixel_limit",
    "prepare",
    "resized_size",
    "to_pixels",
    "to_tensor",
]

#: Pillow's hard decompression-bomb threshold with its default settings
#: (2 * 89_478_485 px, about 13400 x 13400).  Hard-coded rather than read from
#: ``Image.MAX_IMAGE_PIXELS`` so that our limit holds even if that is ``None``.
DEFAULT_MAX_PIXELS = 178_956_970

#: Largest square input a model may declare; keeps corrupt metadata from
#: asking for absurd allocations.
MAX_INPUT_SIZE = 4096

#: File name suffixes of the images a folder of photos is searched for (calibration, evaluation).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})

#: Most bytes read into memory from a source that cannot seek (a pipe, ``/dev/stdin``,
#: a socket): the same limit as the photo indexer's ``MAX_FILE_BYTES``.
MAX_STREAM_BYTES = 1 << 30

#: Environment variable that lowers the pixel limit (:func:`pixel_limit`).
MAX_PIXELS_ENV = "KLAUS_MAX_PIXELS"

#: Seconds a pipe's writer may send nothing before reading the pipe is given up.
STREAM_IDLE_SECONDS = 10.0

INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESIZE_RULES = ("shorter", "stretch")
_CHANNEL_ORDERS = ("RGB", "BGR")
_LAYOUTS = ("NCHW", "NHWC")
_CROPS = (1, 10)
# Above this (16 Mpx, ~48 MB as RGB) to_tensor stops resizing whole images.
_MAX_RESIZED_PIXELS = 4096 * 4096
# Radius (in output pixels) of the filters whose weights vary smoothly with the sampling
# position, so that one window can be resampled on its own (see _window).
_SUPPORT: dict[Image.Resampling, float] = {
    Image.Resampling.BILINEAR: 1.0,
    Image.Resampling.HAMMING: 1.0,
    Image.Resampling.BICUBIC: 2.0,
    Image.Resampling.LANCZOS: 3.0,
}

Source = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]
Box = tuple[int, int, int, int]


# --------------------------------------------------------------------------
# Preprocess spec


@dataclass(frozen=True)
class Preprocess:
    """The input pipeline a model was trained with, as stored in its metadata.

    ``mean``/``std`` are in 0..255 pixel units and listed in the order of the
    tensor's channels (i.e. in ``channel_order``), as Caffe-style BGR models
    declare them.  Direct construction with bad values raises ``ValueError``;
    :meth:`from_dict` (untrusted input) raises :class:`KlausFormatError`.
    """

    input_size: int = 224
    resize: str = "shorter"
    crop_ratio: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    channel_order: str = "RGB"
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        _check_int("input_size", self.input_size, 1, MAX_INPUT_SIZE)
        _check_choice("resize", self.resize, _RESIZE_RULES)
        ratio = _check_real("crop_ratio", self.crop_ratio)
        if not 0.1 <= ratio <= 1.0:
            raise ValueError(f"'crop_ratio' must be in 0.1..1.0, got {_show(ratio)}")
        _check_choice("interpolation", self.interpolation, tuple(INTERPOLATIONS))
        _check_choice("channel_order", self.channel_order, _CHANNEL_ORDERS)
        _check_choice("layout", self.layout, _LAYOUTS)
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "crop_ratio", ratio)
        object.__setattr__(self, "mean", _check_triple("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _check_triple("std", self.std, positive=True))

    @property
    def resize_side(self) -> int:
        """Side the image is resized to before cropping (256 for 224 / 0.875)."""
        return round(self.input_size / self.crop_ratio)

    @property
    def resample(self) -> Image.Resampling:
        return INTERPOLATIONS[self.interpolation]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; :meth:`from_dict` inverts it exactly."""
        return {
            "input_size": self.input_size,
            "resize": self.resize,
            "crop_ratio": self.crop_ratio,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": self.channel_order,
            "layout": self.layout,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Preprocess:
        """Validate metadata read from a (possibly corrupt) model file.

        Missing fields take their defaults; unknown fields are rejected so a
        typo cannot silently fall back to a default.
        """
        if not isinstance(d, Mapping):
            raise KlausFormatError(f"invalid preprocess metadata: expected an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(repr(k) for k in d if k not in known)
        if unknown:
            raise KlausFormatError(f"invalid preprocess metadata: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**d)
        except (TypeError, ValueError) as exc:
            raise KlausFormatError(f"invalid preprocess metadata: {exc}") from exc


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or not lo <= int(value) <= hi:
        raise ValueError(f"'{name}' must be an integer in {lo}..{hi}, got {_show(value)}")


def _check_real(name: str, value: object) -> float:
    try:
        number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else None
    except OverflowError:  # e.g. 10**400
        number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"'{name}' must be a finite number, got {_show(value)}")
    return number


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"'{name}' must be one of {', '.join(choices)}; got {_show(value)}")


def _check_triple(name: str, value: object, *, positive: bool) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ValueError(f"'{name}' must be a list of 3 numbers, got {_show(value)}")
    a, b, c = (_check_real(name, v) for v in value)
    if positive and min(a, b, c) <= 0:
        raise ValueError(f"'{name}' values must be > 0, got {_show(value)}")
    return (a, b, c)


# --------------------------------------------------------------------------
# Loading


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
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Decoded images above this many pixels are converted to RGB one band of about this many
# pixels at a time (see _banded_rgb).
_BAND_PIXELS = 1 << 22
# A decoded image above _MAX_RESIZED_PIXELS is reduced by an integer factor that keeps its
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield


_pillow_quiet = pillow_quiet  # the name the tensor code below uses


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
    rgb = _to_rgb(img) if small else _banded_rgb(img, factor)
    if upright is not None:  # after the conversion: a transposed copy of a large image would double it
        rgb = rgb.transpose(upright)
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
    if target is None or width * height <= _MAX_RESIZED_PIXELS:
        return 1
    return max(1, min(width, height) // (_REDUCING_GAP * target))


def _banded_rgb(img: Image.Image, factor: int) -> Image.Image:
    """RGB of a large decoded image, reduced by ``factor``, converted one band at a time.

    Converting a whole 170 Mpx image would add a full-size RGB copy (Pillow keeps 4 bytes a
    pixel) and, for alpha or 16-bit images, two or three more; band by band, memory stays at
    the decoded image plus one band. Bands cut across the longer side and are a whole number
    of ``factor`` pixels thick, so the result is the same as converting and reducing whole.
    """
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
        band = _to_rgb(img.crop(box), scale)
        if factor > 1:
            band = band.reduce(factor)
        out.paste(band, (0, start // factor) if along_rows else (start // factor, 0))
    return out


def _float_scale(img: Image.Image) -> float:
    """255 if a float image's values are 0..1 (the common case), else 1; see :func:`_to_rgb`."""
    step = max(1, _BAND_PIXELS // max(1, img.width))
    peak = 0.0
    for top in range(0, img.height, step):
        band = np.nan_to_num(
            np.asarray(img.crop((0, top, img.width, min(img.height, top + step))), dtype=np.float64), nan=0.0
        )
        peak = max(peak, float(band.max(initial=0.0)))
    return 255.0 if peak <= 1.0 else 1.0


def _to_rgb(img: Image.Image, float_scale: float | None = None) -> Image.Image:
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
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _over_white(img: Image.Image) -> Image.Image:
    if img.mode == "La":  # premultiplied; Pillow cannot convert it directly
        lum, alpha = img.split()
        img = Image.merge("RGBa", (lum, lum, lum, alpha))
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")


def _describe(exc: BaseException) -> str:
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


# --------------------------------------------------------------------------
# Tensor


def resized_size(width: int, height: int, spec: Preprocess, crops: int = 1) -> tuple[int, int]:
    """Size of the image after the resize rule, before cropping.

    "stretch" with one crop fills the input exactly; with ten crops it
    stretches to ``resize_side`` so the corner crops differ from the center.
    """
    _check_crops(crops)
    if spec.resize == "stretch":
        side = spec.input_size if crops == 1 else spec.resize_side
        return side, side
    side = spec.resize_side
    if width <= height:
        return side, max(side, round(height * side / width))
    return max(side, round(width * side / height)), side


def crop_boxes(width: int, height: int, spec: Preprocess, crops: int = 1) -> list[Box]:
    """Crop windows ``(left, top, right, bottom)`` in resized-image coordinates.

    One box per output crop, in tensor order.  For ten crops: top-left,
    top-right, bottom-left, bottom-right, center, then the same five windows
    again, which :func:`to_tensor` mirrors horizontally (Caffe's oversample).
    """
    rw, rh = resized_size(width, height, spec, crops)
    s = spec.input_size
    left, top = (rw - s) // 2, (rh - s) // 2
    center = (left, top, left + s, top + s)
    if crops == 1:
        return [center]
    windows = [(0, 0, s, s), (rw - s, 0, rw, s), (0, rh - s, s, rh), (rw - s, rh - s, rw, rh), center]
    return windows + windows


def to_tensor(image: Image.Image, spec: Preprocess, crops: int = 1) -> np.ndarray:
    """Resize, crop and normalize into a float32 batch of ``crops`` model inputs."""
    return normalize(to_pixels(image, spec, crops), spec)


def to_pixels(image: Image.Image, spec: Preprocess, crops: int = 1) -> np.ndarray:
    """The ``crops`` resized and cropped RGB windows, uint8 ``(crops, S, S, 3)``, before normalization.

    ``normalize(to_pixels(image, spec), spec)`` is :func:`to_tensor`; the indexer keeps
    the pixels (a quarter of the float bytes) until it assembles a batch.
    """
    _check_crops(crops)
    rgb = image if image.mode == "RGB" else _to_rgb(image)
    boxes = crop_boxes(rgb.width, rgb.height, spec, crops)
    windows = boxes[:5] if crops == 10 else boxes
    with _pillow_quiet():  # cropping a large photo (within max_pixels) would warn again
        patches = _windows(rgb, windows, spec, crops)
    if crops == 10:
        patches = np.concatenate([patches, patches[:, :, ::-1]])
    return patches


def normalize(pixels: np.ndarray, spec: Preprocess, out: np.ndarray | None = None) -> np.ndarray:
    """``(pixels - mean) / std`` in float32, in the spec's channel order and layout.

    ``pixels`` is uint8 ``(n, S, S, 3)`` RGB as :func:`to_pixels` returns it. The
    channel flip and the layout transpose are done on the uint8 pixels, then one
    subtraction and one division write straight into ``out`` (a new C-contiguous array
    unless given): the same float32 operations, so the same bits, as converting to
    float first, at a fraction of the memory traffic.
    """
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels must be (n, height, width, 3), got shape {pixels.shape}")
    if spec.channel_order == "BGR":
        pixels = pixels[..., ::-1]
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    if spec.layout == "NCHW":
        pixels = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))
        mean, std = mean.reshape(1, 3, 1, 1), std.reshape(1, 3, 1, 1)
    if out is None:
        out = np.empty(pixels.shape, np.float32)
    elif out.shape != pixels.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {pixels.shape}, got {out.dtype} {out.shape}")
    np.subtract(pixels, mean, out=out, dtype=np.float32)
    np.divide(out, std, out=out)
    return out


def prepare(
    source: Source,
    spec: Preprocess,
    crops: int = 1,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Load ``source`` and turn it into the model input batch for ``spec``."""
    image = load_image(source, target=_decode_target(spec, crops), max_pixels=max_pixels)
    return to_tensor(image, spec, crops)


def _check_crops(crops: int) -> None:
    if crops not in _CROPS:
        raise ValueError(f"crops must be 1 or 10, got {crops!r}")


def _decode_target(spec: Preprocess, crops: int) -> int:
    """Smallest side the decoded image needs so the resize never upsamples."""
    _check_crops(crops)
    if spec.resize == "stretch" and crops == 1:
        return spec.input_size
    return spec.resize_side


def _windows(img: Image.Image, boxes: list[Box], spec: Preprocess, crops: int) -> np.ndarray:
    """Stack of uint8 crops (n, S, S, 3) of the image resized by the spec's rule.

    One window with a smooth filter (bilinear, bicubic, Lanczos, Hamming): only that
    window is resampled (:func:`_window`). Otherwise the whole image is resized then
    sliced, exactly like reference pipelines; only when that would be huge (a 1 x
    100000 strip resized to a 256 shorter side) is each window resampled straight from
    its source region via ``resize(box=)``: same filter, but rounding can differ by a
    pixel value or (nearest/box) a sampling position.
    """
    rw, rh = resized_size(img.width, img.height, spec, crops)
    if len(boxes) == 1 and spec.resample in _SUPPORT:
        window = _window(img, boxes[0], rw, rh, spec.resample)
        if window is not None:
            return window[None]
    if rw * rh <= _MAX_RESIZED_PIXELS:
        full = np.asarray(img.resize((rw, rh), spec.resample))
        return np.stack([full[top:bottom, left:right] for left, top, right, bottom in boxes])
    sx, sy = img.width / rw, img.height / rh
    return np.stack(
        [
            np.asarray(
                img.resize(
                    (right - left, bottom - top),
                    spec.resample,
                    box=(left * sx, top * sy, min(img.width, right * sx), min(img.height, bottom * sy)),
                )
            )
            for left, top, right, bottom in boxes
        ]
    )


def _window(img: Image.Image, box: Box, rw: int, rh: int, resample: Image.Resampling) -> np.ndarray | None:
    """The window ``box`` of ``img`` resized to ``rw`` x ``rh``, computing little else.

    Pillow resizes in two single-axis passes, rounding to uint8 in between. The first
    pass here is Pillow's own, bit-exact, but only over the source rows (or columns)
    that the window's second-pass filter reaches; the second computes only the
    window, via ``resize(box=)``. Pillow passes a box as float32, which can move a
    filter coefficient by one unit of its fixed-point rounding, so a pixel may differ
    from resize-then-crop by one level, never more (none does when that scale is a
    binary fraction, e.g. 375 -> 256 rows). The passes run in the order Pillow's own
    resize would use (:func:`_pillow_vertical_first`). ``None`` if that order is not known
    or the first pass would be huge (then the caller resamples as for ten crops).
    For a 500 x 375 photo this samples about 40 % fewer pixels than resizing it whole.
    """
    vertical_first = _pillow_vertical_first()
    if vertical_first is None:
        return None
    left, top, right, bottom = box
    width, height = img.size
    if vertical_first(width, height, rw, rh):  # columns first: the mirror image of the branch below
        sx = width / rw
        x0, x1 = _source_span(left, right, sx, width, resample)
        if (x1 - x0) * rh > _MAX_RESIZED_PIXELS:
            return None
        cols = img if (x0, x1) == (0, width) else img.crop((x0, 0, x1, height))
        if rh != height:
            cols = cols.resize((x1 - x0, rh), resample)
        if (top, bottom) != (0, rh):
            cols = cols.crop((0, top, x1 - x0, bottom))
        last = min(x1 - x0, right * sx - x0)  # right * sx may round past the last column
        window = cols.resize((right - left, bottom - top), resample, box=(left * sx - x0, 0, last, bottom - top))
        return np.asarray(window)
    sy = height / rh
    y0, y1 = _source_span(top, bottom, sy, height, resample)
    if rw * (y1 - y0) > _MAX_RESIZED_PIXELS:  # a 200000 x 2 strip: its first pass alone would be huge
        return None
    rows = img if (y0, y1) == (0, height) else img.crop((0, y0, width, y1))
    if rw != width:
        rows = rows.resize((rw, y1 - y0), resample)
    if (left, right) != (0, rw):
        rows = rows.crop((left, 0, right, y1 - y0))
    last = min(y1 - y0, bottom * sy - y0)  # bottom * sy may round past the last row
    window = rows.resize((right - left, bottom - top), resample, box=(0, top * sy - y0, right - left, last))
    return np.asarray(window)


def _source_span(start: int, stop: int, scale: float, size: int, resample: Image.Resampling) -> tuple[int, int]:
    """Source rows (or columns) that output pixels ``start..stop`` of one axis draw on, at ``scale``."""
    reach = _SUPPORT[resample] * max(scale, 1.0) + 1.0  # filter radius in source pixels, plus one to spare
    return max(0, math.floor((start + 0.5) * scale - reach)), min(size, math.ceil((stop - 0.5) * scale + reach))


@functools.cache
def _pillow_vertical_first() -> Callable[[int, int, int, int], bool] | None:
    """Which pass this Pillow runs first when resizing ``(w, h)`` to ``(rw, rh)``.

    Pillow before 13 always resamples rows (horizontal pass) first; Pillow 13 runs
    the vertical pass first when the height shrinks by more than twice as many pixels
    as the width. Told apart by resizing two small probes on either side of that
    threshold; ``None`` (so: resize whole images) if Pillow does something else.
    """
    rules: dict[str, Callable[[int, int, int, int], bool]] = {
        "horizontal first": lambda w, h, rw, rh: False,
        "vertical first past 2x": lambda w, h, rw, rh: h - rh > 0 and h - rh > 2 * (w - rw),
    }
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    cubic = Image.Resampling.BICUBIC
    observed = []
    for h, rh in ((61, 40), (60, 40)):  # width 40 -> 30: the height shrinks by 21, then by 20
        probe = Image.fromarray(noise[:h, :40])
        whole = np.asarray(probe.resize((30, rh), cubic))
        rows_first = np.asarray(probe.resize((30, h), cubic).resize((30, rh), cubic))
        cols_first = np.asarray(probe.resize((40, rh), cubic).resize((30, rh), cubic))
        if np.array_equal(rows_first, cols_first):
            return None  # a useless probe; cannot happen with this noise
        if np.array_equal(whole, rows_first):
            observed.append(False)
        elif np.array_equal(whole, cols_first):
            observed.append(True)
        else:
            return None
    for rule in rules.values():
        if [rule(40, 61, 30, 40), rule(40, 60, 30, 40)] == observed:
            return rule
    return None


# --------------------------------------------------------------------------
# Fitting a graph input


def shape_text(dims: Sequence[object]) -> str:
    """A shape as messages show it: ``(?, 3, 224, 224)``."""
    return "(" + ", ".join(str(d) if _fixed(d) else "?" for d in dims) + ")"


def _fixed(dim: object) -> bool:
    return isinstance(dim, int) and not isinstance(dim, bool) and dim > 0


def preprocess_for_input(shape: Sequence[object] | None, where: str) -> Preprocess:
    """EfficientNet-Lite preprocessing at the square size a graph input declares (224 if none).

    ``shape`` lists the input's dims as ONNX Runtime or the ONNX graph give them (ints fixed,
    anything else unknown). An input (N, S, S, 3) is taken as NHWC; anything else as NCHW.
    Errors name ``where``.
    """
    dims = list(shape or [])
    size, layout = None, "NCHW"
    if len(dims) == 4:
        if _fixed(dims[2]) and dims[2] == dims[3]:
            size = int(dims[2])  # type: ignore[call-overload]
        elif dims[3] == 3 and _fixed(dims[1]) and dims[1] == dims[2]:
            size, layout = int(dims[1]), "NHWC"  # type: ignore[call-overload]
    if size is not None and size > MAX_INPUT_SIZE:
        raise KlausModelError(
            f"{where}: the graph takes {size}x{size} inputs, more than the {MAX_INPUT_SIZE}-pixel limit"
        )
    return Preprocess(input_size=size or Preprocess().input_size, layout=layout)


def check_input_shape(shape: Sequence[object], preprocess: Preprocess, where: str, name: str = "input") -> None:
    """Refuse a graph input ``shape`` (ints fixed; anything else unknown) the preprocessing cannot feed.

    Klaus feeds (N, 3, S, S) (NHWC: (N, S, S, 3)) with N images or crops; a graph that fixes N
    is fed that many at a time (the last group padded), so only another rank, channel count or
    size is refused, in one line naming ``where``.
    """
    if not shape:  # rank unknown: ONNX Runtime will tell
        return
    fixed = [d if _fixed(d) else None for d in shape]
    s = preprocess.input_size
    wanted = [None, 3, s, s] if preprocess.layout == "NCHW" else [None, s, s, 3]
    made = f"(N, 3, {s}, {s})" if preprocess.layout == "NCHW" else f"(N, {s}, {s}, 3)"
    if len(fixed) != 4 or any(f is not None and f != w for f, w in zip(fixed[1:], wanted[1:], strict=True)):
        raise KlausModelError(
            f"{where}: input {name!r} has shape {shape_text(shape)}, but the preprocessing makes {made}"
        )
