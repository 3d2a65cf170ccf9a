"""The `klaus` command: a thin layer over the library.

Each command parses its options, calls the library, and prints: :mod:`.classify` (classify, eval),
:mod:`.build` (compress, zoo, recipes), :mod:`.files` (inspect, export), :mod:`.sweep` and
:mod:`.library` (index, search, serve); :mod:`.common` holds the one-line error handling and the
options they share. Every command takes ``--json``; every error is one line on stderr and exit status 1.
"""

from __future__ import annotations

import click

from .. import __version__
from . import build, classify, files, library, sweep
from .common import PRESERVE, KlausGroup


@click.group(cls=KlausGroup, context_settings=PRESERVE)
@click.version_option(__version__, prog_name="klaus")
def main() -> None:
    """Klaus: tiny palettized ImageNet classifiers (SQLite + PNG), run offline on ONNX Runtime."""


for _module in (classify, build, files, sweep, library):
    for _command in _module.COMMANDS:
        main.add_command(_command)

__all__ = ["main"]
