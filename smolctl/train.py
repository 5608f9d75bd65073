"""Pretraining under Accelerate: setup -> fit, with exact resume.

    cfg = TrainConfig(preset="tiny", data="sample", max_steps=200, batch_size=8, seq_len=256)
    result = train(cfg, run_dir=Path("runs/demo"), sinks=[print])
    result = train(cfg, run_dir=Path("runs/demo"), resume="latest")   # same loop, restored state

Resume is training with restored state, not a second code path: `train` loads the checkpoint's
weights, optimizer, RNG and data position, then runs the same loop. On CPU the losses after a
resume equal an uninterrupted run's bit for bit.

The loop emits events (see metrics.py); it never draws anything itself.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from smolctl import checkpoint as ckpt_io
from smolctl import fsutil
from smolctl.checkpoint import resume_command
from smolctl.config import RESUMABLE, ModelConfig, TrainConfig, write_mapping
from smolctl.data import BlockStream, DataSpec, batches
from smolctl.distributed import PeerFailed, is_peer_failure, place
from smolctl.distributed import accelerator as make_accelerator
from smolctl.errors import SmolctlError
from smolctl.loss import CausalLMLoss, evaluate
from smolctl.metrics import JsonlSink, LogFileSink, plot_loss, truncate_after
from smolctl.perf import compile_layers, device_peak_tflops, flops_per_token, memory_gb
from smolctl.schedule import lr_at
from smolctl.sources import with_init_model
from smolctl.tokenizer import document_separator, load_tokenizer, without_chat_template


class RunComplete(SmolctlError):
    """Resuming a run whose final checkpoint is at --max-steps: nothing to do (exit 0)."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(f"Run {run_dir} is complete at step {step}",
                         hint=f"Pass --max-steps N (above {step}) to extend it", exit_code=0)


@dataclass
class TrainResult:
    step: int
    stopped_by: str | None  # "SIGINT"/"SIGTERM" when interrupted, None when finished
    last_checkpoint: Path | None
    run_dir: Path


def train(cfg: TrainConfig, run_dir: Path, resume: str | None = None, log_file: Path | None = None,
          sinks: list[Callable] = (), overwrite: bool = False, allow_config_change: bool = False) -> TrainResult:
    """Train (or resume) to cfg.max_steps; see the module docstring. Raises SmolctlError (RunComplete
    when resuming a run that already reached cfg.max_steps).

    The main process holds the run directory's lock for the whole run (one process per run). A
    fresh run checks its inputs before creating anything; if it fails later, whatever the
    exception, before its first checkpoint, it removes what this call created (the run directory,
    or the new entries of an existing one, and a new log file).
    """
    run_dir = Path(run_dir)
    log_file = Path(log_file) if log_file else run_dir / LOG
    where = place()  # a launch that cannot form its job fails here, before anything is created
    main = where.rank == 0
    if main:
        fsutil.check_run_dir(run_dir)
        if resume is None:
            check_inputs(cfg, run_dir, overwrite)
    progress = {"stepped": False}
    with ExitStack() as held:
        undo = _claim(run_dir, log_file, held) if main else None
        try:
            with ExitStack() as cleanup:  # closes the metrics files and the data worker however _train ends
                try:
                    return _train(cfg, run_dir, resume, log_file, sinks, overwrite, allow_config_change, cleanup,
                                  progress)
                except (torch.OutOfMemoryError, RuntimeError) as e:
                    if is_peer_failure(e):
                        raise PeerFailed(f"process {where.rank} of {where.world} stopped: another process of the "
                                         "job failed or was killed", hint=_how_to_continue(run_dir, where.world)) from None
                    if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                        raise
                    hint = ("Lower --batch-size (raise --grad-accum to keep the tokens per step) or --seq-len"
                            if resume is None else  # resume keeps the batch: the run's shape is fixed
                            "Free memory on the device (another process?), or start a new run with a smaller "
                            "batch: smolctl train --batch-size N --grad-accum M")
                    raise SmolctlError(f"out of memory with batch size {cfg.batch_size} x sequence length "
                                       f"{cfg.seq_len}", hint=hint, exit_code=1) from None
        except BaseException as e:
            if undo is not None and not ckpt_io.checkpoints(run_dir):
                undo()
            if isinstance(e, SmolctlError) and where.world > 1 and progress["stepped"] and not isinstance(e, PeerFailed):
                # It ends the whole job (the launcher stops the others): say which process, and how to go on.
                how = _how_to_continue(run_dir, where.world)
                raise SmolctlError(f"process {where.rank} of {where.world} failed: {e.message}",
                                   hint=f"{e.hint.rstrip('.')}. {how}" if e.hint else how, exit_code=e.exit_code) from None
            raise


