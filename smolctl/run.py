"""A training run as the loop sees it: `setup` builds everything before the first step (the
Run) and the state to start from (the TrainState), fresh, from --init-from weights, or from a
checkpoint: resume is the same objects with restored state.

    run, state = setup(cfg, run_dir, resume=None, log_file=run_dir / "train.log", sinks=[print], ...)
    fit(run, state)   # train.py
"""

from __future__ import annotations

import dataclasses
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from smolctl import checkpoint as ckpt_io
from smolctl import rundir
from smolctl.config import ModelConfig, TrainConfig, write_mapping
from smolctl.data import BlockStream, DataSpec, batches
from smolctl.distributed import accelerator as make_accelerator, job_restarts
from smolctl.errors import SmolctlError
from smolctl.loss import CausalLMLoss
from smolctl.metrics import JsonlSink, LogFileSink, truncate_after
from smolctl.perf import compile_failure, compile_layers, device_peak_tflops, eager_attention_for, flops_per_token
from smolctl.rundir import config_changes, data_flags, resume_point
from smolctl.sources import load, resolve, with_init_model


@dataclass
class Run:
    """Everything built before the first step; fixed for the life of the run."""
    cfg: TrainConfig
    mcfg: ModelConfig
    run_dir: Path
    accelerator: Any
    model: torch.nn.Module  # the bare model (sampling, parameter counts)
    loss_module: torch.nn.Module  # model + loss, as Accelerate prepared it (DDP/FSDP-wrapped)
    optimizer: Any  # Accelerate's wrapper; .optimizer is the torch AdamW
    data: Any  # iterator of (batch, data state after it)
    tokenizer: Any
    eval_spec: DataSpec | None
    sinks: list[Callable]  # where events go: metrics.jsonl and the log file on the main process, the caller's
    general: dict  # GGUF-style provenance for the checkpoints
    flops_per_token: float
    peak_tflops: float | None  # the device's, for MFU

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len * self.cfg.grad_accum * self.world

    @cached_property
    def base_tokenizer(self):
        """The tokenizer as the run's checkpoints hold it, a base model's (a chat template is for
        chat-tuned models). Made once: without_chat_template deep-copies a tokenizer that has one
        (the bundled one has), ~0.3-0.4 s; once per save, that was 13 s of a 46 s micro run saving every 2 steps."""
        from smolctl.tokenizer import without_chat_template

        return without_chat_template(self.tokenizer)

    def emit(self, event: str, **fields) -> None:
        for sink in self.sinks:
            sink({"event": event, **fields})


@dataclass
class TrainState:
    """What the loop advances and a checkpoint restores."""
    step: int = 0
    tokens_seen: int = 0
    data_state: dict | None = None  # the data stream's position after the last batch taken
    last_checkpoint: Path | None = None
    start_step: int = 0  # where this call started (0, or the checkpoint's step)
    elapsed_before: float = 0.0  # training time of the attempts before this one
    started: float = 0.0  # perf_counter() when this attempt's first step began
    bad_steps: int = 0  # non-finite steps in a row
    # The log window: the steps since the last `train` row. It continues across a resume, so that
    # the next row averages the same steps, with the same float32 sums, as an uninterrupted run's.
    window_steps: int = 0  # good (finite) steps in the window
    window_loss: torch.Tensor | None = None  # their float32 loss sum, on the device
    window_t: float = 0.0
    window_aside: float = 0.0  # seconds of the window's evals, samples and saves (not steps: see train.aside)
    grad_norm: torch.Tensor | None = None  # the last step's, on the device
    unseen: list[torch.Tensor] = field(default_factory=list)  # finite or not, each step since the last look

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started


