"""Training checkpoints: self-describing directories of safetensors files, written atomically,
verified against their manifest, found and pruned.

A checkpoint directory is a model directory (model_io.py: config.json + model.safetensors, which
`LlamaForCausalLM.from_pretrained(ckpt)` loads too) plus what resuming needs:

    runs/demo/checkpoints/step-00000500/
        config.json          transformers' LlamaConfig (the architecture)
        model.safetensors    weights; a tied lm_head is not stored twice
        tokenizer.json + tokenizer_config.json      the run's tokenizer (no chat template: a base model)
        smolctl.json         our ModelConfig, the training config, step, tokens seen, provenance
        optimizer.safetensors + optimizer.json      AdamW moments / param groups
        rng-rank0.json + rng-rank0.safetensors      python, numpy, torch (CPU, CUDA) RNG states
        data-rank0.json + data-rank0.safetensors    the positions of its data streams (see data.py)
        manifest.json        sha256 and size of every file above, written last

It is written into a temporary directory and renamed into place only when complete, so a
crash mid-save leaves the previous checkpoint as the latest. Nothing here unpickles: tensors
come from safetensors, everything else is JSON. Every file is fsynced and hashed as it is
written (safetensors_io.py), so the manifest never rereads them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from smolctl import fsutil
from smolctl.config import ModelConfig
from smolctl.errors import SmolctlError
from smolctl.metadata import META, CheckpointMeta, is_number, read_meta
from smolctl.model_io import WEIGHTS, write_config
from smolctl.safetensors_io import file_sha256, write_file, write_json, write_tensors

MANIFEST = "manifest.json"
IN_SAFETENSORS = "<in optimizer.safetensors>"  # optimizer.json's stand-in for a tensor


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:08d}"


def resume_command(run_dir: Path, world: int, step: int | str = "latest") -> str:
    """The command that continues `run_dir` from its checkpoint at `step`, with `world` processes."""
    again = f" --num-processes {world}" if world > 1 else ""
    return f"smolctl resume{again} --run-dir {run_dir} --from {step}"


def staging_path(final: Path) -> Path:
    """`.tmp-<name>` next to the checkpoint: never matched as a step, tidied by `recover`."""
    return final.parent / f".tmp-{final.name}"


def staging_dir(final: Path, is_main: bool) -> Path:
    """The temporary directory a checkpoint is written into (created by the main process)."""
    tmp = staging_path(final)
    if is_main:
        fsutil.remove(tmp)  # a leftover of an interrupted save
        tmp.mkdir(parents=True)
    return tmp


def check_finite(weights: dict[str, torch.Tensor]) -> str | None:
    """The name of the first weight holding NaN or inf, if any: such a state is never saved."""
    return next((name for name, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


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
    return _unflatten_optimizer(load_file(str(ckpt / "optimizer.safetensors")),
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


def save_model_state(tmp: Path, weights: dict, cfg: ModelConfig, optimizer_state: dict, meta: dict,
                     tokenizer=None) -> None:
    """The main process's part: weights, configs, tokenizer files, optimizer (the dicts from
    `training_state`)."""
    write_config(cfg, tmp)
    if tokenizer is not None:
        from smolctl.tokenizer import save_tokenizer

        for path in save_tokenizer(tokenizer, tmp, cfg.max_seq_len):  # small files: reread to fsync them
            write_file(path, path.read_bytes())
    write_json(tmp / META, {"model": cfg.to_dict(), **meta})
    tensors, rest = _flatten_optimizer(optimizer_state)
    write_json(tmp / "optimizer.json", rest)
    # The two big files at once (135M: 538 MB and 1.08 GB): sha256 (~1.2 GB/s a core) is the
    # bottleneck, and this way each file's hashing gets a core.
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(write_tensors, tmp / WEIGHTS, weights, {"format": "pt"}),
                pool.submit(write_tensors, tmp / "optimizer.safetensors", tensors)]
        for job in jobs:
            job.result()


def save_rank_state(tmp: Path, rank: int, data_state: dict) -> None:
    """Every process's part: its RNG states and its data stream position."""
    rng = {"python": random.getstate(), "numpy": _numpy_rng()}
    write_json(tmp / f"rng-rank{rank}.json", rng)
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    write_tensors(tmp / f"rng-rank{rank}.safetensors", tensors)
    # The tensors (carried-over tokens, shuffle buffer) go to safetensors: compact, however long
    # the document being packed; the rest to JSON.
    tensors = {k: v for k, v in data_state.items() if torch.is_tensor(v)}
    write_json(tmp / f"data-rank{rank}.json", {k: v for k, v in data_state.items() if k not in tensors})
    if tensors:
        write_tensors(tmp / f"data-rank{rank}.safetensors", tensors)


def finalize(tmp: Path, final: Path) -> None:
    """Write the manifest, then rename the finished directory into place (replacing an older one)."""
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    manifest = {"files": {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files},
                "time": time.time()}
    write_json(tmp / MANIFEST, {**manifest, "sha256": _manifest_sha256(manifest)})
    fsutil.publish(tmp, final, aside=final.parent / f".old-{final.name}")


