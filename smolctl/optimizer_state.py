"""A training state as whole tensors and back: the weights and optimizer state of a module
however it is wrapped (DDP, FSDP1/2, torch.compile), through torch's distributed-checkpoint
state-dict API, and the optimizer state flattened for safetensors + JSON. checkpoint.py writes
and reads the files; this module only shapes what goes in and comes out.

    weights, optim = training_state(module, optimizer, cfg)   # every rank (a collective under FSDP)
    load_optimizer(read_optimizer(ckpt), module, optimizer)  # after accelerator.prepare
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from smolctl.config import ModelConfig

IN_SAFETENSORS = "<in optimizer.safetensors>"  # optimizer.json's stand-in for a tensor


def training_state(module: torch.nn.Module, optimizer, cfg: ModelConfig, prefix: str = "model.") -> tuple[dict, dict]:
    """(weights with transformers' names, optimizer state keyed by parameter name), both whole.

    One path for every way the module may be wrapped: torch's distributed-checkpoint state-dict
    API gathers FSDP shards (FSDP1 and FSDP2), strips DDP's `module.` and torch.compile's
    `_orig_mod.`, and hands plain tensors through untouched on one process. Under FSDP it is a
    collective: every rank calls it; the full dicts land on rank 0 (others get empty ones).
    `prefix` is the wrapper's own (CausalLMLoss holds the LlamaForCausalLM as `.model`).
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(module, options=full)
    weights = {k[len(prefix):]: v.detach().contiguous() for k, v in weights.items() if k.startswith(prefix)}
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)  # it is the embedding
    if not optimizer.state:
        # Nothing to save before the first update (e.g. only skipped steps so far); asking the API
        # would make it initialise the state with a fake step, which changes the run.
        return weights, {"state": {}, "param_groups": []}
    return weights, get_optimizer_state_dict(module, optimizer, options=full)


def read_optimizer(ckpt: Path) -> dict:
    """The optimizer state saved by `training_state` (parameter names as keys)."""
    return unflatten_optimizer(load_file(str(ckpt / "optimizer.safetensors")),
                                json.loads((ckpt / "optimizer.json").read_text()))


def load_optimizer(state: dict, module: torch.nn.Module, optimizer) -> None:
    """Put `read_optimizer`'s state into `optimizer`, after accelerator.prepare (under FSDP each
    rank keeps its own shard of the whole state)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    if state["state"]:  # empty: saved before the first update; a fresh optimizer is the same
        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors for safetensors (`<param>.<name>`), the rest for JSON. Params are indices or names.

    The JSON keeps each entry's key order, tensors standing in as IN_SAFETENSORS: torch's
    set_optimizer_state_dict shards FSDP2 state in that order (measured: with safetensors' sorted
    order, exp_avg_sq landed in exp_avg on rank 1 and the first step went NaN).
    """
    tensors, state = {}, {}
    for idx, entry in sd["state"].items():
        state[str(idx)] = {}
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.contiguous()
                v = IN_SAFETENSORS
            state[str(idx)][k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": state}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    def key(i: str):
        return int(i) if i.isdigit() else i

    state: dict = {key(i): dict(v) for i, v in rest["state"].items()}
    for k, t in tensors.items():
        idx, name = k.rsplit(".", 1)  # "model.model.layers.0.mlp.up_proj.weight" . "exp_avg"
        state.setdefault(key(idx), {})[name] = t  # in its IN_SAFETENSORS place
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}