def setup(cfg: TrainConfig, run_dir: Path, resume: str | None, log_file: Path, sinks: list[Callable],
          overwrite: bool, allow_config_change: bool, cleanup: ExitStack,
          plan: RunPlan | None = None, say: Callable[[str], None] | None = None) -> tuple[Run, TrainState]:
    """Build the run and its starting state: fresh, from --init-from weights, or from a checkpoint.
    `plan`: the one check_inputs made on this process, if it did. `cleanup` gets what must be
    closed however training ends (the data worker, the sinks). `say`: see mixed_precision."""
    from accelerate.utils import DistributedType, set_seed

    from smolctl.model import build_model

    cfg = plan.cfg if plan else planned_config(cfg, run_dir, resume, overwrite)
    mixed = mixed_precision(cfg, say)
    trackers = None if cfg.report_to == "none" else [cfg.report_to]
    if trackers:
        _require_tracker(cfg.report_to)
    accelerator = make_accelerator(cfg.device, mixed_precision=mixed, log_with=trackers, project_dir=str(run_dir))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process

    # -- run directory, or the checkpoint to resume from --------------------------------------
    if main and resume is not None and run_dir.is_dir():
        ckpt_io.recover(run_dir, say=accelerator.print)
    accelerator.wait_for_everyone()
    plan = plan or plan_of(cfg, run_dir, resume, overwrite, world, say=accelerator.print,
                           allow_config_change=allow_config_change)
    cfg, mcfg, tok, resume_path = plan.cfg, plan.mcfg, plan.tokenizer, plan.resume_from
    if resume_path is None:  # what auto decided is the run's from its start: config.yaml keeps it, so a
        # resume trains in the same precision whatever another measurement or launcher would say (a run
        # started before this was recorded keeps its "auto", which its checkpoints were saved with)
        cfg = dataclasses.replace(cfg, mixed_precision=mixed)
    compiled, compile_why = _compile_choice(cfg, mcfg, mixed, accelerator)
    if resume_path is None:
        cfg = dataclasses.replace(cfg, compile=compiled)
    if cfg.sample_every and accelerator.distributed_type == DistributedType.FSDP:
        raise SmolctlError("--sample-every does not work under FSDP (the weights are sharded across ranks)",
                           hint="Leave it out and sample from a checkpoint with smolctl generate")
    if main:  # config.yaml first: it is what marks the directory as a run of ours
        write_mapping(run_dir / "config.yaml", cfg.to_dict())
        rundir.prepare(run_dir, fresh=overwrite and resume_path is None)
    accelerator.wait_for_everyone()

    # -- model, optimizer, and the state to start from ----------------------------------------
    set_seed(cfg.seed)
    model = build_model(mcfg, device="cpu")  # seeded init; identical on every rank
    optimizer = _adamw(model, cfg)
    state, window_sum, restored = TrainState(), 0.0, None
    if cfg.init_from and resume_path is None:  # continued pretraining: step 0 only; a resume has its own weights
        model.load_state_dict(load(cfg.init_from, dtype=torch.float32).model.state_dict())
    if resume_path is not None:
        restored = ckpt_io.restore(resume_path, model, rank, world, strict=not mcfg.tie_embeddings)
        meta = restored.meta
        state = TrainState(step=meta.step, tokens_seen=meta.tokens_seen, data_state=restored.data_state,
                           last_checkpoint=resume_path, start_step=meta.step, elapsed_before=meta.elapsed_s,
                           window_steps=meta.log_steps)
        window_sum = meta.log_loss_sums[rank] if meta.log_steps else 0.0
        if main:
            rundir.supersede_later_checkpoints(run_dir, resume_path, meta.step, accelerator.print)
    loss_module = CausalLMLoss(model)
    if compiled:
        compile_layers(model, eager_attention=eager_attention_for(accelerator.device, cfg.seq_len))
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    if restored is not None:  # after prepare: under FSDP each rank keeps its shard of it
        restored.load_optimizer(loss_module, optimizer.optimizer)
    state.window_loss = torch.tensor(window_sum, dtype=torch.float32, device=accelerator.device)

    # -- data, and where events go ------------------------------------------------------------
    spec = DataSpec.parse(cfg.data, cfg.text_column, flags=data_flags(run_dir, plan.resume, "data"))
    stream = BlockStream(spec, cfg.seq_len, cfg.batch_size, tok, rank, world,
                         cfg.shuffle_buffer, cfg.seed, state.data_state, streams=cfg.data_streams)
    data = batches(stream, cfg.num_workers)
    # Shut the worker down on every way out: left to the interpreter's exit, it is sent a SIGTERM
    # that it ignores (see data.py), and joined forever.
    cleanup.callback(data.close)
    emit_to: list[Callable] = []
    cleanup.callback(close_sinks, emit_to)
    if main:
        _open_sinks(emit_to, run_dir, log_file, state.step, sinks, accelerator if trackers else None, cfg)
    general = {"name": run_dir.name, **({"license": cfg.license} if cfg.license else {})}
    run = Run(cfg, mcfg, run_dir, accelerator, model, loss_module, optimizer, data, tok,
              _eval_spec(cfg, data_flags(run_dir, plan.resume, "eval_data")), emit_to, general,
              flops_per_token(mcfg, cfg.seq_len), device_peak_tflops(accelerator.device, cfg.peak_tflops))
    restarts = job_restarts()
    again = f"restart {restarts} of the job" if restarts else ""
    verb = (f"Resuming {'automatically ' if plan.auto else ''}from {resume_path} "
            f"(step {state.step}{', ' + again if again else ''})" if resume_path else
            f"Training from the weights of {cfg.init_from}" if cfg.init_from else "Training")
    if again and not resume_path:
        verb += f" ({again}, before its first checkpoint)"
    run.emit("start", text=f"{verb}: {mcfg.name} ({sum(p.numel() for p in model.parameters()):,} params) on "
                           f"{spec.describe()}, {world} x {accelerator.device.type} process(es), mixed precision "
                           f"{mixed}{', compiled' if compiled else ''}, {run.tokens_per_step:,} tokens/step, "
                           f"to step {cfg.max_steps}; run dir {run_dir}",
             step=state.step, max_steps=cfg.max_steps, run_dir=str(run_dir), world_size=world,
             resumed_from=str(resume_path) if resume_path else None,
             resumed=("auto" if plan.auto else "asked") if resume_path else None, restarts=restarts,
             config=cfg.to_dict())
    if compiled:
        run.emit("phase", step=state.step, text="compiling the decoder layers…")
        seconds, why = _compile_now(run), compile_why or "set in the run's config"
        run.emit("message", step=state.step, text=f"Compiled the decoder layers in {seconds:.1f} s ({why})",
                 compile_s=seconds)
    elif compile_why:
        run.emit("message", step=state.step, text=f"Not compiled ({compile_why})")
    return run, state


