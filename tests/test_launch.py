"""How a process finds its place in a job (distributed.py) and how the launcher reads a failure
(launch.py), in-process and in milliseconds. The jobs themselves run in test_distributed.py."""

import signal
import time

import pytest
import torch

from smolctl.checkpoint import resume_command
from smolctl.device import for_process
from smolctl.distributed import PEER_FAILED_EXIT, Place, place
from smolctl.errors import SmolctlError
from smolctl.launch import _consequence, without_option

LAUNCH_ENV = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without a GPU does")


@pytest.fixture
def launched(monkeypatch):
    """Set the launcher's variables (all of LAUNCH_ENV, overridden by keyword; None removes one)."""
    def set_env(**kw):
        for k, v in {**LAUNCH_ENV, **kw}.items():
            monkeypatch.delenv(k, raising=False) if v is None else monkeypatch.setenv(k, v)
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    return set_env


def test_place_reads_the_launchers_variables(launched):
    assert place() == Place(0, 0, 1)  # no launcher: one process
    launched()
    assert place() == Place(rank=1, local_rank=1, world=2)
    launched(WORLD_SIZE="1", MASTER_ADDR=None)
    assert place() == Place(0, 0, 1)


@pytest.mark.parametrize("env, words", [
    (dict(MASTER_ADDR=None, MASTER_PORT=None), "MASTER_ADDR, MASTER_PORT are not set"),
    (dict(RANK=None), "RANK is not set"),
    (dict(RANK="2"), "RANK=2 / LOCAL_RANK=1 do not fit WORLD_SIZE=2"),
    (dict(RANK="0"), "RANK=0 / LOCAL_RANK=1 do not fit WORLD_SIZE=2"),
    (dict(WORLD_SIZE="two"), "WORLD_SIZE='two' is not a number"),
])
def test_a_launch_that_cannot_form_its_job_is_refused(launched, env, words):
    launched(**env)
    with pytest.raises(SmolctlError, match=words) as e:
        place()
    assert "torchrun or accelerate launch" in str(e.value)


def test_a_half_launched_job_fails_at_once_writing_nothing(launched, cli, corpus, tmp_path):
    """WORLD_SIZE=2 set by hand (or a scheduler) without the rest: one line, exit 2, no run
    directory and no log -- not a world of one training alone on a run directory it shares."""
    launched(MASTER_ADDR=None, MASTER_PORT=None)
    for command in (["train", "--preset", "tiny", "--data", corpus, "--max-steps", 2, "--run-dir", "half"],
                    ["train", "--num-processes", 2, "--data", corpus, "--run-dir", "half"]):
        r = cli(*command)
        assert r.exit_code == 2 and r.output.startswith("Error: WORLD_SIZE=2 says") and r.output.count("\n") == 1
    assert not (tmp_path / "half").exists() and not (tmp_path / "logs").exists()


@no_gpu
def test_the_default_device_is_the_cpu_for_one_process_or_many():
    for where in (Place(0, 0, 1), Place(0, 0, 2), Place(3, 1, 4)):
        assert for_process(None, where) == torch.device("cpu")
        assert for_process("cpu", where) == torch.device("cpu")
        assert for_process("auto", where) == torch.device("cpu")  # README: --device takes auto


@pytest.mark.parametrize("device, where, words", [
    ("cuda:1", Place(0, 0, 2), "would put all 2 processes on one GPU"),
    ("gpu", Place(0, 0, 1), "--device 'gpu' is not a device"),
    ("meta", Place(0, 0, 1), "--device 'meta' is not a device"),
])
def test_devices_a_job_cannot_use_are_refused(device, where, words):
    with pytest.raises(SmolctlError, match=words):
        for_process(device, where)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks what a machine without MPS does")
def test_mps_without_mps_is_refused():
    with pytest.raises(SmolctlError, match="--device mps: Apple's MPS is not available here"):
        for_process("mps", Place(0, 0, 1))


@no_gpu
def test_cuda_without_a_gpu_is_refused():
    for where in (Place(0, 0, 1), Place(1, 1, 2)):
        with pytest.raises(SmolctlError, match="--device cuda: (this torch is built without CUDA|no CUDA GPU is visible)"):
            for_process("cuda", where)


def test_the_launcher_reports_the_cause_not_the_consequences():
    """Timestamps have whole seconds: a rank's own error outranks a kill, which outranks a rank
    that a SIGTERM stopped (143: it saved and said so, or was quiet), the launcher's own SIGTERM
    to the survivors and a survivor's broken collective."""
    codes = [PEER_FAILED_EXIT, -signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGKILL, 2]
    assert sorted(codes, key=_consequence) == [2, -signal.SIGKILL, 128 + signal.SIGTERM, -signal.SIGTERM,
                                               PEER_FAILED_EXIT]


