"""A lean batch-1 decoder for Llama models on CPU with 4-bit weights: what `smolctl generate` and
`smolctl chat` run on a CPU for a Q4 GGUF file, and for --quantize int4.

    dec = Decoder.from_gguf(path)           # the Q4 blocks as stored
    dec = Decoder.from_state(cfg, state)    # a transformers Llama's weights, quantized to 4 bits in groups of 32
    step = dec.start(max_len)               # a fresh KV cache for max_len positions
    logits = step(ids, pos)                 # (1, T) ids at positions pos.. -> (1, vocab) fp32, last position
    dec.engine.name                         # "native" (smolctl/native.py: C) or "torch" (below)

Two engines run the step: native.py's compiled C step (int8 activations, llama.cpp's scheme) and the
torch one below (bf16 activations through torch's int4 kernel). `engine="auto"` takes the one that
ran a step faster on this machine: measured once, both built, then cached (autotune.fastest).

The torch engine:
Why not the transformers model with int4 linears (what smolctl ran before): at batch 1 a decode step
of the 135M model is ~60 small matmuls, and transformers wraps each layer in mask, cache and
dispatch machinery that costs as much as the kernels. Here a layer is ~20 tensor ops:
- q, k and v are one int4 matrix, gate and up another (fewer, larger kernel calls);
- q and k rows are kept in GGUF's interleaved order, so RoPE is one complex multiply by a
  precomputed table; 1/sqrt(head_dim) is folded into q's scales (a power of two: exact);
- the KV cache is preallocated (layers, kv_heads, max_len, head_dim) in fp32; attention of one
  query is two small matmuls and a softmax; grouped-query heads share their kv head by a view;
- the residual stream and norms are fp32, the matmul inputs bf16 (the kernel's fast dtype).
The lm_head (the tied embedding: 49,152 x 576, as many bytes as all the layers in bf16) is int4 with
its top 64 logits recomputed in bf16 (Int4Head), or bf16 with head_kind="bf16". Tried: int8 per row
(`_weight_int8pack_mm`, `torch._int_mm`): no faster than bf16's torch.mv here.
Checked against the transformers model's logits in tests/test_fastpath.py.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn import functional as F

from smolctl.config import ModelConfig
from smolctl.errors import SmolctlError

GROUP = 32  # weights per int4 scale/zero pair, as in GGUF's Q4_0/Q4_1
HEADS = ("int4", "bf16")
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8  # GGML tensor types


def int4_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


# -- 4-bit weights: (codes, scale, min) per group of GROUP -----------------------------------------

@dataclass
class Q4:
    """Weights w = q * scale + lo, q in 0..15: codes (rows, cols) uint8, scale and lo (rows, cols/GROUP) fp32."""

    codes: torch.Tensor
    scale: torch.Tensor
    lo: torch.Tensor

    @staticmethod
    def quantize(w: torch.Tensor) -> Q4:
        """Round float weights (rows, cols) to 4 bits, each group of GROUP spanning its min..max."""
        rows, cols = w.shape
        groups = w.detach().float().reshape(rows, cols // GROUP, GROUP)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-10)
        q = (groups - lo[..., None]).div_(scale[..., None]).round_().clamp_(0, 15)  # one temporary, not four
        return Q4(q.to(torch.uint8).reshape(rows, cols), scale, lo)

    @staticmethod
    def from_gguf(blocks: np.ndarray, kind: int, rows: int, cols: int) -> Q4:
        """GGUF Q4_0 / Q4_1 bytes (rows, cols/32 * (18 / 20)) -> Q4, exactly. A block is a fp16 scale d,
        for Q4_1 a fp16 min m, and 16 bytes of codes (the low nibbles are weights 0-15, the high ones
        16-31): Q4_1's w = q*d + m, Q4_0's w = (q - 8)*d."""
        size = 20 if kind == Q4_1 else 18
        b = torch.from_numpy(blocks).reshape(rows, cols // GROUP, size)
        head = b[..., :size - 16].contiguous().view(torch.float16).float()
        d, m = (head[..., 0], head[..., 1]) if kind == Q4_1 else (head[..., 0], -8 * head[..., 0])
        q = torch.empty(rows, cols // GROUP, GROUP, dtype=torch.uint8)
        torch.bitwise_and(b[..., -16:], 15, out=q[..., :16])
        torch.bitwise_right_shift(b[..., -16:], 4, out=q[..., 16:])
        return Q4(q.reshape(rows, cols), d, m)

    def times(self, factor: float) -> Q4:
        return Q4(self.codes, self.scale * factor, self.lo * factor)

    @staticmethod
    def cat(parts: list[Q4]) -> Q4:
        return Q4(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "lo")))

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.codes.shape
        w = self.codes.reshape(rows, -1, GROUP) * self.scale[..., None] + self.lo[..., None]
        return w.reshape(rows, cols)


def stored_in_4_bits(scan) -> bool:
    """Whether a scanned GGUF's layer weights are all Q4_0 / Q4_1: then 4-bit decoding is exact."""
    return all(kind in (Q4_0, Q4_1) for name, (kind, _, _) in scan.tensors.items()
               if name.startswith("blk.") and not name.endswith("norm.weight"))


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) uint8 codes -> the CPU int4 kernel's packed weight (rows, cols/2) uint8.

    `_convert_weight_to_int4pack_for_cpu` wants int32 codes (4x the bytes: ~1 s more for the 135M
    model). Its layout, for rows in blocks of 64, is (cols, 32) bytes per block, byte [k, j] holding
    row j's code k in the low nibble and row 32 + j's in the high one; that is built here directly
    when a probe shows this torch packs that way, and through the op otherwise."""
    rows, cols = codes.shape
    if rows % 64 or not _direct_packing():
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    blocks = codes.reshape(rows // 64, 2, 32, cols)
    return (blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).reshape(rows, cols // 2).contiguous()


@functools.cache
def _direct_packing() -> bool:
    probe = torch.randint(0, 16, (128, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    blocks = probe.reshape(2, 2, 32, 64)
    ours = (blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).reshape(128, 32)
    return torch.equal(ours, torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32), 1))


def dequantize(data: np.ndarray, kind: int) -> torch.Tensor:
    """A GGUF tensor's bytes (rows, row bytes) -> fp32 weights (rows, cols). F32, F16 and Q8_0 (a fp16
    scale and 32 int8 codes per block) here; other types through the gguf package."""
    b = torch.from_numpy(data)
    if kind == F32:
        return b.view(torch.float32).clone()
    if kind == F16:
        return b.view(torch.float16).float()
    if kind == Q8_0:
        blocks = b.reshape(b.shape[0], -1, 34)
        d = blocks[..., :2].contiguous().view(torch.float16).float()
        return (blocks[..., 2:].contiguous().view(torch.int8) * d).reshape(b.shape[0], -1)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return torch.from_numpy(np.array(gguf_dequantize(data, GGMLQuantizationType(kind)), dtype=np.float32))


class Int4Matmul:
    """x (T, cols) bf16 -> x W^T (T, rows) bf16 through PyTorch's CPU int4 kernel."""

    def __init__(self, w: Q4):
        self.packed = pack_int4(w.codes)  # (rows, cols/2) uint8
        # the kernel computes (q - 8) * scale + zero, so zero = lo + 8 * scale; layout (cols/GROUP, rows, 2)
        self.scale_zero = torch.stack([w.scale.T, (w.lo + 8 * w.scale).T], -1).to(torch.bfloat16).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scale_zero)


