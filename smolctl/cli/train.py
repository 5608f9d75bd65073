"""`smolctl train` and `smolctl resume`.

    smolctl train --max-steps 5000                          # SmolLM2-135M on cosmopedia-v2 (hub)
    smolctl train --preset tiny --data sample --max-steps 300 --batch-size 8 --seq-len 256
    smolctl train --config examples/tiny.yaml --lr 1e-3     # flags override the file
    smolctl train --init-from smollm2-instruct --data sample --seq-len 256   # continued pretraining
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
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from smolctl.cli.options import ConfigOpt, VerboseOpt, config_options
from smolctl.cli.registry import command, crash_reports_in
from smolctl.config import DEFAULT_PRESET, RESUMABLE, TrainConfig
from smolctl.errors import SmolctlError, note

RUNS = Path("runs")
# Every TrainConfig field is a `train` flag (the model's own fields go in a --config file).
TRAIN_FLAGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["cli"])


def opt(*names: str, help: str, **kw):
    return typer.Option(*names, help=help, show_default=False, **kw)


RunDirOpt = Annotated[Optional[Path], opt("--run-dir", help="The run directory (default runs/<run-name>).")]
LogFileOpt = Annotated[Optional[Path], opt("--log-file", help="The human-readable log (default <run-dir>/train.log).")]
NumProcOpt = Annotated[Optional[int], opt("--num-processes", help="Train in N processes on this machine (DDP: "
                                          "one per GPU, or CPU processes over gloo), started through torchrun. "
                                          "For multi-node or FSDP use accelerate launch.")]
DashOpt = Annotated[bool, typer.Option("--dashboard/--no-dashboard",
                                       help="Live dashboard on a terminal; plain lines otherwise.")]


def register(app: typer.Typer) -> None:
    @command(app, help="Pretrain a model from scratch, or from a model's weights with --init-from (on the "
             "seed's cosmopedia-v2 stream by default).")
    @config_options(TrainConfig, TRAIN_FLAGS)
    def train(
        config: ConfigOpt = None,
        num_processes: NumProcOpt = None,
        run_name: Annotated[Optional[str], opt("--run-name", help="Default: <preset>-<date>-<time>.")] = None,
        run_dir: RunDirOpt = None,
        log_file: LogFileOpt = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in a run directory "
                                                "that has checkpoints.")] = False,
        resume: Annotated[Optional[str], opt("--resume", help="auto: continue the run in --run-dir from its "
                                             "newest good checkpoint if it has one and the same config, else "
                                             "start it (for jobs that torchrun --max-restarts or a scheduler "
                                             "starts again).")] = None,
        dashboard: DashOpt = True,
        verbose: VerboseOpt = False,
        **flags,
    ) -> None:
        cfg = (TrainConfig.from_file(config) if config else TrainConfig()).with_flags(flags)
        if resume not in (None, "auto"):
            raise SmolctlError(f"--resume {resume!r}: the only value is auto",
                               hint="To resume from a given checkpoint: smolctl resume --run-dir DIR --from STEP")
        if resume and run_name is None and run_dir is None:
            raise SmolctlError("--resume auto needs --run-dir or --run-name",
                               hint="The default run name has the time in it: a restart would start a new run")
        if run_name is not None and (Path(run_name).name != run_name or run_name in (".", "..")):
            raise SmolctlError(f"--run-name {run_name!r} is not a plain name (it would be written outside runs/)",
                               hint="Use a name without '/' or '..', or --run-dir for a path")
        model_name = cfg.preset or (Path(cfg.init_from).name if cfg.init_from else DEFAULT_PRESET)
        name = run_name or (run_dir.name if run_dir else f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}")
        _run(cfg, run_dir or RUNS / name, resume, log_file, overwrite, dashboard, num_processes, verbose=verbose)

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
        verbose: VerboseOpt = False,
        **flags,
    ) -> None:
        if run_dir is None and Path(from_).is_dir() and Path(from_).parent.name == "checkpoints":
            run_dir = Path(from_).parent.parent
        run_dir = run_dir or _newest_run()
        if not (run_dir / "config.yaml").is_file():
            raise SmolctlError(f"{run_dir} is not a smolctl run directory (no config.yaml)",
                               hint="Pass --run-dir of a run started with smolctl train")
        cfg = TrainConfig.from_file(run_dir / "config.yaml").with_flags(flags)
        _run(cfg, run_dir, from_, log_file, False, dashboard, num_processes, allow_config_change, verbose)


def _newest_run() -> Path:
    runs = [p for p in RUNS.glob("*") if (p / "config.yaml").is_file()]
    if not runs:
        raise SmolctlError(f"no runs under {RUNS}/", hint="Pass --run-dir, or start one with smolctl train")
    return max(runs, key=lambda p: (p / "config.yaml").stat().st_mtime)


def _run(cfg, run_dir: Path, resume: str | None, log_file: Path | None, overwrite: bool, dashboard: bool,
         num_processes: int | None = None, allow_config_change: bool = False, verbose: bool = False) -> None:
    from smolctl.distributed import PeerFailed, continue_command, place
    from smolctl.launch import LAUNCHED_BY_SMOLCTL, launch, preflight, without_option
    from smolctl.train import train

    crash_reports_in(run_dir)
    where = place()  # set by torchrun / accelerate launch / a scheduler
    if num_processes is not None:
        if num_processes < 1:
            raise SmolctlError(f"--num-processes must be positive, got {num_processes}")
        if where.world > 1 and num_processes != where.world:
            raise SmolctlError(f"--num-processes {num_processes} inside a launcher that started {where.world}",
                               hint="Leave --num-processes out under torchrun / accelerate launch")
        if where.world == 1 and num_processes > 1:
            with _complete_is_done(main=True):
                mixed = preflight(cfg, run_dir, resume, overwrite, num_processes, allow_config_change)
            raise typer.Exit(launch(num_processes, without_option(sys.argv[1:], "--num-processes"), run_dir, mixed))
    main = where.rank == 0  # the dashboard and messages come from rank 0 only
    sink = None
    if main and dashboard and sys.stdout.isatty():
        from smolctl.dashboard import Dashboard

        sink = Dashboard()
    elif main:
        from smolctl.dashboard import PlainSink

        sink = PlainSink()
    try:
        with _complete_is_done(main):
            result = train(cfg, run_dir, resume=resume, log_file=log_file, sinks=[sink] if sink else [],
                           overwrite=overwrite, allow_config_change=allow_config_change,
                           say=note if verbose and main else None)
    except PeerFailed as e:
        # The process that failed says why, and a launcher names one that was killed: only rank 0
        # speaks for the others, and only under a launcher that does not (accelerate launch, torchrun).
        if main and not os.environ.get(LAUNCHED_BY_SMOLCTL):
            raise
        raise typer.Exit(e.exit_code) from None
    finally:
        if hasattr(sink, "close"):
            sink.close()
    if result.stopped_by:
        if main:
            print(f"Stopped at step {result.step}. Continue with:\n  "
                  f"{continue_command(run_dir, where.world, result.step)}", file=sys.stderr)
        raise typer.Exit(130 if result.stopped_by == "SIGINT" else 143)


@contextmanager
def _complete_is_done(main: bool):
    """A run already at its last step (a job requeued or restarted after its final save): say so
    (once) and exit 0."""
    from smolctl.rundir import RunComplete

    try:
        yield
    except RunComplete as e:
        if main:
            print(e)
        raise typer.Exit(0) from None
