"""What every command shares: the settings read once when the command line started, the services
made once for the command, and `emit`, the one way a result reaches stdout."""

from __future__ import annotations

import json
import textwrap

import click

from cudabuild.errors import EXIT_CODES
from cudabuild.settings import Services, Settings

def code_table(title: str, rows) -> str:
    """An exit-code table for an epilog, as printed (click keeps a \\b paragraph's lines as they are)."""
    lines = [textwrap.fill(meaning, width=96, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
             for code, meaning in rows]
    return "\b\n" + title + "\n" + "\n".join(lines)


EXIT_CODE_HELP = code_table("Exit codes:", EXIT_CODES)


def settings() -> Settings:
    """The command's settings: read once, when the command line started (cli.main.invoke)."""
    return click.get_current_context().find_root().obj


def services() -> Services:
    """The command's services (cache, downloads, engine, registry, reporter), made once for it."""
    ctx = click.get_current_context()
    made = ctx.meta.get("cudabuild.services")
    if made is None:
        made = ctx.meta["cudabuild.services"] = Services(settings())
    return made


def emit(result, as_json: bool = False) -> None:
    """Print a result: its JSON (`to_json()`) with --json, else its text (`text()`); then raise the
    error it carries, or exit with its code."""
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        text = result.text()
        if text:
            click.echo(text, nl=not text.endswith("\n"), err=getattr(result, "to_stderr", False))
    for line in getattr(result, "notes", None) or []:
        click.echo(line, err=True)
    error = getattr(result, "error", None)
    if error is not None:
        raise error
    code = getattr(result, "exit_code", 0)
    if code:
        click.get_current_context().exit(code)
