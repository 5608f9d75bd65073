"""Build the model from a ModelConfig, initialise it, and break its parameters down.

The model is transformers' own `LlamaForCausalLM` (so checkpoints load anywhere transformers
does); smolctl only decides how it is built and initialised.

    model = build_model(ModelConfig.from_preset("tiny"))            # real weights, SmolLM2 init
    param_breakdown(skeleton(cfg), cfg.num_layers)["total"]         # 134,515,008 for 135M (meta device)
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


def skeleton(cfg: ModelConfig):
    """The model on the meta device with at most 2 of its decoder layers (they are all alike):
    every shape, in no time and no memory, however deep the config says it is. Count it with
    `param_breakdown(skeleton(cfg), cfg.num_layers)`."""
    import dataclasses

    return build_model(dataclasses.replace(cfg, num_layers=min(cfg.num_layers, 2)), device="meta")


def param_breakdown(model: nn.Module, num_layers: int | None = None) -> dict[str, Any]:
    """Parameter counts by component, counted from the module itself (meta-device is fine);
    `num_layers`: the real depth of a `skeleton` (default: the layers the module has).

    Returns {"embedding", "embedding_shape", "per_layer" (a decoder layer's: they are all alike),
    "num_layers", "layers_total", "final_norm", "lm_head" (0 when tied), "tied", "total"}.
    """
    inner = model.model
    num_layers = len(inner.layers) if num_layers is None else num_layers
    layer = inner.layers[0]
    attn = {n: getattr(layer.self_attn, n).weight.numel() for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    mlp = {n: getattr(layer.mlp, n).weight.numel() for n in ("gate_proj", "up_proj", "down_proj")}
    norms = layer.input_layernorm.weight.numel() + layer.post_attention_layernorm.weight.numel()
    per_layer = {"attention": attn, "attention_total": sum(attn.values()), "mlp": mlp,
                 "mlp_total": sum(mlp.values()), "norms": norms, "total": sum(p.numel() for p in layer.parameters())}
    tied = is_tied(model)
    out = {
        "embedding": inner.embed_tokens.weight.numel(),
        "embedding_shape": list(inner.embed_tokens.weight.shape),
        "per_layer": per_layer,
        "num_layers": num_layers,
        "layers_total": per_layer["total"] * num_layers,
        "final_norm": inner.norm.weight.numel(),
        "lm_head": 0 if tied else model.lm_head.weight.numel(),
        "tied": tied,
    }
    out["total"] = out["embedding"] + out["layers_total"] + out["final_norm"] + out["lm_head"]
    return out
