"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): smolctl's checkpoint
path under real FSDP2 sharding (torch's fully_shard, DTensor parameters and optimizer state).

accelerate refuses FSDP without GPUs, so this wraps the model the way accelerate's FSDP2 plugin
does (each LlamaDecoderLayer, then the root) and drives the same functions train() calls:
training_state on every rank, save_model_state + finalize on rank 0, read_optimizer +
load_optimizer after wrapping. Writes {"straight": [...], "resumed": [...]} losses to argv[2].
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from smolctl import checkpoint as ckpt_io
from smolctl.config import ModelConfig
from smolctl.loss import CausalLMLoss
from smolctl.model import build_model

MODEL = {"preset": "tiny", "num_layers": 2, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 1,
         "intermediate_size": 64}


def wrapped(cfg: ModelConfig, weights: dict | None = None):
    torch.manual_seed(0)
    module = CausalLMLoss(build_model(cfg, device="cpu"))
    if weights is not None:  # as train() does: into the plain model, before wrapping
        module.model.load_state_dict(weights, strict=not cfg.tie_embeddings)
    for layer in module.model.model.layers:
        fully_shard(layer)
    fully_shard(module)
    params = list(module.parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-2)
    return module, optimizer


def main(ckpt_root: Path, out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig.from_dict(MODEL)
    gen = torch.Generator().manual_seed(1 + rank)  # each rank its own data
    data = [torch.randint(0, cfg.vocab_size, (2, 17), generator=gen) for _ in range(8)]

    def step(module, optimizer, batch) -> float:
        loss = module(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return mean.item() / world

    module, optimizer = wrapped(cfg)
    straight = [step(module, optimizer, b) for b in data]

    module, optimizer = wrapped(cfg)
    first = [step(module, optimizer, b) for b in data[:4]]
    assert type(next(module.parameters())).__name__ == "DTensor"  # really sharded
    final = ckpt_root / "step-00000004"
    tmp = ckpt_io.staging_dir(final, rank == 0)
    dist.barrier()
    weights, optim_state = ckpt_io.training_state(module, optimizer, cfg)  # a collective
    if rank == 0:
        ckpt_io.save_model_state(tmp, weights, cfg, optim_state, {"step": 4, "world_size": world})
        ckpt_io.finalize(tmp, final)
    dist.barrier()
    ckpt_io.verify(final)
    module, optimizer = wrapped(cfg, ckpt_io.load_file(str(final / ckpt_io.WEIGHTS)))
    ckpt_io.load_optimizer(ckpt_io.read_optimizer(final), module, optimizer)
    resumed = first + [step(module, optimizer, b) for b in data[4:]]
    if rank == 0:
        out.write_text(json.dumps({"straight": straight, "resumed": resumed}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
