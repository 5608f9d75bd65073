"""One `--dtype` vocabulary for generate, chat and export, and what `auto` means.

    canonical("f16", ("fp32", "fp16", "bf16"))   # -> "fp16"
    dtype, why = pick_dtype("auto", "cpu")        # -> (torch.float32, "fp32: this CPU has no AMX ...")

Names are fp32, fp16, bf16 (and q8_0 for GGUF); llama.cpp's f32/f16 and torch's float32/
float16/bfloat16 are accepted everywhere as the same thing.
"""

from __future__ import annotations

from pathlib import Path

from smolctl.errors import SmolctlError

ALIASES = {"fp32": "fp32", "f32": "fp32", "float32": "fp32", "float": "fp32",
           "fp16": "fp16", "f16": "fp16", "float16": "fp16", "half": "fp16",
           "bf16": "bf16", "bfloat16": "bf16",
           "q8_0": "q8_0", "auto": "auto"}
GENERATE = ("auto", "fp32", "bf16", "fp16")  # what generate/chat compute in


def canonical(name: str, allowed: tuple[str, ...], what: str = "--dtype") -> str:
    """`name` in the one vocabulary, if it is one of `allowed` (canonical names); else a one-line error."""
    found = ALIASES.get(str(name).lower())
    if found not in allowed:
        raise SmolctlError(f"unknown dtype {name!r} for {what}", hint=f"Use one of: {', '.join(allowed)}")
    return found


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def pick_dtype(name: str, device: str):
    """--dtype for generate/chat -> (torch dtype, why, in a few words).

    auto is bf16 only where bf16 matmuls are really fast: a CUDA device that supports bf16, or a
    CPU with AMX (`amx_bf16`: tile matmul units). AVX512-BF16 alone only speeds up dot products,
    and decoding SmolLM2-135M there ran slower in bf16 than in fp32 (13.6 vs 20.9 tokens/s) and
    changed greedy output; everywhere else auto is fp32."""
    import torch

    name = canonical(name, GENERATE)
    if name != "auto":
        return torch_dtype(name), f"{name}: asked for"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "bf16: auto, this GPU computes bf16 natively"
        return torch.float32, "fp32: auto, this GPU has no bf16"
    if device == "cpu":
        if cpu_has_amx_bf16():
            return torch.bfloat16, "bf16: auto, this CPU has AMX bf16 matmul units"
        return torch.float32, "fp32: auto, this CPU has no AMX (bf16 would decode slower)"
    return torch.float32, f"fp32: auto, on {device}"


def cpu_has_amx_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU flags list amx_bf16 (Linux; elsewhere there is no such file: False)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    return any("amx_bf16" in line.split() for line in text.splitlines() if line.startswith("flags"))
