"""This process's place in its training job: the device it trains on and the process group it joins.

Every way of starting `smolctl train` comes through `accelerator()`: plain, `--num-processes N`
(torchrun, see launch.py), `accelerate launch`, or a scheduler that sets WORLD_SIZE / RANK /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT itself; on CPUs (gloo) and GPUs (nccl) alike. The device
and the process group are decided together because Accelerate joins a multi-process launch on a
machine without GPUs only when told `cpu=True`: without `--device cpu`, every rank used to train
alone, as a world of one, on the same run directory.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch

from smolctl import device as devices
from smolctl.errors import SmolctlError

# How long a collective waits for the slowest rank before the job is declared dead. A rank that
# dies closes its sockets and its peers' collectives fail at once; this bounds the rest (a rank
# that hangs, a machine that vanishes), and is longer than a checkpoint save or a first hub fetch.
TIMEOUT = timedelta(minutes=10)
LAUNCH_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
FIX = ("Start it with smolctl train --num-processes N, torchrun or accelerate launch (they set all of "
       f"{', '.join(LAUNCH_ENV)}), or unset WORLD_SIZE for one process")


@dataclass(frozen=True)
class Place:
    rank: int
    local_rank: int
    world: int


# The exit status of a process that stopped only because another one of its job failed or died,
# so that a launcher can tell the cause from the consequences.
PEER_FAILED_EXIT = 3


class PeerFailed(SmolctlError):
    """This process stopped because another process of the job failed or died."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, exit_code=PEER_FAILED_EXIT)


def place() -> Place:
    """Rank, local rank and world size as the launcher set them; one process when none did."""
    world = _env_int("WORLD_SIZE", 1)
    if world == 1:
        return Place(0, 0, 1)
    missing = [k for k in LAUNCH_ENV if not os.environ.get(k)]
    if missing:
        raise SmolctlError(f"WORLD_SIZE={world} says this is one of {world} processes, but "
                           f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set", hint=FIX)
    p = Place(_env_int("RANK"), _env_int("LOCAL_RANK"), world)
    if not (0 <= p.rank < world and 0 <= p.local_rank <= p.rank):
        raise SmolctlError(f"RANK={p.rank} / LOCAL_RANK={p.local_rank} do not fit WORLD_SIZE={world}", hint=FIX)
    return p


def accelerator(requested_device: str | None, **kwargs):
    """The Accelerator of this process, on the device decided above, in the job's process group:
    gloo on CPUs, nccl on GPUs (Accelerate forms it, told the backend and the timeout).

    Fails on every rank, before anything is written, when the launch and the job disagree: a
    world size whose other processes cannot be reached, or an Accelerator that ended up in a
    different world than the launcher started.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    where = place()
    device = devices.for_process(requested_device, where)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if where.world == 1:  # a second run in this process (a notebook, a test) may train in another precision
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state()
    else:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend=backend, timeout=TIMEOUT)]
    try:
        if where.world > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and _env_int(
                "TORCHELASTIC_RESTART_COUNT", 0):
            _join_with_keys_of_this_attempt(backend, where)  # Accelerate then takes the group as it is
        with warnings.catch_warnings():  # under a bare scheduler it splits the cores and says so on every rank
            warnings.filterwarnings("ignore", "OMP_NUM_THREADS/MKL_NUM_THREADS unset")
            acc = Accelerator(cpu=device.type == "cpu", **kwargs)
    except torch.distributed.DistError as e:  # the rendezvous: address unreachable, port taken, timeout
        raise SmolctlError(f"process {where.rank} of {where.world} could not join the job at "
                           f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}: {_first_line(e)}",
                           hint="MASTER_ADDR:MASTER_PORT must be a free port on the machine of rank 0 that every "
                                "process can reach; the launchers pick one (smolctl train --num-processes N, "
                                "torchrun --standalone, accelerate launch)") from None
    if (acc.num_processes, acc.process_index, acc.device.type) != (where.world, where.rank, device.type):
        raise SmolctlError(f"the launcher started {where.world} process(es) on {device.type}, but Accelerate "
                           f"made this one process {acc.process_index} of {acc.num_processes} on {acc.device}",
                           hint=FIX)
    return acc


def _join_with_keys_of_this_attempt(backend: str, where: Place) -> None:
    """Form the process group of a job that torchrun restarted (--max-restarts) under keys of its
    own. torchrun's agent keeps one store for all its attempts, and the process group of the
    attempt that failed left its keys there (each rank's address among them): a rank of the new
    attempt could read a dead process's address and fail to connect (seen on CPUs over gloo)."""
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], _env_int("MASTER_PORT"), where.world,
                                       is_master=False, timeout=TIMEOUT)
    attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
    torch.distributed.init_process_group(backend, store=torch.distributed.PrefixStore(f"attempt-{attempt}/", store),
                                         rank=where.rank, world_size=where.world, timeout=TIMEOUT)


def machines() -> int:
    """How many machines the job spans (torchrun and accelerate launch set LOCAL_WORLD_SIZE)."""
    local = _env_int("LOCAL_WORLD_SIZE", 0) or 1
    return max(1, _env_int("WORLD_SIZE", 1) // local)


def continue_command(run_dir, world: int, step: int | str = "latest") -> str:
    """How to continue the job from its checkpoint at `step`: with `world` processes on this
    machine, or the same launch again on each of its machines."""
    from smolctl.checkpoint import resume_command

    n = machines() if world > 1 else 1
    if n > 1:
        return f"{resume_command(run_dir, 1, step)}, launched on each of the {n} machines as before"
    return resume_command(run_dir, world, step)


def job_restarts() -> int:
    """How many times this job was started again by its launcher or scheduler: torchrun's
    --max-restarts (TORCHELASTIC_RESTART_COUNT), SLURM's requeue (SLURM_RESTART_COUNT)."""
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value):
            return int(value)
    return 0


def is_peer_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that broke because another process of the job is gone: c10d
    raises DistError (NCCL, timeouts); gloo's broken connections inside DDP's backward come as a
    plain RuntimeError that names gloo's transport."""
    if not torch.distributed.is_initialized():
        return False
    return isinstance(e, torch.distributed.DistError) or (isinstance(e, RuntimeError) and "gloo/transport" in str(e))


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if not value and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SmolctlError(f"{name}={value!r} is not a number", hint=FIX) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