LOG = "train.log"  # the human-readable log, in the run directory: one log per run


def check_inputs(cfg: TrainConfig, run_dir: Path, overwrite: bool) -> None:
    """What a fresh run can check before it creates anything: the config, the run directory, the
    data (its first document is read and tokenized), the tracker."""
    from smolctl.data import first_document

    if cfg.init_from:
        cfg = with_init_model(cfg)
    cfg = cfg.resolved()
    cfg.model_config()
    resume_point(cfg, run_dir, None, overwrite, 1)
    first_document(DataSpec.parse(cfg.data, cfg.text_column), cfg.tokenizer)
    if cfg.report_to != "none":
        _require_tracker(cfg.report_to)


def _claim(run_dir: Path, log_file: Path, held: ExitStack) -> Callable[[], None]:
    """Lock the run directory for the life of `held` (creating it if needed). Returns the undo of
    a failed fresh start: remove the directory if this call created it, else its new entries, and
    the log file if this call created it."""
    before = set(os.listdir(run_dir)) if run_dir.is_dir() else set()
    new_log = not log_file.exists()
    created = held.enter_context(fsutil.run_lock(run_dir))

    def undo() -> None:
        made = [run_dir] if created else [run_dir / name for name in set(os.listdir(run_dir)) - before]
        for path in made + ([log_file] if new_log else []):
            fsutil.remove(path)

    return undo


def _how_to_continue(run_dir: Path, world: int) -> str:
    if ckpt_io.checkpoints(run_dir):
        return f"Continue with: {resume_command(run_dir, world)}"
    return "Start again with the same command (there is no checkpoint yet)"


