"""Performance helpers: regional torch.compile, training FLOPs per token, device peaks for MFU, memory."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from smolctl.config import ModelConfig
from smolctl.fsutil import cache_dir


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


# -- compile: auto --------------------------------------------------------------------------------

# Measuring whether torch.compile pays is itself a compile (~30-60 s on 2 CPU cores, once per
# machine and shape): worth it only for a run whose matmuls alone take at least this long.
MEASURE_FROM_S = 300.0
# Compile only where its measured cost is repaid within this share of the run's steps.
REPAID_WITHIN = 0.5


def compile_choice(mcfg: ModelConfig, batch_size: int, seq_len: int, mixed: str, device: torch.device,
                   steps: int, grad_accum: int = 1) -> tuple[bool, str]:
    """What `compile: auto` means for `steps` optimizer steps of grad_accum micro-batches of
    (batch_size, seq_len) in Accelerate's `mixed` precision on `device`, and why (a few words).

    Measured, never guessed: a model of the run's widths with two layers is timed forward and
    backward, eager and compiled (each layer's saving, and the compile's cost), once per machine,
    torch, shape and precision (cached in autotune.json). Compiled when that cost is repaid within
    REPAID_WITHIN of the run. A run whose matmuls alone (autotune's cached figures) take less than
    MEASURE_FROM_S is not measured: the measurement would cost a good share of it."""
    from smolctl import autotune

    if device.type not in ("cpu", "cuda"):
        return False, f"auto: off, not measured on {device.type}"
    shape, tokens = autotune.Shape.of(mcfg), batch_size * seq_len
    dtype = {"no": "fp32"}.get(mixed, mixed)
    figures = autotune.measured(device.type, min(tokens, autotune.MAX_ROWS), shape)[0]
    speed = next(v for v in (figures.get(dtype), figures["fp32"]) if isinstance(v, (int, float)))
    least_s = steps * grad_accum * 3 * tokens / speed  # forward, and backward's two
    if least_s < MEASURE_FROM_S:
        return False, f"auto: off, a run this short ({least_s:.0f} s of matmuls) cannot repay a compile"
    eager_attention = eager_attention_for(device, seq_len)
    timed = autotune.cached(device.type, compile_entry(shape, batch_size, seq_len, dtype, eager_attention),
                            lambda: measure_compile(mcfg, batch_size, seq_len, mixed, device, eager_attention),
                            keep=usable_compile_figures)[0]
    if "failed" in timed:
        return False, f"auto: off, torch.compile failed here ({timed['failed']})"
    saved_s = mcfg.num_layers * (timed["eager_ms"] - timed["compiled_ms"]) / 1000
    if saved_s <= 0:
        return False, (f"auto: off, compiled layers were not faster here ({timed['compiled_ms']:.1f} ms "
                       f"against {timed['eager_ms']:.1f} eager)")
    repaid = timed["compile_s"] / saved_s / grad_accum  # in optimizer steps
    on = repaid <= REPAID_WITHIN * steps
    return on, (f"auto: {'on' if on else 'off'}, compiled layers ran {timed['eager_ms'] / timed['compiled_ms']:.2f}x "
                f"eager here, and a {timed['compile_s']:.0f} s compile is repaid after {math.ceil(repaid):,} of "
                f"{steps:,} steps")


def usable_compile_figures(figures: dict) -> bool:
    """measure_compile's figures worth caching and reading back: its three times, compiled_ms above
    0 -- not a failure (a compiler may be installed later), nor a damaged entry."""
    times = [figures.get(k) for k in ("eager_ms", "compiled_ms", "compile_s")]
    return all(isinstance(t, (int, float)) and t >= 0 for t in times) and times[1] > 0


def eager_attention_for(device: torch.device, seq_len: int) -> bool:
    """compile_layers' eager_attention for a run on `device` at seq_len (see there)."""
    return device.type == "cpu" and seq_len <= 512


def compile_entry(shape, batch_size: int, seq_len: int, dtype: str, eager_attention: bool) -> str:
    """The autotune cache entry of measure_compile's figures."""
    return f"compile {shape.key()} b{batch_size} s{seq_len} {dtype}{' eager-attention' if eager_attention else ''}"


def measure_compile(mcfg: ModelConfig, batch_size: int, seq_len: int, mixed: str, device: torch.device,
                    eager_attention: bool, rounds: int = 5) -> dict:
    """Forward and backward of the decoder layers of two 2-layer models of mcfg's widths, one eager
    and one regionally compiled (as compile_layers does the run's), timed in turn (a neighbour's
    load falls on both alike): {eager_ms, compiled_ms} per layer, each its best of `rounds`, and
    compile_s (the first compiled call's excess), or {failed: why}. It also fills inductor's cache
    for the run's own compile, which compiles the same layer graph."""
    import dataclasses

    from smolctl.autotune import _sync
    from smolctl.loss import CausalLMLoss
    from smolctl.model import build_model

    tokens = torch.zeros(batch_size, seq_len, dtype=torch.long, device=device)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    sync = _sync(str(device)) or (lambda: None)

    def model() -> CausalLMLoss:
        built = build_model(dataclasses.replace(mcfg, num_layers=2), device=device)
        if eager_attention:
            built.config._attn_implementation = "eager"
        return CausalLMLoss(built)

    def step(layers: CausalLMLoss) -> float:
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            hidden = layers.hidden_states(tokens)
        hidden.float().sum().backward()
        layers.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    eager, compiled = model(), model()
    compile_layers(compiled.model, eager_attention)
    step(eager)
    try:
        first = step(compiled)
        start, cpu_start = time.perf_counter(), time.process_time()
        times = [(step(eager), step(compiled)) for _ in range(rounds)]
    except Exception as e:  # noqa: BLE001 -- inductor's failures (no C++ compiler, no triton) are many
        return {"failed": compile_failure(e)}
    eager_s, compiled_s = (min(column) for column in zip(*times))
    out = {"eager_ms": round(eager_s * 1000 / 2, 3), "compiled_ms": round(compiled_s * 1000 / 2, 3),
           "compile_s": round(max(0.0, first - compiled_s), 2)}
    if device.type == "cpu":  # the share of the CPU torch's threads got: on a busy machine, not cached (autotune)
        out["cpu_share"] = round((time.process_time() - cpu_start) / (time.perf_counter() - start)
                                 / torch.get_num_threads(), 2)
    return out


def compile_failure(e: Exception) -> str:
    """Why torch.compile failed, in one line: the exception's type and its message's first line (under
    inductor's InductorError, the cause: "InvalidCxxCompiler: No working C++ compiler found ...")."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


def compile_cache_dir() -> Path:
    """~/.cache/smolctl/torchinductor, unless TORCHINDUCTOR_CACHE_DIR names another directory
    (torch itself sets it to its /tmp default when transformers is imported: that one doesn't count)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen)
    return cache_dir() / "torchinductor"


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



def memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    except ImportError:
        return None
