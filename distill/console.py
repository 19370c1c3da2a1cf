"""The one way distill makes a rich ``Console``: terminal width on a terminal, full lines elsewhere.

Rich wraps at 80 columns when its stream is not a terminal (a log file, a pipe, CI), which breaks
lines mid-word and splits wide tables into stacked blocks; worse, when stdin is a terminal rich takes
*its* width for a redirected stderr. A log is read later, in an editor or with grep, so there every
line is written whole. ``COLUMNS``, when set, still wins (``COLUMNS=80 distill run --help``).
"""

from __future__ import annotations

import os
import warnings
from typing import IO

from rich.console import Console, ConsoleDimensions
from rich.markup import escape

LOG_WIDTH = 1000  # columns of a console that is not a terminal: wide enough for any table distill prints


class _Console(Console):
    """A ``Console`` whose width is ``LOG_WIDTH`` whenever its stream is not a terminal (checked at each
    print: the stream may be swapped after creation, as by pytest or ``CliRunner``)."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._width is not None or self.is_terminal or os.environ.get("COLUMNS", "").isdigit():
            return size
        return ConsoleDimensions(LOG_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)


def make_console(stderr: bool = False, file: IO[str] | None = None, width: int | None = None) -> Console:
    """A console on stdout (or ``stderr``, or ``file``): its terminal's width, full lines when it is
    not a terminal; ``width`` fixes it (tests)."""
    return _Console(stderr=stderr, file=file, width=width)


def one_line_warnings(debug: bool = False) -> None:
    """Show Python warnings as one line ``warning: ...`` on stderr, the source line only with ``debug``:
    the CLI's and every study worker's (a spawned process starts with Python's own format)."""
    console = make_console(stderr=True)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        where = f" ({filename}:{lineno})" if debug else ""
        console.print(f"[yellow]warning:[/] {escape(str(message))}{escape(where)}", highlight=False, soft_wrap=True)

    warnings.showwarning = show