def check_inputs(cfg: TrainConfig, run_dir: Path, resume: str | None, overwrite: bool, world: int) -> RunPlan:
    """What a fresh run can check before it creates anything: the config, the run directory, the
    data (its first document is read and tokenized), the tracker. Returns the run's plan (with
    `resume` "auto", one that may continue the run)."""
    from smolctl.data import first_document

    plan = make_plan(cfg, run_dir, resume, overwrite, world)
    if plan.resume_from is None:
        first_document(DataSpec.parse(plan.cfg.data, plan.cfg.text_column), plan.cfg.tokenizer)
    if plan.cfg.report_to != "none":
        _require_tracker(plan.cfg.report_to)
    return plan


# -- the run plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunPlan:
    """What a run will be, decided once per process before anything is created or any model is
    built: by the launcher's preflight (for the N processes it starts), a fresh run's input
    checks and setup alike."""
    cfg: TrainConfig  # resolved; with --init-from: that model's config and tokenizer, its path absolute
    mcfg: ModelConfig  # the model, with the run tokenizer's bos/eos ids
    tokenizer: Any
    resume: str | None  # what to resume from ("latest", a step, a path; "auto" decided), None: fresh
    resume_from: Path | None  # that checkpoint, verified
    auto: bool  # --resume auto chose to continue the run


def make_plan(cfg: TrainConfig, run_dir: Path, resume: str | None, overwrite: bool, world: int,
              say: Callable = print, allow_config_change: bool = False) -> RunPlan:
    """The plan of a run started with `cfg` (train's, or config.yaml's with resume's flags) in
    `run_dir` by `world` processes; raises SmolctlError for a run that cannot start.

    `resume` "auto" continues the run in `run_dir` from its newest good checkpoint when it has
    any and its config.yaml is `cfg` (what a relaunched or requeued job runs again), starts one
    when it has none, and refuses any other config, naming the keys that differ."""
    return plan_of(planned_config(cfg, run_dir, resume, overwrite), run_dir, resume, overwrite, world, say,
                   allow_config_change)


