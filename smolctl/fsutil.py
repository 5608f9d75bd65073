"""Filesystem safety: every file smolctl writes, replaces or deletes goes through here.

    with atomic_file(out / "model.gguf") as tmp: ...     # write tmp; it replaces the target at the end
    with atomic_dir(dest) as tmp: ...                    # the same for a directory
    write_text(path, text)                               # a small file, atomically
    sha256(path) / sha256([buffer, ...])                 # the one hasher (files are read in chunks)
    with hold(out): ...                                  # one writer per output target (lock naming its PID)
    with run_lock(run_dir) as created: ...               # one process per run directory
    with open_file(path, "a") as f: ...                  # the one open() for writing: never through a link
    with pinned(ckpt): ...                               # a reader's claim: pruning leaves `ckpt` alone

Only this module opens files for writing, renames or deletes (tests/test_write_gate.py checks the
source). What it deletes, truncates or replaces is what smolctl made and recognises as its own
(the predicates of smolctl/precious.py, and what a command's `ours` says of its own output):
never a user's file, whatever --force says.

Temporary paths live beside their target (same filesystem: the final rename is atomic) under a
hidden name, and are registered while they exist: a block that raises -- any exception, Ctrl-C's
KeyboardInterrupt, or `Terminated` (SIGTERM, see `cleanup_on_exit`) -- removes its own, and
`remove_temps()` removes whatever is left. The renames that publish a result run with SIGINT and
SIGTERM held back, so a signal never lands between moving the old target aside and moving the new
one in.

What is precious -- a run, a checkpoint, an import -- and the checks made before writing
(`check_output`, `check_replaceable`, `check_run_dir`) are in smolctl/precious.py, which only reads.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator

from smolctl.errors import SmolctlError
from smolctl.precious import empty_dir, file_kind

LOCK = ".lock"  # in a run directory: flock'ed by the process training it, which writes its PID there
_TEMPS: set[Path] = set()  # temporary paths this process created and has not yet published or removed


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM (while `cleanup_on_exit` is active), so that a
    termination unwinds like Ctrl-C: every `finally` runs and temporary paths are removed."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def cache_dir() -> Path:
    """~/.cache/smolctl, or $XDG_CACHE_HOME/smolctl: what smolctl caches per machine (compiled
    kernels, autotune's figures)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smolctl"


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


_TEMP_NAME = re.compile(r"\.(?P<target>.+)\.(?P<kind>partial|old)-\d+-\w+")  # what _temp_name makes


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
        return f"{what} {path} is not a regular file (it is a {file_kind(os.stat(p).st_mode)})"
    return f"{what} not found: {path}"


def open_file(path: Path, mode: str = "wb", encoding: str | None = None) -> IO:
    """The one way a file is opened for writing ("w", "a", with "b" or not): never through a
    symbolic link, and only a regular file (a FIFO or device is refused, not waited on)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    flags |= os.O_APPEND if mode.startswith("a") else os.O_TRUNC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SmolctlError(f"{path} is a symbolic link", hint="smolctl never writes through a link") from None
        if e.errno == errno.ENXIO:  # a FIFO nobody reads
            raise SmolctlError(f"{path} is not a regular file (it is a named pipe)", hint="Pass a regular file") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise SmolctlError(f"{path} is not a regular file (it is a {file_kind(info.st_mode)})",
                           hint="Pass a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode, encoding=None if "b" in mode else (encoding or "utf-8"))


def move(src: Path, dst: Path) -> None:
    """Rename `src` (ours) to `dst`, which must not exist: a move never replaces anything."""
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "already exists", str(dst))
    os.rename(src, dst)


def check_writable(folder: Path) -> None:
    """A real write in `folder` (root passes access checks on read-only mounts); OSError if not."""
    tempfile.TemporaryFile(dir=folder).close()


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


# -- one writer per target -------------------------------------------------------------------

@contextmanager
def _locked(lock: Path, what: str, cannot: str, hint: str) -> Iterator[None]:
    """Hold an exclusive flock on `lock` (created if needed; it holds our PID) for the block. A
    second process gets a one-line error naming the holder's PID. The kernel drops a flock when
    its process dies, so the lock file a killed process leaves never blocks; it is removed (while
    still held) when the block ends."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise SmolctlError(f"{cannot}: {e.strerror}", hint=hint) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SmolctlError(f"{what} is in use by process {pid}",
                               hint="Wait for it to finish or stop it: two writers would overwrite each other",
                               exit_code=1) from None
        try:  # the holder may have removed the lock file (its block ended) while we waited
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same and not re.fullmatch(rb"\d*\n?", os.pread(fd, 64, 0)):  # a file of the user's by that name
            os.close(fd)
            raise SmolctlError(f"{lock} is in the way: it is not a lock file smolctl wrote",
                               hint="Move it away, or pick another output path")
        if same:
            break
        os.close(fd)
        lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if os.path.isdir(lock.parent):
            lock.unlink(missing_ok=True)
        os.close(fd)


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextmanager
def hold(target: Path, what: str | None = None, hint: str = "Pick another output path") -> Iterator[None]:
    """Be the one writer of `target` (a file or directory about to be written or replaced) for the
    block: a lock beside it, and what an earlier writer killed mid-write left (its hidden temporary
    copies) tidied first -- an old version moved aside and never replaced is put back."""
    target = Path(target).absolute()
    made = [d for d in target.parents if not os.path.lexists(d)]  # what the lock needs created
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        what = what or str(target)
        with _locked(lock_path(target), what, f"cannot write {what}", hint):
            tidy(target)
            yield
    finally:  # nothing written: the folders made for the lock go too
        for folder in made:
            if os.path.lexists(target) or not empty_dir(folder):
                break
            folder.rmdir()


def tidy(target: Path) -> None:
    """Remove the temporary copies of `target` that a killed writer left beside it (call it while
    holding the target: nobody else is writing it)."""
    target = Path(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return
    for name in names:
        m = _TEMP_NAME.fullmatch(name)
        if not m or m["target"] != target.name:
            continue
        leftover = target.parent / name
        if m["kind"] == "old" and not os.path.lexists(target):
            os.replace(leftover, target)  # killed between publish's two renames: the old one back
        else:
            remove(leftover)


def tidy_dir(folder: Path) -> None:
    """`tidy` for every target directly in `folder` (a run directory, which we hold)."""
    seen = set()
    for name in os.listdir(folder):
        m = _TEMP_NAME.fullmatch(name)
        if m and m["target"] not in seen:
            seen.add(m["target"])
            tidy(Path(folder) / m["target"])


@contextmanager
def run_lock(run_dir: Path) -> Iterator[bool]:
    """Create `run_dir` if needed and hold its exclusive lock for the block; yield whether this call
    created the directory. A second process gets a one-line error naming the holder's PID."""
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
    with _locked(run_dir / LOCK, f"run directory {run_dir}", f"cannot write to run directory {run_dir}",
                 hint="Pick another --run-dir"):
        tidy_dir(run_dir)
        yield created


# -- readers' claims -----------------------------------------------------------------------------

@contextmanager
def pinned(folder: Path) -> Iterator[Path]:
    """A shared flock on the directory `folder` for the block: `remove_unpinned` (pruning) leaves
    it alone meanwhile, so a reader never loses the checkpoint it is reading to a live run."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        yield Path(folder)  # not there (or no directory): the reader says what it found
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield Path(folder)
    finally:
        os.close(fd)


def remove_unpinned(folder: Path) -> bool:
    """Delete the directory `folder` unless a reader has it pinned; whether it was deleted."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # being read: the next prune takes it
        remove(folder)
        return True
    finally:
        os.close(fd)