class Bf16Head:
    """The lm_head in bf16: x (1, hidden) bf16 -> (1, vocab) fp32 logits."""

    def __init__(self, w: torch.Tensor):
        self.weight = w.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mv(self.weight, x[0]).float()[None]


class Int4Head(Bf16Head):
    """The lm_head in 4 bits, with the RESCORE highest logits recomputed from the bf16 rows: 2.5x
    faster than bf16, and the tokens that decide greedy and sampled picks get bf16's logits.
    (Plain int4 moved the next-token distribution 65x more than bf16: KL 0.055 vs 0.0008.)"""

    RESCORE = 64

    def __init__(self, w: torch.Tensor):
        super().__init__(w)
        self.int4 = Int4Matmul(Q4.quantize(w))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.int4(x).float()  # (1, vocab)
        top = logits[0].topk(self.RESCORE).indices
        logits[0, top] = (self.weight[top] @ x[0]).float()
        return logits


# -- the decoder ---------------------------------------------------------------------------------

ENGINES = ("auto", "native", "torch")


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
            def tensors(name: str):
                kind, shape, data = gguf_tensor(path, scan, name)
                if name.endswith("proj.weight") and kind in (Q4_0, Q4_1):
                    return Q4.from_gguf(data, kind, *shape)
                w = dequantize(data, kind).reshape(shape)
                return Q4.quantize(w) if name.endswith("proj.weight") else w

            return TorchEngine(cfg, arrange(cfg, tensors, 1 / math.sqrt(cfg.head_dim)), head_kind)

        return cls(cfg, pick_engine(cfg, engine, native_engine, torch_engine, say)), info

    @classmethod
    def from_state(cls, cfg: ModelConfig, state: dict[str, torch.Tensor], head_kind: str = "int4",
                   engine: str = "auto", say=None) -> Decoder:
        """From a transformers-named state dict (best fp32): the layers' linears quantized to Q4."""
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
            return TorchEngine(cfg, arrange(cfg, tensors, 1 / math.sqrt(cfg.head_dim)), head_kind)

        return cls(cfg, pick_engine(cfg, engine, native_engine, torch_engine, say))


