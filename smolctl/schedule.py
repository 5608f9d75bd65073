"""The learning-rate schedule, a pure function of the step and the training config."""

from __future__ import annotations

import math


def lr_at(step: int, cfg) -> float:
    """The learning rate for optimizer step `step` (1-based), a pure function of the config.

    WSD: linear warmup to lr, constant, then linear decay towards min_lr over the last decay_frac
    of the run. The decay's D steps take D of the D + 1 even strides from lr to min_lr, so the last
    step still learns at (lr - min_lr) / (D + 1) + min_lr: decaying all the way would make it an
    lr-0 step (min_lr 0) that changes nothing (torchtitan and nanotron count the same way).
    cosine: linear warmup, then half a cosine towards min_lr, counted the same way: its C steps
    sit at 1..C of C + 1 even strides of the half period, so its last step is no lr-0 step either.
    """
    if step <= cfg.warmup_steps:  # warmup: lr * step / warmup
        return cfg.lr * step / max(1, cfg.warmup_steps)
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / (cfg.max_steps - cfg.warmup_steps + 1)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = round(cfg.decay_frac * cfg.max_steps)
    decay_start = cfg.max_steps - decay_steps
    if step <= decay_start:  # stable
        return cfg.lr
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (cfg.max_steps + 1 - step) / (decay_steps + 1)  # decay

