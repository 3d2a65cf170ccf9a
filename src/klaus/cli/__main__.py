"""`python -m klaus.cli`: the `klaus` command."""

from __future__ import annotations

from . import main

main()
