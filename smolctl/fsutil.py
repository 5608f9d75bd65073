"""Filesystem safety: every file smolctl writes, replaces or deletes goes through here.

    with atomic_file(out / "model.gguf") as tmp: ...     # write tmp; it replaces the target at the end
    with atomic_dir(dest) as tmp: ...                    # the same for a directory
    write_text(path, text)                               # a small file, atomically
    sha256(path) / sha256([buffer, ...])                 # the one hasher (files are read in chunks)
    check_replaceable(out, force, ours, "an HF model")   # before replacing anything: refuse what isn't ours
    with run_lock(run_dir) as created: ...               # one process per run directory

Temporary paths live beside their target (same filesystem: the final rename is atomic) under a
hidden name, and are registered while they exist: a block that raises -- any exception, Ctrl-C's
KeyboardInterrupt, or `Terminated` (SIGTERM, see `cleanup_on_exit`) -- removes its own, and
`remove_temps()` removes whatever is left. The renames that publish a result run with SIGINT and
SIGTERM held back, so a signal never lands between moving the old target aside and moving the new
one in.

What is precious -- a training run (config.yaml + checkpoints/), a checkpoint (manifest.json), a
model `smolctl import` made -- is never replaced or deleted by a command that writes elsewhere.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from smolctl.errors import SmolctlError

LOCK = ".lock"  # in a run directory: flock'ed by the process training it, which writes its PID there
_TEMPS: set[Path] = set()  # temporary paths this process created and has not yet published or removed


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM (while `cleanup_on_exit` is active), so that a
    termination unwinds like Ctrl-C: every `finally` runs and temporary paths are removed."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# -- hashing -----------------------------------------------------------------------------------

def sha256(data: str | Path | Iterable[bytes | bytearray | memoryview]) -> str:
    """The hex sha256 of a file (read in 4 MiB chunks) or of buffers in memory."""
    h = hashlib.sha256()
    if isinstance(data, (str, Path)):
        with open(data, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    else:
        for chunk in data:
            h.update(chunk)
    return h.hexdigest()


# -- temporary paths ---------------------------------------------------------------------------

@contextmanager
def temporary(path: Path) -> Iterator[Path]:
    """Register `path` (about to be created by this process) as temporary for the block: whatever
    is still there when the block ends -- because it raised, or nothing published it -- is removed."""
    path = Path(path)
    _TEMPS.add(path)
    try:
        yield path
    finally:
        _TEMPS.discard(path)
        remove(path)


def remove_temps() -> None:
    """Remove every temporary path this process still holds (the CLI calls it after each command)."""
    while _TEMPS:
        remove(_TEMPS.pop())


def remove(path: Path) -> None:
    """Delete a file or a directory tree; nothing there is fine. Only for paths this process made
    (temporaries, its own run directory) or that a guard has cleared (`check_replaceable`)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)


