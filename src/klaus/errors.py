"""One exception type per domain, each carrying a message a user can act on.

All derive from :class:`KlausError`, so the CLI can turn any of them into a
one-line error and a non-zero exit status without catching unrelated bugs.
"""

from __future__ import annotations


class KlausError(Exception):
    """Base class for every error Klaus reports to a user."""


class KlausFormatError(KlausError):
    """A `.klaus` file is corrupt, truncated, of an unknown version, or invalid."""


class KlausImageError(KlausError):
    """An input image cannot be read: missing, truncated, not an image, or too large."""


class KlausModelError(KlausError):
    """A model (ONNX or recipe) cannot be compressed or run as asked."""


class KlausDataError(KlausError):
    """An evaluation or calibration data set cannot be read as asked."""


class KlausWriteError(KlausError, OSError):
    """An output file cannot be written (disk full, file size limit, permissions, a directory in the way).

    Also an :class:`OSError`, which is what writing raised before it had its own type.
    """


def first_line(exc: BaseException) -> str:
    """The first line of a third-party exception's message (ONNX Runtime's run to many), or its type."""
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def one_line(message: str) -> str:
    """An error message as one line: its first line, plus how many more there were."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return message.strip()
    return f"{lines[0].strip()} ({len(lines) - 1} more lines)"


def naming(message: str, where: str) -> str:
    """``message`` starting with ``where`` (the user's file) if it does not name it yet."""
    return message if message.startswith(f"{where}:") else f"{where}: {message}"
