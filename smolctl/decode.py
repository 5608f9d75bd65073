"""A lean batch-1 decoder for Llama models on CPU with 4-bit weights: what `smolctl generate` and
`smolctl chat` run on a CPU for a Q4 GGUF file, and for --quantize int4.

    dec = Decoder.from_gguf(path)           # the Q4 blocks as stored
    dec = Decoder.from_state(cfg, state)    # a transformers Llama's weights, quantized to 4 bits in groups of 32
    step = dec.start(max_len)               # a fresh KV cache for max_len positions
    logits = step(ids, pos)                 # (1, T) ids at positions pos.. -> (1, vocab) fp32, last position
    dec.engine.name                         # "native" or "torch"

Two engines run the step: native.py's compiled C step (int8 activations against the blocks as
stored, llama.cpp's scheme; numpy logits) and decode_torch.py's (bf16 activations through torch's
int4 kernel; torch logits). `engine="auto"` takes the one whose step ran faster on this machine:
both built and timed once, then cached (autotune.fastest). This module imports neither torch nor
transformers, so a GGUF decoded natively never loads them (whole-process time: see
docs/generate-and-chat.md).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np

from smolctl.config import ModelConfig
from smolctl.errors import SmolctlError
from smolctl.gguf_io import GROUP, Q4_0, Q4_1, dequantize, gguf_tensor

ENGINES = ("auto", "native", "torch")


def stored_in_4_bits(scan) -> bool:
    """Whether a scanned GGUF's layer weights are all Q4_0 / Q4_1: then 4-bit decoding is exact."""
    return all(kind in (Q4_0, Q4_1) for name, (kind, _, _) in scan.tensors.items()
               if name.startswith("blk.") and not name.endswith("norm.weight"))


# -- the decoder ---------------------------------------------------------------------------------

def arrange(cfg: ModelConfig, tensors, q_scale: float = 1.0) -> SimpleNamespace:
    """A Llama's weights as the engines take them: `layers` (each: attn_norm, qkv, out, mlp_norm,
    gate_up, down), `embed`, `norm`, `head`. `tensors(name)` gives a transformers-named weight: the
    linears as 4-bit matrices (Q4, or native.Blocks; q and k rows in GGUF's interleaved order), which
    are fused with their type's `cat` (q, k, v into qkv; gate and up); the rest as float arrays."""
    widths = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
    if any(w % GROUP for w in widths):
        raise SmolctlError(f"4-bit decoding needs layer widths divisible by {GROUP}, not {widths}")
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        q = tensors(p + "self_attn.q_proj.weight")
        q = q.times(q_scale) if q_scale != 1 else q
        layers.append(SimpleNamespace(
            attn_norm=tensors(p + "input_layernorm.weight"),
            qkv=type(q).cat([q, tensors(p + "self_attn.k_proj.weight"), tensors(p + "self_attn.v_proj.weight")]),
            out=tensors(p + "self_attn.o_proj.weight"), mlp_norm=tensors(p + "post_attention_layernorm.weight"),
            gate_up=type(q).cat([tensors(p + "mlp.gate_proj.weight"), tensors(p + "mlp.up_proj.weight")]),
            down=tensors(p + "mlp.down_proj.weight")))
    embed = tensors("model.embed_tokens.weight")
    return SimpleNamespace(layers=layers, embed=embed, norm=tensors("model.norm.weight"),
                           head=embed if cfg.tie_embeddings else tensors("lm_head.weight"))


