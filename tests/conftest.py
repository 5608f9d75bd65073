import os

import pytest

# Tests run fully offline: nothing may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def cli():
    """Invoke the smolctl app in-process: cli("count-params", "--json") -> click Result."""
    from typer.testing import CliRunner

    from smolctl.cli import app

    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke


WORDS = ("the a model learns tokens from text every step small language data stream block loss "
         "gravity pulls apples toward earth while students read about plants cells rivers stars "
         "history music numbers and the quick brown fox jumps over lazy dogs in warm summer light").split()


def write_corpus(path, n_docs=24, seed=0, column="text", extra=None):
    """A small deterministic .jsonl corpus of varied-length documents."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
            row = {column: f"Doc {seed}-{i}: " + " ".join(words) + ".", **(extra or {})}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl")


# A model small enough that a training step takes milliseconds (the vocabulary stays SmolLM2's).
MICRO = {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


@pytest.fixture
def micro_cfg(corpus):
    from smolctl.train import TrainConfig

    def make(**kw):
        base = dict(preset="tiny", model=dict(MICRO), data=str(corpus), batch_size=2, seq_len=16,
                    max_steps=12, save_every=4, log_every=1, mixed_precision="no", device="cpu",
                    num_workers=0, lr=3e-3)
        return TrainConfig(**{**base, **kw})

    return make


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it, children first: a machine losing power.

    torchrun starts its workers in sessions of their own, so killing the launcher's process
    group would leave them running; this walks the tree instead."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True)[::-1] + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)
