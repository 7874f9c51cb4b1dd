"""Output sized for the terminal it is printed on: a rich Console as wide as the terminal (or
COLUMNS) is, and whether a rich table fits in a console's width with no cell wrapped, so a
command can fall back to a compact layout when it does not."""

from __future__ import annotations

import os
from typing import IO

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

_WIDTH_WHEN_NOT_A_TERMINAL = 200


def terminal_console(file: IO[str]) -> Console:
    """A rich Console for `file`: as wide and high as COLUMNS and LINES say (positive whole
    numbers), else as the terminal is; output to a pipe or file is 200 columns wide, not
    wrapped at 80. The size is always given to rich, so it never reads those variables
    itself (it fails on some values that look like digits, such as "²")."""
    try:
        terminal = os.get_terminal_size(file.fileno()) if file.isatty() else None
    except (AttributeError, ValueError, OSError):  # (a file object without a descriptor)
        terminal = None
    width = _environment_size("COLUMNS") or (
        terminal.columns if terminal and terminal.columns > 0 else None
    )
    height = _environment_size("LINES") or (
        terminal.lines if terminal and terminal.lines > 0 else None
    )
    if width is None:
        width = 80 if terminal is not None else _WIDTH_WHEN_NOT_A_TERMINAL
    return Console(file=file, width=width, height=height or 25, highlight=False)


def _environment_size(name: str) -> int | None:
    """The size an environment variable (COLUMNS, LINES) asks for; None when unset or not a
    positive whole number written in ASCII digits."""
    text = os.environ.get(name, "").strip()
    return int(text) if text.isascii() and text.isdigit() and int(text) > 0 else None


def fits(table: Table, console: Console) -> bool:
    """Whether `table` fits in the console's width with no cell wrapped."""
    unbounded = console.options.update_width(1 << 16)
    return Measurement.get(console, unbounded, table).maximum <= console.width
