"""The command registry: every command, built-in or not, comes in through one entry-point group.

A package adds commands to smolctl by declaring, in its pyproject.toml,

    [project.entry-points."smolctl.commands"]
    hello = "my_pkg.cli:register"

where `register(app: typer.Typer) -> None` adds its commands, usually with `@command(app)`
below so that a `SmolctlError` becomes a one-line error and an exit code instead of a traceback.
smolctl's own commands are declared the same way in its pyproject.toml.
"""

from __future__ import annotations

import errno
import functools
import sys
from importlib.metadata import entry_points
from typing import Callable

import typer
from typer.core import TyperGroup

from smolctl.errors import SmolctlError
from smolctl.fsutil import Terminated, cleanup_on_exit

GROUP = "smolctl.commands"
# OSErrors that mean the machine, not smolctl, is in the way (one line, exit 1, no traceback),
# with what to do about them.
ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "Free some disk space", errno.EDQUOT: "Free some space within your quota",
    errno.EROFS: "Pick a writable location", errno.EACCES: "Fix the permissions or pick another path",
    errno.EPERM: "Fix the permissions or pick another path", errno.EIO: "Check the disk",
}


def load_commands(app: typer.Typer) -> list[str]:
    """Call every registered `register(app)`; return their names. A broken plugin warns, never breaks smolctl."""
    loaded = []
    for ep in sorted(entry_points(group=GROUP), key=lambda ep: ep.name):
        try:
            ep.load()(app)
        except Exception as e:  # a third-party plugin failing to import must not take the CLI down
            print(f"Warning: smolctl command plugin {ep.name!r} ({ep.value}) failed to load: {e}", file=sys.stderr)
            continue
        loaded.append(ep.name)
    return loaded


def command(app: typer.Typer, name: str | None = None, **kwargs) -> Callable:
    """Like `app.command()`, plus smolctl's error contract: a SmolctlError prints one line
    (`Error: ...`) on stderr and exits with its code; so does an OSError from the environment (disk
    full, read-only, permissions: exit 1); Ctrl-C exits 130 and SIGTERM 143 without a traceback.
    However the command ends, the temporary files it still holds are removed (fsutil)."""

    def decorator(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kw):
            try:
                with cleanup_on_exit():
                    return fn(*args, **kw)
            except SmolctlError as e:
                fail(e)
            except OSError as e:
                if e.errno not in ENVIRONMENT_ERRORS:
                    raise  # anything else is a bug: keep its traceback
                fail(SmolctlError(f"{e.strerror}" + (f": {e.filename}" if e.filename else ""),
                                  hint=f"{ENVIRONMENT_ERRORS[e.errno]}, then run it again", exit_code=1))
            except KeyboardInterrupt:
                print("\nInterrupted.", file=sys.stderr)
                raise typer.Exit(130) from None
            except Terminated as e:
                print(f"Stopped by {e}.", file=sys.stderr)
                raise typer.Exit(128 + e.signum) from None

        app.command(name, **kwargs)(run)
        return fn

    return decorator


def fail(e: SmolctlError):
    print(f"Error: {e}", file=sys.stderr)
    raise typer.Exit(e.exit_code)


class OneLineErrors(TyperGroup):
    """The root command group: usage errors (unknown option, bad value, missing command) come out
    as one line like every other error -- `Error: No such option: --bogus. Try 'smolctl train -h'
    for help.` (exit 2) -- instead of click's usage block and Rich's boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        from typer import rich_utils
        from typer.core import _click

        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click.exceptions.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `smolctl`: the help, as usual
                rich_utils.rich_format_error(e)
                sys.exit(e.exit_code)
            where = f" Try '{e.ctx.command_path if e.ctx else 'smolctl'} -h' for help."
            print(f"Error: {' '.join(e.format_message().split()).rstrip('.')}.{where}", file=sys.stderr)
            sys.exit(e.exit_code)
        except _click.exceptions.ClickException as e:
            print(f"Error: {' '.join(e.format_message().split())}", file=sys.stderr)
            sys.exit(e.exit_code)
        except typer.Abort:
            print("Aborted.", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
