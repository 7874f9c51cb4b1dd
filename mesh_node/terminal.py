"""Tables sized for the terminal they are printed on: whether a rich table fits in a console's
width with no cell wrapped, so a command can fall back to a compact layout when it does not."""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


def fits(table: Table, console: Console) -> bool:
    """Whether `table` fits in the console's width with no cell wrapped."""
    unbounded = console.options.update_width(1 << 16)
    return Measurement.get(console, unbounded, table).maximum <= console.width
