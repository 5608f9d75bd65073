"""--device: one check for every command that takes it.

    pick_device("cuda:1")   # "cuda:1" if this machine has a second GPU, else a one-line SmolctlError
    pick_device(None)       # the best available: cuda, then mps, then cpu ("auto" says the same)

A device string torch would misread (`bogus`) or a device this machine lacks (`cuda` without a
GPU) fails here, before anything is loaded or created -- not later as a confusing error about
something else, and never by quietly running somewhere else.
"""

from __future__ import annotations

import re

from smolctl.errors import SmolctlError

VALID = "cpu, cuda, cuda:N, mps or auto (the best available)"


def pick_device(name: str | None = None, flag: str = "--device") -> str:
    """The device `name` asks for, checked; None or "auto": cuda, then mps, then cpu. `flag`: what
    the messages call the setting (resume reads it from the run's config.yaml)."""
    import torch

    if name is None or name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    match = re.fullmatch(r"(cpu|mps|cuda)(?::(\d+))?", name)
    if not match or (match[1] != "cuda" and match[2] is not None):
        raise SmolctlError(f"{flag} {name!r} is not a device", hint=f"Use {VALID}")
    kind, index = match[1], int(match[2] or 0)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise SmolctlError(f"{flag} {name}: {why}", hint=f"Use {flag} cpu, or leave it out")
        if index >= count:
            raise SmolctlError(f"{flag} {name}: this machine has {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})",
                               hint="Pick one of those, or leave it out")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise SmolctlError(f"{flag} {name}: Apple's MPS is not available here",
                           hint=f"Use {flag} cpu, or leave it out")
    return name
