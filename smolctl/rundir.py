"""A training run's directory: the checkpoint to resume from, the lock, undoing a failed start,
and the signals that stop a run.

    path = resume_point(cfg, run_dir, "latest", overwrite=False, world_size=1)  # or None: a fresh run
    undo = claim(run_dir, log_file, held)   # lock it; undo() removes what a failed fresh start made
    with stop_on_signals() as stop: ...     # stop.signal: "SIGINT"/"SIGTERM" once one arrived
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

from smolctl import checkpoint as ckpt_io
from smolctl import fsutil
from smolctl.config import RESUMABLE, TrainConfig
from smolctl.errors import SmolctlError
from smolctl.distributed import continue_command

LOG = "train.log"  # the human-readable log, in the run directory: one log per run


class RunComplete(SmolctlError):
    """Resuming a run whose final checkpoint is at --max-steps: nothing to do (exit 0)."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(f"Run {run_dir} is complete at step {step}",
                         hint=f"Pass --max-steps N (above {step}) to extend it", exit_code=0)


def resume_point(cfg: TrainConfig, run_dir: Path, resume: str | None, overwrite: bool, world_size: int,
                 say: Callable = print, allow_config_change: bool = False) -> Path | None:
    """The checks a run can make before any process group exists: the checkpoint to resume from
    (verified, same model, a world size its data streams allow -- saying so when it differs --,
    same trajectory unless `allow_config_change`), or None for a fresh run in a directory that
    may take one. Raises RunComplete when that checkpoint is the final one at cfg.max_steps.
    train() calls it on every rank; the CLI once, before launching N processes."""
    cfg = cfg.resolved()
    if resume is None:
        if ckpt_io.saved(run_dir) and not overwrite:  # damaged ones count: they may be all there is
            raise SmolctlError(f"run directory {run_dir} already has checkpoints",
                               hint=f"Continue it with: smolctl resume --run-dir {run_dir} --from latest "
                                    "(to start over instead: smolctl train ... --overwrite)")
        return None
    path = ckpt_io.find_checkpoint(run_dir, resume, say=say)
    meta = ckpt_io.check_world_size(path, world_size)
    mcfg = cfg.model_config()
    # bos/eos are the run's tokenizer's (train.run_tokenizer), not the preset's
    same = dict(name=mcfg.name, bos_token_id=mcfg.bos_token_id, eos_token_id=mcfg.eos_token_id)
    if dataclasses.replace(meta.model, **same) != mcfg:
        raise SmolctlError(f"{path} holds a different model config than this run's",
                           hint=f"Put back the model of {run_dir / 'config.yaml'} as the checkpoint saved it "
                                f"(its smolctl.json has it)")
    if meta.step == cfg.max_steps and path.name == "final":
        raise RunComplete(run_dir, meta.step)
    if meta.step > cfg.max_steps:  # a step checkpoint at max_steps (stopped during the last step) finishes
        raise SmolctlError(f"{path} is at step {meta.step}, which is not before --max-steps {cfg.max_steps}",
                           hint="Pass a larger --max-steps to extend the run")
    changed = _trajectory_changes(meta.train, cfg)
    if changed and not allow_config_change:
        raise SmolctlError(f"{run_dir / 'config.yaml'} differs from the config {path.name} was trained with "
                           f"({'; '.join(changed)}): resuming would not continue the run exactly",
                           hint="Undo the edit, or pass --allow-config-change to resume with it")
    if meta.world_size != world_size:  # allowed by check_world_size: it only costs bit-exactness
        say(f"World size {meta.world_size} -> {world_size}: data positions re-dealt; not bit-exact")
    return path


