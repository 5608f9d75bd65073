"""Pretraining under Accelerate: setup -> fit, with exact resume.

    cfg = TrainConfig(preset="tiny", data="sample", max_steps=200, batch_size=8, seq_len=256)
    result = train(cfg, run_dir=Path("runs/demo"), sinks=[print])
    result = train(cfg, run_dir=Path("runs/demo"), resume="latest")   # same loop, restored state

`setup` builds everything the first step needs (accelerator, model, optimizer, data stream,
sinks) and the TrainState to start from; `fit` advances that state to cfg.max_steps. Resume is
training with restored state, not a second code path: setup loads the checkpoint's weights,
optimizer, RNG and data position into the same objects. On CPU the losses after a resume equal
an uninterrupted run's bit for bit.

The loop emits events (see metrics.py); it never draws anything itself.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from smolctl import checkpoint as ckpt_io
from smolctl import precious, rundir
from smolctl.config import TrainConfig
from smolctl.distributed import PeerFailed, is_peer_failure, place
from smolctl.errors import SmolctlError
from smolctl.loss import evaluate
from smolctl.metrics import check_log_file, plot_loss
from smolctl.perf import memory_gb
from smolctl.run import Run, TrainState, check_inputs, close_sinks, setup
from smolctl.rundir import LOG, stop_on_signals
from smolctl.schedule import lr_at


@dataclass
class TrainResult:
    step: int
    stopped_by: str | None  # "SIGINT"/"SIGTERM" when interrupted, None when finished
    last_checkpoint: Path | None
    run_dir: Path


def train(cfg: TrainConfig, run_dir: Path, resume: str | None = None, log_file: Path | None = None,
          sinks: list[Callable] = (), overwrite: bool = False, allow_config_change: bool = False,
          say: Callable[[str], None] | None = None) -> TrainResult:
    """Train (or resume) to cfg.max_steps; see the module docstring. Raises SmolctlError (RunComplete
    when resuming a run that already reached cfg.max_steps). `say` gets the figures behind the
    precision `auto` picks (--verbose).

    The main process holds the run directory's lock for the whole run (one process per run). A
    fresh run checks its inputs before creating anything; if it fails later, whatever the
    exception, before its first checkpoint, it removes what this call created (the run directory,
    or the new entries of an existing one, and a new log file).
    """
    run_dir = Path(run_dir)
    log_file = Path(log_file) if log_file else run_dir / LOG
    where = place()  # a launch that cannot form its job fails here, before anything is created
    # A fresh run (--resume auto without checkpoints is one) plans on rank 0 before anything is
    # created; the other ranks, and every rank of a resume, in setup, once rank 0 has tidied the run.
    fresh = resume is None or (resume == "auto" and not ckpt_io.saved(run_dir))
    plan = None
    if where.rank == 0:
        precious.check_run_dir(run_dir)
        check_log_file(log_file, run_dir)
        if fresh:
            plan = check_inputs(cfg, run_dir, resume, overwrite, where.world)
    state = None
    with ExitStack() as held:
        undo = rundir.claim(run_dir, log_file, held) if where.rank == 0 else None
        try:
            with ExitStack() as cleanup:  # closes the metrics files and the data worker however training ends
                try:
                    run, state = setup(cfg, run_dir, resume, log_file, sinks, overwrite, allow_config_change, cleanup,
                                       plan, say)
                    return fit(run, state)
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    error = _as_smolctl_error(e, cfg, run_dir, resume, where)
                    if error is None:
                        raise
                    raise error from None
        except BaseException as e:
            if undo is not None and not ckpt_io.checkpoints(run_dir):
                undo()
            stepped = state is not None and state.step > state.start_step
            if isinstance(e, SmolctlError) and where.world > 1 and stepped and not isinstance(e, PeerFailed):
                # It ends the whole job (the launcher stops the others): say which process, and how to go on.
                how = rundir.how_to_continue(run_dir, where.world)
                raise SmolctlError(f"process {where.rank} of {where.world} failed: {e.message}",
                                   hint=f"{e.hint.rstrip('.')}. {how}" if e.hint else how, exit_code=e.exit_code) from None
            raise


def fit(run: Run, state: TrainState) -> TrainResult:
    """Train from `state` to cfg.max_steps, or until a signal: log, evaluate, sample and save on
    their schedules. Every rank takes every branch together."""
    cfg = run.cfg
    state.started = state.window_t = time.perf_counter()
    run.loss_module.train()
    with stop_on_signals() as stop:
        stopping = False
        while state.step < cfg.max_steps and not stopping:
            lr = lr_at(state.step + 1, cfg)
            train_step(run, state, lr)
            # The host reads the device (a sync) only at steps where it has something to do. One
            # process reads its signal flag for free at every step; several agree on it at looks.
            if not (due(cfg, state.step) or (run.world == 1 and stop.signal)):
                continue
            good, stopping = look(run, state, stop)
            if not good:
                continue  # a skipped step: nothing to log, evaluate or save
            step = state.step
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                log_row(run, state, lr)
            if cfg.eval_every and step % cfg.eval_every == 0:
                run_eval(run, state, step)
            if cfg.sample_every and step % cfg.sample_every == 0 and run.main:
                run_sample(run, state, step)
            if (step % cfg.save_every == 0 and step < cfg.max_steps) or stopping:
                state.last_checkpoint = save(run, state)
    if stopping:
        signame = stop.signal or "SIGTERM"  # a rank stopped by another rank's signal
        run.emit("end", step=state.step, text=f"Stopped by {signame} at step {state.step}; saved {state.last_checkpoint}",
                 stopped_by=signame)
        close_sinks(run.sinks)
        return TrainResult(state.step, signame, state.last_checkpoint, run.run_dir)
    if not cfg.eval_every or state.step % cfg.eval_every:
        run_eval(run, state, state.step)
    state.last_checkpoint = save(run, state, final=True)
    if run.main:
        png = plot_loss(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
        run.emit("end", step=state.step, text=f"Done: step {state.step}, {state.tokens_seen:,} tokens; final "
                                              f"checkpoint {state.last_checkpoint}" + (f"; loss curve {png}" if png else ""),
                 stopped_by=None)
    close_sinks(run.sinks)
    return TrainResult(state.step, None, state.last_checkpoint, run.run_dir)


def due(cfg: TrainConfig, step: int) -> bool:
    """Whether the loop has anything to do on the host after `step`: log, evaluate, sample, save, end."""
    every = (cfg.log_every, cfg.eval_every, cfg.sample_every, cfg.save_every)
    return step == cfg.max_steps or any(n and step % n == 0 for n in every)


def train_step(run: Run, state: TrainState, lr: float) -> None:
    """One optimizer step: grad_accum micro-batches, clipping, the update. A step that is not
    finite on some rank is skipped on the device: it leaves the weights and AdamW's moments and
    step count as they were. No host sync: the step's loss, norm and finiteness stay on the device
    until the next look."""
    cfg, acc = run.cfg, run.accelerator
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    step_loss = torch.zeros((), device=run.device)
    for micro in range(cfg.grad_accum):
        batch, state.data_state = next(run.data)
        batch = batch.to(run.device, non_blocking=True)
        sync = acc.no_sync(run.loss_module) if micro < cfg.grad_accum - 1 else nullcontext()
        with sync:
            loss = run.loss_module(batch[:, :-1], batch[:, 1:])
            acc.backward(loss / cfg.grad_accum)
        step_loss += loss.detach() / cfg.grad_accum
    grad_norm = acc.clip_grad_norm_(run.loss_module.parameters(), cfg.grad_clip)
    finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm)
    if run.world > 1:  # every rank skips if any rank's step is bad (an all-reduce, no host sync)
        finite = acc.reduce(finite.float(), reduction="sum") == run.world
    # found_inf is the flag GradScaler hands fused AdamW: where it is 1 the kernel changes nothing
    # and the step count is put back. (Under fp16 GradScaler sets its own: non-finite gradients.)
    run.optimizer.optimizer.found_inf = (~finite).float()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.window_loss += torch.where(finite, step_loss, 0.0)
    state.grad_norm = grad_norm
    state.unseen.append(finite)
    state.step += 1
    state.tokens_seen += run.tokens_per_step


def look(run: Run, state: TrainState, stop: stop_on_signals) -> tuple[bool, bool]:
    """The host's look at the steps since the last one, in one device-to-host read: a `skip`
    event for each step that was not finite (cfg.max_bad_steps in a row end training), and whether
    any rank got a signal -- ranks get a launcher's signal at different moments; they stop, and
    save, together. Returns (whether the last step was finite, whether to stop)."""
    cfg = run.cfg
    signalled = torch.tensor([float(stop.signal is not None)], device=run.device)
    if run.world > 1:
        signalled = run.accelerator.reduce(signalled, reduction="sum")
    *finite, n_stopping = torch.cat([torch.stack(state.unseen).float(), signalled]).tolist()
    first, state.unseen = state.step - len(finite) + 1, []
    for step, ok in enumerate(finite, first):
        if ok:
            state.bad_steps = 0
            state.window_steps += 1
            continue
        state.bad_steps += 1
        run.emit("skip", step=step, bad_steps=state.bad_steps)
        if state.bad_steps >= cfg.max_bad_steps:
            raise SmolctlError(
                f"training diverged: {state.bad_steps} non-finite steps in a row at step {step}",
                hint=f"The last good checkpoint is {state.last_checkpoint}; lower lr in "
                     f"{run.run_dir / 'config.yaml'} and resume from it: smolctl resume --run-dir {run.run_dir} "
                     "--from latest --allow-config-change", exit_code=1)
    return finite[-1] > 0, n_stopping > 0


def log_row(run: Run, state: TrainState, lr: float) -> None:
    """The `train` event: the window's mean loss over all ranks, throughput, MFU; then a new window.
    Throughput counts the steps' time only: the window's evals, samples and saves (`aside_s`) are
    left out."""
    cfg, device = run.cfg, run.device
    loss_sum, grad_norm = torch.stack([run.accelerator.reduce(state.window_loss, reduction="mean"),
                                       state.grad_norm.float()]).tolist()
    now = time.perf_counter()
    tps = state.window_steps * run.tokens_per_step / (now - state.window_t - state.window_aside)
    peak = run.peak_tflops
    run.emit("train", step=state.step, max_steps=cfg.max_steps, loss=loss_sum / max(1, state.window_steps), lr=lr,
             grad_norm=grad_norm, tokens_seen=state.tokens_seen, tokens_per_s=tps,
             mfu=run.flops_per_token * tps / (peak * 1e12 * run.world) if peak else None,
             elapsed_s=state.elapsed(), memory_gb=memory_gb(device), aside_s=state.window_aside)
    state.window_loss.zero_()
    state.window_steps, state.window_t, state.window_aside = 0, time.perf_counter(), 0.0


def save(run: Run, state: TrainState, final: bool = False) -> Path:
    """Checkpoint the state at state.step (all ranks take part), atomically; never non-finite
    weights. Returns the checkpoint's path."""
    cfg, acc, main, step = run.cfg, run.accelerator, run.main, state.step
    t = time.perf_counter()
    path = run.run_dir / "checkpoints" / "final" if final else ckpt_io.step_dir(run.run_dir, step)
    if main:
        run.emit("phase", step=step, text="saving checkpoint…")
    loss_sums = acc.gather(state.window_loss.reshape(1)).tolist()  # all ranks: each rank's window

    def meta() -> dict:  # the main process's, once the weights are known to be finite
        return {"step": step, "tokens_seen": state.tokens_seen, "world_size": run.world, "train": cfg.to_dict(),
                "elapsed_s": state.elapsed(), "lr": lr_at(max(step, 1), cfg), "log_steps": state.window_steps,
                "log_loss_sums": loss_sums, "general": run.general}

    def not_finite(bad: str | None) -> SmolctlError:  # never the newest state: resume must find a good one
        return SmolctlError(
            f"the weights at step {step} are not finite (NaN/inf" + (f" in {bad}" if bad else "")
            + f"): {path.name} was not saved",
            hint=f"The last good checkpoint is {state.last_checkpoint}; lower lr in {run.run_dir / 'config.yaml'} "
                 f"and resume from it: smolctl resume --run-dir {run.run_dir} --from latest --allow-config-change"
            if state.last_checkpoint else "No checkpoint was saved; start again with a lower learning rate",
            exit_code=1)

    with _save_errors(path, state.last_checkpoint, run.run_dir):
        ckpt_io.save(path, acc, run.loss_module, run.optimizer.optimizer, run.mcfg, meta, state.data_state,
                     tokenizer=run.base_tokenizer, keep_last=cfg.keep_last, not_finite=not_finite)
    seconds = aside(state, t)
    if main:
        run.emit("checkpoint", step=step, path=str(path), seconds=seconds)
    acc.wait_for_everyone()
    return path


