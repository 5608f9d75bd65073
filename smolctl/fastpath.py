"""Faster batch-1 decoding on CPU in bf16: matrix-vector products through torch.mv.

    fast_cpu_decoding(model)              # bf16 model: its linears use torch.mv for one-row inputs

(4-bit decoding is smolctl/decode.py's Decoder.)

Decoding one token reads every weight once, so on a CPU its speed is set by bytes per weight and
by how close the kernel gets to memory bandwidth. Measured here (benchmarks/bench_decode.py):
- bf16 `F.linear` with one input row is no faster than fp32 on this CPU, while `torch.mv` on the
  same bf16 weight streams it ~1.3x faster (whole model);
- int4 weights through PyTorch's `_weight_int4pack_mm_for_cpu`: ~2x bf16 (decode.py).
Tried and dropped: torch.ao dynamic int8 quantization (2x fp32, but activations quantized per
tensor put the next-token argmax on the fp32 one at only 39% of positions), and int8 weight-only
(`_weight_int8pack_mm`: 1.25x bf16, slower than int4 and no more accurate on the Q4_1 model).
The model's state_dict names are kept (MvLinear holds `weight`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


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


def fast_cpu_decoding(model: nn.Module) -> nn.Module:
    """Swap the linears of a bf16 model about to decode on CPU for MvLinear, in place."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.bfloat16:
        return model  # fp32 F.linear already streams at the mv speed
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, MvLinear(child.weight))
    return model