def recover(run_dir: Path, say=print) -> None:
    """Tidy what an interrupted save left behind (main process, before anything reads the run).

    A `.tmp-<name>` whose manifest verifies is a finished checkpoint whose rename was cut short
    (e.g. killed between finalize's two renames, with the old final/ already moved aside): it is
    moved into place. Any other `.tmp-*` or `.old-*` directory is incomplete or stale: deleted.
    """
    ckpts = Path(run_dir) / "checkpoints"
    for tmp in sorted(ckpts.glob(".tmp-*")):
        final = ckpts / tmp.name[len(".tmp-"):]
        try:
            if final.exists():
                raise SmolctlError("superseded")
            verify(tmp)
        except SmolctlError:
            fsutil.remove(tmp)
            continue
        fsutil.publish(tmp, final)
        say(f"Recovered {final.name}: its save had finished but was not yet renamed into place")
    for old in ckpts.glob(".old-*"):
        fsutil.remove(old)


DAMAGED = "Resume from another checkpoint: --from latest skips damaged ones"  # what to do about a damaged one


def verify(ckpt: Path, hint: str = DAMAGED) -> None:
    """Check the manifest against its own checksum and every file against the manifest; raise
    naming the first bad file."""
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        raise SmolctlError(f"checkpoint {ckpt} is incomplete (no {MANIFEST}: its save was interrupted)", hint=hint)
    try:
        manifest = json.loads(mpath.read_text())
        ok = manifest.pop("sha256") == _manifest_sha256(manifest)
        files = manifest["files"]
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, not UTF-8, not our layout
        ok = False
    if not ok:
        raise SmolctlError(f"checkpoint file {mpath} is corrupt (it does not match its own checksum)", hint=hint)
    for name in files:
        if Path(name).name != name:  # the manifest only ever names files of this directory
            raise SmolctlError(f"checkpoint file {mpath} is corrupt (it names {name!r})", hint=hint)
        if not (ckpt / name).is_file():
            raise SmolctlError(f"checkpoint file {ckpt / name} is missing", hint=hint)
    sized = [name for name, want in files.items() if (ckpt / name).stat().st_size == want["bytes"]]
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
        digests = dict(zip(sized, pool.map(lambda name: fsutil.sha256(ckpt / name), sized)))
    for name, want in files.items():
        if digests.get(name) != want["sha256"]:
            raise SmolctlError(f"checkpoint file {ckpt / name} is corrupt (sha256 does not match the manifest)",
                               hint=hint)


def _manifest_sha256(manifest: dict) -> str:
    """The manifest's checksum of itself (without this field): a damaged manifest is caught too."""
    return fsutil.sha256([json.dumps(manifest, sort_keys=True).encode()])


