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
import shutil
import signal
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F

from smolctl import checkpoint as ckpt_io
from smolctl.config import ModelConfig, read_mapping, write_mapping
from smolctl.data import BlockStream, DataSpec, batches
from smolctl.errors import SmolctlError
from smolctl.metrics import JsonlSink, LogFileSink, plot_loss, truncate_after


@dataclass
class TrainConfig:
    # model: a preset, optionally overridden field by field (a config file's `model:` section)
    preset: str = "smollm2-135m"
    model: dict[str, Any] = field(default_factory=dict)
    # data
    data: str = "cosmopedia-v2"  # the seed's stream; "sample" is the bundled corpus
    text_column: str = "text"
    eval_data: str | None = None  # None: the held-out split when --data sample, else no eval
    tokenizer: str | None = None  # None: the bundled SmolLM2 tokenizer
    shuffle_buffer: int = 0  # blocks held for shuffling (0: stream order)
    num_workers: int = 1  # a background DataLoader worker tokenizes and packs
    # batch: tokens per optimizer step = batch_size * seq_len * grad_accum * processes
    batch_size: int = 8  # micro-batch per device
    seq_len: int | None = None  # None: the model's max_seq_len (2048 for SmolLM2-135M)
    grad_accum: int = 1
    # optimizer and schedule: the SmolLM2-135M recipe (huggingface/smollm config_smollm2_135M.yaml)
    lr: float = 3e-3
    min_lr: float = 0.0
    schedule: str = "wsd"  # warmup-stable-decay, or "cosine"
    warmup_steps: int | None = None  # None: 2% of max_steps, at most 2000 (the recipe's value)
    decay_frac: float = 0.2  # WSD: linear decay to min_lr over the last 20% of steps
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # loop
    max_steps: int = 5000
    mixed_precision: str = "auto"  # auto: accelerate launch's setting, else bf16 on GPUs that support it
    compile: bool = False
    seed: int = 42
    device: str | None = None  # None: what Accelerate picks
    save_every: int = 500
    keep_last: int | None = None
    eval_every: int = 0  # 0: only at the end
    eval_tokens: int = 32768
    sample_every: int = 0
    sample_prompt: str = "Once upon a time"
    sample_tokens: int = 32
    log_every: int = 10
    report_to: str = "none"  # tensorboard, wandb or none
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    peak_tflops: float | None = None  # the device's peak for MFU; None: from a table of GPUs

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({"preset": self.preset, **self.model})

    def resolved(self) -> TrainConfig:
        """Fill the derived defaults and check every value; raises SmolctlError."""
        cfg = dataclasses.replace(self)
        mcfg = cfg.model_config()
        cfg.seq_len = cfg.seq_len or mcfg.max_seq_len
        if cfg.warmup_steps is None:
            cfg.warmup_steps = min(2000, max(1, round(0.02 * cfg.max_steps)))
        checks = [
            (cfg.max_steps > 0, f"--max-steps must be positive, got {cfg.max_steps}"),
            (cfg.batch_size > 0, f"--batch-size must be positive, got {cfg.batch_size}"),
            (cfg.grad_accum > 0, f"--grad-accum must be positive, got {cfg.grad_accum}"),
            (cfg.seq_len > 0, f"--seq-len must be positive, got {cfg.seq_len}"),
            (cfg.seq_len <= mcfg.max_seq_len,
             f"--seq-len {cfg.seq_len} exceeds the model's max positions ({mcfg.max_seq_len})"),
            (cfg.lr > 0 and cfg.min_lr >= 0, "--lr must be positive and min_lr non-negative"),
            (cfg.schedule in ("wsd", "cosine"), f"schedule must be wsd or cosine, got {cfg.schedule!r}"),
            (0 <= cfg.decay_frac <= 1, "decay_frac must be within [0, 1]"),
            (cfg.mixed_precision in ("auto", "no", "bf16", "fp16"),
             f"--mixed-precision must be auto, no, bf16 or fp16, got {cfg.mixed_precision!r}"),
            (cfg.save_every > 0, f"--save-every must be positive, got {cfg.save_every}"),
            (cfg.max_bad_steps > 0, f"--max-bad-steps must be at least 1, got {cfg.max_bad_steps}"),
            (cfg.log_every > 0, f"--log-every must be positive, got {cfg.log_every}"),
            (min(cfg.eval_every, cfg.sample_every, cfg.shuffle_buffer, cfg.warmup_steps) >= 0,
             "--eval-every, --sample-every, --shuffle-buffer and warmup must not be negative"),
            (cfg.num_workers in (0, 1), "--num-workers must be 0 or 1 (one ordered stream per rank)"),
            (cfg.report_to in ("none", "tensorboard", "wandb"), "--report-to must be tensorboard, wandb or none"),
        ]
        for ok, message in checks:
            if not ok:
                raise SmolctlError(message)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SmolctlError(f"unknown training config keys: {', '.join(unknown)}",
                               hint=f"Valid keys: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """A YAML/TOML/JSON file: training keys at the top level (or under `train:`), the model as
        `preset:` and/or a `model:` mapping of ModelConfig fields (or a preset name)."""
        d = read_mapping(path)
        d = {**d.pop("train", {}), **d}
        model = d.get("model")
        if isinstance(model, str):
            d["preset"], d["model"] = model, {}
        elif isinstance(model, dict) and "preset" in model:
            d["model"] = dict(model)
            d["preset"] = d["model"].pop("preset")
        return cls.from_dict(d)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate for optimizer step `step` (1-based), a pure function of the config.

    WSD: linear warmup to lr, constant, then linear decay to min_lr over the last decay_frac of
    the run. cosine: linear warmup, then half a cosine down to min_lr.
    """
    if step <= cfg.warmup_steps:  # warmup: lr * step / warmup
        return cfg.lr * step / max(1, cfg.warmup_steps)
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = round(cfg.decay_frac * cfg.max_steps)
    decay_start = cfg.max_steps - decay_steps
    if step <= decay_start:  # stable
        return cfg.lr
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (cfg.max_steps - step) / max(1, decay_steps)  # decay


class CausalLMLoss(nn.Module):
    """The model plus its loss, as one module: the one place the loss is computed.

    Wrapping (rather than calling model.model directly) keeps DDP's hooks on the forward pass.
    Blocks are already shifted (inputs = block[:-1], labels = block[1:]), so we don't use
    transformers' labels= path, which would shift them again.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model.model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, C)
        return linear_cross_entropy(hidden.flatten(0, 1), self.model.lm_head.weight, labels.flatten())


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean(cross_entropy(hidden @ weight.T, labels)) without the full (N, V) logits.

    hidden (N, C), weight (V, C), labels (N,) of token ids (no ignore_index: blocks are packed).
    The logits are the step's largest activation: 4 x 256 tokens x 49,152 x 4 bytes = 200 MB in fp32,
    and a plain `F.cross_entropy(logits.float())` writes and rereads them ~8 times over forward and
    backward. Liger's fused Triton kernel takes over on CUDA when installed; otherwise
    `_ChunkedLinearCrossEntropy` computes each chunk's loss and gradients at once.
    """
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else weight.dtype
    if not torch.is_grad_enabled():  # evaluation: detached, so that no gradient is computed
        return _ChunkedLinearCrossEntropy.apply(hidden.detach(), weight.detach(), labels, dtype)
    if hidden.is_cuda and _liger_flce() is not None:  # Liger computes the gradients in forward too
        return _liger_flce()(hidden.to(dtype), weight.to(dtype), labels)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, dtype)


