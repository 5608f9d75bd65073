"""The command boundary and the messages at its edges: a bug is one line with its traceback in a
file, Ctrl-C and a closed pipe are quiet, a bad --device / a missing local path / an empty value
say what they are, hints name flags the command has, and a data worker never outlives its trainer.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO

import smolctl

ROOT = Path(smolctl.__file__).resolve().parent.parent  # the smolctl under test (PYTHONPATH)


def smolctl(*args, env=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smolctl", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, **kw)


def shim(tmp_path, code: str) -> dict:
    """Environment that runs `code` in every Python process started with it (a sitecustomize on
    PYTHONPATH): a way to plant a bug in a real `smolctl` process."""
    (tmp_path / "shim").mkdir(exist_ok=True)
    (tmp_path / "shim" / "sitecustomize.py").write_text(code)
    return {"PYTHONPATH": os.pathsep.join([str(tmp_path / "shim"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


BUG = """
import smolctl.model
def build_model(*args, **kwargs):
    raise ValueError("planted bug\\nwith a second line")
smolctl.model.build_model = build_model
"""


def micro_config(tmp_path, **extra) -> Path:
    path = tmp_path / "micro.yaml"
    model = ", ".join(f"{k}: {v}" for k, v in MICRO.items())
    rest = "".join(f"{k}: {v}\n" for k, v in extra.items())
    path.write_text(f"model: {{preset: tiny, {model}}}\nmixed_precision: 'no'\ncompile: false\ndevice: cpu\n{rest}")
    return path


# -- unexpected exceptions -----------------------------------------------------------------------

def test_a_bug_is_one_line_with_its_traceback_in_the_cache_dir(tmp_path):
    env = {**shim(tmp_path, BUG), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = smolctl("count-params", "--preset", "tiny", env=env)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("Error: internal error: ValueError: planted bug with a second line (full traceback in ")
    log = Path(lines[0].rsplit("full traceback in ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "cache" / "smolctl" / "crash"
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "build_model" in text and "planted bug" in text
    assert "count-params --preset tiny" in text  # the command line, to reproduce it


def test_a_bug_in_a_training_run_leaves_its_traceback_in_the_run_dir(tmp_path, corpus):
    plant = """
import smolctl.train
def plot_loss(*args, **kwargs):
    raise KeyError("planted")
