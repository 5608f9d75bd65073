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
from conftest import MICRO, kill_tree, tmpfs, write_corpus

from smolctl import checkpoint as ckpt_io
from smolctl import safetensors_io

STEPS, SAVE_EVERY = 64, 2


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Commands write runs/ under the working directory: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


def _attempt(cwd: str, argv: list[str], fault: tuple | None, out: str) -> None:
    """One training attempt in a forked child: the CLI, with an optional self-inflicted SIGKILL."""
    os.chdir(cwd)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # A child of the forkserver inherits its start method, and the DataLoader's worker would then
    # come from a fresh forkserver of its own, importing torch anew (~4 s an attempt). A `smolctl`
    # process has the platform's default (fork on Linux): so has the attempt.
    multiprocessing.set_start_method(None, force=True)
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
                whole = data if isinstance(data, bytes) else b"".join(bytes(chunk) for chunk in data)
                with open(path, "wb") as f:
                    f.write(whole[:int(len(whole) * frac)])
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
    """(kind, n, fraction): killed from outside at a random moment after this attempt's n-th
    logged step ("time") or as soon as it announces a save ("after-save"); or from inside at the
    n-th checkpoint file write (cut at `fraction` of its bytes), just before / just after the n-th
    save's rename into place, or in the middle of the n-th metrics.jsonl row. Counted in steps,
    not seconds, so that a fast machine doesn't finish the run before the plan is through."""
    plan = [("time", rng.randint(1, 3), 0) for _ in range(3)] + [("after-save", 0, 0)] * 2
    plan += [("write", rng.randint(1, 12), rng.random()) for _ in range(5)]  # 8 files per save
    plan += [(kind, rng.randint(1, 2), 0) for kind in ("before-rename", "after-rename") for _ in range(2)]
    plan += [("torn-metrics", rng.randint(2, 6), rng.uniform(0.1, 0.9)) for _ in range(2)]
    rng.shuffle(plan)
    return plan


@pytest.mark.heavy
def test_kill_anywhere_then_resume_is_exact(tmp_path, forkserver):
    """SIGKILL at ~16 points of every kind, `resume --from latest` after each (or `train` again
    when no checkpoint exists yet): metrics.jsonl and the log hold each step once, with the
    uninterrupted run's values bit for bit, and the final weights are identical."""
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
                if fault[0] == "time" and sum(r["event"] == "train" for r in mine) >= fault[1]:
                    time.sleep(rng.uniform(0, 0.05))  # somewhere in the next step or save
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
    assert p.exitcode == 0 and len(kills) >= 12
    assert train_rows(metrics) == train_rows(tmp_path / "straight" / "metrics.jsonl")
    assert [r[0] for r in train_rows(metrics)] == list(range(1, STEPS + 1))
    assert log_steps(tmp_path / "run" / "train.log") == list(range(1, STEPS + 1))
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))  # no staging leftovers
    final = [(tmp_path / r / "checkpoints" / "final" / "model.safetensors").read_bytes() for r in ("run", "straight")]
    assert final[0] == final[1]


# -- torn writes and interrupted renames, in isolation -------------------------------------------

def test_a_torn_last_metrics_row_is_dropped_when_resuming(tmp_path):
    from smolctl.metrics import truncate_after

    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"event": "train", "step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)]
    path.write_text("".join(good) + '{"event": "train", "st')  # killed in the middle of a row
    truncate_after(path, 3)
    assert path.read_text() == "".join(good)  # the next row starts on a line of its own
    truncate_after(path, 2)
    assert path.read_text() == "".join(good[:2])


def _extend_killed_between_renames(cwd: str, run: str, cfg) -> None:
    """In a forked child: extend the run, SIGKILL-like death (os._exit) between finalize's renames."""
    from smolctl import fsutil
    from smolctl.train import train

    os.chdir(cwd)
    real = os.replace

    def replace(src, dst):
        if Path(src).name == ".tmp-final":
            os._exit(137)  # nothing runs after this: no finally, no cleanup
        real(src, dst)

    fsutil.os.replace = replace
    train(cfg, Path(run), resume="latest")