@pytest.mark.parametrize("launched_by_smolctl", [False, True])
def test_a_rank_stopped_by_its_launcher_leaves_the_words_to_it(monkeypatch, launched_by_smolctl):
    """SIGTERM outside the training loop (setup, or unwinding after a peer died) ends a command
    with 143. Alone it says so; as a rank of `--num-processes` it is quiet: the launcher sent that
    signal because another rank failed, and names that one (seen in CI: `Stopped by SIGTERM.` from
    the survivor, in place of the launcher's line about the rank that was killed)."""
    import os

    import typer
    from typer.testing import CliRunner

    from smolctl.cli import registry
    from smolctl.launch import LAUNCHED_BY_SMOLCTL

    if launched_by_smolctl:
        monkeypatch.setenv(LAUNCHED_BY_SMOLCTL, "1")
    else:
        monkeypatch.delenv(LAUNCHED_BY_SMOLCTL, raising=False)
    app = typer.Typer()

    @registry.command(app)
    def setup():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at once

    r = CliRunner().invoke(app, [])
    assert r.exit_code == 128 + signal.SIGTERM
    assert r.output == ("" if launched_by_smolctl else "Stopped by SIGTERM.\n")


def test_resume_command_and_argv_surgery(tmp_path):
    assert resume_command(tmp_path / "r", 1, 7) == f"smolctl resume --run-dir {tmp_path / 'r'} --from 7"
    assert resume_command("runs/x", 4) == "smolctl resume --num-processes 4 --run-dir runs/x --from latest"
    argv = ["train", "--num-processes", "2", "--data", "d", "--num-processes=3", "--num-processes-x", "1"]
    assert without_option(argv, "--num-processes") == ["train", "--data", "d", "--num-processes-x", "1"]


def test_a_process_that_cannot_join_its_job_says_so_in_one_line(tmp_path, corpus):
    """Rank 0 of 2 told a MASTER_PORT that is taken: one line naming the address, exit 2, nothing
    written. (A subprocess: a failed rendezvous leaves Accelerate's process-wide state half set.)"""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, **LAUNCH_ENV, "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": str(port),
               "CUDA_VISIBLE_DEVICES": ""}
        r = subprocess.run([sys.executable, "-m", "smolctl", "train", "--preset", "tiny", "--data", str(corpus),
                            "--max-steps", "2", "--run-dir", "joined"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"Error: process 0 of 2 could not join the job at 127.0.0.1:{port}: ")
    assert "address already in use" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "joined").exists() and not (tmp_path / "logs").exists()


# -- train --resume auto: what a restarted or requeued job runs again ----------------------------

def test_resume_auto_starts_continues_and_refuses_another_config(cli, tmp_path, corpus):
    """The same `train --resume auto` command: in a new run directory it starts the run; after a
    crash (the checkpoints after step 4 lost) it continues from the newest good one and ends with
    the uninterrupted run's losses; once the run is complete it has nothing to do (exit 0). Under
    another config it refuses in one line naming the keys that differ, and changes nothing."""
    import json
    import shutil

    from conftest import MICRO

    (tmp_path / "micro.yaml").write_text(
        "model: {preset: tiny, " + ", ".join(f"{k}: {v}" for k, v in MICRO.items()) + "}\n"
        f"data: {corpus}\nbatch_size: 2\nseq_len: 16\nmixed_precision: 'no'\ndevice: cpu\nnum_workers: 0\n"
        "max_steps: 6\nsave_every: 2\nlog_every: 1\nlr: 0.01\n")
    command = ["train", "--config", "micro.yaml", "--run-dir", "auto", "--resume", "auto", "--no-dashboard"]
    metrics = tmp_path / "auto" / "metrics.jsonl"

    def losses():
        return [(e["step"], e["loss"]) for e in map(json.loads, metrics.read_text().splitlines()) if e["event"] == "train"]

    r = cli(*command)
    assert r.exit_code == 0 and r.output.startswith("Training: "), r.output
    straight = losses()
    for lost in ("final", "step-00000006"):  # what a crash during step 5 or 6 would not have written
        shutil.rmtree(tmp_path / "auto" / "checkpoints" / lost, ignore_errors=True)
    r = cli(*command)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("Resuming automatically from auto/checkpoints/step-00000004 (step 4): "), r.output
    assert losses() == straight and len(straight) == 6  # bit for bit, each step once
    r = cli(*command)
    assert (r.exit_code, r.output) == (0, "Run auto is complete at step 6. Pass --max-steps N (above 6) to extend it\n")
    before = sorted(p.name for p in (tmp_path / "auto" / "checkpoints").iterdir())
    r = cli(*command, "--lr", "0.02", "--max-steps", "8")
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("Error: --resume auto: auto holds a run with another config (lr: 0.01 -> 0.02; "
                               "max_steps: 6 -> 8). "), r.output
    assert sorted(p.name for p in (tmp_path / "auto" / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("args, words", [
    (["--resume", "latest", "--run-dir", "r"], "--resume 'latest': the only value is auto"),
    (["--resume", "auto"], "--resume auto needs --run-dir or --run-name"),
    (["--resume", "auto", "--run-dir", "r", "--overwrite"], "--resume auto continues the run in --run-dir, "
                                                             "--overwrite starts it over"),
])
def test_resume_auto_misused_is_refused(cli, tmp_path, corpus, args, words):
    r = cli("train", "--preset", "tiny", "--data", corpus, "--max-steps", 2, *args)
    assert r.exit_code == 2 and r.output.startswith(f"Error: {words}") and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()
