"""decode.py's torch engine: a batch-1 decode step in torch with int4 weights (torch's
`_weight_int4pack_mm_for_cpu`) and bf16 activations -- what runs where the native step cannot be
built, or where it measured slower.

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
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn import functional as F

from smolctl.config import ModelConfig
from smolctl.gguf_io import GROUP, Q4_1, split_blocks
from smolctl.errors import SmolctlError

HEADS = ("int4", "bf16")  # the lm_head: see Int4Head


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
        packed, d, m = split_blocks(blocks.reshape(rows, -1), kind)
        b = torch.from_numpy(packed).reshape(rows, cols // GROUP, GROUP // 2)
        d = torch.from_numpy(d).float()
        m = torch.from_numpy(m).float() if kind == Q4_1 else -8 * d
        q = torch.empty(rows, cols // GROUP, GROUP, dtype=torch.uint8)
        torch.bitwise_and(b, 15, out=q[..., :16])
        torch.bitwise_right_shift(b, 4, out=q[..., 16:])
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
            ids = torch.as_tensor(ids)
            T = ids.shape[-1]
            if pos + T > max_len:
                raise ValueError(f"position {pos + T} is past the cache's {max_len}")
            x = self.embed[ids.reshape(-1)]  # (T, hidden) fp32: the residual stream
            x = one(x, pos) if T == 1 else many(x, pos)
            return self.head(norm(x[-1:], self.norm))  # (1, vocab) fp32

        return step
