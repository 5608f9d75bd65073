"""One `--dtype` vocabulary for generate, chat and export, and what `auto` means.

    canonical("f16", ("fp32", "fp16", "bf16"))   # -> "fp16"
    dtype, why = pick_dtype("auto", "cpu")        # -> (torch.float32, "auto: fp32, as bf16 matmuls ran only 0.6x ...")

Names are fp32, fp16, bf16 (and q8_0 for GGUF); llama.cpp's f32/f16 and torch's float32/
float16/bfloat16 are accepted everywhere as the same thing.
"""

from __future__ import annotations

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


def pick_dtype(name: str, device: str, work: str = "decode", rows: int = 1, mcfg=None, say=None):
    """--dtype for generate/chat/eval -> (torch dtype, why, in a few words). `mcfg`: the model's
    config, whose matmul shapes are timed (default SmolLM2-135M's); `say`: called with the figures
    behind an auto choice (--verbose).

    auto is what ran fastest here when the model's own matmuls were timed for `work` ("decode":
    one row at a time; "eval": `rows` tokens per forward), see autotune.choose: bf16 (or fp16)
    only where it beats fp32 clearly. Decoding on a CPU with AVX512-BF16 but no AMX, bf16 ran
    slower than fp32 (13.6 vs 20.9 tokens/s) -- CPU flags do not say which wins; a measurement does."""
    name = canonical(name, GENERATE)
    if name != "auto":
        return torch_dtype(name), f"{name}: asked for"
    from smolctl.autotune import Shape, choose

    choice = choose(device, work, rows, Shape.of(mcfg) if mcfg else Shape())
    if say:
        from smolctl.autotune import describe

        say(describe(choice))
    return torch_dtype(choice.name), choice.why
