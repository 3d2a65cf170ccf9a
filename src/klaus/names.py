"""File names as the index can store them and as one line of text can show them.

A POSIX file name is bytes; Python gives undecodable bytes back as lone surrogates
(``surrogateescape``), which SQLite's TEXT columns (UTF-8) cannot hold. Storing a
lossy version could make a path point at another file, so such names are not stored
(:func:`storable`); messages show their bytes as ``\\xNN`` (:func:`printable`).
A name may also hold a newline or other control characters: text output escapes them
(:func:`shown`) so every warning and result stays one line.
"""

from __future__ import annotations

import json
import math
import os
import re

from .errors import KlausWriteError

#: C0 and C1 controls, line and paragraph separators, and the bidirectional-text controls
#: (which can make one name display as another).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def storable(path: str) -> bool:
    """Whether ``path`` is valid Unicode text (no undecodable bytes), so a TEXT column can hold it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(path: str | os.PathLike[str]) -> str:
    """The path (or any text) with undecodable bytes shown as ``\\xNN``: always valid UTF-8
    (for JSON and terminals too)."""
    text = os.fspath(path)
    if storable(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that did not come from a file name's bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _escape(match: re.Match[str]) -> str:
    return match.group(0).encode("unicode_escape").decode("ascii")


def shown(text: str | os.PathLike[str]) -> str:
    """One line of display text: undecodable bytes as ``\\xNN``, control characters as ``\\n``, ``\\x1b``, ``\\u2028``."""
    return _UNSAFE.sub(_escape, printable(text))


def json_safe(value: object) -> object:
    """Strings printable, non-finite floats null (JSON has no NaN), containers recursively."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {printable(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(obj: object) -> str:
    """``obj`` as one line of valid UTF-8 JSON (see :func:`json_safe`)."""
    return json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False)


def check_output(out: str, *sources: str | None) -> None:
    """Refuse an OUT that cannot be written as a file, or that is one of a command's inputs
    (writing it would destroy the input; symlinks and other spellings of a path count)."""
    if not out:
        raise KlausWriteError("'': the output file name (-o) is empty")
    if out.endswith(("/", os.sep)):  # Path() would drop the slash and write a file named like the folder
        raise KlausWriteError(f"{out}: names a folder; give a file name")
    if os.path.isdir(out):
        raise KlausWriteError(f"{out}: is a directory, not a file")
    for src in sources:
        if src and _same_file(src, out):
            raise KlausWriteError(f"{out}: is the same file as {src}")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # either is missing (or not a path at all)
        return False