smolctl.train.plot_loss = plot_loss
"""
    cfg = micro_config(tmp_path, batch_size=2, seq_len=16, num_workers=0)
    run = tmp_path / "run"
    r = smolctl("train", "--config", cfg, "--data", corpus, "--max-steps", 2, "--run-dir", run, "--no-dashboard",
                env={**shim(tmp_path, plant), "XDG_CACHE_HOME": str(tmp_path / "cache")}, cwd=tmp_path)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: internal error: KeyError: 'planted' (full traceback in ")
    assert "Traceback" not in r.stderr
    logs = list(run.glob("crash-*.log"))
    assert len(logs) == 1 and "plot_loss" in logs[0].read_text() and str(logs[0]) in last
    assert not (tmp_path / "cache" / "smolctl" / "crash").exists()


def test_a_bug_in_the_data_worker_ends_the_run_without_hanging(tmp_path, corpus):
    """An unexpected exception inside the background workers: one line, exit 1, and the process
    exits -- it once printed the line, then waited forever for the worker, which ignores SIGTERM.
    (Two workers: each is set up and stopped alike, so this covers the single worker that is a
    2-core machine's default too.)"""
    plant = """
import smolctl.data
def token_ids(*args, **kwargs):
    raise IndexError("planted in the worker")
smolctl.data.token_ids = token_ids
"""
    cfg = micro_config(tmp_path, batch_size=2, seq_len=16, num_workers=2)
    run = tmp_path / "run"
    r = smolctl("train", "--config", cfg, "--data", corpus, "--max-steps", 2, "--run-dir", run, "--no-dashboard",
                env={**shim(tmp_path, plant), "XDG_CACHE_HOME": str(tmp_path / "cache")}, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: internal error: IndexError: ")
    assert "planted in the worker" in Path(last.rsplit("full traceback in ", 1)[1].rstrip(")")).read_text()
    assert not run.exists()  # a fresh run that failed before its first step leaves nothing


def test_a_corpus_broken_past_its_start_ends_the_run_in_one_line_and_keeps_its_checkpoints(tmp_path):
    """The first file reads; the second has a line that is not JSON. The reader fails mid-run, in
    the data worker: one line, and no log line from datasets before it; the checkpoints stay.
    (Inline, and in the other commands: test_data.py and test_bad_input_matrix.py.)"""
    from smolctl.data import TOKENIZE_DOCS

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": f"Document {i} is short and plain."}) + "\n"
                                            for i in range(TOKENIZE_DOCS)))  # ~16 steps, then b is read
    (corpus / "b.jsonl").write_text('{"text": "fine"}\n{"text": "cut off\n')
    cfg = micro_config(tmp_path, batch_size=2, seq_len=16, num_workers=1)
    run = tmp_path / "run"
    r = smolctl("train", "--config", cfg, "--data", corpus, "--max-steps", 1000, "--save-every", 10,
                "--run-dir", run, "--no-dashboard", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    errors = [line for line in r.stderr.splitlines() if not line.startswith(("Training:", "step "))]
    assert len(errors) == 1 and errors[0].startswith("Error: cannot read 2 local json file(s): "), r.stderr
    assert "JSON" in errors[0] and "Traceback" not in r.stderr
    assert (run / "checkpoints" / "step-00000010").is_dir()


def test_smolctl_debug_lets_the_traceback_through(tmp_path):
    r = smolctl("count-params", "--preset", "tiny", env={**shim(tmp_path, BUG), "SMOLCTL_DEBUG": "1",
                                                        "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "planted bug" in r.stderr
    assert "internal error" not in r.stderr


def test_a_plugin_command_gets_the_same_boundary(tmp_path, monkeypatch):
    """A command added with plain `app.command()` (no `command` wrapper) still cannot print a traceback."""
    from typer.testing import CliRunner

    from smolctl.cli import make_app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    app = make_app()

    @app.command("explode")
    def explode() -> None:
        raise RuntimeError("from a plugin")

    @app.command("interrupt")
    def interrupt() -> None:
        raise KeyboardInterrupt

    r = CliRunner().invoke(app, ["explode"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.startswith("Error: internal error: RuntimeError: from a plugin (full traceback in ")
    assert len(list((tmp_path / "cache" / "smolctl" / "crash").glob("crash-*.log"))) == 1
    r = CliRunner().invoke(app, ["interrupt"])
    assert r.exit_code == 130 and "Traceback" not in r.output  # (Typer's own: exit 130, no line)


def test_a_closed_stdout_pipe_is_a_quiet_exit(tmp_path):
    """`smolctl inspect | head -1`: the reader goes away; no traceback, no internal error."""
    p = subprocess.Popen([sys.executable, "-m", "smolctl", "inspect", "--preset", "tiny"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) in (0, 1)
    assert err == ""
    assert not (tmp_path / "cache" / "smolctl" / "crash").exists()


# -- the data worker -------------------------------------------------------------------------------

def test_the_data_workers_die_with_their_trainer(tmp_path):
    """SIGKILL a `smolctl train` that tokenizes in background workers: no process of it is left.
    (Two: each worker is set up alike, so this covers the single worker of a 2-core machine too.)

    Long documents make each chunk of tokens a worker sends big, so the queue to the trainer is
    full when the trainer dies: a worker that outlives it blocks there forever."""
    import psutil

    workers = 2
    words = " ".join(f"w{i % 997}" for i in range(100_000))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{n} {words}"}) + "\n" for n in range(4)))
    cfg = micro_config(tmp_path, batch_size=2, seq_len=64, num_workers=workers)
    run = tmp_path / "run"
    log = open(tmp_path / "out.txt", "w")
    p = subprocess.Popen([sys.executable, "-m", "smolctl", "train", "--config", str(cfg), "--data", str(corpus),
                          "--max-steps", "100000", "--save-every", "100000", "--log-every", "1", "--run-dir",
                          str(run), "--no-dashboard"], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    children = []
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or '"train"' not in (run / "metrics.jsonl").read_text():
            assert p.poll() is None, (tmp_path / "out.txt").read_text()
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.2)
        time.sleep(1)  # the workers run ahead and fill their queue
        children = psutil.Process(p.pid).children(recursive=True)
        assert len(children) == workers, "the workers should be the trainer's child processes"
        p.send_signal(signal.SIGKILL)
        p.wait()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left running after the trainer was killed: {[c.pid for c in alive]}"
    finally:
        for c in children:
            try:
                c.kill()
            except psutil.NoSuchProcess:
                pass
        if p.poll() is None:
            p.kill()
        log.close()


# -- long documents ----------------------------------------------------------------------------------

def test_long_documents_are_tokenized_in_pieces_exactly(monkeypatch):
    """Cut into pieces of a few characters, every kind of text still gives the whole document's ids."""
    import random

    import smolctl.data as data
    from smolctl.tokenizer import load_tokenizer

    tok = load_tokenizer()
    rng = random.Random(0)
    bits = ["a", "Zz", " ", "  ", "\n", "\t ", "1", "234", ".", ", ", "'s", " 're", "é", "中文", "<|endoftext|>", "!!",
            "\u00a0", "🙂", "x y", "--"]
    texts = ["".join(rng.choice(bits) for _ in range(rng.randint(1, 300))) for _ in range(60)]
    whole = [i for t in texts for i in tok([t], add_special_tokens=False)["input_ids"][0] + [0]]
    for size in (1, 3, 17, 64):
        monkeypatch.setattr(data, "PIECE_CHARS", size)
        assert data.token_ids(tok, texts, 0).tolist() == whole
    assert len(data.pieces(" ".join(["word"] * 1000), 64)) > 10  # it does cut


def test_a_long_documents_carry_is_saved_as_a_tensor_and_resumes_exactly(micro_cfg, tmp_path):
    """The tokens carried over to the next block go to data-rank0.safetensors (int32), not JSON."""
    import torch
    from safetensors.torch import load_file

    from smolctl.data import token_ids
    from smolctl.tokenizer import load_tokenizer
    from smolctl.train import train

    words = " ".join(f"w{i % 997}" for i in range(20_000))
    corpus = tmp_path / "long.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{n} {words}"}) + "\n" for n in range(2)))
    cfg = micro_cfg(data=str(corpus), max_steps=6, save_every=3)
    train(cfg, tmp_path / "straight")
    ckpt = tmp_path / "straight" / "checkpoints" / "step-00000003"
    meta = json.loads((ckpt / "data-rank0.json").read_text())
    assert "carry" not in meta and (ckpt / "data-rank0.json").stat().st_size < 10_000
    carry = load_file(str(ckpt / "data-rank0.safetensors"))["carry"]
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    assert carry.dtype == torch.int32
    assert carry.tolist() == token_ids(load_tokenizer(), texts, 0).tolist()[meta["tokens"]:]  # all not yet in a block

    train(cfg, tmp_path / "resumed")
    train(cfg, tmp_path / "resumed", resume="3")

    def losses(run):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["event"] == "train"]

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


# -- messages ----------------------------------------------------------------------------------------

RESUME_PATH = ["train.py", "checkpoint.py", "data.py", "corpus.py", "tokenizer.py", "hub.py", "device.py", "cli/train.py",
               "cli/registry.py"]  # the modules whose errors `smolctl resume` can print


def hint_texts(tree):
    """The string parts of every `hint=...` / `hint = ...` (a `... if resume is None else ...`: the
    branch resume takes)."""
    import ast

    def strings(node):
        if isinstance(node, ast.IfExp) and ast.unparse(node.test) == "resume is None":
            yield from strings(node.orelse)
            return
        if isinstance(node, ast.JoinedStr):  # an f-string: its text, {} for each value
            yield "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value
        else:
            for child in ast.iter_child_nodes(node):
                yield from strings(child)

    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "hint":
            yield from strings(node.value)
        elif isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "hint" for t in node.targets):
            yield from strings(node.value)