def _train(cfg: TrainConfig, run_dir: Path, resume: str | None, log_file: Path, sinks: list[Callable],
           overwrite: bool, allow_config_change: bool, cleanup: ExitStack, progress: dict) -> TrainResult:
    from accelerate.utils import DistributedType, set_seed

    from smolctl.model import build_model

    if cfg.init_from and resume is None:  # a resume has the source's config in config.yaml already
        cfg = with_init_model(cfg)
    cfg = cfg.resolved()
    mcfg = cfg.model_config()
    run_dir = Path(run_dir)
    mixed = cfg.mixed_precision
    if mixed == "auto":  # what accelerate launch was told (config file or flag), else bf16 where supported
        mixed = os.environ.get("ACCELERATE_MIXED_PRECISION") or (
            "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no")
    trackers = None if cfg.report_to == "none" else [cfg.report_to]
    if trackers:
        _require_tracker(cfg.report_to)
    accelerator = make_accelerator(cfg.device, mixed_precision=mixed, log_with=trackers, project_dir=str(run_dir))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device

    # -- run directory, or the checkpoint to resume from --------------------------------------
    if main and resume is not None:
        ckpt_io.recover(run_dir, say=accelerator.print)
    accelerator.wait_for_everyone()
    resume_path = resume_point(cfg, run_dir, resume, overwrite, world, say=accelerator.print,
                               allow_config_change=allow_config_change)
    tok, mcfg = run_tokenizer(cfg, mcfg, resume_path)
    if cfg.sample_every and accelerator.distributed_type == DistributedType.FSDP:
        raise SmolctlError("--sample-every does not work under FSDP (the weights are sharded across ranks)",
                           hint="Leave it out and sample from a checkpoint with smolctl generate")
    if main:
        _prepare_run_dir(run_dir, overwrite and resume is None)
        write_mapping(run_dir / "config.yaml", cfg.to_dict())
    accelerator.wait_for_everyone()

    set_seed(cfg.seed)
    model = build_model(mcfg, device="cpu")  # seeded init; identical on every rank
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm weights
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    step, tokens_seen, data_state, elapsed_before, window = 0, 0, None, 0.0, (0, 0.0)
    if cfg.init_from and resume_path is None:  # continued pretraining: step 0 only; a resume has its own weights
        from smolctl.sources import load

        model.load_state_dict(load(cfg.init_from, dtype=torch.float32).model.state_dict())
    if resume_path is not None:
        weights = ckpt_io.load_file(str(resume_path / ckpt_io.WEIGHTS))
        model.load_state_dict(weights, strict=not mcfg.tie_embeddings)
        meta, data_state = ckpt_io.load_training_state(resume_path, rank, world)
        optim_state = ckpt_io.read_optimizer(resume_path)  # applied after prepare
        step, tokens_seen, elapsed_before = meta.step, meta.tokens_seen, meta.elapsed_s
        window = (meta.log_steps, meta.log_loss_sums[rank] if meta.log_steps else 0.0)
        _supersede_later_checkpoints(run_dir, resume_path, step, main, accelerator.print)
    loss_module = CausalLMLoss(model)
    if cfg.compile:
        compile_layers(model, eager_attention=device.type == "cpu" and cfg.seq_len <= 512)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    if resume_path is not None:  # after prepare: under FSDP each rank keeps its shard of it
        ckpt_io.load_optimizer(optim_state, loss_module, optimizer.optimizer)
        del optim_state

    spec = DataSpec.parse(cfg.data, cfg.text_column, flags=data_flags(run_dir, resume, "data"))
    stream = BlockStream(spec, cfg.seq_len, cfg.batch_size, tok, rank, world,
                         cfg.shuffle_buffer, cfg.seed, data_state)
    data = batches(stream, cfg.num_workers)
    # Shut the worker down on every way out: left to the interpreter's exit, it is sent a SIGTERM
    # that it ignores (see data.py), and joined forever.
    cleanup.callback(data.close)
    eval_spec = _eval_spec(cfg, data_flags(run_dir, resume, "eval_data"))

    # -- sinks: files on the main process; the caller's display --------------------------------
    emit_to: list[Callable] = []
    cleanup.callback(_close, emit_to)
    if main:
        # Drop what an earlier attempt logged after this point (all of it for a fresh start, e.g. a
        # run killed before its first checkpoint and started again): each step is logged once.
        truncate_after(run_dir / "metrics.jsonl", step)
        truncate_after(log_file, step)
        try:
            emit_to.append(JsonlSink(run_dir / "metrics.jsonl"))
            emit_to.append(LogFileSink(log_file))
        except OSError as e:
            raise SmolctlError(f"cannot write the log file {log_file}: {e.strerror}",
                               hint="Pick another --log-file") from None
        emit_to.extend(sinks)
        if trackers:
            from smolctl.metrics import TrackerSink

            accelerator.init_trackers(run_dir.name, config={k: v for k, v in cfg.to_dict().items() if k != "model"})
            emit_to.append(TrackerSink(accelerator))

    def emit(event: str, **fields) -> None:
        for sink in emit_to:
            sink({"event": event, **fields})

    fpt = flops_per_token(mcfg, cfg.seq_len)
    peak = device_peak_tflops(device, cfg.peak_tflops)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    verb = (f"Resuming from {resume_path} (step {step})" if resume_path else
            f"Training from the weights of {cfg.init_from}" if cfg.init_from else "Training")
    emit("start", text=f"{verb}: {mcfg.name} ({sum(p.numel() for p in model.parameters()):,} params) on "
                       f"{spec.describe()}, {world} x {device.type} process(es), mixed precision {mixed}, "
                       f"{tokens_per_step:,} tokens/step, to step {cfg.max_steps}; run dir {run_dir}",
         step=step, max_steps=cfg.max_steps, run_dir=str(run_dir), resumed_from=str(resume_path) if resume_path else None,
         config=cfg.to_dict())

    # what checkpoints carry besides the weights: the tokenizer as a base model has it (a chat
    # template is for chat-tuned models), and GGUF-style provenance for exports
    base_tok = without_chat_template(tok)
    general = {"name": run_dir.name, **({"license": cfg.license} if cfg.license else {})}

    def save(kind: str = "step") -> Path:
        t = time.perf_counter()
        final = ckpt_io.step_dir(run_dir, step) if kind == "step" else run_dir / "checkpoints" / "final"
        tmp = ckpt_io.staging_path(final)
        with fsutil.temporary(tmp) if main else nullcontext(), _save_errors(final, last_ckpt, run_dir):
            ckpt_io.staging_dir(final, main)
            accelerator.wait_for_everyone()
            weights, optim_state = ckpt_io.training_state(loss_module, optimizer.optimizer, mcfg)  # all ranks
            bad = ckpt_io.check_finite(weights) if main else None
            if _on_any_rank(accelerator, bad is not None):  # never the newest state: resume must find a good one
                raise SmolctlError(f"the weights at step {step} are not finite (NaN/inf" + (f" in {bad}" if bad else "")
                                   + f"): {final.name} was not saved",
                                   hint=f"The last good checkpoint is {last_ckpt}; lower lr in {run_dir / 'config.yaml'} and resume from "
                                        f"it: smolctl resume --run-dir {run_dir} --from latest --allow-config-change"
                                   if last_ckpt else "No checkpoint was saved; start again with a lower learning rate",
                                   exit_code=1)
            loss_sums = accelerator.gather(window_loss.reshape(1)).tolist()  # all ranks: each rank's window
            if main:
                meta = {"step": step, "tokens_seen": tokens_seen, "world_size": world, "train": cfg.to_dict(),
                        "elapsed_s": elapsed_before + time.perf_counter() - t0, "lr": lr_at(max(step, 1), cfg),
                        "log_steps": window_steps, "log_loss_sums": loss_sums, "general": general}
                ckpt_io.save_model_state(tmp, weights, mcfg, optim_state, meta, tokenizer=base_tok)
            del weights, optim_state
            ckpt_io.save_rank_state(tmp, rank, last_state)
            accelerator.wait_for_everyone()
            if main:
                ckpt_io.finalize(tmp, final)
        if main:
            ckpt_io.prune(run_dir, cfg.keep_last)
            emit("checkpoint", step=step, path=str(final), seconds=time.perf_counter() - t)
        accelerator.wait_for_everyone()
        return final

    def run_eval() -> None:
        if eval_spec is None:
            return
        loss, n = evaluate(loss_module, eval_spec, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                           tokens=cfg.eval_tokens, device=device, tokenizer=tok,
                           autocast=accelerator.autocast)
        emit("eval", step=step, loss=loss, perplexity=math.exp(min(loss, 50)), tokens=n)

    def run_sample() -> None:
        from smolctl.generation import complete

        model.eval()
        with accelerator.autocast():
            text = complete(model, tok, cfg.sample_prompt, max_new_tokens=cfg.sample_tokens)
        model.train()
        emit("sample", step=step, prompt=cfg.sample_prompt, text=text)

    # -- the loop ---------------------------------------------------------------------------
    last_ckpt, last_state, stopped_by, bad_steps = resume_path, data_state, None, 0
    # The log window (the steps since the last `train` row) continues across a resume, so that the
    # next row averages the same steps, with the same float32 sums, as an uninterrupted run's.
    window_steps, window_t = window[0], time.perf_counter()
    window_loss = torch.tensor(window[1], dtype=torch.float32, device=device)
    t0 = time.perf_counter()
    loss_module.train()
    with _stop_on_signals() as stop:
        stopping = False  # a signal, agreed on by every rank
        while step < cfg.max_steps and not stopping:
            lr = lr_at(step + 1, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch, last_state = next(data)
                batch = batch.to(device, non_blocking=True)
                sync = accelerator.no_sync(loss_module) if micro < cfg.grad_accum - 1 else nullcontext()
                with sync:
                    loss = loss_module(batch[:, :-1], batch[:, 1:])
                    accelerator.backward(loss / cfg.grad_accum)
                step_loss += loss.detach() / cfg.grad_accum
            grad_norm = accelerator.clip_grad_norm_(loss_module.parameters(), cfg.grad_clip)
            step += 1
            progress["stepped"] = True
            tokens_seen += tokens_per_step
            # Every rank must take the same branch: skip if any rank's loss is bad, stop (and save
            # together) if any rank got a signal -- ranks get a launcher's signal at different
            # moments. One 2-element all-reduce and one host sync per step.
            flags = torch.stack([(torch.isfinite(step_loss) & torch.isfinite(grad_norm)).float(),
                                 torch.tensor(float(stop.signal is not None), device=device)])
            if world > 1:
                flags = accelerator.reduce(flags, reduction="sum")
            n_finite, n_stopping = flags.tolist()
            stopping = n_stopping > 0
            if n_finite < world:
                optimizer.zero_grad(set_to_none=True)  # skip: no update from a NaN/inf step
                bad_steps += 1
                emit("skip", step=step, bad_steps=bad_steps)
                if bad_steps >= cfg.max_bad_steps:
                    raise SmolctlError(
                        f"training diverged: {bad_steps} non-finite steps in a row at step {step}",
                        hint=f"The last good checkpoint is {last_ckpt}; lower lr in {run_dir / 'config.yaml'} and "
                             f"resume from it: smolctl resume --run-dir {run_dir} --from latest --allow-config-change",
                        exit_code=1)
                continue
            bad_steps = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            window_loss += step_loss
            window_steps += 1

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                mean_loss = accelerator.reduce(window_loss, reduction="mean").item() / max(1, window_steps)
                now = time.perf_counter()
                tps = window_steps * tokens_per_step / (now - window_t)
                emit("train", step=step, max_steps=cfg.max_steps, loss=mean_loss, lr=lr,
                     grad_norm=grad_norm.item(), tokens_seen=tokens_seen, tokens_per_s=tps,
                     mfu=fpt * tps / (peak * 1e12 * world) if peak else None,
                     elapsed_s=elapsed_before + now - t0, memory_gb=memory_gb(device))
                window_loss.zero_()
                window_steps, window_t = 0, time.perf_counter()
            if cfg.eval_every and step % cfg.eval_every == 0:
                run_eval()
            if cfg.sample_every and step % cfg.sample_every == 0 and main:
                run_sample()
            if (step % cfg.save_every == 0 and step < cfg.max_steps) or stopping:
                last_ckpt = save()
    if stopping:
        signame = stop.signal or "SIGTERM"  # a rank stopped by another rank's signal
        emit("end", step=step, text=f"Stopped by {signame} at step {step}; saved {last_ckpt}")
        _close(emit_to)
        return TrainResult(step, signame, last_ckpt, run_dir)
    if not cfg.eval_every or step % cfg.eval_every:
        run_eval()
    last_ckpt = save("final")
    if main:
        png = plot_loss(run_dir / "metrics.jsonl", run_dir / "loss.png")
        emit("end", step=step, text=f"Done: step {step}, {tokens_seen:,} tokens; final checkpoint {last_ckpt}"
                                    + (f"; loss curve {png}" if png else ""))
    _close(emit_to)
    return TrainResult(step, None, last_ckpt, run_dir)



def resume_point(cfg: TrainConfig, run_dir: Path, resume: str | None, overwrite: bool, world_size: int,
                 say: Callable = print, allow_config_change: bool = False) -> Path | None:
    """The checks a run can make before any process group exists: the checkpoint to resume from
    (verified, same model, same world size, same trajectory unless `allow_config_change`), or None
    for a fresh run in a directory that may take one. Raises RunComplete when that checkpoint is
    the final one at cfg.max_steps. train() calls it on every rank; the CLI once, before launching
    N processes."""
    cfg = cfg.resolved()
    if resume is None:
        if ckpt_io.checkpoints(run_dir) and not overwrite:
            raise SmolctlError(f"run directory {run_dir} already has checkpoints",
                               hint=f"Continue it with: smolctl resume --run-dir {run_dir} --from latest "
                                    "(to start over instead: smolctl train ... --overwrite)")
        return None
    path = ckpt_io.find_checkpoint(run_dir, resume, say=say)
    meta = ckpt_io.check_world_size(path, world_size)
    mcfg = cfg.model_config()
    # bos/eos are the run's tokenizer's (run_tokenizer), not the preset's
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
    return path


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


def _on_any_rank(accelerator, flag: bool) -> bool:
    """Whether `flag` holds on any process (all ranks must take the same branch)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor(float(flag), device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").item() > 0


def run_tokenizer(cfg: TrainConfig, mcfg: ModelConfig, resume_path: Path | None):
    """(tokenizer, model config with its bos/eos ids) of a run: on resume the checkpoint's own
    tokenizer files (the run keeps its tokenizer even if cfg.tokenizer has moved or changed), else
    cfg.tokenizer (None: the bundled one). Refuses a tokenizer whose ids do not fit the embedding."""
    if resume_path is not None and (resume_path / "tokenizer.json").is_file():
        tok = load_tokenizer(str(resume_path))
    else:
        tok = load_tokenizer(cfg.tokenizer)
    top = max(tok.get_vocab().values())
    if top >= mcfg.vocab_size:
        raise SmolctlError(f"the tokenizer {cfg.tokenizer or '(bundled)'} has ids up to {top:,}; the model's "
                           f"vocab_size is {mcfg.vocab_size:,}",
                           hint=f"Set model.vocab_size to at least {top + 1} (a multiple of 64 is fastest)")
    eos = document_separator(tok)  # what ends each document in training is the model's EOS
    bos = eos if tok.bos_token_id is None else tok.bos_token_id
    return tok, dataclasses.replace(mcfg, bos_token_id=bos, eos_token_id=eos)


def data_flags(run_dir: Path, resume: str | None, key: str) -> tuple[str, str]:
    """What messages call the data (or eval data) and its text column: train's flags, or, when
    resuming (resume has no such flags), the keys of the run's config.yaml."""
    if resume is None:
        return "--" + key.replace("_", "-"), "--text-column"
    return f"{key} in {run_dir / 'config.yaml'}", f"text_column in {run_dir / 'config.yaml'}"


def _trajectory_changes(saved: TrainConfig, now: TrainConfig) -> list[str]:
    """'key: old -> new' for each value that differs and changes what training computes (the model is
    compared as a whole, by resume_point; RESUMABLE fields are bookkeeping)."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        old, new = getattr(saved, f.name), getattr(now, f.name)
        if f.name not in (*RESUMABLE, "preset", "model") and old != new:
            out.append(f"{f.name}: {old!r} -> {new!r}")
    return out


def _eval_spec(cfg: TrainConfig, flags: tuple[str, str]) -> DataSpec | None:
    if cfg.eval_data:
        return DataSpec.parse(cfg.eval_data, cfg.text_column, split="heldout", flags=flags)
    if cfg.data == "sample":
        return DataSpec.parse("sample", cfg.text_column, split="heldout", flags=flags)
    return None


class _stop_on_signals:
    """SIGINT/SIGTERM set `.signal`; the loop finishes its step, saves and returns."""

    signal: str | None = None

    def __enter__(self):
        self.signal = None
        self._old = {}
        if _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _prepare_run_dir(run_dir: Path, fresh: bool) -> None:
    try:
        if fresh:  # --overwrite names this run: its checkpoints and metrics go
            fsutil.remove(run_dir / "checkpoints")
            fsutil.remove(run_dir / "metrics.jsonl")
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SmolctlError(f"cannot write to run directory {run_dir}: {e.strerror}",
                           hint="Pick another --run-dir") from None


def _supersede_later_checkpoints(run_dir: Path, source: Path, step: int, main: bool, say) -> None:
    """Resuming from an earlier step starts a new timeline: set later checkpoints aside (not
    deleted) so that `--from latest` can never pick one from the abandoned branch. The checkpoint
    resumed from stays where it is (a final/ being extended included) until a newer save replaces
    it: a crash before that must find it again."""
    if not main:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for s, path in ckpt_io.checkpoints(run_dir):
        if (s > step or (s == step and path.name == "final")) and path.resolve() != source.resolve():
            aside, n = path.parent / f"superseded-{stamp}-{path.name}", 1
            while aside.exists():  # two resumes within one second
                aside, n = path.parent / f"superseded-{stamp}.{n}-{path.name}", n + 1
            os.replace(path, aside)
            say(f"Set aside {path.name} (after step {step}) as {aside.name}")


def _require_tracker(name: str) -> None:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
    if importlib.util.find_spec(module) is None:
        raise SmolctlError(f"--report-to {name} needs the {module} package", hint=f"pip install {module}")


def _close(sinks: list) -> None:
    """Close each sink once (the list is emptied)."""
    while sinks:
        sink = sinks.pop(0)
        close = getattr(sink, "close", None)
        if close:
            close()
