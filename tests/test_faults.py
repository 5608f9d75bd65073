"""Faults: SIGKILL anywhere, torn writes, damaged checkpoints, full disks, NaN steps.

The kill test runs each training attempt in a process forked from a forkserver that has already
imported torch and transformers (an attempt then starts in about a second instead of five), runs
the real CLI in it, and SIGKILLs it: either from outside at a random moment, or from inside at an
exact point of a save (a torn file write, before/after the rename into place, a torn
metrics.jsonl line). SMOLCTL_FAULT_SEED picks other kill points.
"""

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from conftest import MICRO, kill_tree, write_corpus
from smolctl import checkpoint as ckpt_io

STEPS, SAVE_EVERY = 32, 2


def _attempt(cwd: str, argv: list[str], fault: tuple | None, out: str) -> None:
    """One training attempt in a forked child: the CLI, with an optional self-inflicted SIGKILL."""
    os.chdir(cwd)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(1)  # the same in every attempt and in the reference run
    if fault:
        _arm(fault)
    from smolctl.cli import app

    try:
        app(args=argv, prog_name="smolctl")
    except SystemExit as e:
        os._exit(e.code if isinstance(e.code, int) else 1)
    os._exit(0)


def _die(where: str) -> None:
    import psutil

    with open("kills.log", "a") as f:
        f.write(where + "\n")
    for child in psutil.Process().children(recursive=True):  # the DataLoader worker
        child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(fault: tuple) -> None:
    """Patch a SIGKILL into this process at an exact point (module attributes: train.py looks
    them up through the module at each call)."""
    from smolctl import checkpoint as ck
    from smolctl import metrics

    kind, n, frac = fault
    count = [0]
    if kind == "write":  # the n-th checkpoint file write stops after `frac` of its bytes
        real_write = ck.write_file

        def write_file(path, data):
            count[0] += 1
            if count[0] == n:
                with open(path, "wb") as f:
                    f.write(data[:int(len(data) * frac)])
                _die(f"torn write of {path.parent.name}/{path.name} at {frac:.0%}")
            real_write(path, data)

        ck.write_file = write_file
    elif kind in ("before-rename", "after-rename"):  # the n-th save, just before/after its rename into place
        real_finalize = ck.finalize

        def finalize(tmp, final):
            count[0] += 1
            if count[0] == n and kind == "before-rename":
                _die(f"{final.name}: staged, manifest not yet written")
            real_finalize(tmp, final)
            if count[0] == n:
                _die(f"{final.name}: renamed into place, not yet announced")

        ck.finalize = finalize
    elif kind == "torn-metrics":  # the n-th metrics.jsonl row is cut short
        real_call = metrics.JsonlSink.__call__

        def call(self, e):
            count[0] += 1
            if count[0] == n:
                line = json.dumps(e)
                self.f.write(line[:int(len(line) * frac)])
                self.f.flush()
                _die(f"torn metrics.jsonl row ({e['event']} at step {e.get('step')})")
            real_call(self, e)

        metrics.JsonlSink.__call__ = call


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([
        "torch", "transformers", "datasets", "accelerate", "psutil", "matplotlib.pyplot",
        "transformers.models.llama.modeling_llama", "torch.distributed.checkpoint.state_dict",
        "datasets.packaged_modules.json.json", "smolctl.cli", "smolctl.train", "smolctl.model",
        "smolctl.tokenizer", "smolctl.dashboard"])
    return ctx


def rows(metrics: Path) -> list[dict]:
    """metrics.jsonl's rows; every line must parse."""
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def complete_rows(metrics: Path) -> list[dict]:
    """The rows of a file that a live (or killed) process may be writing: a torn last line is left out."""
    if not metrics.exists():
        return []
    return [json.loads(x) for x in metrics.read_text().splitlines() if x.endswith("}")]


def train_rows(metrics: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r["tokens_seen"])
            for r in rows(metrics) if r["event"] == "train"]


def log_steps(log: Path) -> list[int]:
    return [int(line.split(" step ")[1].split("/")[0]) for line in log.read_text().splitlines()
            if " step " in line and "/" in line.split(" step ")[1][:12]]