def test_a_save_cut_between_its_two_renames_is_recovered(tmp_path, micro_cfg, cli, forkserver):
    """Replacing final/ takes two renames (old aside, new in). Killed between them, the run has
    no final/ but a finished `.tmp-final`: the next resume moves it into place and goes on."""
    from smolctl.train import train

    run = tmp_path / "run"
    train(micro_cfg(max_steps=4, save_every=100), run)  # final/ at step 4
    p = forkserver.Process(target=_extend_killed_between_renames,
                           args=(str(tmp_path), str(run), micro_cfg(max_steps=6, save_every=100)))
    p.start()
    p.join(120)
    assert p.exitcode == 137
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert "final" not in names and {".tmp-final", ".old-final"} <= names
    r = cli("resume", "--run-dir", run, "--from", "latest", "--max-steps", 8, "--no-dashboard")
    assert r.exit_code == 0, r.output
    assert "Recovered final" in r.output and "Resuming from" in r.output and "(step 6)" in r.output
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"final"}


# -- corruption ------------------------------------------------------------------------------------

CKPT_FILES = ["config.json", "model.safetensors", "smolctl.json", "optimizer.safetensors", "optimizer.json",
              "rng-rank0.json", "rng-rank0.safetensors", "data-rank0.json", "manifest.json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished micro run: step-00000003 and final/ (step 6)."""
    from smolctl.config import TrainConfig
    from smolctl.train import train

    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus.jsonl")
    cfg = TrainConfig(preset="tiny", model=dict(MICRO), data=str(corpus), batch_size=2, seq_len=16, max_steps=6,
                      save_every=3, log_every=1, mixed_precision="no", device="cpu", num_workers=0)
    train(cfg, root / "run", log_file=root / "run.log")
    return root / "run"


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x01  # one bit, mid-file
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()


def one_error_line(r) -> str:
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, r.output
    return lines[0]


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("name", CKPT_FILES)
def test_any_damaged_checkpoint_file_is_named(trained, tmp_path, cli, name, how):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run / "checkpoints" / "final" / name, how)
    r = cli("resume", "--run-dir", run, "--from", run / "checkpoints" / "final", "--max-steps", 8)
    assert r.exit_code == 2, r.output
    line = one_error_line(r)
    assert f"checkpoint file {run / 'checkpoints' / 'final' / name} is " in line and "--from latest" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["final", "step-00000003"]  # untouched


@pytest.mark.parametrize("name, how", [("model.safetensors", "flip"), ("manifest.json", "truncate"),
                                       ("rng-rank0.json", "flip"), ("optimizer.safetensors", "delete")])
def test_latest_skips_a_damaged_checkpoint_saying_so(trained, tmp_path, cli, name, how):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run / "checkpoints" / "step-00000003" / name, how)  # an explicit step is refused...
    r = cli("resume", "--run-dir", run, "--from", 3)
    assert r.exit_code == 2 and f"step-00000003/{name} is" in one_error_line(r)
    damage(run / "checkpoints" / "final" / name, how)  # ...and latest falls back past the damage
    shutil.rmtree(run / "checkpoints" / "step-00000003")
    shutil.copytree(trained / "checkpoints" / "step-00000003", run / "checkpoints" / "step-00000003")
    r = cli("resume", "--run-dir", run, "--from", "latest", "--no-dashboard")
    assert r.exit_code == 0, r.output
    assert f"Skipping damaged checkpoint: checkpoint file {run / 'checkpoints' / 'final' / name}" in r.output
    assert "step-00000003 (step 3)" in r.output and "Done: step 6" in r.output
    ckpt_io.verify(run / "checkpoints" / "final")


def test_every_checkpoint_damaged(trained, tmp_path, cli):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for ckpt in (run / "checkpoints").iterdir():
        damage(ckpt / "model.safetensors", "flip")
    r = cli("resume", "--run-dir", run, "--from", "latest")
    assert r.exit_code == 2 and "every checkpoint of" in one_error_line(r)


# -- full or failing disks -------------------------------------------------------------------------

