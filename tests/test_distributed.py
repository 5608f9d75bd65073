"""Two training processes over gloo on CPU, started the ways a user starts them.

`accelerate launch --multi_gpu --num_processes 2 --num_machines 1` and `smolctl train
--num-processes 2` (torchrun) both give DistributedType.MULTI_CPU with DDP; `accelerate launch
--cpu --num_processes 2` would start only one process (measured with accelerate 1.15).

The data is built so that the comparison with one process is exact by construction: every
document is exactly SEQ tokens, so with its <|endoftext|> it is exactly one block (seq_len + 1
tokens) and packing never mixes documents. Two files a.jsonl and b.jsonl: split_dataset_by_node
gives rank 0 all of a and rank 1 all of b (the world size divides the file count). Step k of the
2-process run trains on a[kB:(k+1)B] (rank 0) and b[kB:(k+1)B] (rank 1); the one-process runs
read interleaved.jsonl = a[0:B] b[0:B] a[B:2B] b[B:2B] ..., so their step k sees the same 2B blocks.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FIXED_PORT, MICRO, WORDS, kill_tree

from smolctl.config import TrainConfig
from smolctl.train import train

pytestmark = [FIXED_PORT, pytest.mark.heavy]  # accelerate launch on port 29500; several minutes in all

SEQ, B, STEPS, DOCS = 16, 2, 10, 12  # 12 documents per file: an epoch is 6 steps, so STEPS crosses one
TOL = 1e-5  # fp32 on CPU: the same sums in another order (DDP's all-reduce, one 2B batch vs two B's)


def exact_docs(tag: str, n: int, seed: int) -> list[str]:
    """n documents of exactly SEQ tokens each (every word in WORDS is one token after a space)."""
    from smolctl.tokenizer import load_tokenizer

    tok, rng, docs = load_tokenizer(), random.Random(seed), []
    for i in range(n):
        text = f"Doc {tag}{i}:"
        while len(tok(text, add_special_tokens=False).input_ids) < SEQ:
            text += " " + rng.choice(WORDS)
        assert len(tok(text, add_special_tokens=False).input_ids) == SEQ
        docs.append(text)
    return docs


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Commands write runs/ under the working directory: keep them out of the repo."""
    monkeypatch.chdir(tmp_path)


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def interleave(a: list[str], b: list[str]) -> list[str]:
    return [d for k in range(0, len(a), B) for d in a[k:k + B] + b[k:k + B]]


def train_losses(metrics: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["event"] == "train"]