def gguf_tensor(path, scan, name: str):
    """(GGML type, shape, bytes) of a transformers-named tensor in a scanned GGUF."""
    from smolctl.gguf_io import hf_to_gguf_name

    gguf_name = hf_to_gguf_name(name)
    if gguf_name not in scan.tensors:
        raise SmolctlError(f"{path} has no tensor {gguf_name}", hint="Use a complete llama GGUF")
    return scan.tensors[gguf_name]


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
        ids = torch.zeros(1, 1, dtype=torch.long)
        return {name: functools.partial(step, ids, 8) for name, step in steps.items()}

    key = f"decode engine {autotune.Shape.of(cfg).key()}"
    name, figures, cached = autotune.fastest("cpu", key, ("native", "torch"), candidates)
    if say:
        speeds = ", ".join(f"{k} {v:,.0f} steps/s" for k, v in figures.items() if k in ("native", "torch"))
        say(f"Decode engine: {name} ({speeds}; {'cached' if cached else 'measured now'} in {autotune.cache_file()})")
    return built.get(name) or (native_engine() if name == "native" else torch_engine())


@dataclass
class Layer:
    attn_norm: torch.Tensor  # (hidden,) fp32
    qkv: Int4Matmul  # rows: q heads, kv heads (k), kv heads (v); q and k rows interleaved for RoPE
    out: Int4Matmul
    mlp_norm: torch.Tensor
    gate_up: Int4Matmul  # rows: gate, then up
    down: Int4Matmul


