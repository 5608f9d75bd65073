"""Checkpoint save and load of the full 135M training state, against copying the same bytes.

    python benchmarks/bench_checkpoint.py [--preset smollm2-135m] [--repeats 2]

The state is what `train()` saves: model.safetensors (538 MB), the AdamW moments (1.08 GB), RNG
and data state, configs and the sha256 manifest, through smolctl.checkpoint's own functions
(save_model_state, save_rank_state, finalize: written to a staging directory, fsynced, renamed).
Loading is `find_checkpoint(run, "latest")` (which verifies every sha256) plus the weights and
`load_training_state` into a fresh AdamW.

The baseline copies the checkpoint's files (the same bytes, the same number of files) with
shutil.copyfile and fsyncs them: the checkpoint is durable when save returns, so the copy must be
too. Best of --repeats each, interleaved.

--writers also times the same save with safetensors' own writers in place of the hand-written
`checkpoint.write_tensors` (see its docstring for the figures and the decision).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, write_rows  # noqa: E402


def training_state(preset: str):
    import torch

    from smolctl.config import ModelConfig
    from smolctl.model import build_model

    cfg = ModelConfig.from_preset(preset)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for p in model.parameters():  # one step, so that the moments exist and are not zeros
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, cfg, opt


def save(run: Path, model, cfg, opt) -> Path:
    from smolctl import checkpoint as ckpt_io
    from smolctl.config import TrainConfig

    final = ckpt_io.step_dir(run, 1)
    tmp = ckpt_io.staging_dir(final, True)
    weights, optim_state = ckpt_io.training_state(model, opt, cfg, prefix="")
    meta = {"step": 1, "tokens_seen": 1024, "world_size": 1, "train": TrainConfig(preset=cfg.name).to_dict()}
    ckpt_io.save_model_state(tmp, weights, cfg, optim_state, meta)
    ckpt_io.save_rank_state(tmp, 0, {"epoch": 0, "carry": [1, 2, 3], "docs": 5, "tokens": 1024})
    ckpt_io.finalize(tmp, final)
    return final


def st_bytes(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors' own serializer: `safetensors.torch.save()` builds the file in memory, and our
    write_file writes it (fsync, sha256 from memory in a second thread, the umask's mode)."""
    from safetensors.torch import save as st_save

    from smolctl import checkpoint as ckpt_io

    ckpt_io.write_file(path, st_save(tensors, metadata=metadata))


def st_file(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """safetensors' own file writer: `save_file()` (which makes the file 0600), then chmod to the
    umask's mode and fsync; the manifest hashes it by rereading (its bytes were never ours)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


WRITERS = {"safetensors.torch.save() bytes through write_file": st_bytes,
           "safetensors.torch.save_file() + chmod + fsync, hashed by rereading": st_file}


def save_with(writer, run: Path, model, cfg, opt) -> Path:
    """`save` with every safetensors file written by `writer` instead of checkpoint.write_tensors."""
    from smolctl import checkpoint as ckpt_io

    own = ckpt_io.write_tensors
    ckpt_io.write_tensors = writer
    try:
        return save(run, model, cfg, opt)
    finally:
        ckpt_io.write_tensors = own


def load(run: Path, cfg) -> None:
    import torch

    from smolctl import checkpoint as ckpt_io
    from smolctl.model import build_model

    ckpt = ckpt_io.find_checkpoint(run, "latest")
    model = build_model(cfg, device="meta")
    model.load_state_dict(ckpt_io.load_file(str(ckpt / ckpt_io.WEIGHTS)), strict=False, assign=True)
    model.tie_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ckpt_io.load_training_state(ckpt, 0, 1)
    ckpt_io.load_optimizer(ckpt_io.read_optimizer(ckpt), model, opt)


def copy_files(src: Path, dst: Path) -> None:
    dst.mkdir()
    for p in sorted(src.iterdir()):
        shutil.copyfile(p, dst / p.name)
        fd = os.open(dst / p.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--writers", action="store_true",
                   help="also time the save with safetensors' own writers instead of checkpoint.write_tensors")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    model, cfg, opt = training_state(args.preset)
    saves, loads, copies = [], [], []
    others: dict[str, list[float]] = {name: [] for name in WRITERS} if args.writers else {}
    with tempfile.TemporaryDirectory(prefix="smolctl-bench-ckpt-") as tmp:
        tmp = Path(tmp)
        for i in range(args.repeats):
            run = tmp / f"run{i}"
            saves.append(timed(lambda: save(run, model, cfg, opt)))
            ckpt = run / "checkpoints" / "step-00000001"
            size = sum(f.stat().st_size for f in ckpt.iterdir())
            copies.append(timed(lambda: copy_files(ckpt, tmp / f"copy{i}")))
            loads.append(timed(lambda: load(run, cfg)))
            shutil.rmtree(run)
            shutil.rmtree(tmp / f"copy{i}")
            for name, times in others.items():  # interleaved with the own writer's saves
                times.append(timed(lambda: save_with(WRITERS[name], tmp / "other", model, cfg, opt)))
                shutil.rmtree(tmp / "other")
    gb = size / 1e9
    copy_s = min(copies)
    rows = [
        Row("Checkpoint", f"save, {args.preset} full training state ({gb:.2f} GB)", min(saves), "s",
            "copy the same files + fsync", copy_s, lower_is_better=True, target=2.0,
            note=f"best of {args.repeats}; {gb / min(saves):.2f} GB/s"),
        Row("Checkpoint", "load (verify sha256 + weights + optimizer)", min(loads), "s",
            "copy the same files + fsync", copy_s, lower_is_better=True, note=f"best of {args.repeats}"),
    ]
    for name, times in others.items():
        rows.append(Row("Checkpoint", f"save with {name}", min(times), "s", "save with checkpoint.write_tensors",
                        min(saves), lower_is_better=True, note=f"best of {args.repeats}"))
    write_rows(rows, args.out, {"bytes": size, "save_s": saves, "load_s": loads, "copy_s": copies,
                                **{f"save_s {name}": times for name, times in others.items()}})


if __name__ == "__main__":
    main()