def run_eval(run: Run, state: TrainState, step: int) -> None:
    if run.eval_spec is None:
        return
    cfg, t = run.cfg, time.perf_counter()

    def progress(scored: int) -> None:
        run.emit("phase", step=step, text=f"evaluating {scored:,}/{cfg.eval_tokens:,} tokens…")

    progress(0)
    loss, n = evaluate(run.loss_module, run.eval_spec, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                       tokens=cfg.eval_tokens, device=run.device, tokenizer=run.tokenizer,
                       autocast=run.accelerator.autocast, progress=progress)
    run.emit("eval", step=step, loss=loss, perplexity=math.exp(min(loss, 50)), tokens=n, seconds=aside(state, t))


def run_sample(run: Run, state: TrainState, step: int) -> None:
    from smolctl.generation import complete

    t = time.perf_counter()
    run.emit("phase", step=step, text=f"sampling {run.cfg.sample_tokens} tokens…")
    run.model.eval()
    with run.accelerator.autocast():
        text = complete(run.model, run.tokenizer, run.cfg.sample_prompt, max_new_tokens=run.cfg.sample_tokens)
    run.model.train()
    run.emit("sample", step=step, prompt=run.cfg.sample_prompt, text=text, seconds=aside(state, t))


def aside(state: TrainState, since: float) -> float:
    """The seconds since `since`, spent on an eval, a sample or a save rather than on steps: the
    log window's throughput leaves them out."""
    seconds = time.perf_counter() - since
    state.window_aside += seconds
    return seconds


