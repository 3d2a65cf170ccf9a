"""The `klaus` command: a thin layer over the library.

Each command parses its options, calls the library, and prints: :mod:`.classify` (classify, eval),
:mod:`.build` (compress, zoo, recipes), :mod:`.files` (inspect, export), :mod:`.sweep` and
:mod:`.library` (index, search, serve); :mod:`.common` holds the one-line error handling and the
options they share. Every command takes ``--json``; every error is one line on stderr and exit status 1.
A command's module is imported when the command runs (or when ``klaus --help`` lists them), so
`klaus classify` does not pay for importing the others.
"""

from __future__ import annotations

import importlib

import click

from .. import __version__
from .common import PRESERVE, KlausGroup

# Every command, by the module (in this package) that defines it in its COMMANDS.
COMMAND_MODULES = {
    "classify": "classify",
    "eval": "classify",
    "compress": "build",
    "zoo": "build",
    "recipes": "build",
    "inspect": "files",
    "export": "files",
    "sweep": "sweep",
    "index": "library",
    "search": "library",
    "serve": "library",
}


class LazyGroup(KlausGroup):
    """:class:`KlausGroup` whose commands are registered by importing their module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *COMMAND_MODULES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            module = importlib.import_module(f".{COMMAND_MODULES[cmd_name]}", __name__)
            for command in module.COMMANDS:
                if command.name not in self.commands:
                    self.add_command(command)
        return self.commands.get(cmd_name)


@click.group(cls=LazyGroup, context_settings=PRESERVE)
@click.version_option(__version__, prog_name="klaus")
def main() -> None:
    """Klaus: tiny palettized ImageNet classifiers (SQLite + PNG), run offline on ONNX Runtime."""


__all__ = ["main"]
