"""`smolctl train` and `smolctl resume`.

    smolctl train --max-steps 5000                          # SmolLM2-135M on cosmopedia-v2 (hub)
    smolctl train --preset tiny --data sample --max-steps 300 --batch-size 8 --seq-len 256
    smolctl train --config examples/tiny.yaml --lr 1e-3     # flags override the file
    smolctl resume --from 500                               # the newest run under runs/
    smolctl resume --run-dir runs/demo --from latest --max-steps 8000
    smolctl train --num-processes 2 ...                     # N processes on this machine (torchrun)
    accelerate launch --config_file examples/accelerate/multi-gpu.yaml -m smolctl train ...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from smolctl.cli.options import ConfigOpt, DeviceOpt, PresetOpt
from smolctl.cli.registry import command, crash_reports_in
from smolctl.errors import SmolctlError

RUNS = Path("runs")


def opt(*names: str, help: str, **kw):
    return typer.Option(*names, help=help, show_default=False, **kw)


DataOpt = Annotated[Optional[str], opt("--data", help="'sample' (bundled corpus), 'cosmopedia-v2' (default, "
                                       "the hub stream), a hub dataset id, or local .jsonl/.json/.parquet/.txt "
                                       "files: a path, directory or glob.")]
MaxStepsOpt = Annotated[Optional[int], opt("--max-steps", help="Optimizer steps to train to (default 5000).")]
SaveEveryOpt = Annotated[Optional[int], opt("--save-every", help="Checkpoint every N steps (default 500).")]
EvalEveryOpt = Annotated[Optional[int], opt("--eval-every", help="Held-out loss every N steps (0: at the end).")]
SampleEveryOpt = Annotated[Optional[int], opt("--sample-every", help="Generate from a fixed prompt every N steps.")]
LogEveryOpt = Annotated[Optional[int], opt("--log-every", help="Log every N steps (default 10).")]
KeepLastOpt = Annotated[Optional[int], opt("--keep-last", help="Keep only the newest N step checkpoints.")]
WorkersOpt = Annotated[Optional[int], opt("--num-workers", help="0: tokenize in the training process; "
                                          "1 (default): in a background worker.")]
ReportOpt = Annotated[Optional[str], opt("--report-to", help="tensorboard, wandb or none.")]
RunDirOpt = Annotated[Optional[Path], opt("--run-dir", help="The run directory (default runs/<run-name>).")]
LogFileOpt = Annotated[Optional[Path], opt("--log-file", help="The human-readable log (default logs/<run-name>.log).")]
BadStepsOpt = Annotated[Optional[int], opt("--max-bad-steps", help="Stop after N non-finite (NaN/inf) steps in "
                                           "a row; each is skipped, with no update (default 10).")]
NumProcOpt = Annotated[Optional[int], opt("--num-processes", help="Train in N processes on this machine (DDP: "
                                          "one per GPU, or CPU processes over gloo), started through torchrun. "
                                          "For multi-node or FSDP use accelerate launch.")]
DashOpt = Annotated[bool, typer.Option("--dashboard/--no-dashboard",
                                       help="Live dashboard on a terminal; plain lines otherwise.")]

# The flags `resume` accepts: they change bookkeeping, not the trajectory (max_steps extends it).
RESUMABLE = ("max_steps", "save_every", "eval_every", "sample_every", "log_every", "keep_last",
             "num_workers", "report_to", "max_bad_steps")


def register(app: typer.Typer) -> None:
    @command(app, help="Pretrain a model from scratch (on the seed's cosmopedia-v2 stream by default).")
    def train(
        preset: PresetOpt = None,
        config: ConfigOpt = None,
        data: DataOpt = None,
        text_column: Annotated[Optional[str], opt("--text-column", help="The text column (default text).")] = None,
        eval_data: Annotated[Optional[str], opt("--eval-data", help="Held-out data for --eval-every "
                                                "(default: the sample's held-out split with --data sample).")] = None,
        batch_size: Annotated[Optional[int], opt("--batch-size", help="Micro-batch per device (default 8).")] = None,
        seq_len: Annotated[Optional[int], opt("--seq-len", help="Tokens per sequence (default: the model's "
                                              "context, 2048 for SmolLM2-135M).")] = None,
        grad_accum: Annotated[Optional[int], opt("--grad-accum", help="Micro-batches per step (default 1).")] = None,
        lr: Annotated[Optional[float], opt("--lr", help="Peak learning rate (default 3e-3).")] = None,
        schedule: Annotated[Optional[str], opt("--schedule", help="wsd (default) or cosine.")] = None,
        warmup_steps: Annotated[Optional[int], opt("--warmup-steps", help="Default: 2% of --max-steps, "
                                                   "at most 2000.")] = None,
        mixed_precision: Annotated[Optional[str], opt("--mixed-precision", help="no, bf16, fp16 or auto "
                                                      "(default: accelerate launch's setting, else bf16 on GPUs "
                                                      "that support it).")] = None,
        max_steps: MaxStepsOpt = None,
        save_every: SaveEveryOpt = None,
        eval_every: EvalEveryOpt = None,
        sample_every: SampleEveryOpt = None,
        log_every: LogEveryOpt = None,
        keep_last: KeepLastOpt = None,
        shuffle_buffer: Annotated[Optional[int], opt("--shuffle-buffer", help="Shuffle blocks through a "
                                                     "buffer of N (default 0: stream order).")] = None,
        num_workers: WorkersOpt = None,
        max_bad_steps: BadStepsOpt = None,
        num_processes: NumProcOpt = None,
        compile: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the model.",
                                                        show_default=False)] = None,
        seed: Annotated[Optional[int], opt("--seed", help="Random seed (default 42).")] = None,
        device: DeviceOpt = None,
        report_to: ReportOpt = None,
        peak_tflops: Annotated[Optional[float], opt("--peak-tflops", help="The device's peak TFLOP/s for MFU "
                                                    "(known GPUs are looked up).")] = None,
        run_name: Annotated[Optional[str], opt("--run-name", help="Default: <preset>-<date>-<time>.")] = None,
        run_dir: RunDirOpt = None,
        log_file: LogFileOpt = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Start over in a run directory "
                                                "that has checkpoints.")] = False,
        dashboard: DashOpt = True,
    ) -> None:
        from smolctl.config import TrainConfig

        flags = {k: v for k, v in locals().items() if v is not None and k in TrainConfig.__dataclass_fields__}
        cfg = TrainConfig.from_file(config) if config else TrainConfig()
        cfg = _with(cfg, flags)
        if run_name is not None and (Path(run_name).name != run_name or run_name in (".", "..")):
            raise SmolctlError(f"--run-name {run_name!r} is not a plain name (it would be written outside runs/)",
                               hint="Use a name without '/' or '..', or --run-dir for a path")
        name = run_name or (run_dir.name if run_dir else f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        _run(cfg, run_dir or RUNS / name, None, log_file, overwrite, dashboard, num_processes)

    @command(app, help="Continue a run from one of its checkpoints, exactly where it stopped.")
    def resume(
        from_: Annotated[str, typer.Option("--from", help="A step number, 'latest', or a checkpoint path.")] = "latest",
        run_dir: RunDirOpt = None,
        max_steps: MaxStepsOpt = None,
        save_every: SaveEveryOpt = None,
        eval_every: EvalEveryOpt = None,
        sample_every: SampleEveryOpt = None,
        log_every: LogEveryOpt = None,
        keep_last: KeepLastOpt = None,
        num_workers: WorkersOpt = None,
        max_bad_steps: BadStepsOpt = None,
        report_to: ReportOpt = None,
        log_file: LogFileOpt = None,
        num_processes: NumProcOpt = None,
        dashboard: DashOpt = True,
    ) -> None:
        from smolctl.config import TrainConfig

        if run_dir is None and Path(from_).is_dir() and Path(from_).parent.name == "checkpoints":
            run_dir = Path(from_).parent.parent
        run_dir = run_dir or _newest_run()
        if not (run_dir / "config.yaml").is_file():
            raise SmolctlError(f"{run_dir} is not a smolctl run directory (no config.yaml)",
                               hint="Pass --run-dir of a run started with smolctl train")
        cfg = TrainConfig.from_file(run_dir / "config.yaml")
        flags = {k: v for k, v in locals().items() if v is not None and k in RESUMABLE}
        _run(_with(cfg, flags), run_dir, from_, log_file, False, dashboard, num_processes)


def _with(cfg, flags: dict):
    import dataclasses

    return dataclasses.replace(cfg, **flags)


def _newest_run() -> Path:
    runs = [p for p in RUNS.glob("*") if (p / "config.yaml").is_file()]
    if not runs:
        raise SmolctlError(f"no runs under {RUNS}/", hint="Pass --run-dir, or start one with smolctl train")
    return max(runs, key=lambda p: (p / "config.yaml").stat().st_mtime)


def _run(cfg, run_dir: Path, resume: str | None, log_file: Path | None, overwrite: bool, dashboard: bool,
         num_processes: int | None = None) -> None:
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
            _preflight(cfg, run_dir, resume, overwrite, num_processes)
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
        result = train(cfg, run_dir, resume=resume, log_file=log_file, sinks=[sink] if sink else [], overwrite=overwrite)
    finally:
        if hasattr(sink, "close"):
            sink.close()
    if result.stopped_by:
        if main:
            again = f" --num-processes {world}" if world > 1 else ""
            print(f"Stopped at step {result.step}. Continue with:\n  smolctl resume{again} --run-dir {run_dir} "
                  f"--from {result.step}", file=sys.stderr)
        raise typer.Exit(130 if result.stopped_by == "SIGINT" else 143)


def _preflight(cfg, run_dir: Path, resume: str | None, overwrite: bool, world: int) -> None:
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
    resume_point(cfg, run_dir, resume, overwrite, world, say=lambda _: None)


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
