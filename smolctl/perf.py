"""Performance helpers: regional torch.compile, training FLOPs per token, device peaks for MFU, memory."""

from __future__ import annotations

import os
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
