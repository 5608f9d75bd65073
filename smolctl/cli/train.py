"""`smolctl train` and `smolctl resume`.

    smolctl train --max-steps 5000                          # SmolLM2-135M on cosmopedia-v2 (hub)
    smolctl train --preset tiny --data sample --max-steps 300 --batch-size 8 --seq-len 256
    smolctl train --config examples/tiny.yaml --lr 1e-3     # flags override the file
    smolctl resume --from 500                               # the newest run under runs/
    smolctl resume --run-dir runs/demo --from latest --max-steps 8000
    smolctl train --num-processes 2 ...                     # N processes on this machine (torchrun)
    accelerate launch --config_file examples/accelerate/multi-gpu-ddp.yaml -m smolctl train ...
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from smolctl.cli.options import ConfigOpt, config_options
from smolctl.cli.registry import command, crash_reports_in
from smolctl.config import RESUMABLE, TrainConfig
from smolctl.errors import SmolctlError

RUNS = Path("runs")
# Every TrainConfig field is a `train` flag (the model's own fields go in a --config file).
TRAIN_FLAGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["cli"])


def opt(*names: str, help: str, **kw):
    return typer.Option(*names, help=help, show_default=False, **kw)


RunDirOpt = Annotated[Optional[Path], opt("--run-dir", help="The run directory (default runs/<run-name>).")]
LogFileOpt = Annotated[Optional[Path], opt("--log-file", help="The human-readable log (default logs/<run-name>.log).")]
NumProcOpt = Annotated[Optional[int], opt("--num-processes", help="Train in N processes on this machine (DDP: "
                                          "one per GPU, or CPU processes over gloo), started through torchrun. "
                                          "For multi-node or FSDP use accelerate launch.")]
DashOpt = Annotated[bool, typer.Option("--dashboard/--no-dashboard",
                                       help="Live dashboard on a terminal; plain lines otherwise.")]


def register(app: typer.Typer) -> None:
    @command(app, help="Pretrain a model from scratch (on the seed's cosmopedia-v2 stream by default).")
    @config_options(TrainConfig, TRAIN_FLAGS)
    def train(
        config: ConfigOpt = None,
        num_processes: NumProcOpt = None,
        run_name: Annotated[Optional[str], opt("--run-name", help="Default: <preset>-<date>-<time>.")] = None,
        run_dir: RunDirOpt = None,
        log_file: LogFileOpt = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in a run directory "
                                                "that has checkpoints.")] = False,
        dashboard: DashOpt = True,
        **flags,
    ) -> None:
        cfg = (TrainConfig.from_file(config) if config else TrainConfig()).with_flags(flags)
        if run_name is not None and (Path(run_name).name != run_name or run_name in (".", "..")):
            raise SmolctlError(f"--run-name {run_name!r} is not a plain name (it would be written outside runs/)",
                               hint="Use a name without '/' or '..', or --run-dir for a path")
        name = run_name or (run_dir.name if run_dir else f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        _run(cfg, run_dir or RUNS / name, None, log_file, overwrite, dashboard, num_processes)

    @command(app, help="Continue a run from one of its checkpoints, exactly where it stopped.")
    @config_options(TrainConfig, RESUMABLE)
    def resume(
        from_: Annotated[str, typer.Option("--from", help="A step number, 'latest', or a checkpoint path.")] = "latest",
        run_dir: RunDirOpt = None,
        allow_config_change: Annotated[bool, typer.Option(
            "--allow-config-change", help="Resume although config.yaml was edited in a way that changes the "
                                          "run (its batch, data, model, optimizer...): it will not continue "
                                          "exactly.")] = False,
        log_file: LogFileOpt = None,
        num_processes: NumProcOpt = None,
        dashboard: DashOpt = True,
        **flags,
    ) -> None:
        from smolctl.train import RunComplete

        if run_dir is None and Path(from_).is_dir() and Path(from_).parent.name == "checkpoints":
            run_dir = Path(from_).parent.parent
        run_dir = run_dir or _newest_run()
        if not (run_dir / "config.yaml").is_file():
            raise SmolctlError(f"{run_dir} is not a smolctl run directory (no config.yaml)",
                               hint="Pass --run-dir of a run started with smolctl train")
        cfg = TrainConfig.from_file(run_dir / "config.yaml").with_flags(flags)
        try:
            _run(cfg, run_dir, from_, log_file, False, dashboard, num_processes, allow_config_change)
        except RunComplete as e:  # a job scheduler re-running resume after the last save: nothing to do
            if os.environ.get("RANK", "0") == "0":
                print(e)
            raise typer.Exit(0) from None


def _newest_run() -> Path:
    runs = [p for p in RUNS.glob("*") if (p / "config.yaml").is_file()]
    if not runs:
        raise SmolctlError(f"no runs under {RUNS}/", hint="Pass --run-dir, or start one with smolctl train")
    return max(runs, key=lambda p: (p / "config.yaml").stat().st_mtime)


def _run(cfg, run_dir: Path, resume: str | None, log_file: Path | None, overwrite: bool, dashboard: bool,
         num_processes: int | None = None, allow_config_change: bool = False) -> None:
    from smolctl.train import train

    crash_reports_in(run_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch
    if num_processes is not None:
        if num_processes < 1:
            raise SmolctlError(f"--num-processes must be positive, got {num_processes}")
        if world > 1 and num_processes != world:
            raise SmolctlError(f"--num-processes {num_processes} inside a launcher that started {world}",
                               hint="Leave --num-processes out under torchrun / accelerate launch")
        if world == 1 and num_processes > 1:
            _preflight(cfg, run_dir, resume, overwrite, num_processes, allow_config_change)
            return _launch(num_processes)
    main = os.environ.get("RANK", "0") == "0"  # the dashboard and messages come from rank 0 only
    sink = None
    if main and dashboard and sys.stdout.isatty():
        from smolctl.dashboard import Dashboard

        sink = Dashboard()
    elif main:
        from smolctl.dashboard import PlainSink

        sink = PlainSink()
    try:
        result = train(cfg, run_dir, resume=resume, log_file=log_file, sinks=[sink] if sink else [],
                       overwrite=overwrite, allow_config_change=allow_config_change)
    finally:
        if hasattr(sink, "close"):
            sink.close()
    if result.stopped_by:
        if main:
            again = f" --num-processes {world}" if world > 1 else ""
            print(f"Stopped at step {result.step}. Continue with:\n  smolctl resume{again} --run-dir {run_dir} "
                  f"--from {result.step}", file=sys.stderr)
        raise typer.Exit(130 if result.stopped_by == "SIGINT" else 143)


def _preflight(cfg, run_dir: Path, resume: str | None, overwrite: bool, world: int,
               allow_config_change: bool) -> None:
    """Once, before starting N processes: the checks that would otherwise fail in all of them."""
    import torch

    from smolctl import checkpoint as ckpt_io
    from smolctl.data import DataSpec
    from smolctl.train import data_flags, resume_point

    cfg = cfg.resolved()
    gpus = torch.cuda.device_count() if cfg.device != "cpu" else 0
    if gpus and world > gpus:
        raise SmolctlError(f"--num-processes {world} but this machine has {gpus} GPU(s)",
                           hint=f"Run one process per GPU: --num-processes {gpus}")
    DataSpec.parse(cfg.data, cfg.text_column, flags=data_flags(run_dir, resume, "data"))
    if resume is not None:
        ckpt_io.recover(run_dir)
    resume_point(cfg, run_dir, resume, overwrite, world, say=lambda _: None, allow_config_change=allow_config_change)


def _launch(n: int) -> None:
    """Run this same command line again in `n` processes on this machine, through torchrun (the
    launcher `accelerate launch` itself uses for multi-process jobs), and exit with their status.

    In-process rather than exec'ing `torchrun`, so that a failure ends in one line and an exit
    code instead of the launcher's traceback. Each worker prints its own errors; Ctrl-C/SIGTERM
    reach them through the launcher (one signal each): they finish the step, save and stop.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = _without_option(sys.argv[1:], "--num-processes")
    # torchrun would set 1 thread per process (and print a banner saying so); split the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    for name in list(logging.root.manager.loggerDict):  # we report failures; torch's loggers set their own levels
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={n}", "--module", "smolctl", *args]))
    except ChildFailedError as e:
        rank, failure = min(e.failures.items(), key=lambda kv: kv[1].timestamp)
        if failure.exitcode > 0:  # the process said why itself
            raise typer.Exit(failure.exitcode) from None
        import signal

        name = signal.Signals(-failure.exitcode).name
        print(f"Error: process {rank} of {n} was killed by {name}; "
              f"continue with: smolctl resume --num-processes {n} --from latest", file=sys.stderr)
        raise typer.Exit(128 - failure.exitcode) from None
    except SignalException as e:  # the workers were stopped with the same signal and have saved
        raise typer.Exit(128 + int(e.sigval)) from None


def _without_option(argv: list[str], name: str) -> list[str]:
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