def _liger_flce():
    """Liger's fused linear cross-entropy function, or None when liger-kernel is not installed."""
    global _LIGER
    if _LIGER is False:
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            _LIGER = liger_fused_linear_cross_entropy
        except ImportError:
            _LIGER = None
    return _LIGER


_LIGER = False  # not looked up yet


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in the forward pass, the fp32 logits a chunk of rows at a time.

    Per chunk: logits = h @ W.T in `dtype` (bf16 under autocast, as nn.Linear computes them),
    then in fp32 (as `logits.float()`), in place: p = exp(logits - max), loss = max + log(sum p)
    - logit[label], and dlogits = (p / sum p - onehot) / N, stored in `dtype` into one (N, V)
    buffer. Then, as nn.Linear's backward would: dh = dlogits @ W and dW = dlogits.T @ h, one
    matmul each. Backward only scales the saved gradients (by 1 / grad_accum, say).

    Same FLOPs as the plain path; what it saves is memory traffic, which on a CPU costs about as
    much as the lm_head's matmuls: the plain path allocates and walks (N, V) fp32 tensors some
    eight times (the cast, log_softmax and its backward, nll's zero-filled gradient, the cast back).
    Here one fp32 pass makes the loss and the gradient, and only the `dtype` gradient is (N, V).
    Chunks bound the fp32 memory (on a GPU without Liger: 24 chunks for 16 x 2048 tokens) but
    are kept large, since every op costs a synchronisation of the CPU's threads.
    """

    CHUNK_BYTES = 256 * 2**20  # fp32 logits per chunk: 1,365 rows at V = 49,152 (all of B4 x S256)

    @staticmethod
    def forward(ctx, hidden, weight, labels, dtype):
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = max(1, _ChunkedLinearCrossEntropy.CHUNK_BYTES // (4 * vocab))
        need_h, need_w = ctx.needs_input_grad[:2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            grad = torch.empty(n, vocab, dtype=dtype, device=hidden.device) if need_h or need_w else None
            for start in range(0, n, rows):
                h, y = h_all[start:start + rows], labels[start:start + rows, None]
                logits = F.linear(h, w).float()  # (rows, V) fp32, a fresh tensor: modified in place below
                target = logits.gather(1, y)
                top = logits.amax(1, keepdim=True)
                probs = logits.sub_(top).exp_()  # unnormalised softmax
                norm = probs.sum(1, keepdim=True)
                total += (top + norm.log() - target).sum()  # logsumexp - logit[label]
                if grad is not None:
                    probs.mul_((norm * n).reciprocal_())  # softmax / N
                    probs.scatter_add_(1, y, torch.full_like(target, -1.0 / n))  # - onehot / N
                    grad[start:start + rows] = probs
            grad_h = (grad @ w).to(hidden.dtype) if need_h else None
            grad_w = (grad.T @ h_all).to(weight.dtype) if need_w else None
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors  # ours alone, used once: scaled in place (no 113 MB copy)
        return (None if grad_h is None else grad_h.mul_(grad_out),
                None if grad_w is None else grad_w.mul_(grad_out), None, None)


def compile_layers(model: nn.Module, eager_attention: bool = False) -> None:
    """torch.compile each decoder layer in place, with inductor's caches in a persistent directory.

    Regional compilation: the 30 layers share one code object, so dynamo traces and inductor
    compiles one layer graph (forward and backward) and reuses it for all of them, instead of
    one 30-layer graph (a cold compile of ~80 s on 2 CPU cores). What it buys is fusion of the
    elementwise work around the matmuls (RMSNorm, RoPE, SiLU, residual adds and autocast's
    casts), which dominates a CPU step at hidden size 576. The embedding and the loss stay eager
    (the loss is already fused, see linear_cross_entropy); parameter names are unchanged, so
    checkpoints are the same.

    eager_attention: transformers' matmul-softmax-matmul attention instead of SDPA, for short
    sequences on a CPU. Compiled, it beats SDPA's CPU flash kernel, whose backward is slow (5x
    its forward: ~15% of a 135M step at S=256); it keeps the (B, heads, S, S) probabilities for
    backward, 9 MB a layer at B4 x S256 but 600 MB at S=2048, hence short sequences only.

    The FX-graph and AOTAutograd caches are on by default but live in /tmp/torchinductor_<user>;
    here they default to ~/.cache/smolctl/torchinductor (TORCHINDUCTOR_CACHE_DIR overrides), so
    a warm start skips inductor's codegen and C++/Triton compiles: only dynamo's trace remains.
    """
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
    if eager_attention:
        model.config._attn_implementation = "eager"
    for layer in model.model.layers:
        layer.compile()


def compile_cache_dir() -> Path:
    """~/.cache/smolctl/torchinductor, unless TORCHINDUCTOR_CACHE_DIR names another directory
    (torch itself sets it to its /tmp default when transformers is imported: that one doesn't count)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smolctl" / "torchinductor"


def flops_per_token(mcfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 per weight used in a matmul (the lm_head's too, tied or not;
    the embedding lookup is free) plus attention's 12 * layers * hidden * seq_len (PaLM, app. B)."""
    h, n = mcfg.hidden_size, mcfg.num_layers
    kv = mcfg.num_kv_heads * mcfg.head_dim
    per_layer = h * (h + 2 * kv + h) + 3 * h * mcfg.intermediate_size
    return 6 * (n * per_layer + mcfg.vocab_size * h) + 12 * n * h * seq_len


PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125, "4090": 165, "3090": 71}


def device_peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return None


@dataclass
class TrainResult:
    step: int
    stopped_by: str | None  # "SIGINT"/"SIGTERM" when interrupted, None when finished
    last_checkpoint: Path | None
    run_dir: Path


def train(cfg: TrainConfig, run_dir: Path, resume: str | None = None, log_file: Path | None = None,
          sinks: list[Callable] = (), overwrite: bool = False) -> TrainResult:
    """Train (or resume) to cfg.max_steps; see the module docstring. Raises SmolctlError.

    A run that fails before its first step (bad config or data, out of memory) leaves nothing
    behind: the run directory and log file this call created are removed again.
    """
    run_dir = Path(run_dir)
    log_file = log_file or Path("logs") / f"{run_dir.name}.log"
    created = [p for p in (run_dir, log_file) if not p.exists()]
    progress = {"stepped": False}
    with ExitStack() as cleanup:  # closes the metrics files however _train ends
        try:
            try:
                return _train(cfg, run_dir, resume, log_file, sinks, overwrite, cleanup, progress)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
                    raise
                raise SmolctlError(f"out of memory with --batch-size {cfg.batch_size} x --seq-len {cfg.seq_len}",
                                   hint="Lower --batch-size (raise --grad-accum to keep the tokens per step) "
                                        "or --seq-len", exit_code=1) from None
        except SmolctlError:
            if not progress["stepped"] and os.environ.get("RANK", "0") == "0":
                cleanup.close()
                for p in created:
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            raise


def _train(cfg: TrainConfig, run_dir: Path, resume: str | None, log_file: Path, sinks: list[Callable],
           overwrite: bool, cleanup: ExitStack, progress: dict) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    from smolctl.model import build_model

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
    accelerator = Accelerator(mixed_precision=mixed, cpu=cfg.device == "cpu", log_with=trackers,
                              project_dir=str(run_dir))
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device

    # -- run directory, or the checkpoint to resume from --------------------------------------
    if main and resume is not None:
        ckpt_io.recover(run_dir, say=accelerator.print)
    accelerator.wait_for_everyone()
    resume_path = resume_point(cfg, run_dir, resume, overwrite, world, say=accelerator.print)
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
    step, tokens_seen, data_state, elapsed_before = 0, 0, None, 0.0
    if resume_path is not None:
        weights = ckpt_io.load_file(str(resume_path / ckpt_io.WEIGHTS))
        model.load_state_dict(weights, strict=not mcfg.tie_embeddings)
        meta, data_state = ckpt_io.load_training_state(resume_path, rank, world)
        optim_state = ckpt_io.read_optimizer(resume_path)  # applied after prepare
        step, tokens_seen, elapsed_before = meta["step"], meta["tokens_seen"], meta.get("elapsed_s", 0.0)
        _supersede_later_checkpoints(run_dir, resume_path, step, main, accelerator.print)
    loss_module = CausalLMLoss(model)
    if cfg.compile:
        compile_layers(model, eager_attention=device.type == "cpu" and cfg.seq_len <= 512)
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    if resume_path is not None:  # after prepare: under FSDP each rank keeps its shard of it
        ckpt_io.load_optimizer(optim_state, loss_module, optimizer.optimizer)
        del optim_state

    spec = DataSpec.parse(cfg.data, cfg.text_column)
    stream = BlockStream(spec, cfg.seq_len, cfg.batch_size, cfg.tokenizer, rank, world,
                         cfg.shuffle_buffer, cfg.seed, data_state)
    data = batches(stream, cfg.num_workers)
    eval_spec = _eval_spec(cfg)

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
    verb = f"Resuming from {resume_path} (step {step})" if resume_path else "Training"
    emit("start", text=f"{verb}: {mcfg.name} ({sum(p.numel() for p in model.parameters()):,} params) on "
                       f"{spec.describe()}, {world} x {device.type} process(es), mixed precision {mixed}, "
                       f"{tokens_per_step:,} tokens/step, to step {cfg.max_steps}; run dir {run_dir}",
         step=step, max_steps=cfg.max_steps, run_dir=str(run_dir), resumed_from=str(resume_path) if resume_path else None,
         config=cfg.to_dict())

    def save(kind: str = "step") -> Path:
        t = time.perf_counter()
        final = ckpt_io.step_dir(run_dir, step) if kind == "step" else run_dir / "checkpoints" / "final"
        tmp = ckpt_io.staging_path(final)
        try:
            ckpt_io.staging_dir(final, main)
            accelerator.wait_for_everyone()
            weights, optim_state = ckpt_io.training_state(loss_module, optimizer.optimizer, mcfg)  # all ranks
            if main:
                meta = {"step": step, "tokens_seen": tokens_seen, "world_size": world, "train": cfg.to_dict(),
                        "elapsed_s": elapsed_before + time.perf_counter() - t0, "lr": lr_at(max(step, 1), cfg)}
                ckpt_io.save_model_state(tmp, weights, mcfg, optim_state, meta)
            del weights, optim_state
            ckpt_io.save_rank_state(tmp, rank, last_state)
            accelerator.wait_for_everyone()
            if main:
                ckpt_io.finalize(tmp, final)
        except OSError as e:  # disk full, read-only, quota...: the previous checkpoint is untouched
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise SmolctlError(f"could not save checkpoint {final}: {e.strerror or e}"
                               + (f" ({e.filename})" if e.filename else ""),
                               hint=f"Free space or fix permissions; the last good checkpoint is {last_ckpt}, "
                                    f"continue with: smolctl resume --run-dir {run_dir} --from latest",
                               exit_code=1) from None
        if main:
            ckpt_io.prune(run_dir, cfg.keep_last)
            emit("checkpoint", step=step, path=str(final), seconds=time.perf_counter() - t)
        accelerator.wait_for_everyone()
        return final

    def run_eval() -> None:
        if eval_spec is None:
            return
        loss, n = evaluate(loss_module, eval_spec, seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                           tokens=cfg.eval_tokens, device=device, tokenizer=cfg.tokenizer,
                           autocast=accelerator.autocast)
        emit("eval", step=step, loss=loss, perplexity=math.exp(min(loss, 50)), tokens=n)

    def run_sample() -> None:
        from smolctl.generation import complete
        from smolctl.tokenizer import load_tokenizer

        model.eval()
        with accelerator.autocast():
            text = complete(model, load_tokenizer(cfg.tokenizer), cfg.sample_prompt, max_new_tokens=cfg.sample_tokens)
        model.train()
        emit("sample", step=step, prompt=cfg.sample_prompt, text=text)

    # -- the loop ---------------------------------------------------------------------------
    last_ckpt, last_state, stopped_by, bad_steps = resume_path, data_state, None, 0
    window_loss, window_steps, window_t = torch.zeros((), device=device), 0, time.perf_counter()
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
                        hint=f"The last good checkpoint is {last_ckpt}; resume from it with a lower --lr",
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
                     elapsed_s=elapsed_before + now - t0, memory_gb=_memory_gb(device))
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