def saved(run_dir: Path) -> list[Path]:
    """Every checkpoint directory of a run, damaged and set-aside ones too (not the hidden
    leftovers of an interrupted save): what starting the run over would delete."""
    folder = Path(run_dir) / "checkpoints"
    return sorted(p for p in folder.glob("*") if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def checkpoints(run_dir: Path, say=lambda message: None) -> list[tuple[int, Path]]:
    """(step, path) of a run's finished checkpoints, oldest first (final/ counted at the step its
    metadata says: one whose metadata is damaged is left out, and `say` is told why)."""
    out = []
    for p in (Path(run_dir) / "checkpoints").glob("*"):
        if not (p / MANIFEST).is_file():
            continue
        if p.name.startswith("step-") and is_number(p.name[5:]):
            out.append((int(p.name[5:]), p))
        elif p.name == "final":
            try:
                out.append((read_meta(p, training=True).step, p))
            except SmolctlError as e:
                say(f"Skipping damaged checkpoint: {e}")
    return sorted(out, key=lambda x: (x[0], x[1].name == "final"))


def find_checkpoint(run_dir: Path, which: str, say=print, hint: str = DAMAGED) -> Path:
    """`which`: "latest" (the newest checkpoint that verifies, files and metadata; damaged ones are
    skipped, saying so), a step number, or a checkpoint path. `hint`: what to do about a damaged one."""
    if which != "latest" and not is_number(which):
        path = Path(which)
        if not (path / MANIFEST).is_file() and not (path / META).is_file():
            raise SmolctlError(f"--from {which}: not a checkpoint directory",
                               hint="Use a step number, 'latest', or a checkpoint path")
        return _checked(path, hint)
    for attempt in range(3):  # a live run may prune what we listed: then list again
        found = checkpoints(run_dir, say=say if which == "latest" else lambda message: None)
        if not found:
            if which == "latest" and (Path(run_dir) / "checkpoints" / "final").is_dir():
                raise SmolctlError(f"every checkpoint of {run_dir} is damaged")
            raise SmolctlError(f"run {run_dir} has no checkpoints", hint="Start it with smolctl train")
        if which != "latest":
            break
        for step, path in reversed(found):
            try:
                return _checked(path, hint)
            except Vanished:
                break
            except SmolctlError as e:
                say(f"Skipping damaged checkpoint: {e}")
        else:
            raise SmolctlError(f"every checkpoint of {run_dir} is damaged")
    if which == "latest":
        raise SmolctlError(f"the checkpoints of {run_dir} were deleted while being read", hint=hint)
    step = int(which)
    matches = [p for s, p in found if s == step]
    if not matches:
        steps = ", ".join(str(s) for s, _ in found)
        raise SmolctlError(f"run {run_dir} has no checkpoint at step {step}", hint=f"Checkpoints: {steps}")
    return _checked(matches[0], hint)


class Vanished(SmolctlError):
    """A checkpoint that a live run pruned between listing it and reading it."""


def _checked(ckpt: Path, hint: str = DAMAGED) -> Path:
    """`ckpt`, once its files match the manifest and its metadata is a training checkpoint's."""
    with fsutil.pinned(ckpt):  # a live run's pruning leaves it alone while we hash it
        if not ckpt.is_dir():
            raise Vanished(f"checkpoint {ckpt} was deleted while it was being read", hint=hint)
        verify(ckpt, hint)
        read_meta(ckpt, training=True)
    return ckpt


def check_world_size(ckpt: Path, world_size: int) -> CheckpointMeta:
    """The metadata of `ckpt`, if `world_size` processes can resume it; raise otherwise.

    The data is split into streams, each with its own position (data.py), dealt out to the
    processes: a checkpoint resumes on any number of processes up to its number of streams (by
    default, the number that saved it; more when the run set data_streams), bit for bit only on
    the same number.
    """
    meta = read_meta(ckpt, training=True)
    saved, streams = meta.world_size, data_streams(ckpt, meta.world_size)
    if world_size > streams:
        how = f"smolctl resume --num-processes {streams}" if streams > 1 else "plain smolctl resume"
        raise SmolctlError(f"{ckpt} was saved by {saved} process(es); this run has {world_size}, more than its "
                           f"{streams} data stream(s)",
                           hint=f"Resume with at most {streams} process(es) ({how}); a run started with "
                                "smolctl train --data-streams N resumes on up to N")
    return meta


def data_streams(ckpt: Path, saved_world: int) -> int:
    """How many streams a checkpoint's data is split into: one per process unless it says otherwise."""
    return json.loads((ckpt / "data-rank0.json").read_text()).get("streams", saved_world)


def load_training_state(ckpt: Path, rank: int, world_size: int) -> tuple[CheckpointMeta, dict | list[dict]]:
    """Restore this rank's RNG states; return (its metadata, data state). The optimizer
    comes back later, through `load_optimizer`, once the model is wrapped.

    On another number of processes than saved it (see check_world_size), the data state is every
    saved process's, for data.BlockStream to deal the streams out anew; a rank the checkpoint has
    no RNG states for takes those of rank % saved; the log window's loss sum is shared out so that
    its mean over the processes stays the same."""
    meta = check_world_size(ckpt, world_size)
    saved = meta.world_size
    rng = json.loads((ckpt / f"rng-rank{rank % saved}.json").read_text())
    version, internal, gauss = rng["python"]  # JSON made getstate()'s tuples lists
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(tuple(rng["numpy"][:1]) + (np.array(rng["numpy"][1], dtype=np.uint32),) + tuple(rng["numpy"][2:]))
    rng_t = load_file(str(ckpt / f"rng-rank{rank % saved}.safetensors"))
    torch.set_rng_state(rng_t["torch"])
    if torch.cuda.is_available() and "cuda0" in rng_t:
        torch.cuda.set_rng_state_all([rng_t[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in rng_t])
    if world_size == saved:
        return meta, _data_state(ckpt, rank)
    share = sum(meta.log_loss_sums) / saved if meta.log_loss_sums else 0.0
    meta = dataclasses.replace(meta, log_loss_sums=[share] * world_size)
    return meta, [_data_state(ckpt, r) for r in range(saved)]


def _data_state(ckpt: Path, rank: int) -> dict:
    data = json.loads((ckpt / f"data-rank{rank}.json").read_text())
    if (ckpt / f"data-rank{rank}.safetensors").is_file():
        data.update(load_file(str(ckpt / f"data-rank{rank}.safetensors")))
    return data


def prune(run_dir: Path, keep_last: int | None) -> None:
    """Keep the newest `keep_last` step-* checkpoints (final/ is always kept)."""
    if not keep_last:
        return
    steps = [p for _, p in checkpoints(run_dir) if p.name.startswith("step-")]
    for p in steps[:-keep_last]:
        fsutil.remove_unpinned(p)  # one being read (eval, generate, export of this run) waits for the next save


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
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


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    def key(i: str):
        return int(i) if i.isdigit() else i

    state: dict = {key(i): dict(v) for i, v in rest["state"].items()}
    for k, t in tensors.items():
        idx, name = k.rsplit(".", 1)  # "model.model.layers.0.mlp.up_proj.weight" . "exp_avg"
        state.setdefault(key(idx), {})[name] = t  # in its IN_SAFETENSORS place
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _numpy_rng() -> list:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
