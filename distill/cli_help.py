"""``--help`` of a distill command: its options in one panel per section, full names at 80 columns.

Typer's own layout gives ``--no-NAME`` and the type columns of their own, so at 80 columns the help
text gets a dozen characters and long names are cut (``--teacher-min-ste...``). Here each option is
one row of two columns: its names (``--flag`` over ``--no-flag``, or ``--name TYPE``), never cut, and
its help with the default. :func:`help_sections` is what both this and ``docs/cli.md``
(:mod:`distill.cli_reference`) show, so the two cannot drift apart.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.padding import Padding
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer.core import TyperArgument, TyperCommand, TyperOption

from distill.console import LOG_WIDTH, make_console

OPTIONS = "Options"  # the panel of a command's own options and --help
ARGUMENTS = "Arguments"
PIPED_WIDTH = 100  # help piped into a pager or a file: panels as wide as a text, not as a log line
_TYPE_NAMES = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


@dataclass(frozen=True)
class HelpRow:
    """One option or argument as help shows it."""

    names: tuple[str, ...]  # --name and its short form, or the argument's name
    off_names: tuple[str, ...]  # --no-name of an on/off switch
    metavar: str  # INT, FLOAT, TEXT, PATH; "" for a switch
    help: str
    default: str | None  # as shown; None: nothing to show
    required: bool

    @property
    def label(self) -> str:
        return " ".join((", ".join(self.names), self.metavar)).strip()


def _type_name(annotation: Any) -> str:
    """INT, FLOAT, TEXT or PATH for an option's annotation (``Optional[X]`` and ``list[X]`` as X)."""
    while typing.get_args(annotation):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return _TYPE_NAMES.get(annotation, "TEXT")


def _row(param: TyperOption | TyperArgument) -> HelpRow:
    if isinstance(param, TyperArgument):
        return HelpRow((param.name.upper(),), (), "", param.help or "", None, param.required)
    switch = param.is_flag or bool(param.secondary_opts)
    metavar = "" if switch else param.metavar or _type_name(param.type_descriptor.annotation)
    default: str | None = None
    if isinstance(param.show_default, str):
        default = param.show_default
    elif param.default is not None and not param.required and param.name != "help":
        default = str(param.default).lower() if isinstance(param.default, bool) else str(param.default)
    return HelpRow(tuple(param.opts), tuple(param.secondary_opts), metavar, param.help or "", default, param.required)


def help_sections(command: TyperCommand, ctx: Any) -> dict[str, list[HelpRow]]:
    """``{panel title: rows}`` of a command: arguments first, then its own options (and ``--help``),
    then each section of Config options in the order they come."""
    sections: dict[str, list[HelpRow]] = {ARGUMENTS: [], OPTIONS: []}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        title = ARGUMENTS if isinstance(param, TyperArgument) else getattr(param, "rich_help_panel", None) or OPTIONS
        sections.setdefault(title, []).append(_row(param))
    return {title: rows for title, rows in sections.items() if rows}


def _names_cell(row: HelpRow) -> Text:
    text = Text(row.label, style="bold cyan")
    if row.off_names:
        text.append("\n" + ", ".join(row.off_names), style="bold magenta")
    return text


def _help_cell(row: HelpRow) -> str:
    extra = " [dim red]\\[required][/]" if row.required else ""
    if row.default is not None:
        extra += f" [dim]\\[default: {escape(row.default)}][/]"
    return escape(row.help) + extra


class SectionedCommand(TyperCommand):
    """A typer command whose ``--help`` is :func:`help_sections` in rich panels."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        console = make_console()
        if console.width == LOG_WIDTH:
            console = make_console(width=PIPED_WIDTH)
        console.print(Padding(Text(self.get_usage(ctx), style="bold"), (1, 1, 0, 1)))
        if self.help:
            console.print(Padding(escape(inspect.cleandoc(self.help)), (1, 1, 1, 1)))
        for title, rows in help_sections(self, ctx).items():
            table = Table(show_header=False, box=None, expand=True, padding=(0, 1), pad_edge=False)
            table.add_column(no_wrap=True)
            table.add_column(ratio=1)
            for row in rows:
                table.add_row(_names_cell(row), _help_cell(row))
            console.print(Panel(table, title=title, title_align="left", border_style="dim"))