@torch.no_grad()
def evaluate(loss_module: nn.Module, spec: DataSpec, *, seq_len: int, batch_size: int, tokens: int, device,
             tokenizer: str | None = None, autocast=nullcontext) -> tuple[float, int]:
    """Mean loss over the first `tokens` predicted tokens of `spec`, read in order (one epoch at most).

    Returns (loss, tokens actually scored): whole batches, so slightly more than asked.
    """
    stream = BlockStream(spec, seq_len, batch_size, tokenizer, max_epochs=1)
    was_training = loss_module.training
    loss_module.eval()
    total, n = 0.0, 0
    for batch, _ in batches(stream, num_workers=0):
        batch = batch.to(device)
        with autocast():
            loss = loss_module(batch[:, :-1], batch[:, 1:])
        total += loss.item() * batch[:, 1:].numel()
        n += batch[:, 1:].numel()
        if n >= tokens:
            break
    loss_module.train(was_training)
    if n == 0:
        raise SmolctlError(f"the eval data ({spec.describe()}) is shorter than one batch "
                           f"({batch_size} x {seq_len + 1} tokens)", hint="Use more eval text or a smaller batch/seq-len")
    return total / n, n


def resume_point(cfg: TrainConfig, run_dir: Path, resume: str | None, overwrite: bool, world_size: int,
                 say: Callable = print) -> Path | None:
    """The checks a run can make before any process group exists: the checkpoint to resume from
    (verified, same model, same world size), or None for a fresh run in a directory that may
    take one. train() calls it on every rank; the CLI once, before launching N processes."""
    cfg = cfg.resolved()
    if resume is None:
        if ckpt_io.checkpoints(run_dir) and not overwrite:
            raise SmolctlError(f"run directory {run_dir} already has checkpoints",
                               hint=f"Continue it with: smolctl resume --run-dir {run_dir} --from latest "
                                    "(or pass --overwrite to start over)")
        return None
    path = ckpt_io.find_checkpoint(run_dir, resume, say=say)
    meta = ckpt_io.check_world_size(path, world_size)
    mcfg = cfg.model_config()
    if dataclasses.replace(ModelConfig.from_dict(meta["model"]), name=mcfg.name) != mcfg:
        raise SmolctlError(f"{path} holds a different model config than this run's",
                           hint="Resume with the run's own config (leave --preset/--config out)")
    if meta["step"] >= cfg.max_steps:
        raise SmolctlError(f"{path} is at step {meta['step']}, which is not before --max-steps {cfg.max_steps}",
                           hint="Pass a larger --max-steps to extend the run")
    return path


def _eval_spec(cfg: TrainConfig) -> DataSpec | None:
    if cfg.eval_data:
        return DataSpec.parse(cfg.eval_data, cfg.text_column, split="heldout")
    if cfg.data == "sample":
        return DataSpec.parse("sample", cfg.text_column, split="heldout")
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
        if fresh and (run_dir / "checkpoints").exists():
            import shutil

            shutil.rmtree(run_dir / "checkpoints")
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
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


def _memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except ImportError:
        return None


def _close(sinks: list) -> None:
    """Close each sink once (the list is emptied)."""
    while sinks:
        sink = sinks.pop(0)
        close = getattr(sink, "close", None)
        if close:
            close()
