"""Checkpoints: self-describing directories of safetensors files, written atomically.

A checkpoint directory is also a Hugging Face model directory (config.json + model.safetensors
with transformers' tensor names), so `LlamaForCausalLM.from_pretrained(ckpt)` loads it too:

    runs/demo/checkpoints/step-00000500/
        config.json          transformers' LlamaConfig (the architecture)
        model.safetensors    weights; a tied lm_head is not stored twice
        smolctl.json         our ModelConfig, the training config, step, tokens seen
        ...                  training state (optimizer, scheduler, RNG, data): see save_checkpoint
        manifest.json        sha256 and size of every file above, written last

Nothing here unpickles: tensors come from safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from smolctl.config import ModelConfig
from smolctl.errors import SmolctlError

WEIGHTS = "model.safetensors"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as saved: contiguous, with a tied lm_head dropped (it is the embedding)."""
    state = model.state_dict()
    if model.lm_head.weight is model.model.embed_tokens.weight:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_model(model: torch.nn.Module, cfg: ModelConfig, out: str | Path, extra: dict | None = None) -> None:
    """Write config.json, model.safetensors and smolctl.json into `out` (which must exist)."""
    out = Path(out)
    cfg.to_hf().to_json_file(str(out / "config.json"))
    save_file(model_state(model), str(out / WEIGHTS), metadata={"format": "pt"})
    meta = {"model": cfg.to_dict(), **(extra or {})}
    (out / "smolctl.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, cfg) from a checkpoint or HF model directory holding model.safetensors."""
    path = Path(path)
    meta = path / "smolctl.json"
    cfg = (ModelConfig.from_dict(json.loads(meta.read_text())["model"]) if meta.is_file()
           else ModelConfig.from_dir(path))
    weights = path / WEIGHTS
    if not weights.is_file():
        raise SmolctlError(f"no {WEIGHTS} in {path}", hint="Pass a checkpoint or HF model directory with safetensors weights")
    return model_from_state(cfg, load_file(str(weights), device=str(device)), device, dtype, source=weights)


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None, source: str | Path = "the weights"):
    """An eval-mode model for `cfg` holding `state`'s tensors (assigned, not copied: no second allocation)."""
    from smolctl.model import build_model

    model = build_model(cfg, device="meta")
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SmolctlError(f"{source} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}",
                           hint="The checkpoint is damaged or from another model")
    if cfg.tie_embeddings:
        model.tie_weights()
    _rebuild_rotary(model, cfg, device)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), cfg


def _rebuild_rotary(model, cfg: ModelConfig, device) -> None:
    """Non-persistent buffers (RoPE inv_freq) are not in the file: rebuild them off the meta device."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=model.config)