# -- errors and endings ---------------------------------------------------------------------------

def _as_smolctl_error(e: RuntimeError, cfg: TrainConfig, run_dir: Path, resume: str | None,
                      where) -> SmolctlError | None:
    """A peer's failure or an out-of-memory as one line; None for anything else."""
    if is_peer_failure(e):
        return PeerFailed(f"process {where.rank} of {where.world} stopped: another process of the job failed "
                          "or was killed", hint=rundir.how_to_continue(run_dir, where.world))
    if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
        return None
    hint = ("Lower --batch-size (raise --grad-accum to keep the tokens per step) or --seq-len"
            if resume is None else  # resume keeps the batch: the run's shape is fixed
            "Free memory on the device (another process?), or start a new run with a smaller "
            "batch: smolctl train --batch-size N --grad-accum M")
    return SmolctlError(f"out of memory with batch size {cfg.batch_size} x sequence length {cfg.seq_len}",
                        hint=hint, exit_code=1)


@contextmanager
def _save_errors(final: Path, last_ckpt: Path | None, run_dir: Path) -> Iterator[None]:
    """A disk full, read-only, quota...: one line; the previous checkpoint is untouched."""
    try:
        yield
    except OSError as e:
        raise SmolctlError(f"could not save checkpoint {final}: {e.strerror or e}"
                           + (f" ({e.filename})" if e.filename else ""),
                           hint=f"Free space or fix permissions; the last good checkpoint is {last_ckpt}, "
                                f"continue with: smolctl resume --run-dir {run_dir} --from latest",
                           exit_code=1) from None
