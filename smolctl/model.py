"""Build the model from a ModelConfig, initialise it, and break its parameters down.

The model is transformers' own `LlamaForCausalLM` (so checkpoints load anywhere transformers
does); smolctl only decides how it is built and initialised.

    model = build_model(ModelConfig.from_preset("tiny"))            # real weights, SmolLM2 init
    skeleton = build_model(cfg, device="meta")                      # shapes only, no memory
    param_breakdown(skeleton)["total"]                              # 134,515,008 for 135M
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from smolctl.config import ModelConfig


def build_model(cfg: ModelConfig, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None, init: bool = True):
    """A LlamaForCausalLM for `cfg`. On the meta device nothing is allocated (and nothing initialised)."""
    from transformers import LlamaForCausalLM

    hf_cfg = cfg.to_hf()
    hf_cfg._attn_implementation = "sdpa"
    device = torch.device(device or "cpu")
    with device:
        model = LlamaForCausalLM(hf_cfg)
    if dtype is not None:
        model.to(dtype)
    if init and device.type != "meta":
        init_weights(model, cfg.init_std)
    return model


@torch.no_grad()
def init_weights(model: nn.Module, std: float) -> None:
    """SmolLM2's init: every linear and embedding weight ~ N(0, std), RMSNorm weights = 1.

    Done here (not by transformers' post_init) so the init is ours, explicit and seedable:
    the same torch seed gives the same weights on every transformers version.
    """
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif type(module).__name__.endswith("RMSNorm"):
            nn.init.ones_(module.weight)


def is_tied(model: nn.Module) -> bool:
    return model.lm_head.weight is model.model.embed_tokens.weight


def param_breakdown(model: nn.Module) -> dict[str, Any]:
    """Parameter counts by component, counted from the module itself (meta-device is fine).

    Returns {"embedding", "layers": [per-layer dicts], "per_layer" (layer 0's), "num_layers",
    "layers_total", "final_norm", "lm_head" (0 when tied), "tied", "total"}.
    """
    inner = model.model
    layers = []
    for layer in inner.layers:
        attn = {n: getattr(layer.self_attn, n).weight.numel() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        mlp = {n: getattr(layer.mlp, n).weight.numel() for n in ("gate_proj", "up_proj", "down_proj")}
        norms = layer.input_layernorm.weight.numel() + layer.post_attention_layernorm.weight.numel()
        total = sum(p.numel() for p in layer.parameters())
        layers.append({"attention": attn, "attention_total": sum(attn.values()), "mlp": mlp,
                       "mlp_total": sum(mlp.values()), "norms": norms, "total": total})
    tied = is_tied(model)
    out = {
        "embedding": inner.embed_tokens.weight.numel(),
        "embedding_shape": list(inner.embed_tokens.weight.shape),
        "per_layer": layers[0] if layers else None,
        "num_layers": len(layers),
        "layers_total": sum(layer["total"] for layer in layers),
        "final_norm": inner.norm.weight.numel(),
        "lm_head": 0 if tied else model.lm_head.weight.numel(),
        "tied": tied,
    }
    out["total"] = out["embedding"] + out["layers_total"] + out["final_norm"] + out["lm_head"]
    return out