def test_hints_that_resume_prints_name_flags_resume_has():
    """A hint names `--flag`s of the command that prints it, or of the command it spells out
    (`... smolctl train --batch-size N`)."""
    import ast
    import re

    import typer

    from smolctl.cli import app

    group = typer.main.get_command(app)
    options = {name: {o for p in cmd.params for o in p.opts} for name, cmd in group.commands.items()}
    checked = 0
    for module in RESUME_PATH:
        for text in hint_texts(ast.parse((ROOT / "smolctl" / module).read_text())):
            for i, part in enumerate(re.split(r"smolctl (?=[a-z])", text)):
                command = part.split()[0] if i else "resume"
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", part):
                    assert flag in options.get(command, options["resume"]), f"{module}: {text!r} names {flag}"
                    checked += 1
    assert checked >= 5


@pytest.mark.parametrize("args", [
    ["train", "--data", ""], ["train", "--data= "], ["train", "--run-dir", ""],
    ["eval", "--model", "run", "--data", ""],
    ["generate", "hi", "--model", ""], ["count-params", "--preset", " "], ["export", "--model", "x", "--out", ""],
    ["resume", "--from", ""],
])
def test_empty_values_are_refused_before_anything_runs(cli, tmp_path, args):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text('{"text": "not a corpus"}\n')
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("Error: ") and "must not be empty" in r.output
    assert len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # nothing created


