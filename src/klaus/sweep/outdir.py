"""Where a sweep writes its files, checked before any row is computed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import KlausWriteError

OUTPUT_NAMES = ("sweep.md", "sweep.csv", "sweep.json", "sweep.png")


_NAME_MAX = 255  # bytes per file name on common file systems, when pathconf cannot say


def default_out_dir(model: str) -> str:
    """``sweep-<model>``, shortened (with a hash of the full name) if it would be too long a file name."""
    name = f"sweep-{model}"
    if len(os.fsencode(name)) <= _NAME_MAX:
        return name
    tag = hashlib.sha256(os.fsencode(model)).hexdigest()[:8]
    short = model
    while len(os.fsencode(f"sweep-{short}-{tag}")) > _NAME_MAX:
        short = short[:-1]
    return f"sweep-{short}-{tag}"


def check_out_dir(out_dir: str | os.PathLike[str]) -> Path:
    """The output folder, refused up front (before any row is computed) if it could not be written.

    Refused: an empty name, a path that exists and is not a folder (or has a file where a
    folder should be), a file name too long, a folder that cannot be created or written,
    an output name that is a folder. Errors are one :class:`KlausWriteError` naming ``out_dir``.
    """
    where = os.fspath(out_dir)
    if not where:
        raise KlausWriteError("'': the output folder name is empty")
    path = Path(where)
    try:
        if path.exists() and not path.is_dir():
            raise KlausWriteError(f"{where}: exists and is not a folder")
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise KlausWriteError(f"{where}: {existing} is not a folder")
        try:
            name_max = os.pathconf(existing, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = _NAME_MAX
        if any(len(os.fsencode(part)) > name_max for part in path.parts):
            raise KlausWriteError(f"{where}: file name too long")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise KlausWriteError(f"{where}: cannot write ({existing} is not writable)")
        for name in OUTPUT_NAMES:
            if (path / name).is_dir():
                raise KlausWriteError(f"{path / name}: is a directory, not a file")
    except KlausWriteError:
        raise
    except OSError as exc:  # e.g. a name too long for the file system to even look up
        raise KlausWriteError(f"{where}: cannot write ({(exc.strerror or str(exc)).lower()})") from None
    return path
