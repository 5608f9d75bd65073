"""Model sources: one resolver for every command that takes --model.

    loaded = load(spec, device="cpu", dtype=torch.float32)
    loaded.model, loaded.cfg, loaded.tokenizer, loaded.path

`spec` may be a training run directory (its latest good checkpoint), a checkpoint directory or an
HF model directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolctl.errors import SmolctlError

HINT = "Pass a run directory, a checkpoint directory or an HF model directory"


@dataclass
class Loaded:
    model: Any
    cfg: Any
    tokenizer: Any
    path: Path  # the directory the weights came from


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: the highest step, final/ winning a tie (while a
    run is being extended, final/ is older than its newest step-* checkpoints)."""
    from smolctl.checkpoint import checkpoints

    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve(spec: str | Path) -> Path:
    """The directory holding the weights that `spec` names."""
    path = Path(spec).expanduser()
    if not path.exists():
        from smolctl.hub import looks_like_hub_id, require_hub

        if looks_like_hub_id(str(spec)):
            require_hub(f"model {spec}", hint=HINT)
        raise SmolctlError(f"model not found: {spec}", hint=HINT)
    if path.is_dir() and (path / "checkpoints").is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise SmolctlError(f"run {path} has no complete checkpoint yet", hint="Train it first, or pass a checkpoint")
        return found
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise SmolctlError(f"{spec} is neither a run, a checkpoint nor an HF model directory", hint=HINT)


def load(spec: str | Path, device: str = "cpu", dtype=None) -> Loaded:
    from smolctl.checkpoint import load_model
    from smolctl.tokenizer import load_tokenizer

    path = resolve(spec)
    model, cfg = load_model(path, device=device, dtype=dtype)
    tokenizer = load_tokenizer(str(path) if (path / "tokenizer.json").is_file() else None)
    return Loaded(model, cfg, tokenizer, path)