class TorchEngine:
    """The decode step in torch: bf16 activations through torch's int4 kernel (see the module docstring)."""

    name = "torch"

    def __init__(self, cfg: ModelConfig, weights: SimpleNamespace, head_kind: str = "int4"):
        if not int4_supported():
            raise SmolctlError(f"4-bit decoding needs torch >= 2.6 (this is {torch.__version__})")
        if head_kind not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, not {head_kind!r}")
        self.cfg, self.norm = cfg, weights.norm.float()
        self.layers = [Layer(w.attn_norm.float(), Int4Matmul(w.qkv), Int4Matmul(w.out), w.mlp_norm.float(),
                             Int4Matmul(w.gate_up), Int4Matmul(w.down)) for w in weights.layers]
        self.embed = weights.embed.float()  # (vocab, hidden): one row read per token
        self.head = Int4Head(weights.head) if head_kind == "int4" else Bf16Head(weights.head)
        self.head_kind = head_kind
        half = cfg.head_dim // 2
        self.inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(half, dtype=torch.float64) / half)

    def nbytes(self) -> int:
        mats = [m for layer in self.layers for m in (layer.qkv, layer.out, layer.gate_up, layer.down)]
        head = [self.head.int4] if isinstance(self.head, Int4Head) else []
        return (sum(m.packed.nbytes + m.scale_zero.nbytes for m in mats + head) + (0 if head else self.head.weight.nbytes)
                + sum(layer.attn_norm.nbytes + layer.mlp_norm.nbytes for layer in self.layers))

    # -- running ----------------------------------------------------------------------------------

    def start(self, max_len: int):
        """A decode step function with its own KV cache for `max_len` positions:
        step(ids (1, T) long, pos) -> (1, vocab) fp32 logits of the last of the T positions."""
        cfg = self.cfg
        n_q, n_kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        keys = torch.zeros(len(self.layers), n_kv, max_len, hd)  # k and v of every position so far
        values = torch.zeros_like(keys)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), self.inv_freq)
        rotation = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)  # (max_len, hd/2)
        eps, hidden, qk = cfg.rms_norm_eps, (cfg.hidden_size,), (n_q + n_kv) * hd

        caches = list(zip(keys, values))  # per layer (n_kv, max_len, hd): views made once, not per step
        group, inter = n_q // n_kv, cfg.intermediate_size

        def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # fp32 -> the kernels' bf16
            return F.rms_norm(x, hidden, weight, eps).to(torch.bfloat16)

        def one(x: torch.Tensor, pos: int) -> torch.Tensor:
            """The decode step proper, x (1, hidden): the fewest tensor ops (each costs µs here)."""
            end, rot = pos + 1, rotation[pos]
            for layer, (k, v) in zip(self.layers, caches):
                h = layer.qkv(norm(x, layer.attn_norm)).float()  # (1, (n_q + 2 n_kv) hd)
                q_k = torch.view_as_real(torch.view_as_complex(h[0, :qk].view(n_q + n_kv, hd // 2, 2)) * rot)
                k[:, pos] = q_k[n_q:].view(n_kv, hd)
                v[:, pos] = h[0, qk:].view(n_kv, hd)
                # (n_kv, group, hd): the q heads that share each kv head, against its keys (n_kv, end, hd)
                scores = torch.bmm(q_k[:n_q].view(n_kv, group, hd), k[:, :end].transpose(1, 2))
                a = torch.bmm(torch.softmax(scores, -1), v[:, :end]).view(1, -1)
                x = x + layer.out(a.to(torch.bfloat16))
                gate_up = layer.gate_up(norm(x, layer.mlp_norm))
                x = x + layer.down(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
            return x

        def many(x: torch.Tensor, pos: int) -> torch.Tensor:
            """T positions at once (the prompt), x (T, hidden): query t sees keys 0..pos+t."""
            T = x.shape[0]
            end, rot = pos + T, rotation[pos:pos + T, None]
            mask = torch.arange(end)[None] <= torch.arange(pos, end)[:, None]
            for layer, (k, v) in zip(self.layers, caches):
                h = layer.qkv(norm(x, layer.attn_norm)).float()
                q_k = torch.view_as_real(torch.view_as_complex(h[:, :qk].reshape(T, n_q + n_kv, hd // 2, 2)) * rot)
                q_k = q_k.reshape(T, n_q + n_kv, hd)
                k[:, pos:end] = q_k[:, n_q:].transpose(0, 1)
                v[:, pos:end] = h[:, qk:].reshape(T, n_kv, hd).transpose(0, 1)
                a = F.scaled_dot_product_attention(q_k[:, :n_q].transpose(0, 1), k[:, :end], v[:, :end],
                                                   attn_mask=mask, scale=1.0, enable_gqa=True)
                x = x + layer.out(a.transpose(0, 1).reshape(T, -1).to(torch.bfloat16))
                gate_up = layer.gate_up(norm(x, layer.mlp_norm))
                x = x + layer.down(F.silu(gate_up[:, :inter]) * gate_up[:, inter:])
            return x

        @torch.inference_mode()
        def step(ids: torch.Tensor, pos: int) -> torch.Tensor:
            T = ids.shape[-1]
            if pos + T > max_len:
                raise ValueError(f"position {pos + T} is past the cache's {max_len}")
            x = self.embed[ids.reshape(-1)]  # (T, hidden) fp32: the residual stream
            x = one(x, pos) if T == 1 else many(x, pos)
            return self.head(norm(x[-1:], self.norm))  # (1, vocab) fp32

        return step
