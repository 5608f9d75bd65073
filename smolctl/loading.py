"""Loading --model to generate with: the one policy `smolctl generate` and `smolctl chat` share.

    loaded, seconds = load_for_generation("runs/demo", dtype="auto", device=None, quantize="none")

The device and dtype are picked (see dtypes.pick_dtype), --model is resolved before anything is
printed (a bad spec fails first), --quantize is checked against the two, and on a CPU the fast
decoding paths of fastpath.py are applied to the loaded model.
"""

from __future__ import annotations

import sys
import time

from smolctl.errors import SmolctlError


def load_for_generation(spec: str | None, dtype: str, device: str | None, quantize: str = "none",
                        verbose: bool = False):
    """Load `spec` for generation (imports torch). Returns (sources.Loaded, seconds it took)."""
    from smolctl.device import pick_device
    from smolctl.dtypes import GENERATE, canonical, pick_dtype
    from smolctl.sources import load, resolve

    device = pick_device(device)
    if spec is None:
        load(None)  # raises the "how to get a model" message
    dtype = canonical(dtype, GENERATE)
    path = resolve(spec)  # a bad spec fails here, before anything is printed
    if quantize != "none" and dtype in ("fp32", "fp16"):
        raise SmolctlError(f"--quantize int4 computes in bf16: leave --dtype out or use --dtype bf16, not {dtype}")
    if quantize != "none" and device != "cpu":
        raise SmolctlError(f"--quantize {quantize} is a CPU path (not {device})",
                           hint="Use --dtype bf16 on accelerators")
    torch_dtype, why = pick_dtype(dtype, device, say=_stderr if verbose else None)
    what = f"{quantize} weights, bf16" if quantize != "none" else why
    if verbose or sys.stderr.isatty():  # scripts get only errors and the speed line, unless they ask
        print(f"Loading {spec} ({what}; {device})", file=sys.stderr, flush=True)
    t = time.perf_counter()
    # int4 is quantized from the stored (fp32) weights, not from a bf16 copy of them
    loaded = load(path, device=device, dtype=None if quantize == "int4" else torch_dtype)
    if device == "cpu":
        from smolctl.fastpath import fast_cpu_decoding

        fast_cpu_decoding(loaded.model, int4=quantize == "int4")
    return loaded, time.perf_counter() - t


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
