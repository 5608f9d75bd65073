"""What smolctl must never write over, and the checks made before anything is written.

    check_output(path, "--log-file")                     # no link, FIFO, device; not inside a run
    check_replaceable(out, force, ours, "an HF model")   # before replacing anything: refuse what isn't ours
    check_run_dir(run_dir)                               # a run directory holds one run and nothing else
    precious(path), precious_above(path)                 # 'a training run', 'a checkpoint', 'an imported model'

What is precious -- a training run (config.yaml + checkpoints/), a checkpoint (manifest.json), a
model `smolctl import` made -- is never replaced or deleted by a command that writes elsewhere.
This module only reads (stat, walk, parse): the writes, renames and deletes are fsutil's, the one
write gate, which calls these checks first.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Callable

from smolctl.errors import SmolctlError


def file_kind(mode: int) -> str:
    """What a special file is, in words: 'named pipe', 'character device'..."""
    kinds = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISFIFO, "named pipe"), (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def check_output(path: Path, what: str, own: Path | None = None, kind: str = "file") -> None:
    """Refuse, before anything is created, an output path smolctl must not write: a symbolic link
    (never written through), a named pipe, device or socket, something of the other `kind` ("file"
    or "directory"), or a path inside a run, checkpoint or model -- other than `own`, the run this
    command writes."""
    path = Path(path)
    if os.path.islink(path):
        raise SmolctlError(f"{what} {path} is a symbolic link (to {os.readlink(path)})",
                           hint="smolctl never writes through a link: pass the path it points to, or another path")
    if os.path.exists(path):
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise SmolctlError(f"{what} {path} is not a regular file (it is a {file_kind(mode)})",
                               hint="Pass a path to a regular file")
        if kind == "file" and stat.S_ISDIR(mode):
            raise SmolctlError(f"{what} {path} is a directory", hint="Pass a file name")
        if kind == "directory" and not stat.S_ISDIR(mode):
            raise SmolctlError(f"{what} {path} is a file, not a directory", hint="Pass a directory")
    found = precious_above(path)
    if found and (own is None or found[0] != Path(own).resolve()):
        raise SmolctlError(f"{what} {path} lies inside {found[1]} ({found[0]})",
                           hint="Choose a path outside runs, checkpoints and models")


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
    """The nearest run, checkpoint or model that (resolved) `path` lies inside, if any."""
    for parent in Path(path).resolve().parents:
        what = precious(parent) or ("a model" if is_model(parent) else None)
        if what:
            return parent, what
    return None


def is_model(path: Path) -> bool:
    """A model directory: config.json with the weights beside it (an HF model, an export, an import)."""
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


# Keys that every config.yaml smolctl writes into a run directory has (all of TrainConfig's).
RUN_KEYS = {"model", "data", "max_steps", "batch_size", "seq_len", "lr", "save_every"}


def owns_run(path: Path) -> bool:
    """Whether `path` is a run directory smolctl made: its config.yaml is a training config as
    `smolctl train` writes it. A user's own config.yaml there is not (it is never overwritten)."""
    config = Path(path) / "config.yaml"
    if not config.is_file() or config.is_symlink():
        return False
    try:
        import yaml

        with open(config, "rb") as f:
            data = yaml.safe_load(f.read(1 << 20))
        return isinstance(data, dict) and RUN_KEYS <= set(data)
    except Exception:  # not YAML, not UTF-8: not ours
        return False


def empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def check_replaceable(path: Path, force: bool, ours: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace `path` unless --force names it, it is `ours` (something of the kind this
    command writes: `what`), and it neither is nor holds a run, a checkpoint or another import."""
    if not os.path.lexists(path) or empty_dir(path):
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


RUN_FILES = ("config.yaml", "checkpoints", "metrics.jsonl", "train.log", "loss.png")  # what a run writes


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that lies inside a run or a checkpoint, that is itself a checkpoint or
    a model, or that holds another run, checkpoint or model below it (other than its own
    checkpoints): training there would mix two things that are each deleted or replaced whole."""
    run_dir = Path(run_dir)
    check_output(run_dir, "--run-dir", kind="directory")  # not a link, nor inside a run, checkpoint or model
    if not run_dir.is_dir():
        return
    if (run_dir / "config.json").is_file() or is_checkpoint(run_dir) or is_import(run_dir):
        raise SmolctlError(f"--run-dir {run_dir} is a model or checkpoint directory, not a run",
                           hint="Choose another run directory, e.g. runs/NAME")
    if not owns_run(run_dir):
        clash = next((name for name in RUN_FILES if os.path.lexists(run_dir / name)
                      and not (name == "checkpoints" and empty_dir(run_dir / name))), None)
        if clash:
            raise SmolctlError(f"--run-dir {run_dir} is not a smolctl run, and it holds a {clash} that a run "
                               f"would overwrite", hint="Choose a new or empty run directory, e.g. runs/NAME")
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
