"""The command line: click turns arguments into values and calls the library once; `invoke()`
turns cudabuild's errors into their exit codes. Results go to stdout (cli.common.emit), progress to
stderr. One module per family of commands: build (modules, image, matrix, boot-test, inspect),
host (install, holders, uninstall), node (stage, ready, status), cdi (cdi, run), deploy."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import click

import cudabuild
from cudabuild.cli import build, cdi, deploy, host, node
from cudabuild.cli.common import EXIT_CODE_HELP
from cudabuild.errors import EXIT_INTERRUPTED, CudabuildError
from cudabuild.settings import Settings


@click.group(epilog=EXIT_CODE_HELP, context_settings={"help_option_names": ["-h", "--help"],
                                                      "max_content_width": 100})
@click.version_option(cudabuild.__version__, prog_name="cudabuild")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Build NVIDIA kernel modules for one exact kernel in a disposable container, verify them,
    and bake them into GPU container images that load the driver at start.

    \b
      cudabuild modules --kernel 6.1.0-56-amd64 --driver 535    # phase 1: verified modules
      cudabuild image device-query                              # phase 2: a runtime image
      docker run --privileged cudabuild/device-query:535.309.01-6.1.0-56-amd64
    """
    if ctx.obj is None:  # invoke() reads the settings; a caller of the click group directly gets this process's
        ctx.obj = Settings.from_env(os.environ)



for _family in (build, host, node, cdi, deploy):
    for _command in _family.COMMANDS:
        cli.add_command(_command)


def invoke(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """The command line, in this process, with the settings read once from `env` (default: this
    process's environment): every error printed as docs/exit-codes.md says and mapped to its exit code,
    which is returned (tests call this; `main` exits with it)."""
    try:
        settings = Settings.from_env(os.environ if env is None else env)
        code = cli.main(args=argv, prog_name="cudabuild", standalone_mode=False, obj=settings)
    except click.exceptions.Abort:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except CudabuildError as exc:
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted: the builder container was removed; nothing was published", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(invoke(argv))