class Decoder:
    """Batch-1 Llama decoding on CPU with 4-bit layer weights, through `engine` (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, engine):
        self.cfg, self.engine = cfg, engine
        # what Generation and tokenizer.stop_ids read from a model
        self.config = SimpleNamespace(max_position_embeddings=cfg.max_seq_len, eos_token_id=cfg.eos_token_id)
        self.generation_config = None
        self.training = False

    def start(self, max_len: int):
        """step(ids (1, T), pos) -> (1, vocab) fp32 logits of the last of the T positions, with a
        fresh KV cache for `max_len` positions."""
        return self.engine.start(max_len)

    def nbytes(self) -> int:
        """Bytes one decode step reads: every layer's weights and the lm_head (one embedding row)."""
        return self.engine.nbytes()

    # the nn.Module surface Generation touches
    def eval(self) -> Decoder:
        return self

    def train(self, mode: bool = True) -> Decoder:
        return self

    @classmethod
    def from_gguf(cls, path, header=None, head_kind: str = "int4", engine: str = "auto", say=None):
        """(Decoder, GGUFInfo) from a llama GGUF (`header`: what scan_gguf(path) returned). Q4_0 and Q4_1
        tensors are taken as they are (no rounding); others are dequantized, and the layers' linears
        among them quantized to Q4 (the native engine keeps Q8_0 as it is)."""
        from smolctl.gguf_io import scan_gguf

        cfg, info, scan = header or scan_gguf(path)

        def native_engine():
            from smolctl import native

            return native.Engine(cfg, arrange(cfg, native.gguf_tensors(path, scan)))

        def torch_engine():
            import torch

            from smolctl.decode_torch import Q4, TorchEngine

            def tensors(name: str):
                kind, shape, data = gguf_tensor(path, scan, name)
                if name.endswith("proj.weight") and kind in (Q4_0, Q4_1):
                    return Q4.from_gguf(data, kind, *shape)
                w = torch.from_numpy(dequantize(data, kind).reshape(shape))
                return Q4.quantize(w) if name.endswith("proj.weight") else w

            return TorchEngine(cfg, arrange(cfg, tensors, cfg.head_dim ** -0.5), head_kind)

        return cls(cfg, pick_engine(cfg, engine, native_engine, torch_engine, say)), info

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: dict, head_kind: str = "int4", engine: str = "auto",
                   say=None) -> Decoder:
        """From a transformers-named state dict (best fp32): the layers' linears quantized to Q4."""
        import torch

        from smolctl.decode_torch import Q4, TorchEngine
        from smolctl.gguf_io import to_gguf_rows

        def tensors(name: str):
            w = state[name].detach().float()
            if not name.endswith("proj.weight"):
                return w
            if name.endswith(("q_proj.weight", "k_proj.weight")):  # halves layout -> interleaved pairs
                heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
                w = torch.from_numpy(to_gguf_rows(w.numpy(), heads).copy())
            return Q4.quantize(w)

        def native_engine():
            from smolctl import native

            return native.Engine(cfg, arrange(cfg, lambda name: native.Blocks.of(w) if isinstance(w := tensors(name), Q4)
                                              else w.numpy()))

        def torch_engine():
            return TorchEngine(cfg, arrange(cfg, tensors, cfg.head_dim ** -0.5), head_kind)

        return cls(cfg, pick_engine(cfg, engine, native_engine, torch_engine, say))


def pick_engine(cfg: ModelConfig, choice: str, native_engine, torch_engine, say=None):
    """The engine `choice` names; for "auto", the one whose decode step ran faster here (both are
    built and timed once per machine, model shape and torch; then cached). No C compiler: torch."""
    from smolctl import autotune, native

    if choice not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {choice!r}")
    if choice == "torch" or (choice == "auto" and native.library() is None):
        if say and choice == "auto":
            say(f"Decode engine: torch ({native.why_not()})")
        return torch_engine()
    if choice == "native":
        if native.library() is None:
            raise SmolctlError(f"the native decoder is not available: {native.why_not()}")
        return native_engine()
    built = {}

    def candidates():
        built.update(native=native_engine(), torch=torch_engine())
        steps = {name: engine.start(16) for name, engine in built.items()}
        return {name: functools.partial(step, np.zeros((1, 1), np.int64), 8) for name, step in steps.items()}

    key = f"decode engine {autotune.Shape.of(cfg).key()}"
    name, figures, cached = autotune.fastest("cpu", key, ("native", "torch"), candidates)
    if say:
        speeds = ", ".join(f"{k} {v:,.0f} steps/s" for k, v in figures.items() if k in ("native", "torch"))
        say(f"Decode engine: {name} ({speeds}; {'cached' if cached else 'measured now'} in {autotune.cache_file()})")
    return built.get(name) or (native_engine() if name == "native" else torch_engine())
