"""A checkpoint's smolctl.json, read and checked in one place.

    meta = read_meta(ckpt)                 # any checkpoint or imported model: meta.model is its ModelConfig
    meta = read_meta(ckpt, training=True)  # one that training can resume: step, tokens_seen, train too

Every reader goes through here -- resume choosing a checkpoint, loading weights, inspect and
count-params -- so that they all agree on what a checkpoint holds, and a damaged file (not JSON,
`"step": "4"`, a missing key, an impossible value) is one line naming it: `resume --from latest`
skips such a checkpoint, saying why; eval, generate and export refuse it. smolctl writes this file
itself, so it is read strictly (schema.validate's `strict`): a string where a number belongs is
damage, not something to coerce. No torch here: inspect and count-params read it too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolctl.config import ModelConfig, TrainConfig
from smolctl.errors import SmolctlError
from smolctl.schema import setting, validate

META = "smolctl.json"
HINT = "The checkpoint's metadata is damaged: use another checkpoint (resume --from latest skips damaged ones)"


@dataclass
class CheckpointMeta:
    model: ModelConfig
    train: TrainConfig | None = None
    step: int | None = setting(None, "Optimizer steps taken.", ge=0)
    tokens_seen: int | None = setting(None, "Training tokens consumed, over all processes.", ge=0)
    world_size: int = setting(1, "Processes that trained it (each saved its own data position).", gt=0)
    elapsed_s: float = setting(0.0, "Training time so far, in seconds.", ge=0)
    lr: float | None = setting(None, "The learning rate of its last step.", ge=0)
    # The log window at the save: the next `train` row averages the loss over it, so a resume must
    # carry it to log what an uninterrupted run logs.
    log_steps: int = setting(0, "Steps in the log window so far.", ge=0)
    log_loss_sums: list[float] = setting(default_factory=list, help="Each rank's sum of the window's losses.")
    imported_from: dict[str, Any] | None = setting(None, "The GGUF file an imported model came from.")
    general: dict[str, Any] = setting(default_factory=dict, help="Provenance for exports, as GGUF general.* keys "
                                      "(imports: the source file's; runs: name and license).")


def is_number(text: str) -> bool:
    """A step number as written in a directory name, --from or a log line: ASCII digits ('²' is a
    digit to str.isdigit, and not a number to int)."""
    return text.isascii() and text.isdigit()


def read_meta(ckpt: str | Path, training: bool = False) -> CheckpointMeta:
    """`ckpt`/smolctl.json, checked; SmolctlError naming what is wrong. `training`: it must also
    hold what resuming needs (a step, the tokens seen and the training config)."""
    path = Path(ckpt) / META
    where = f"checkpoint metadata {path}: "
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SmolctlError(f"{ckpt} has no {META}", hint="Pass a checkpoint saved by smolctl") from None
    except (ValueError, UnicodeDecodeError) as e:  # not JSON, not UTF-8
        raise SmolctlError(f"{where}not valid JSON ({' '.join(str(e).split())[:80]})", hint=HINT) from None
    if not isinstance(d, dict) or not isinstance(d.get("model"), dict):
        raise SmolctlError(f"{where}no model config in it", hint=HINT)
    try:
        values = validate(CheckpointMeta, d, "checkpoint metadata", where, strict=True, also=("model", "train"))
        model = ModelConfig.from_dict(values.pop("model"), where=where, strict=True)
        train = values.pop("train", None)
        train = None if train is None else TrainConfig.from_dict(_mapping(train, where), where=where, strict=True)
    except SmolctlError as e:
        raise SmolctlError(e.message, hint=HINT) from None
    meta = CheckpointMeta(model=model, train=train, **values)
    missing = [k for k in ("step", "tokens_seen", "train") if getattr(meta, k) is None]
    if training and missing:
        raise SmolctlError(f"{where}not a training checkpoint (no {', '.join(missing)})",
                           hint="Resume from a checkpoint under a run's checkpoints/")
    named = Path(ckpt).name
    number = named[5:] if named.startswith("step-") and is_number(named[5:]) else None
    if meta.step is not None and number is not None and int(number) != meta.step:
        raise SmolctlError(f"{where}it says step {meta.step} in a directory named {named}", hint=HINT)
    if meta.log_steps and len(meta.log_loss_sums) != meta.world_size:
        raise SmolctlError(f"{where}log_loss_sums holds {len(meta.log_loss_sums)} values for "
                           f"{meta.world_size} process(es)", hint=HINT)
    return meta


def model_config_of(path: str | Path) -> ModelConfig:
    """The config of the model in a checkpoint or HF model directory: smolctl.json's where there is
    one (what loading uses), else the HF config.json."""
    path = Path(path)
    if (path / META).is_file():
        return read_meta(path).model
    return ModelConfig.from_dir(path)


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise SmolctlError(f"{where}train must be a mapping of keys to values, got {value!r}", hint=HINT)
    return value
