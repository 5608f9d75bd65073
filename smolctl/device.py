"""--device: one check for every command that takes it.

    pick_device("cuda:1")   # "cuda:1" if this machine has a second GPU, else a one-line SmolctlError
    pick_device(None)       # the best available: cuda, then mps, then cpu ("auto" says the same)
    for_process("cuda", place())  # torch.device("cuda", LOCAL_RANK) in a job of N processes on GPUs

A device string torch would misread (`bogus`) or a device this machine lacks (`cuda` without a
GPU) fails here, before anything is loaded or created -- not later as a confusing error about
something else, and never by quietly running somewhere else.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING

from smolctl.errors import SmolctlError

if TYPE_CHECKING:
    import torch

VALID = "cpu, cuda, cuda:N, mps or auto (the best available)"


# Device nodes a GPU's driver makes (NVIDIA, AMD's ROCm, WSL's GPU): where none exists on Linux,
# torch can find no CUDA device either.
GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg", "/proc/driver/nvidia")


def _may_have_accelerator() -> bool:
    """False only where no accelerator can be (Linux with no GPU device node); else torch must say."""
    return sys.platform != "linux" or any(os.path.exists(node) for node in GPU_NODES)


def pick_device(name: str | None = None, flag: str = "--device") -> str:
    """The device `name` asks for, checked; None or "auto": cuda, then mps, then cpu. `flag`: what
    the messages call the setting (resume reads it from the run's config.yaml)."""
    if (name is None or name == "auto") and not _may_have_accelerator():
        return "cpu"  # without importing torch (~1.5 s): a natively decoded GGUF never needs it
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


def for_process(requested: str | None, where) -> torch.device:
    """The device this process of a job trains on: `requested` (--device; None or "auto": the
    best available) checked as above, then placed -- with N processes on GPUs, each takes the GPU
    of its LOCAL_RANK. `where`: the process's place (distributed.Place: local_rank, world)."""
    import torch

    if where.world > 1 and re.fullmatch(r"cuda:\d+", requested or ""):
        raise SmolctlError(f"device {requested} would put all {where.world} processes on one GPU",
                           hint="Ask for cuda without an index: each process takes the GPU of its LOCAL_RANK")
    device = torch.device(pick_device(requested))
    if device.type == "cuda":  # always with its index: torch.cuda.set_device takes no other
        gpus = torch.cuda.device_count()
        device = torch.device("cuda", where.local_rank if where.world > 1 else device.index or 0)
        if where.world > 1 and device.index >= gpus:  # one process: pick_device checked it
            raise SmolctlError(f"{where.world} processes need a GPU each, but torch sees {gpus} on this machine",
                               hint=f"Run one process per GPU ({gpus}), or train on the CPU (device cpu)")
    if where.world > 1 and device.type == "mps":
        raise SmolctlError(f"{where.world} processes on mps cannot form a process group",
                           hint="Use CUDA GPUs, or train on the CPU (device cpu)")
    return device