def config_changes(saved: TrainConfig, now: TrainConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """'key: old -> new' for each value that differs, but for the keys in `ignore`."""
    return [f"{f.name}: {getattr(saved, f.name)!r} -> {getattr(now, f.name)!r}" for f in dataclasses.fields(TrainConfig)
            if f.name not in ignore and getattr(saved, f.name) != getattr(now, f.name)]


def _trajectory_changes(saved: TrainConfig, now: TrainConfig) -> list[str]:
    """The changes that change what training computes (the model is compared as a whole, by
    resume_point; RESUMABLE fields are bookkeeping)."""
    return config_changes(saved, now, ignore=(*RESUMABLE, "preset", "model"))


def data_flags(run_dir: Path, resume: str | None, key: str) -> tuple[str, str]:
    """What messages call the data (or eval data) and its text column: train's flags, or, when
    resuming (resume has no such flags), the keys of the run's config.yaml."""
    if resume is None:
        return "--" + key.replace("_", "-"), "--text-column"
    return f"{key} in {run_dir / 'config.yaml'}", f"text_column in {run_dir / 'config.yaml'}"


def claim(run_dir: Path, log_file: Path, held: ExitStack) -> Callable[[], None]:
    """Lock the run directory, and a log file outside it, for the life of `held` (creating the
    directory if needed). Returns the undo of a failed fresh start: remove the directory if this
    call created it, else its new entries, and the log file if this call created it."""
    if not in_run(log_file, run_dir):  # a log elsewhere has a lock of its own
        held.enter_context(fsutil.hold(log_file, f"the log file {log_file}", hint="Pick another --log-file"))
    before = set(os.listdir(run_dir)) if run_dir.is_dir() else set()
    new_log = not log_file.exists()
    created = held.enter_context(fsutil.run_lock(run_dir))

    def undo() -> None:
        made = [run_dir] if created else [run_dir / name for name in set(os.listdir(run_dir)) - before]
        for path in made + ([log_file] if new_log else []):
            fsutil.remove(path)

    return undo


def in_run(path: Path, run_dir: Path) -> bool:
    """Whether `path` (a log file) lies in the run directory, the run's own, or elsewhere."""
    return Path(run_dir).absolute() in Path(path).absolute().parents


def how_to_continue(run_dir: Path, world: int) -> str:
    if ckpt_io.checkpoints(run_dir):
        return f"Continue with: {continue_command(run_dir, world)}"
    return "Start again with the same command (there is no checkpoint yet)"


def prepare(run_dir: Path, fresh: bool) -> None:
    """Make the checkpoints folder and prove the directory writable; `fresh` (--overwrite names
    this run): its checkpoints and metrics go first."""
    try:
        if fresh:  # a run of ours (precious.check_run_dir refused any other with checkpoints)
            fsutil.remove(run_dir / "checkpoints")
            fsutil.remove(run_dir / "metrics.jsonl")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        fsutil.check_writable(run_dir)
    except OSError as e:
        raise SmolctlError(f"cannot write to run directory {run_dir}: {e.strerror}",
                           hint="Pick another --run-dir") from None


def supersede_later_checkpoints(run_dir: Path, source: Path, step: int, say) -> None:
    """Resuming from an earlier step starts a new timeline: set later checkpoints aside (not
    deleted) so that `--from latest` can never pick one from the abandoned branch. The checkpoint
    resumed from stays where it is (a final/ being extended included) until a newer save replaces
    it: a crash before that must find it again."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for s, path in ckpt_io.checkpoints(run_dir):
        if (s > step or (s == step and path.name == "final")) and path.resolve() != source.resolve():
            aside, n = path.parent / f"superseded-{stamp}-{path.name}", 1
            while aside.exists():  # two resumes within one second
                aside, n = path.parent / f"superseded-{stamp}.{n}-{path.name}", n + 1
            fsutil.move(path, aside)
            say(f"Set aside {path.name} (after step {step}) as {aside.name}")


class stop_on_signals:
    """SIGINT/SIGTERM set `.signal` (a host flag, free to read); the loop finishes its step, saves
    and returns. A second Ctrl-C stops at once."""

    signal: str | None = None

    def __enter__(self):
        self.signal = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def run_tokenizer(cfg: TrainConfig, mcfg, resume_path: Path | None):
    """(tokenizer, model config with its bos/eos ids) of a run: on resume the checkpoint's own
    tokenizer files (the run keeps its tokenizer even if cfg.tokenizer has moved or changed), else
    cfg.tokenizer (None: the bundled one). Refuses a tokenizer whose ids do not fit the embedding."""
    from smolctl.tokenizer import check_vocabulary, load_tokenizer, training_ids

    if resume_path is not None and (resume_path / "tokenizer.json").is_file():
        tok = load_tokenizer(str(resume_path))
    else:
        tok = load_tokenizer(cfg.tokenizer)
    check_vocabulary(tok, mcfg.vocab_size, lambda top: SmolctlError(
        f"the tokenizer {cfg.tokenizer or '(bundled)'} has ids up to {top:,}; the model's vocab_size is "
        f"{mcfg.vocab_size:,}", hint=f"Set model.vocab_size to at least {top + 1} (a multiple of 64 is fastest)"))
    bos, eos = training_ids(tok)
    return tok, dataclasses.replace(mcfg, bos_token_id=bos, eos_token_id=eos)
