"""The one exception type that the CLI turns into a one-line error.

Core code raises `SmolctlError("what went wrong", hint="what to do")` for anything a user can
fix (bad flags, files, configs, data, network); the CLI prints `Error: what went wrong. what to
do` on stderr and exits with `exit_code` (2: bad input). Anything else is a bug and keeps its
traceback. Notes that are not errors (what was chosen, what was skipped) go to stderr too: `note`.
"""

import errno
import sys

# OSErrors that mean the machine, not smolctl or its input, is in the way (one line, exit 1, no
# traceback), with what to do about them. Readers of files (artifacts.py) let these through.
ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "Free some disk space", errno.EDQUOT: "Free some space within your quota",
    errno.EROFS: "Pick a writable location", errno.EACCES: "Fix the permissions or pick another path",
    errno.EPERM: "Fix the permissions or pick another path", errno.EIO: "Check the disk",
}


class SmolctlError(Exception):
    def __init__(self, message: str, hint: str | None = None, exit_code: int = 2):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:
        text = self.message.rstrip(".")
        return f"{text}. {self.hint}" if self.hint else text


def note(line: str) -> None:
    """A line for the user on stderr (stdout is the command's output)."""
    print(line, file=sys.stderr, flush=True)
