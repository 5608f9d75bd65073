"""`smolctl train --num-processes N`: the same command again in N processes, through torchrun.

torchrun is the launcher `accelerate launch` itself uses for multi-process jobs, so the two ways
of starting a job behave alike: its agent watches the processes, and when one exits or dies it
stops the others (SIGTERM, then SIGKILL) and reports which one failed. Each process then finds
its place in the job in distributed.py.
"""

from __future__ import annotations

import os
from pathlib import Path

from smolctl.errors import SmolctlError

# Set in the processes this launcher starts: the launcher reports a failed process itself, so
# the others stay quiet (under another launcher, rank 0 says that the job lost a process).
LAUNCHED_BY_SMOLCTL = "SMOLCTL_LAUNCHER"


def preflight(cfg, run_dir: Path, resume: str | None, overwrite: bool, world: int,
              allow_config_change: bool = False) -> str:
    """Once, before starting N processes: the checks that would otherwise fail in all of them,
    on the device each of them would pick. Each process then makes the same plan again (a
    relaunch must see the run directory as it is then). Returns Accelerate's mixed precision,
    decided here once (measured, if auto) for `launch` to hand to every process."""
    from smolctl import checkpoint as ckpt_io
    from smolctl import fsutil
    from smolctl.data import DataSpec
    from smolctl.device import for_process
    from smolctl.distributed import Place
    from smolctl.rundir import data_flags
    from smolctl.run import make_plan, mixed_precision

    if resume is not None and run_dir.is_dir():  # under the run's lock, released before the launch: rank 0 takes it then
        with fsutil.run_lock(run_dir):
            ckpt_io.recover(run_dir)
    plan = make_plan(cfg, run_dir, resume, overwrite, world, say=lambda _: None, allow_config_change=allow_config_change)
    for_process(plan.cfg.device, Place(world - 1, world - 1, world))  # the last process: is there a GPU for it?
    DataSpec.parse(plan.cfg.data, plan.cfg.text_column, flags=data_flags(run_dir, plan.resume, "data"))
    return mixed_precision(plan.cfg)


def launch(n: int, args: list[str], run_dir: Path, mixed_precision: str | None = None) -> int:
    """Run `smolctl ARGS` in `n` processes on this machine; return their exit status.
    `mixed_precision`: preflight's decision, so that the processes agree even where `auto`'s
    figures were taken on a busy machine and not cached (each would measure again).

    In-process rather than exec'ing `torchrun`, so that a failure ends in one line and an exit
    code instead of the launcher's traceback. A process that fails says why itself and the
    others stop quietly; one killed outright (SIGKILL, the OOM killer) is reported here, as a
    SmolctlError. Ctrl-C/SIGTERM reach the processes through the launcher (one signal each):
    they finish the step, save and stop.
    """
    import logging
    import signal

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from smolctl.distributed import PEER_FAILED_EXIT

    # torchrun would set 1 thread per process (and print a banner saying so); split the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    os.environ[LAUNCHED_BY_SMOLCTL] = "1"
    if mixed_precision:
        os.environ["ACCELERATE_MIXED_PRECISION"] = mixed_precision
    for name in list(logging.root.manager.loggerDict):  # we report failures; torch's loggers set their own levels
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={n}", "--module", "smolctl", *args]))
    except ChildFailedError as e:
        rank, failure = min(e.failures.items(), key=lambda kv: (_consequence(kv[1].exitcode), kv[1].timestamp, kv[0]))
        if failure.exitcode > 0 and failure.exitcode != PEER_FAILED_EXIT:
            return failure.exitcode  # it printed why
        from smolctl.checkpoint import resume_command

        how = (f"was killed by {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0
               else f"stopped with exit code {failure.exitcode}")
        raise SmolctlError(f"process {rank} of {n} {how}, so the job stopped",
                           hint=f"Continue with: {resume_command(run_dir, n)}",
                           exit_code=128 - failure.exitcode if failure.exitcode < 0 else 1) from None
    except SignalException as e:  # the workers were stopped with the same signal and have saved
        return 128 + int(e.sigval)
    return 0


def _consequence(exitcode: int) -> int:
    """How likely a process's exit status is a consequence of another's failure rather than its
    cause (timestamps have only seconds): its own error (0), killed outright (1), stopped by a
    SIGTERM after saving or quietly (128 + SIGTERM: 2), killed by the launcher's own SIGTERM to the
    survivors (3), stopped because a collective broke (4)."""
    import signal

    from smolctl.distributed import PEER_FAILED_EXIT

    consequences = {128 + signal.SIGTERM: 2, -signal.SIGTERM: 3, PEER_FAILED_EXIT: 4}
    return consequences.get(exitcode, 1 if exitcode < 0 else 0)


def without_option(argv: list[str], name: str) -> list[str]:
    """argv minus `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == name:
            skip = True
        elif not arg.startswith(name + "="):
            out.append(arg)
    return out
