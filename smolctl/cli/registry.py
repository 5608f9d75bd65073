"""The command registry: every command, built-in or not, comes in through one entry-point group.

A package adds commands to smolctl by declaring, in its pyproject.toml,

    [project.entry-points."smolctl.commands"]
    hello = "my_pkg.cli:register"

where `register(app: typer.Typer) -> None` adds its commands, usually with `@command(app)`
below so that a `SmolctlError` becomes a one-line error and an exit code instead of a traceback.
smolctl's own commands are declared the same way in its pyproject.toml.

Every command -- built-in, or a plugin's however it was added -- runs inside `OneLineErrors.main`,
the boundary: an exception nobody expected (a bug) becomes one line, `Error: internal error: ...
(full traceback in FILE)`, exit 1, with the traceback saved to FILE (under the run directory when
the command has one, else the user's cache directory). SMOLCTL_DEBUG=1 lets it through instead.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import time
import traceback
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

import typer
from typer.core import TyperCommand, TyperGroup

from smolctl.errors import ENVIRONMENT_ERRORS, SmolctlError
from smolctl.fsutil import Terminated, cleanup_on_exit
from smolctl.launch import LAUNCHED_BY_SMOLCTL

GROUP = "smolctl.commands"
# OSErrors that mean a path given on the command line cannot be one: bad input (exit 2), wherever
# the command first touches it.
PATH_ERRORS = {errno.ENAMETOOLONG: "Use a shorter path (each name in it at most 255 bytes)"}


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
    full, read-only, permissions: exit 1), and one that says a path cannot be one (too long: exit 2);
    Ctrl-C exits 130 and SIGTERM 143 without a traceback; an empty option value is refused before
    the command runs (see NoBlankValues). However the command ends, the temporary files it still
    holds are removed (fsutil)."""

    def decorator(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(*args, **kw):
            crash_reports_in(None)  # a run directory named by an earlier command in this process is not ours
            try:
                with cleanup_on_exit():
                    return fn(*args, **kw)
            except SmolctlError as e:
                fail(e)
            except OSError as e:
                where = f": {e.filename}" if e.filename else ""
                if e.errno in PATH_ERRORS:
                    fail(SmolctlError(f"{e.strerror}{where}", hint=PATH_ERRORS[e.errno], exit_code=2))
                if e.errno not in ENVIRONMENT_ERRORS:
                    raise  # anything else is a bug: the boundary (OneLineErrors) reports it
                fail(SmolctlError(f"{e.strerror}{where}", hint=f"{ENVIRONMENT_ERRORS[e.errno]}, then run it again",
                                  exit_code=1))
            except KeyboardInterrupt:
                print("\nInterrupted.", file=sys.stderr)
                raise typer.Exit(130) from None
            except Terminated as e:
                if not os.environ.get(LAUNCHED_BY_SMOLCTL):  # else its launcher stopped it, and says why
                    print(f"Stopped by {e}.", file=sys.stderr)
                raise typer.Exit(128 + e.signum) from None

        app.command(name, **{"cls": NoBlankValues, **kwargs})(run)
        return fn

    return decorator


def fail(e: SmolctlError):
    print(f"Error: {error_line(e)}", file=sys.stderr)
    raise typer.Exit(e.exit_code)


# An error line is cut, whatever a damaged file or a YAML alias bomb puts in it: the message (which
# may quote a file) to 300 characters, the hint (ours: what to do, with the paths it names) to 300,
# each by cutting out its middle -- the start says what, the end often why or how to go on.
MAX_MESSAGE, MAX_HINT = 300, 300
MAX_LINE = 300  # a line with no hint (internal errors, usage errors)


def error_line(e: SmolctlError) -> str:
    """`message. hint` on one line, each cut to its bound (a message with no hint: to MAX_LINE)."""
    message = one_line(e.message.rstrip("."), MAX_MESSAGE if e.hint else MAX_LINE)
    if not e.hint:
        return message
    return f"{message}. {one_line(e.hint, MAX_HINT)}"


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """`text` on one line, at most `limit` characters, and printable whatever it holds (the
    surrogates of non-UTF-8 bytes are shown as \\xNN)."""
    text = " ".join(text.split())
    if len(text) > limit:  # the middle goes: a message's start says what, its end often why ("... in use")
        head = (limit - 5) * 2 // 3
        text = f"{text[:head]} ... {text[-(limit - 5 - head):]}"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class NoBlankValues(TyperCommand):
    """`--data ''` (or `--model " "`) is a slip, not a value: an empty path is the working
    directory, and an empty name matches everything. Refused for every option, on the raw
    strings, before Typer turns them into paths or values. `--system ''` (no system prompt) means
    something, so it is allowed; arguments (a prompt) are the command's to judge."""

    BLANK_OK = {"system"}

    def make_parser(self, ctx):
        parser = super().make_parser(ctx)
        parse = parser.parse_args

        def parse_args(args):
            opts, rest, order = parse(args=args)
            for param in order:
                values = opts.get(param.name)
                values = values if isinstance(values, (list, tuple)) else [values]
                if (param.param_type_name == "option" and param.name not in self.BLANK_OK
                        and any(isinstance(v, str) and not v.strip() for v in values)):
                    from typer.core import _click

                    raise _click.exceptions.UsageError(
                        f"{param.opts[0]} must not be empty: give it a value, or leave it out", ctx)
            return opts, rest, order

        parser.parse_args = parse_args
        return parser


# -- the boundary: what no command caught ------------------------------------------------------

_run_dir: Path | None = None


def crash_reports_in(run_dir: Path | None) -> None:
    """Commands that work in a run directory name it here: a crash's traceback is saved there."""
    global _run_dir
    _run_dir = run_dir


def crash_log(exc: BaseException) -> Path | None:
    """Save `exc`'s full traceback as crash-<time>-<pid>.log in the run directory (if it exists),
    else $XDG_CACHE_HOME/smolctl/crash (~/.cache), else the temp directory. None if nowhere works.
    Never raises: whatever the traceback holds (bytes of a non-UTF-8 argument) is written as
    backslash escapes, and any failure to write means the next place, then None."""
    import tempfile

    from smolctl import fsutil

    try:
        name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smolctl" / "crash"
        text = f"smolctl {' '.join(sys.argv[1:])}\n\n" + "".join(traceback.format_exception(exc))
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        folders = ([_run_dir] if _run_dir is not None and _run_dir.is_dir() else []) + [
            cache, Path(tempfile.gettempdir()) / "smolctl-crash"]
    except Exception:
        return None
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fsutil.write_text(folder / name, text)
            return folder / name
        except Exception:
            continue
    return None


def internal_error(exc: Exception) -> int:
    """Report a bug in one line (the traceback goes to a file, else to stderr); the exit code, 1.
    Never raises: the reporter of a bug must not be a second one."""
    try:
        path = crash_log(exc)
        where = f"full traceback in {path}" if path else "rerun with SMOLCTL_DEBUG=1 for the traceback"
        print(f"Error: {one_line(f'internal error: {type(exc).__name__}: {exc}')} ({where})", file=sys.stderr)
    except Exception:
        try:
            traceback.print_exception(exc, file=sys.stderr)
        except Exception:
            pass
    return 1


def undecodable_argument(args: list[str]) -> str | None:
    """The first command-line argument that is not UTF-8 (Python keeps its bytes as surrogates),
    as it was typed with \\xNN escapes; None when every one is text. smolctl's policy: such an
    argument is refused in one line, whatever it was for (a prompt, a name, a path)."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return arg.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except Exception:
            continue
    return None


class OneLineErrors(TyperGroup):
    """The root command group: usage errors (unknown option, bad value, missing command) come out
    as one line like every other error -- `Error: No such option: --bogus. Try 'smolctl train -h'
    for help.` (exit 2) -- instead of click's usage block and Rich's boxed panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        from typer import rich_utils
        from typer.core import _click

        bad = undecodable_argument(list(sys.argv[1:] if args is None else args))
        if bad is not None:
            print(f"Error: {one_line(f'the argument {bad} is not UTF-8 text')}. Pass arguments (prompts, "
                  "names, paths) as UTF-8", file=sys.stderr)
            sys.exit(2)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click.exceptions.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `smolctl`: the help, as usual
                rich_utils.rich_format_error(e)
                sys.exit(e.exit_code)
            where = f" Try '{e.ctx.command_path if e.ctx else 'smolctl'} -h' for help."
            print(f"Error: {one_line(e.format_message()).rstrip('.')}.{where}", file=sys.stderr)
            sys.exit(e.exit_code)
        except _click.exceptions.ClickException as e:
            print(f"Error: {one_line(e.format_message())}", file=sys.stderr)
            sys.exit(e.exit_code)
        except typer.Abort:
            print("Aborted.", file=sys.stderr)
            sys.exit(1)
        except Exception as e:  # a bug: one line for the user, the traceback in a file
            if os.environ.get("SMOLCTL_DEBUG", "") not in ("", "0"):
                raise
            sys.exit(internal_error(e))
        sys.exit(code if isinstance(code, int) else 0)
