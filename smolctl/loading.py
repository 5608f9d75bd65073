"""Loading --model to generate with: the one policy `smolctl generate` and `smolctl chat` share.

    loaded, seconds = load_for_generation("runs/demo", dtype="auto", device=None, quantize="none")

The device and dtype are picked (see dtypes.pick_dtype), --model is resolved before anything is
printed (a bad spec fails first), --quantize is checked against the two, and on a CPU the fast
decoding paths are applied: decode.Decoder (4-bit weights; its engine, native C or torch, picked by
measuring) for --quantize int4 and, with --dtype auto, for a GGUF whose layer weights are stored in
4 bits (Q4_0 / Q4_1: decoding them in 4 bits loses nothing, and it is ~4x faster than dequantizing
them); fastpath.py's torch.mv for bf16.
"""

from __future__ import annotations

import sys
import time

from smolctl.errors import SmolctlError, note


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
    header = None
    if device == "cpu" and path.suffix == ".gguf" and (quantize == "int4" or dtype == "auto"):
        from smolctl.decode import stored_in_4_bits
        from smolctl.gguf_io import scan_gguf

        header = scan_gguf(path)
        if quantize == "none" and not stored_in_4_bits(header[2]):
            header = None  # an F16/Q8_0 file: auto keeps its precision
    say = note if verbose else None
    if header is not None:
        what = "its 4-bit weights as stored" if quantize == "none" else "int4 weights"
    elif quantize != "none":
        what = f"{quantize} weights"
    else:
        torch_dtype, what = pick_dtype(dtype, device, say=say)
    if verbose or sys.stderr.isatty():  # scripts get only errors and the speed line, unless they ask
        note(f"Loading {spec} ({what}; {device})")
    t = time.perf_counter()
    if header is not None:
        loaded = _load_gguf_4bit(path, header, say)
    elif quantize == "int4":  # quantized from the stored (fp32) weights, not from a bf16 copy of them
        from smolctl.decode import Decoder

        loaded = load(spec, device=device, resolved=path)
        loaded.model = Decoder.from_state(loaded.cfg, loaded.model.state_dict(), say=say)
    else:
        loaded = load(spec, device=device, dtype=torch_dtype, resolved=path)
        if device == "cpu":
            from smolctl.fastpath import fast_cpu_decoding

            fast_cpu_decoding(loaded.model)
    return loaded, time.perf_counter() - t


def _load_gguf_4bit(path, header, say=None):
    """sources.Loaded for a GGUF decoded in 4 bits. Neither a transformers model nor (for SmolLM2's
    vocabulary) its tokenizer is built: transformers is not imported (lean_tokenizer.py)."""
    from smolctl.decode import Decoder
    from smolctl.lean_tokenizer import LeanTokenizer
    from smolctl.sources import Loaded, _bundled_vocab_matches, gguf_special_ids, gguf_tokenizer
    from smolctl.tokenizer import BUNDLED

    model, info = Decoder.from_gguf(path, header, say=say)
    if _bundled_vocab_matches(info):
        tokenizer = LeanTokenizer(BUNDLED / "tokenizer.json", gguf_special_ids(info), info.chat_template,
                                  full=lambda: gguf_tokenizer(path, info))
    else:
        tokenizer = gguf_tokenizer(path, info)
    return Loaded(model, model.cfg, tokenizer, path, general=info.general)
