"""How to pick each next token: the settings generate, chat and training-time samples decode with.

    Sampling(temperature=0.8, top_p=0.9, seed=1)     # checked as it is made: errors name the flag

Declared with schema.setting like TrainConfig, so that generate's and chat's sampling flags are
made from these fields (cli/options.config_options), help text and range written once. No torch
here: the CLI builds its options from this module at startup. generation.py decodes with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from smolctl.schema import check_fields, setting

MAX_SEED = 2**63 - 1  # torch.Generator takes 64-bit seeds


@dataclass(frozen=True)
class Sampling:
    """How to pick each next token. The defaults decode greedily."""

    max_new_tokens: int = setting(256, "Most tokens to generate per reply.", ge=1, flag=("--max-new-tokens", "-n"))
    # 0: greedy (argmax); the other knobs only matter when > 0
    temperature: float = setting(0.0, "Sampling temperature; 0 = greedy.", ge=0, says=">= 0 (0 = greedy)",
                                 flag=("--temperature", "-t"))
    top_k: int = setting(0, "Sample from the k most likely tokens; 0 = off.", ge=0, says=">= 0 (0 = off)")
    top_p: float = setting(1.0, "Sample from the smallest set holding this probability; 1 = off.", gt=0, le=1,
                           says="in (0, 1] (1 = off)")
    min_p: float = setting(0.0, "Drop tokens below min-p x the top token's probability; 0 = off.", ge=0, le=1,
                           says="in [0, 1] (0 = off)")
    repetition_penalty: float = setting(1.0, "Above 1 discourages tokens already in the context; 1 = off.", gt=0,
                                        says="> 0 (1 = off)")
    seed: int | None = setting(None, "Random seed for sampling (default: a fresh one each run).", ge=0, le=MAX_SEED)
    # generation ends before the first of these; empty ones are dropped
    stop: tuple[str, ...] = setting((), "Stop before this string (repeatable).")

    def __post_init__(self) -> None:
        check_fields(self, "", flags=True)  # errors name the flag: "--top-p must be in (0, 1] (1 = off), got 0.0"
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
