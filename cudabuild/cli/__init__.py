"""The command line (cli/main.py), one module per family of commands; shared flags in flags.py,
the settings, services and `emit` in common.py."""

from cudabuild.cli.main import cli, invoke, main

__all__ = ["cli", "invoke", "main"]