def fault_plan(rng: random.Random) -> list[tuple]:
    """(kind, n, fraction): killed from outside at a random moment after this attempt's first
    logged step ("time") or as soon as it announces a save ("after-save"); or from inside at the
    n-th checkpoint file write (cut at `fraction` of its bytes), just before / just after the n-th
    save's rename into place, or in the middle of the n-th metrics.jsonl row."""
    plan = [("time", 0, 0), ("after-save", 0, 0)] * 4
    plan += [("write", rng.randint(1, 12), rng.random()) for _ in range(8)]
    plan += [(kind, rng.randint(1, 2), 0) for kind in ("before-rename", "after-rename") for _ in range(3)]
    plan += [("torn-metrics", rng.randint(2, 6), rng.uniform(0.1, 0.9)) for _ in range(3)]
    rng.shuffle(plan)
    return plan


def test_kill_anywhere_then_resume_is_exact(tmp_path, forkserver):
    """SIGKILL at ~25 points, `resume --from latest` after each (or `train` again when no
    checkpoint exists yet): metrics.jsonl and the log hold each step once, with the uninterrupted
    run's values bit for bit, and the final weights are identical."""
    rng = random.Random(int(os.environ.get("SMOLCTL_FAULT_SEED", "0")))
    write_corpus(tmp_path / "corpus.jsonl", n_docs=40)
    model = ", ".join(f"{k}: {v}" for k, v in MICRO.items())
    (tmp_path / "micro.yaml").write_text(
        f"model: {{preset: tiny, {model}}}\ndata: corpus.jsonl\nbatch_size: 2\nseq_len: 16\nmixed_precision: 'no'\n"
        f"device: cpu\nlog_every: 1\nsave_every: {SAVE_EVERY}\nmax_steps: {STEPS}\nlr: 0.01\nshuffle_buffer: 4\n")
    train_args = ["train", "--config", "micro.yaml", "--no-dashboard"]

    def attempt(run: str, argv: list[str], fault=None):
        p = forkserver.Process(target=_attempt, args=(str(tmp_path), argv + ["--run-dir", run], fault,
                                                      str(tmp_path / f"{run}.out")))
        p.start()
        return p

    ref = attempt("straight", train_args)
    ref.join(300)
    assert ref.exitcode == 0, (tmp_path / "straight.out").read_text()

    metrics, kills, plan = tmp_path / "run" / "metrics.jsonl", [], fault_plan(rng)
    for i in range(len(plan) + 1):
        fault = plan[i] if i < len(plan) else None  # the last attempt runs to the end
        argv = ["resume", "--from", "latest", "--no-dashboard"] if ckpt_io.checkpoints(tmp_path / "run") else train_args
        argv += ["--num-workers", str(i % 2)]  # a background data worker or not: no difference allowed
        armed = fault if fault and fault[0] not in ("time", "after-save") else None
        began = time.time()
        p = attempt("run", argv, armed)
        if fault and not armed:  # from outside, watching this attempt's rows
            while p.is_alive() and time.time() < began + 120:
                mine = [r for r in complete_rows(metrics) if r["time"] >= began - 0.01]
                if fault[0] == "after-save" and any(r["event"] == "checkpoint" for r in mine):
                    break
                if fault[0] == "time" and any(r["event"] == "train" for r in mine):
                    time.sleep(rng.uniform(0, 1.0))
                    break
                time.sleep(0.002)
            kill_tree(p.pid)
        p.join(300)
        if p.exitcode == 0:
            break
        assert p.exitcode == -signal.SIGKILL, (p.exitcode, (tmp_path / "run.out").read_text()[-3000:])
        last = max([r["step"] for r in complete_rows(metrics) if r["event"] == "train"], default=0)
        where = (tmp_path / "kills.log").read_text().splitlines()[-1] if armed else fault[0]
        kills.append(f"{where} (last step logged: {last})")
    print(f"\n{len(kills)} kills:\n  " + "\n  ".join(kills))
    assert p.exitcode == 0 and len(kills) >= 20
    assert train_rows(metrics) == train_rows(tmp_path / "straight" / "metrics.jsonl")
    assert [r[0] for r in train_rows(metrics)] == list(range(1, STEPS + 1))
    assert log_steps(tmp_path / "logs" / "run.log") == list(range(1, STEPS + 1))
    final = [(tmp_path / r / "checkpoints" / "final" / "model.safetensors").read_bytes() for r in ("run", "straight")]
    assert final[0] == final[1]