def test_system_prompt_may_be_empty(cli):
    r = cli("chat", "--system", "", "--model", "./no-such-model")
    assert "must not be empty" not in r.output and "no such file or directory" in r.output


@pytest.mark.parametrize("args", [
    ["generate", "hi", "--model", "{model}"], ["chat", "--model", "{model}"], ["eval", "--model", "{model}"],
])
@pytest.mark.parametrize("device, words", [("bogus", "is not a device"), ("cuda:x", "is not a device"),
                                           ("cpu:1", "is not a device"), ("cuda:99", "cuda:99")])
def test_a_bad_device_is_one_clear_line(cli, tmp_path, tiny_base_dir, args, device, words):
    import torch

    if device == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    r = cli(*[a.format(model=tiny_base_dir) for a in args], "--device", device)
    assert r.exit_code == 2, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: --device {device}".replace(device, repr(device)) if "not a" in words
                           else f"Error: --device {device}") and words in line, r.output
    assert not (tmp_path / "runs").exists()


def test_an_absent_gpu_is_named():
    import torch

    from smolctl.device import pick_device
    from smolctl.errors import SmolctlError

    if torch.cuda.is_available():
        assert pick_device("cuda") == "cuda"
    else:
        with pytest.raises(SmolctlError, match="--device cuda: .*(without CUDA|no CUDA GPU)"):
            pick_device("cuda")
    assert pick_device("cpu") == "cpu" and pick_device("auto") == pick_device(None)


@pytest.mark.parametrize("spec, kind", [
    ("HuggingFaceTB/SmolLM2-135M", "hub"), ("Qwen/Qwen2.5-0.5B", "hub"), ("runs/typo", "local"),
    ("data/*.parquet", "local"), ("./corpus.jsonl", "local"), ("corpus.jsonl", "local"), ("a/b/c", "local"),
    ("~/models/x", "local"), ("org/name.gguf", "local"), ("org\\name", "local"),
])
def test_one_rule_tells_local_paths_from_hub_ids(tmp_path, spec, kind):
    from smolctl.hub import looks_like_hub_id, looks_local

    (tmp_path / "runs").mkdir()
    (tmp_path / "data").mkdir()
    assert looks_local(spec) == (kind == "local")
    assert looks_like_hub_id(spec) == (kind == "hub")


@pytest.mark.parametrize("args, words", [
    (["train", "--data", "data/*.parquet"], "--data data/*.parquet: no local file matches this pattern"),
    (["train", "--data", "data/corpus.jsonl"], "--data data/corpus.jsonl: no such file or directory"),
    (["eval", "--model", "runs/dem"], "--model runs/dem: no such file or directory (did you mean runs/demo?)"),
    (["generate", "hi", "--model", "./runs/typo"], "--model ./runs/typo: no such file or directory"),
    (["export", "--model", "runs/typo", "--out", "x"], "--model runs/typo: no such file or directory"),
])
def test_a_missing_local_path_is_not_taken_for_a_hub_id(cli, tmp_path, args, words):
    (tmp_path / "data").mkdir()
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    r = cli(*args, "--preset", "tiny") if args[0] == "train" else cli(*args)
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines()[-1].startswith(f"Error: {words}"), r.output
    assert "hub" not in r.output.lower().replace("hub id", "")


def test_count_params_and_inspect_never_build_every_layer(cli, monkeypatch, tmp_path):
    """The deepest model the schema allows is counted (and shown) from a two-layer skeleton: instant,
    whatever the depth."""
    import dataclasses

    import smolctl.model as model
    from smolctl.config import ModelConfig

    built = []
    real = model.build_model

    def build_model(cfg, *args, **kwargs):
        built.append(cfg.num_layers)
        assert cfg.num_layers <= 2, "built every layer"
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(model, "build_model", build_model)
    tiny = ModelConfig.from_preset("tiny")
    one, two = (model.param_breakdown(real(dataclasses.replace(tiny, num_layers=n), device="meta"))["total"]
                for n in (1, 2))
    (tmp_path / "deep.yaml").write_text("model: {preset: tiny, num_layers: 1024}\n")
    r = cli("count-params", "--config", tmp_path / "deep.yaml", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["total"] == one + 1023 * (two - one)
    r = cli("inspect", "--config", tmp_path / "deep.yaml")
    assert r.exit_code == 0 and "(0-1023): 1024 x LlamaDecoderLayer(" in r.output
    assert built and max(built) <= 2