def test_disk_full_during_a_save_is_one_line_and_the_previous_checkpoint_survives(trained, tmp_path, cli,
                                                                                  monkeypatch):
    """An ENOSPC injected into the second save's model file: exit 1, one line naming the file and
    the way on, no staging directory left, and the run continues from the previous checkpoint."""
    import errno
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    real, calls = safetensors_io.write_file, []

    def write_file(path, data):
        calls.append(path.name)
        if path.name == "model.safetensors" and calls.count("model.safetensors") == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(safetensors_io, "write_file", write_file)
    r = cli("resume", "--run-dir", run, "--from", 3, "--save-every", 1, "--no-dashboard")  # saves 4, then 5 fails
    assert r.exit_code == 1, r.output
    line = one_error_line(r)
    assert "could not save checkpoint" in line and "step-00000005: No space left on device" in line
    assert "model.safetensors" in line and "smolctl resume --run-dir" in line and "--from latest" in line, line
    assert not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(safetensors_io, "write_file", real)
    assert ckpt_io.find_checkpoint(run, "latest").name == "step-00000004"
    r = cli("resume", "--run-dir", run, "--from", "latest", "--no-dashboard")
    assert r.exit_code == 0 and "Done: step 6" in r.output


def test_a_real_write_limit_during_a_save(trained, tmp_path):
    """The same through the kernel, no root needed: RLIMIT_FSIZE (with SIGXFSZ ignored) makes a
    write past 8 MB fail with EFBIG, as a full disk fails with ENOSPC. The optimizer file of the
    micro model is 12.7 MB, so the next save fails; final/ (step 6) must stay usable."""
    import resource
    import shutil
    import subprocess
    import sys

    run = tmp_path / "run"
    shutil.copytree(trained, run)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))

    r = subprocess.run([sys.executable, "-m", "smolctl", "resume", "--run-dir", str(run), "--max-steps", "9",
                        "--save-every", "100", "--no-dashboard"], cwd=tmp_path, preexec_fn=limit,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("Error: ") == 1
    assert "could not save checkpoint" in r.stderr and "File too large" in r.stderr
    assert not list((run / "checkpoints").glob(".tmp-*"))
    assert ckpt_io.find_checkpoint(run, "latest").name == "final"
    ckpt_io.verify(run / "checkpoints" / "final")
    assert json.loads((run / "checkpoints" / "final" / "smolctl.json").read_text())["step"] == 6


def test_a_tiny_filesystem(trained, tmp_path, cli):
    """A real full disk: a 24 MiB tmpfs holds one micro checkpoint (19 MB), not two. Needs root to
    mount; skipped otherwise. After freeing space (a bigger remount) the run resumes from latest."""
    import shutil
    import subprocess

    with tmpfs(tmp_path / "mnt", "24m") as mnt:
        corpus = shutil.copy(trained.parent / "corpus.jsonl", tmp_path / "corpus.jsonl")
        model = ", ".join(f"{k}: {v}" for k, v in MICRO.items())
        (tmp_path / "micro.yaml").write_text(f"model: {{preset: tiny, {model}}}\ndata: {corpus}\nbatch_size: 2\n"
                                             "seq_len: 16\nmixed_precision: 'no'\ndevice: cpu\nnum_workers: 0\n")
        r = cli("train", "--config", tmp_path / "micro.yaml", "--max-steps", 6, "--save-every", 3,
                "--run-dir", mnt / "run", "--log-file", tmp_path / "run.log", "--no-dashboard")
        assert r.exit_code == 1, r.output
        line = one_error_line(r)
        assert "could not save checkpoint" in line and "No space left on device" in line
        assert [p.name for p in (mnt / "run" / "checkpoints").iterdir()] == ["step-00000003"]
        ckpt_io.verify(mnt / "run" / "checkpoints" / "step-00000003")
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        r = cli("resume", "--run-dir", mnt / "run", "--log-file", tmp_path / "run.log", "--no-dashboard")
        assert r.exit_code == 0, r.output
        assert "Done: step 6" in r.output


# -- NaN / inf -------------------------------------------------------------------------------------

def test_non_finite_steps_are_skipped_shown_and_stop_the_run(tmp_path, cli, monkeypatch, corpus):
    """From step 4 on the loss is NaN: steps 4 and 5 are skipped (no update, no checkpoint), shown
    as such, and with --max-bad-steps 3 step 6 stops the run: exit 1, one line naming the last
    good checkpoint, which verifies and resumes."""
    from smolctl.loss import CausalLMLoss

    real, calls = CausalLMLoss.forward, [0]

    def forward(self, input_ids, labels):
        calls[0] += 1
        loss = real(self, input_ids, labels)
        return loss * float("nan") if calls[0] >= 4 else loss

    monkeypatch.setattr(CausalLMLoss, "forward", forward)
    monkeypatch.chdir(tmp_path)
    model = ", ".join(f"{k}: {v}" for k, v in MICRO.items())
    (tmp_path / "micro.yaml").write_text(f"model: {{preset: tiny, {model}}}\ndata: {corpus}\nbatch_size: 2\n"
                                         "seq_len: 16\nmixed_precision: 'no'\ndevice: cpu\nnum_workers: 0\n")
    r = cli("train", "--config", "micro.yaml", "--max-steps", 20, "--save-every", 2, "--log-every", 1,
            "--max-bad-steps", 3, "--run-name", "nan", "--no-dashboard")
    assert r.exit_code == 1, r.output
    line = one_error_line(r)
    assert "training diverged: 3 non-finite steps in a row at step 6" in line
    assert "runs/nan/checkpoints/step-00000002" in line and "lower lr in runs/nan/config.yaml" in line
    assert "step      4 | skipped: non-finite loss or grad norm (1 in a row)" in r.output
    assert [p.name for p in (tmp_path / "runs/nan/checkpoints").iterdir()] == ["step-00000002"]
    rows_ = [json.loads(x) for x in (tmp_path / "runs/nan/metrics.jsonl").read_text().splitlines()]
    assert [(r_["event"], r_["step"]) for r_ in rows_ if r_["event"] in ("train", "skip")] == \
        [("train", 1), ("train", 2), ("train", 3), ("skip", 4), ("skip", 5), ("skip", 6)]
    log = (tmp_path / "runs/nan/train.log").read_text()
    assert log.count("skipped: non-finite") == 3
    monkeypatch.setattr(CausalLMLoss, "forward", real)
    r = cli("resume", "--from", "latest", "--max-steps", 4, "--no-dashboard")
    assert r.exit_code == 0 and "step-00000002 (step 2)" in r.output and "Done: step 4" in r.output


def test_the_dashboard_shows_skipped_steps():
    from io import StringIO

    from rich.console import Console

    from smolctl.dashboard import Dashboard, render

    dash = Dashboard(console=Console(file=StringIO(), width=100))
    dash({"event": "start", "step": 0, "max_steps": 10, "run_dir": "runs/x", "text": "Training"})
    for step in (1, 2):
        dash({"event": "skip", "step": step, "bad_steps": step})
    dash.close()
    out = StringIO()
    Console(file=out, width=100).print(render(dash.snap))
    assert "skipped" in out.getvalue() and "2 non-finite step(s)" in out.getvalue()


def test_models_are_read_from_the_newest_checkpoint_while_a_run_is_extended(trained, tmp_path):
    """Extending a finished run keeps its final/ until the new final replaces it; meanwhile
    --model <run> must read the newest step checkpoint, not the older final/."""
    import shutil

    from smolctl.config import TrainConfig
    from smolctl.sources import resolve
    from smolctl.train import train

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    cfg = TrainConfig.from_file(run / "config.yaml")
    cfg.max_steps, cfg.save_every = 9, 1

    def stop_at_8(e):  # a crash after the save at step 8
        if e["event"] == "checkpoint" and e["step"] == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, resume="latest", log_file=tmp_path / "run.log", sinks=[stop_at_8])
    assert json.loads((run / "checkpoints" / "final" / "smolctl.json").read_text())["step"] == 6  # still there
    assert resolve(run).name == "step-00000008"
    assert ckpt_io.find_checkpoint(run, "latest").name == "step-00000008"