def env(root: Path) -> dict:
    # A private HF_HOME: no user-wide accelerate default_config.yaml may change the launch. No GPU
    # and no --device anywhere: the processes find the CPU by themselves, as on a CPU-only machine.
    return {**os.environ, "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "smolctl"]
SMOLCTL = [sys.executable, "-m", "smolctl"]
COMMON = ["--max-steps", str(STEPS), "--no-dashboard"]


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory):
    """One uninterrupted 2-process run through `accelerate launch` (shared by the tests below)."""
    root = tmp_path_factory.mktemp("ddp")
    a, b = exact_docs("a", DOCS, 1), exact_docs("b", DOCS, 2)
    write_jsonl(root / "data" / "a.jsonl", a)
    write_jsonl(root / "data" / "b.jsonl", b)
    write_jsonl(root / "interleaved.jsonl", interleave(a, b))
    write_jsonl(root / "same.jsonl", interleave(a, a))  # what it would be if both ranks read the same data
    model = ", ".join(f"{k}: {v}" for k, v in MICRO.items())
    (root / "micro.yaml").write_text(
        f"model: {{preset: tiny, {model}}}\ndata: {root / 'data'}\nbatch_size: {B}\nseq_len: {SEQ}\n"
        "mixed_precision: 'no'\ncompile: false\nlog_every: 1\nsave_every: 3\nlr: 0.01\n")
    r = subprocess.run([*ACCELERATE, "train", "--config", "micro.yaml", "--run-dir", "straight", *COMMON],
                       cwd=root, env=env(root), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return SimpleNamespace(root=root, run=root / "straight", out=r.stdout, err=r.stderr)


def one_process(root: Path, data: Path, run: str, batch_size: int, grad_accum: int) -> list[tuple[int, float]]:
    cfg = TrainConfig(preset="tiny", model=dict(MICRO), data=str(data), batch_size=batch_size, seq_len=SEQ,
                      grad_accum=grad_accum, max_steps=STEPS, save_every=100, log_every=1, lr=0.01,
                      mixed_precision="no", device="cpu", num_workers=0)
    train(cfg, root / run, log_file=root / "logs" / f"{run}.log")
    return train_losses(root / run / "metrics.jsonl")


def test_two_processes_match_one_process_with_twice_the_batch(two_proc):
    """2 processes x B == 1 process x 2B == 1 process x B with 2 accumulation steps, on the same
    blocks in the same order (see the module docstring), within TOL per step. And the ranks read
    different data: the curve of one process reading a twice instead of a and b does not match."""
    assert "2 x cpu process(es)" in two_proc.out  # DDP over gloo, not one process
    ddp = train_losses(two_proc.run / "metrics.jsonl")
    big = one_process(two_proc.root, two_proc.root / "interleaved.jsonl", "big-batch", 2 * B, 1)
    accum = one_process(two_proc.root, two_proc.root / "interleaved.jsonl", "accum", B, 2)
    same = one_process(two_proc.root, two_proc.root / "same.jsonl", "same", 2 * B, 1)
    assert [s for s, _ in ddp] == [s for s, _ in big] == [s for s, _ in accum] == list(range(1, STEPS + 1))
    for name, curve in (("1 x 2B", big), ("1 x B x accum 2", accum)):
        worst = max(abs(x - y) for (_, x), (_, y) in zip(ddp, curve))
        print(f"2 x B vs {name}: max |loss difference| over {STEPS} steps = {worst:.2e}")
        assert worst < TOL, (name, ddp, curve)
    assert ddp[-1][1] < ddp[0][1] - 0.5  # it learns
    assert max(abs(x - y) for (_, x), (_, y) in zip(ddp, same)) > 100 * TOL
    # Rank 0 alone writes the run's files and messages, every rank its own data and RNG state.
    final = two_proc.run / "checkpoints" / "final"
    assert {p.name for p in final.glob("*-rank*")} == {f"{k}-rank{r}.{e}" for k in ("data", "rng")
                                                     for r in (0, 1) for e in ("json", "safetensors")}
    assert two_proc.out.count("Done: step") == 1
    states = [json.loads((final / f"data-rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["rank"], s["world_size"]) for s in states] == [(0, 2), (1, 2)]
    assert json.loads((final / "smolctl.json").read_text())["tokens_seen"] == STEPS * 2 * B * SEQ


def test_resuming_on_more_processes_than_data_streams_is_refused(two_proc, cli):
    """Two processes split the data into two streams: three cannot share them out. (Fewer can:
    test_resume_world_size.py.)"""
    before = sorted(p.name for p in (two_proc.run / "checkpoints").iterdir())
    r = cli("resume", "--run-dir", two_proc.run, "--from", "3", "--max-steps", STEPS, "--num-processes", 3)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: ") and r.output.count("\n") == 1
    assert "was saved by 2 process(es); this run has 3, more than its 2 data stream(s)" in r.output
    assert "smolctl resume --num-processes 2" in r.output
    assert sorted(p.name for p in (two_proc.run / "checkpoints").iterdir()) == before  # nothing moved


def test_two_process_run_killed_and_resumed_continues_exactly(two_proc):
    """SIGKILL every process of a `smolctl train --num-processes 2` run (launcher, both ranks and
    their data workers) at a random step, then `accelerate launch ... resume --from latest`: the
    per-step losses equal the uninterrupted run's, each step logged once.

    The run is held at that step (see held_env; rank 1 then waits in the next all-reduce), so the
    kill never races the run to its end."""
    root, rng = two_proc.root, random.Random(os.environ.get("SMOLCTL_FAULT_SEED", "6"))
    kill_at = rng.randint(3, STEPS - 2)
    held = held_env(root, kill_at, release=root / "never")
    p = subprocess.Popen([*SMOLCTL, "train", "--num-processes", "2", "--config", "micro.yaml", "--run-dir", "killed",
                          *COMMON], cwd=root, env=held, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics, deadline = root / "killed" / "metrics.jsonl", time.time() + 240
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and any(s >= kill_at for s, _ in train_losses(metrics)):
            break
        time.sleep(0.05)
    kill_tree(p.pid)
    output = p.communicate()[0].decode(errors="replace")
    steps = [s for s, _ in train_losses(metrics)] if metrics.exists() else []
    assert steps and steps[-1] == kill_at, output[-3000:]
    print(f"killed at step {kill_at}; checkpoints: {sorted(c.name for c in (root / 'killed' / 'checkpoints').iterdir())}")
    r = subprocess.run([*ACCELERATE, "resume", "--run-dir", "killed", "--from", "latest", "--no-dashboard"],
                       cwd=root, env=env(root), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert train_losses(metrics) == train_losses(two_proc.run / "metrics.jsonl")  # bit for bit, no step twice
    log_steps = [int(line.split(" step ")[1].split("/")[0]) for line in (root / "killed" / "train.log").read_text()
                 .splitlines() if " step " in line and "/" in line.split(" step ")[1][:12]]
    assert log_steps == list(range(1, STEPS + 1))


def test_checkpoints_under_fsdp2_sharding_resume_exactly(tmp_path):
    """FSDP2 (fully_shard) on 2 CPU processes: the full state gathered to rank 0 is an ordinary
    checkpoint (it loads without FSDP), and each rank's shard restored from it continues the run
    bit for bit. See fsdp2_worker.py for why this wraps by hand rather than through accelerate."""
    out = tmp_path / "losses.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(Path(__file__).parent / "fsdp2_worker.py"), str(tmp_path / "checkpoints"), str(out)],
                       cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = json.loads(out.read_text())
    assert losses["resumed"] == losses["straight"], losses
    from smolctl.model_io import load_model

    model, cfg = load_model(tmp_path / "checkpoints" / "step-00000004")  # no FSDP needed to read it
    assert cfg.num_layers == 2 and model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name, kind", [("single-gpu-bf16", "NO"), ("multi-gpu-ddp", "MULTI_GPU"),
                                        ("fsdp-full-shard", "FSDP")])
def test_example_accelerate_configs_parse(name, kind):
    """The shipped configs are valid accelerate config files (running them needs GPUs)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parent.parent / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.mixed_precision == "bf16"
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_reshard_after_forward"]
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(two_proc):
    """SIGTERM to rank 1 alone (a launcher or scheduler delivers signals to ranks at different
    moments): the ranks agree at the next step, save one complete checkpoint together, and the
    command exits 143 printing the resume command once. Without the agreement rank 0 would keep
    stepping while rank 1 waits in the save's barrier."""
    import psutil

    root = two_proc.root
    p = subprocess.Popen([*SMOLCTL, "train", "--num-processes", "2", "--config", "micro.yaml", "--run-dir", "sig",
                          "--no-dashboard", "--max-steps", "100000", "--save-every", "100000"],
                         cwd=root, env=env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics, deadline = root / "sig" / "metrics.jsonl", time.time() + 240
        while time.time() < deadline and not (metrics.exists() and train_losses(metrics)):
            time.sleep(0.1)
        rank1 = next(c for c in psutil.Process(p.pid).children()
                     if c.environ().get("RANK") == "1" and "smolctl" in " ".join(c.cmdline()))
        rank1.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=240)
    finally:
        kill_tree(p.pid)
    assert p.returncode == 143, out + err
    step = int(err.split("--from ")[1].split()[0])
    assert err.count("smolctl resume --num-processes 2 --run-dir sig --from") == 1 and "Traceback" not in err
    ckpt = root / "sig" / "checkpoints" / f"step-{step:08d}"
    assert {f"data-rank{r}.json" for r in (0, 1)} <= {f.name for f in ckpt.iterdir()}
    from smolctl.checkpoint import verify

    verify(ckpt)
    assert max(s for s, _ in train_losses(metrics)) == step


def test_ctrl_c_on_num_processes_saves_and_exits_130_quietly(two_proc):
    """Ctrl-C reaches `smolctl train --num-processes 2` (the launcher); it passes the signal on,
    both ranks save at the same step, and all that is printed on stderr is the resume command."""
    root = two_proc.root
    p = subprocess.Popen([*SMOLCTL, "train", "--num-processes", "2", "--config", "micro.yaml", "--run-dir", "ctrl-c",
                          "--no-dashboard", "--max-steps", "100000", "--save-every", "100000"],
                         cwd=root, env=env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics, deadline = root / "ctrl-c" / "metrics.jsonl", time.time() + 240
        while time.time() < deadline and not (metrics.exists() and train_losses(metrics)):
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=240)
    finally:
        kill_tree(p.pid)
    assert p.returncode == 130, out + err
    step = max(s for s, _ in train_losses(metrics))
    assert err == f"Stopped at step {step}. Continue with:\n  smolctl resume --num-processes 2 --run-dir ctrl-c " \
                  f"--from {step}\n"
    assert (root / "ctrl-c" / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()


# -- one rank fails or dies: the whole job ends, with one line --------------------------------

def job_processes(launcher: subprocess.Popen, wait_for) -> list:
    """Once `wait_for()` holds: every process of the job under `launcher` (ranks, data workers)."""
    import psutil

    deadline = time.time() + 240
    while time.time() < deadline and launcher.poll() is None and not wait_for():
        time.sleep(0.05)
    assert launcher.poll() is None, "the job ended before the failure could be staged"
    return psutil.Process(launcher.pid).children(recursive=True)


def assert_nothing_left(procs: list) -> None:
    """No process of the job outlives it. The ranks are waited for by the launcher; a killed rank's
    data worker notices its parent's death by itself (the DataLoader's watchdog polls every 5 s)."""
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=15)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


def test_a_rank_killed_mid_run_ends_the_job_with_one_line(two_proc):
    """SIGKILL to rank 1 alone (the OOM killer, a crash): rank 0 does not wait for it forever --
    its next collective breaks, it stops, the launcher exits 137 with one line naming the rank
    and the resume command, and no process of the job is left. The command it prints works."""
    root, run, steps = two_proc.root, "killed-rank", 20  # the kill lands soon after step 5
    p = subprocess.Popen([*SMOLCTL, "train", "--num-processes", "2", "--config", "micro.yaml", "--run-dir", run,
                          "--no-dashboard", "--max-steps", str(steps), "--save-every", "4"],
                         cwd=root, env=env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = root / run / "metrics.jsonl"
        procs = job_processes(p, lambda: metrics.exists() and any(s >= 5 for s, _ in train_losses(metrics)))
        assert len(procs) >= 4, [c.cmdline() for c in procs]  # 2 ranks and their data workers
        next(c for c in procs if c.ppid() == p.pid and c.environ().get("RANK") == "1").kill()
        _, err = p.communicate(timeout=120)
    finally:
        kill_tree(p.pid)
    resume = f"smolctl resume --num-processes 2 --run-dir {run} --from latest"
    assert err == f"Error: process 1 of 2 was killed by SIGKILL, so the job stopped. Continue with: {resume}\n", err
    assert p.returncode == 137
    assert_nothing_left(procs)
    stopped_at = max(s for s, _ in train_losses(metrics))
    assert stopped_at < steps
    r = subprocess.run([*SMOLCTL, *resume.split()[1:], "--no-dashboard"], cwd=root, env=env(root),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert [s for s, _ in train_losses(metrics)] == list(range(1, steps + 1))


def broken_shard(root: Path) -> Path:
    """Two files, one per rank: rank 1's has a row with no text after 64 good ones (one
    tokenizer batch), so it fails mid-run, after checkpoints were saved. Short ones: they last
    ~20 steps (saves every 5), not the ~65 of write_corpus's."""
    from conftest import write_corpus

    data = root / "broken"
    data.mkdir(exist_ok=True)
    write_corpus(data / "a.jsonl", n_docs=200, seed=1)
    write_jsonl(data / "b.jsonl", [f"Doc b{i}: the model learns tokens from text." for i in range(64)])
    with open(data / "b.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": None}) + "\n")
    return data


@pytest.mark.parametrize("launcher", ["smolctl", "accelerate"])
def test_a_rank_failing_on_its_data_ends_the_job_with_one_line(two_proc, launcher):
    """Rank 1 alone meets a broken row in its share of the data: it says so in one line, with
    its rank and the resume command, rank 0 stops (its all-reduce broke) without a traceback, the
    launcher exits non-zero, and no process of the job is left."""
    root, run = two_proc.root, f"broken-{launcher}"
    data = broken_shard(root)
    # the explicit --device cpu under one launcher, the device found by the processes under the other
    start = ([*SMOLCTL, "train", "--num-processes", "2"] if launcher == "smolctl"
             else [*ACCELERATE, "train", "--device", "cpu"])
    p = subprocess.Popen([*start, "--config", "micro.yaml", "--data", str(data), "--run-dir", run,
                          "--no-dashboard", "--max-steps", "100000", "--save-every", "5"],
                         cwd=root, env=env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = root / run / "metrics.jsonl"
        procs = job_processes(p, lambda: metrics.exists() and train_losses(metrics))
        _, err = p.communicate(timeout=240)
    finally:
        kill_tree(p.pid)
    line = (f"Error: process 1 of 2 failed: column 'text' holds NoneType, not text. Pick a text column with "
            f"--text-column. Continue with: smolctl resume --num-processes 2 --run-dir {run} --from latest\n")
    assert p.returncode != 0
    if launcher == "smolctl":
        assert (p.returncode, err) == (2, line)
    else:  # accelerate's report follows; rank 0 may say that it stopped, if it gets to before the SIGTERM
        survivor = ("Error: process 0 of 2 stopped: another process of the job failed or was killed. "
                    f"Continue with: smolctl resume --num-processes 2 --run-dir {run} --from latest")
        errors = [e for e in err.splitlines() if e.startswith("Error: ")]
        assert line.strip() in errors and set(errors) <= {line.strip(), survivor} and "[rank" not in err, err
    assert_nothing_left(procs)
    assert (root / run / "checkpoints" / "step-00000005" / "manifest.json").is_file()


# -- several machines, and automatic recovery: the commands of docs/distributed.md ---------------

def documented(section: str) -> list[list[str]]:
    from test_readme import commands_by_section

    return commands_by_section()[section]


def held_env(root: Path, step: int, release: Path) -> dict:
    """env(root), with rank 0 of the job's first attempt held after logging `step` until `release`
    exists (a sitecustomize on its PYTHONPATH), so that a kill never races the run to its end."""
    hold = root / "hold-until"
    hold.mkdir(exist_ok=True)
    (hold / "sitecustomize.py").write_text(
        "import os, time\nfrom smolctl import metrics\nwrite = metrics.JsonlSink.__call__\n\n"
        "def write_then_hold(self, e):\n    write(self, e)\n"
        f"    if e['event'] == 'train' and e['step'] == {step} and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0':\n"
        f"        while not os.path.exists({str(release)!r}):\n            time.sleep(0.02)\n\n"
        "metrics.JsonlSink.__call__ = write_then_hold\n")
    return {**env(root), "PYTHONPATH": os.pathsep.join([str(hold), os.environ.get("PYTHONPATH", "")])}


def job_yaml(two_proc) -> str:
    """The documented commands' job.yaml: two_proc's config and step count."""
    return (two_proc.root / "micro.yaml").read_text() + f"max_steps: {STEPS}\n"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_step(metrics: Path, step: int, procs: list[subprocess.Popen]) -> None:
    deadline = time.time() + 240
    while not (metrics.exists() and any(s >= step for s, _ in train_losses(metrics))):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.poll() for p in procs]
        time.sleep(0.05)


def test_two_machines_lose_one_and_the_other_launcher_continues_exactly(two_proc):
    """docs/distributed.md's "Several machines" commands, on one machine as two (127.0.0.1, a
    free port, a working directory and a TMPDIR each, the run directory in a folder both see, one
    CPU process each). torchrun (c10d) starts the job; at step 5 "machine 1" loses power (SIGKILL
    to its launcher and worker). Machine 0 ends within 60 s with one line saying how to go on,
    and no process or temporary file of the job is left. The documented `accelerate launch`
    resume, on both machines, then ends the job with the uninterrupted run's losses, bit for bit
    (two_proc: the same config in 2 processes of one machine)."""
    import psutil

    start, resume = documented("Several machines")
    root, port, release = two_proc.root / "machines", free_port(), two_proc.root / "machines" / "release"
    shared = root / "shared"
    for m in (0, 1):
        (root / f"m{m}" / "tmp").mkdir(parents=True)
        (root / f"m{m}" / "job.yaml").write_text(job_yaml(two_proc))

    def on_machine(m: int, argv: list[str], environ: dict) -> subprocess.Popen:
        from test_readme import PROGRAMS

        words = [w.replace("10.0.0.1", "127.0.0.1").replace("29500", str(port)).replace("$MACHINE_RANK", str(m))
                 .replace("/shared", str(shared)) for w in argv]
        return subprocess.Popen([*PROGRAMS[words[0]], *words[1:], "--no-dashboard"], cwd=root / f"m{m}",
                                env={**environ, "TMPDIR": str(root / f"m{m}" / "tmp"), "HF_HOME": str(root / f"m{m}" / "hf")},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    held = held_env(root, 5, release)
    machines = [on_machine(0, start, held)]
    try:
        while not any(c.laddr.port == port and c.status == "LISTEN" for c in psutil.Process(machines[0].pid).net_connections()):
            assert machines[0].poll() is None, machines[0].communicate()
            time.sleep(0.05)  # the first machine hosts the rendezvous, as 10.0.0.1 would
        machines.append(on_machine(1, start, held))
        metrics = shared / "runs" / "job" / "metrics.jsonl"
        wait_for_step(metrics, 5, machines)
        procs = [c for m in machines for c in psutil.Process(m.pid).children(recursive=True)]
        ranks = [{c.environ().get("RANK") for c in psutil.Process(m.pid).children(recursive=True)} - {None} for m in machines]
        assert ranks == [{"0"}, {"1"}], ranks
        kill_tree(machines[1].pid)
        release.touch()
        lost = time.time()
        _, err = machines[0].communicate(timeout=60)
        ended = time.time() - lost
        machines[1].communicate()
    finally:
        for m in machines:
            kill_tree(m.pid)
    print(f"machine 0 ended {ended:.1f}s after machine 1 was lost")
    how = f"smolctl resume --run-dir {shared}/runs/job --from latest, launched on each of the 2 machines as before"
    assert machines[0].returncode != 0
    assert [line for line in err.splitlines() if line.startswith("Error")] == [
        f"Error: process 0 of 2 stopped: another process of the job failed or was killed. Continue with: {how}"], err
    assert_nothing_left(procs)
    assert not list((shared / "runs" / "job" / "checkpoints").glob(".*"))  # no half-written save
    assert all(p.name.startswith("torch") for p in (root / "m0" / "tmp").iterdir())  # only torch's own caches
    before = train_losses(metrics)
    assert [s for s, _ in before] == [1, 2, 3, 4, 5]
    machines = [on_machine(m, resume, env(root)) for m in (0, 1)]
    try:
        outs = [m.communicate(timeout=240) for m in machines]
    finally:
        for m in machines:
            kill_tree(m.pid)
    assert [m.returncode for m in machines] == [0, 0], outs
    assert "Resuming from" in outs[0][0] and "2 x cpu process(es)" in outs[0][0]
    assert train_losses(metrics) == train_losses(two_proc.run / "metrics.jsonl")
    assert train_losses(metrics)[:5] == before  # steps 4 and 5 again, after the resume from step 3


def test_a_rank_killed_under_torchrun_max_restarts_recovers_by_itself(two_proc):
    """docs/distributed.md's automatic recovery: `torchrun --max-restarts ... train --resume auto`.
    SIGKILL to rank 1 at step 5: torchrun starts both processes again, they continue from the
    checkpoint of step 3 by themselves, and the job exits 0 with the uninterrupted run's losses
    (two_proc), each step logged once; the log says the run recovered, and how."""
    import psutil

    [command] = documented("Automatic recovery")
    root, release = two_proc.root / "recovery", two_proc.root / "recovery" / "release"
    root.mkdir()
    (root / "job.yaml").write_text(job_yaml(two_proc))
    from test_readme import PROGRAMS

    p = subprocess.Popen([*PROGRAMS[command[0]], *command[1:], "--no-dashboard"], cwd=root,
                         env=held_env(root, 5, release), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = root / "runs" / "job" / "metrics.jsonl"
        wait_for_step(metrics, 5, [p])
        next(c for c in psutil.Process(p.pid).children() if c.environ().get("RANK") == "1").kill()
        release.touch()
        out, err = p.communicate(timeout=240)
    finally:
        kill_tree(p.pid)
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    assert train_losses(metrics) == train_losses(two_proc.run / "metrics.jsonl")
    log = (root / "runs" / "job" / "train.log").read_text()
    assert "Resuming automatically from runs/job/checkpoints/step-00000003 (step 3, restart 1 of the job): " in log
    assert "2 x cpu process(es)" in log