def planned_config(cfg: TrainConfig, run_dir: Path, resume: str | None, overwrite: bool) -> TrainConfig:
    """The plan's first half, which reads nothing of the run directory: the config resolved, and
    for a run that may start fresh, --init-from's model and tokenizer pinned, its path absolute.
    (setup needs it before the process group exists: the precision is chosen from it.)"""
    if resume == "auto" and overwrite:
        raise SmolctlError("--resume auto continues the run in --run-dir, --overwrite starts it over",
                           hint="Pass one of them")
    if cfg.init_from and resume in (None, "auto"):  # a resume has the source's config in config.yaml already
        if overwrite and _inside(resolve(cfg.init_from), run_dir):
            raise SmolctlError(f"--init-from {cfg.init_from} lies inside --run-dir {run_dir}, which --overwrite "
                               f"empties first", hint="Export or copy it elsewhere first, or train into another --run-dir")
        cfg = with_init_model(cfg)
    cfg = cfg.resolved()
    cfg.model_config()
    if resume == "auto":  # what the run's auto settings decided at its start, if it has checkpoints
        cfg = dataclasses.replace(cfg, **{k: v for k, v in _decided(run_dir).items() if getattr(cfg, k) == AUTO[k]})
    return cfg


def plan_of(cfg: TrainConfig, run_dir: Path, resume: str | None, overwrite: bool, world: int,
            say: Callable = print, allow_config_change: bool = False) -> RunPlan:
    """The plan's second half, for `cfg` from planned_config: "auto" decided, the checkpoint to
    resume from, the run's tokenizer."""
    auto = resume == "auto"
    if auto:
        resume = "latest" if _same_run(cfg, run_dir) else None
    resume_from = resume_point(cfg, run_dir, resume, overwrite, world, say=say, allow_config_change=allow_config_change)
    tok, mcfg = rundir.run_tokenizer(cfg, cfg.model_config(), resume_from)
    return RunPlan(cfg, mcfg, tok, resume, resume_from, auto and resume_from is not None)


# The settings whose `auto` value a fresh run decides (by measuring) and config.yaml then keeps.
AUTO = {"mixed_precision": "auto", "compile": None}


def _decided(run_dir: Path) -> dict[str, Any]:
    """What the auto settings of a run in `run_dir` with checkpoints decided at its start (config.yaml
    keeps it); {} if none; a config.yaml that can't be read is _same_run's to report."""
    if not ckpt_io.saved(run_dir) or not (run_dir / "config.yaml").is_file():
        return {}
    try:
        saved = TrainConfig.from_file(run_dir / "config.yaml")
    except SmolctlError:
        return {}
    return {k: getattr(saved, k) for k, auto in AUTO.items() if getattr(saved, k) != auto}


def _same_run(cfg: TrainConfig, run_dir: Path) -> bool:
    """--resume auto: whether `run_dir` holds checkpoints of a run of `cfg` (False: none yet).
    Raises naming the keys that differ when they are another config's."""
    if not ckpt_io.saved(run_dir):
        return False
    if not (run_dir / "config.yaml").is_file():
        raise SmolctlError(f"--resume auto: {run_dir} has checkpoints but no config.yaml",
                           hint="Pass --run-dir of a run started with smolctl train")
    saved = TrainConfig.from_file(run_dir / "config.yaml").resolved()
    changed = config_changes(saved, cfg)
    if changed:
        raise SmolctlError(f"--resume auto: {run_dir} holds a run with another config ({'; '.join(changed)})",
                           hint=f"Train with its config ({run_dir / 'config.yaml'}), or continue it with "
                                f"smolctl resume --run-dir {run_dir}, or pick another --run-dir")
    return True


# -- helpers -------------------------------------------------------------------------------------

def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def mixed_precision(cfg: TrainConfig, say: Callable[[str], None] | None = None) -> str:
    """Accelerate's mixed_precision for this run (cfg resolved: seq_len set); `say` gets the
    figures behind an auto choice (--verbose)."""
    say = say or (lambda _: None)
    if cfg.mixed_precision != "auto":
        say(f"Precision: {cfg.mixed_precision} (set in the run's config, not auto)")
        return cfg.mixed_precision
    # what accelerate launch was told (config file or flag), else what measured fastest here
    if os.environ.get("ACCELERATE_MIXED_PRECISION"):
        say(f"Precision: {os.environ['ACCELERATE_MIXED_PRECISION']} (accelerate launch's setting)")
        return os.environ["ACCELERATE_MIXED_PRECISION"]
    from smolctl.autotune import Shape, describe, train_precision
    from smolctl.device import pick_device

    shape = Shape.of(cfg.model_config())  # the model's own matmuls
    mixed, choice = train_precision(pick_device(cfg.device), cfg.batch_size * cfg.seq_len, shape)
    say(describe(choice))
    return mixed


