"""Model directories: config.json + model.safetensors (+ smolctl.json), which is also a Hugging
Face model directory, so `LlamaForCausalLM.from_pretrained(path)` loads it too.

    save_model(model, cfg, out)              # `smolctl import` and checkpoints write this layout
    model, cfg = load_model(path)            # a checkpoint, an import or an HF model directory
    model, cfg = model_from_state(cfg, sd)   # tensors from elsewhere (a GGUF) into our model

Nothing here unpickles: the weights come from safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from smolctl import fsutil
from smolctl.artifacts import check_weights, reading
from smolctl.config import ModelConfig
from smolctl.errors import SmolctlError
from smolctl.metadata import META, model_config_of
from smolctl.safetensors_io import write_tensors

WEIGHTS = "model.safetensors"


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as saved: contiguous, with a tied lm_head dropped (it is the embedding)."""
    state = model.state_dict()
    if model.lm_head.weight is model.model.embed_tokens.weight:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def write_config(cfg: ModelConfig, out: Path, **extra) -> None:
    """config.json: transformers' LlamaConfig (`extra`: more of its fields), and two additions.

    pad_token_id = the EOS unless given, as SmolLM2-Instruct has it: training packs blocks and never
    pads, but runtimes that batch prompts need an id (transformers warns without one). Only in the
    file: in the LlamaConfig we train, a pad id would freeze that embedding row (padding_idx).
    rope_theta at the top level too: transformers 5 keeps it only in rope_parameters, and 4.x and
    llama.cpp's converter read the top-level key (silently falling back to 10,000 without it)."""
    conf = json.loads(cfg.to_hf(**{"pad_token_id": cfg.eos_token_id, **extra}).to_json_string())
    conf.setdefault("rope_theta", cfg.rope_theta)
    with fsutil.open_file(Path(out) / "config.json", "w") as f:
        f.write(json.dumps(conf, indent=2) + "\n")


def save_model(model: torch.nn.Module, cfg: ModelConfig, out: str | Path, extra: dict | None = None) -> None:
    """Write config.json, model.safetensors and smolctl.json into `out` (which must exist)."""
    out = Path(out)
    write_config(cfg, out)
    write_tensors(out / WEIGHTS, model_state(model), {"format": "pt"})
    meta = {"model": cfg.to_dict(), **(extra or {})}
    with fsutil.open_file(out / META, "w") as f:
        f.write(json.dumps(meta, indent=2) + "\n")


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, cfg) from a checkpoint or HF model directory holding model.safetensors."""
    path = Path(path)
    cfg = model_config_of(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise SmolctlError(f"no {WEIGHTS} in {path}", hint="Pass a checkpoint or HF model directory with safetensors weights")
    with reading(weights, "safetensors file"):  # a header that isn't one, a short file: one line
        state = load_file(str(weights), device=str(device))
    return model_from_state(cfg, state, device, dtype, source=weights)


def model_from_state(cfg: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None, source: str | Path = "the weights"):
    """An eval-mode model for `cfg` holding `state`'s tensors (assigned, not copied: no second allocation)."""
    from smolctl.model import build_model

    check_weights(state, source)
    model = build_model(cfg, device="meta")
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    hint = "The checkpoint is damaged or from another model"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # shapes that disagree with config.json
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise SmolctlError(f"{source} does not match its config: {first[:160]}", hint=hint) from None
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SmolctlError(f"{source} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}",
                           hint=hint)
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