def _temp_name(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def _ordinary_mode(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp make private (0600/0700) paths; the result is an ordinary file or directory."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


@contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; write it, and at the end of the block it is fsync'ed
    and renamed onto `target` (replacing a file there). If the block raises, `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=_temp_name(target, "partial"), dir=target.parent)
    os.close(fd)
    with temporary(Path(name)) as tmp:
        _ordinary_mode(tmp, 0o666)
        yield tmp
        publish(tmp, target)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; at the end of the block it replaces `target`
    (an old one is moved aside first and deleted last). If the block raises, `target` is untouched."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with temporary(Path(tempfile.mkdtemp(prefix=_temp_name(target, "partial"), dir=target.parent))) as tmp:
        _ordinary_mode(tmp, 0o777)
        yield tmp
        publish(tmp, target)


def write_bytes(target: Path, data: bytes) -> None:
    with atomic_file(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def publish(tmp: Path, target: Path, aside: Path | None = None) -> None:
    """Make the finished `tmp` (a file or a directory) the `target`: its data fsync'ed, then one
    rename; a directory already at `target` is first renamed to `aside` (default: a hidden name
    beside it) and deleted after. Signals wait until both renames are done."""
    _fsync_tree(tmp)
    if aside is None:
        aside = target.parent / f"{_temp_name(target, 'old')}{os.urandom(3).hex()}"
    with _signals_held():
        if tmp.is_dir() and target.is_dir() and not target.is_symlink():
            remove(aside)
            os.replace(target, aside)
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(aside, target)  # the old one back: a failed publish changes nothing
                raise
            _TEMPS.add(aside)
        else:
            os.replace(tmp, target)
        _TEMPS.discard(tmp)
    _fsync(target.parent)
    if aside in _TEMPS:
        _TEMPS.discard(aside)
        remove(aside)


@contextmanager
def _signals_held() -> Iterator[None]:
    held = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for p in path.iterdir():
            if p.is_file():
                _fsync(p)
    _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def no_file(what: str, path: str | Path) -> str:
    """'{what} not found: {path}', or, where something other than a regular file is there, what."""
    p = os.path.expanduser(os.fspath(path))
    if os.path.islink(p) and not os.path.exists(p):
        return f"{what} {path} is a symbolic link to {os.readlink(p)}, which does not exist"
    if os.path.isdir(p):
        return f"{what} {path} is a directory, not a file"
    if os.path.exists(p):
        import stat

        mode = os.stat(p).st_mode
        kinds = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                 (stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"))
        kind = next((name for test, name in kinds if test(mode)), "special file")
        return f"{what} {path} is not a regular file (it is a {kind})"
    return f"{what} not found: {path}"


# -- signals -----------------------------------------------------------------------------------

@contextmanager
def cleanup_on_exit() -> Iterator[None]:
    """For the life of a command: SIGTERM raises `Terminated` (Ctrl-C already raises
    KeyboardInterrupt), and whatever temporary paths are left at the end are removed."""
    old = None
    if _in_main_thread():
        old = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        remove_temps()
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _terminate(signum, frame):
    raise Terminated(signum)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# -- what is precious ------------------------------------------------------------------------

def is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "checkpoints").is_dir()


def is_checkpoint(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def is_import(path: Path) -> bool:
    """A directory `smolctl import` wrote (its smolctl.json says where it was imported from)."""
    try:
        return "imported_from" in json.loads((path / "smolctl.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def precious(path: Path) -> str | None:
    """What `path` itself is, if it must not be replaced by a command writing somewhere else."""
    if not path.is_dir():
        return None
    if is_run(path):
        return "a training run"
    if is_checkpoint(path):
        return "a checkpoint"
    if is_import(path):
        return "an imported model"
    return None


def precious_within(root: Path) -> tuple[Path, str] | None:
    """The first run, checkpoint or imported model at or below `root` (not descending into them)."""
    if not root.is_dir():
        return None
    for here, dirs, _ in os.walk(root):
        what = precious(Path(here))
        if what:
            return Path(here), what
    return None


def precious_above(path: Path) -> tuple[Path, str] | None:
    """The nearest run or checkpoint that (resolved) `path` lies inside, if any."""
    for parent in Path(path).resolve().parents:
        if is_run(parent) or is_checkpoint(parent):
            return parent, "a training run" if is_run(parent) else "a checkpoint"
    return None


def check_replaceable(path: Path, force: bool, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace `path` unless --force names it, it is `ours` (something of the kind this
    command writes: `what`), and it neither is nor holds a run, a checkpoint or another import."""
    if not os.path.lexists(path) or (path.is_dir() and not any(path.iterdir())):
        return
    if not force:
        raise SmolctlError(f"{path} already exists", hint="Pass --force to replace it, or choose another path")
    found = precious_within(path)
    if found and not (found == (path, "an imported model") and ours(path)):
        where, kind = found
        it = f"it is {kind}" if where == path else f"it holds {kind} ({where})"
        raise SmolctlError(f"refusing to replace {path}: {it}",
                           hint="--force only replaces what this command wrote; choose another path "
                                "(or delete it yourself if you really mean to)")
    if not ours(path):
        raise SmolctlError(f"refusing to replace {path}: it is not {what}",
                           hint="--force only replaces what this command wrote; choose another path")


# -- run directories -------------------------------------------------------------------------

@contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """Create `run_dir` if needed and hold its exclusive lock for the block; yield whether this call
    created the directory. A second process gets a one-line error naming the holder's PID. The
    kernel drops a flock when its process dies, so the lock file a killed run leaves never blocks."""
    run_dir = Path(run_dir)
    try:
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        run_dir.mkdir()
        created = True
    except FileExistsError:
        created = False
    except OSError as e:
        raise SmolctlError(f"cannot write to run directory {run_dir}: {e.strerror}",
                           hint="Pick another --run-dir") from None
    while True:
        try:
            fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SmolctlError(f"cannot write to run directory {run_dir}: {e.strerror}",
                               hint="Pick another --run-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SmolctlError(f"run directory {run_dir} is in use by process {pid}",
                               hint="Wait for it to finish or stop it: two processes would overwrite each "
                                    "other's checkpoints and logs", exit_code=1) from None
        try:  # the holder may have deleted the directory (a failed fresh run) while we waited
            same = os.fstat(fd).st_ino == os.stat(run_dir / LOCK).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
        run_dir.mkdir(parents=True, exist_ok=True)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield created
    finally:  # removed while still held (a waiter notices, above): a run that ends leaves no lock file
        if os.path.isdir(run_dir):
            Path(run_dir / LOCK).unlink(missing_ok=True)
        os.close(fd)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that lies inside a run or a checkpoint, that is itself a checkpoint or
    a model, or that holds another run, checkpoint or model below it (other than its own
    checkpoints): training there would mix two things that are each deleted or replaced whole."""
    run_dir = Path(run_dir)
    found = precious_above(run_dir)
    if found:
        raise SmolctlError(f"--run-dir {run_dir} lies inside {found[1]} ({found[0]})",
                           hint="Choose a run directory outside other runs and checkpoints, e.g. runs/NAME")
    if not run_dir.is_dir():
        return
    if (run_dir / "config.json").is_file() or is_checkpoint(run_dir) or is_import(run_dir):
        raise SmolctlError(f"--run-dir {run_dir} is a model or checkpoint directory, not a run",
                           hint="Choose another run directory, e.g. runs/NAME")
    own = run_dir / "checkpoints"
    for here, dirs, _ in os.walk(run_dir):
        here = Path(here)
        if here == run_dir:
            continue
        if here.parent == own:
            dirs.clear()  # this run's own checkpoints (and staging, superseded ones)
            continue
        what = precious(here) or ("a model" if (here / "config.json").is_file() else None)
        if what:
            raise SmolctlError(f"--run-dir {run_dir} holds {what} ({here})",
                               hint="Choose a run directory that holds no other run, checkpoint or model")