def _compile_choice(cfg: TrainConfig, mcfg: ModelConfig, mixed: str, accelerator) -> tuple[bool, str | None]:
    """Whether the run compiles its decoder layers, and why auto decided so (None: cfg.compile
    said): what the main process decides (perf.compile_choice, measured once per machine), for all."""
    if cfg.compile is not None:
        return cfg.compile, None
    from accelerate.utils import broadcast_object_list

    from smolctl.perf import compile_choice

    decision = [compile_choice(mcfg, cfg.batch_size, cfg.seq_len, mixed, accelerator.device, cfg.max_steps,
                               cfg.grad_accum) if accelerator.is_main_process else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(decision)
    return decision[0]


def _compile_now(run: Run) -> float:
    """Seconds spent compiling: the compiled layers' first forward and backward (where torch.compile
    compiles), on a batch of zeros before the first step, so that the compile is timed on its own
    and not in the first steps' throughput. No weight, optimizer state, RNG or data position changes."""
    t = time.perf_counter()
    zeros = torch.zeros(run.cfg.batch_size, run.cfg.seq_len, dtype=torch.long, device=run.device)
    try:
        with run.accelerator.no_sync(run.loss_module):
            run.accelerator.backward(run.loss_module(zeros, zeros))
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 -- inductor's failures (no C++ compiler, no triton) are many
        raise SmolctlError(f"torch.compile failed here: {compile_failure(e)}",
                           hint="Train with --no-compile (or leave --compile out: auto measures whether it works)",
                           exit_code=1) from None
    run.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return time.perf_counter() - t


def _adamw(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # RMSNorm weights
    # fused: one kernel per step on cpu, cuda and mps alike, and the only AdamW that can skip a
    # non-finite step on the device (found_inf, see train.train_step)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def _open_sinks(emit_to: list, run_dir: Path, log_file: Path, step: int, sinks: list[Callable],
                tracker_accelerator, cfg: TrainConfig) -> None:
    """metrics.jsonl, the log file, the caller's sinks and the tracker, on the main process."""
    # Drop what an earlier attempt logged after this point (all of it for a fresh start, e.g. a
    # run killed before its first checkpoint and started again): each step is logged once. Only in
    # the run's own files: a --log-file elsewhere may be shared with other runs, and is only appended to.
    truncate_after(run_dir / "metrics.jsonl", step)
    if rundir.in_run(log_file, run_dir):
        truncate_after(log_file, step)
    try:
        emit_to.append(JsonlSink(run_dir / "metrics.jsonl"))
        emit_to.append(LogFileSink(log_file))
    except OSError as e:
        raise SmolctlError(f"cannot write the log file {log_file}: {e.strerror}",
                           hint="Pick another --log-file") from None
    emit_to.extend(sinks)
    if tracker_accelerator is not None:
        from smolctl.metrics import TrackerSink

        tracker_accelerator.init_trackers(run_dir.name, config={k: v for k, v in cfg.to_dict().items() if k != "model"})
        emit_to.append(TrackerSink(tracker_accelerator))


def _eval_spec(cfg: TrainConfig, flags: tuple[str, str]) -> DataSpec | None:
    if cfg.eval_data:
        return DataSpec.parse(cfg.eval_data, cfg.text_column, split="heldout", flags=flags)
    if cfg.data == "sample":
        return DataSpec.parse("sample", cfg.text_column, split="heldout", flags=flags)
    return None


def _require_tracker(name: str) -> None:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb"}[name]
    if importlib.util.find_spec(module) is None:
        raise SmolctlError(f"--report-to {name} needs the {module} package", hint=f"pip install {module}")


def close_sinks(sinks: list) -> None:
    """Close each sink once (the list is emptied)."""
    while sinks:
        sink = sinks.pop(0)
        close = getattr(sink, "close", None)
        if close:
            close()
