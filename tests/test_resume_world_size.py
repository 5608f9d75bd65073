"""Resuming on another number of processes: the data is split into a fixed number of streams,
each with its own position, dealt out to the processes (stream s to rank s % world_size), so a
checkpoint's positions continue on any world size up to the number of streams, with every
document read once per epoch. Model, optimizer, step and schedule continue; only bit-exactness
is lost (it holds at the same world size: test_distributed.py, test_train.py).

The documents are exactly one block each (test_distributed.exact_docs): a block names its document.
"""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import MICRO
from test_distributed import SEQ, env, exact_docs, write_jsonl

from smolctl.data import BlockStream, DataSpec, batches

DOCS = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(path, {block as a tuple of token ids: document number})."""
    from smolctl.tokenizer import load_tokenizer

    docs = exact_docs("d", DOCS, 5)
    path = write_jsonl(tmp_path_factory.mktemp("ids") / "ids.jsonl", docs)
    tok = load_tokenizer()
    return path, {tuple(tok(d, add_special_tokens=False).input_ids + [0]): i for i, d in enumerate(docs)}


def read(stream: BlockStream, ids: dict, n: int | None = None, workers: int = 0) -> tuple[list[int], dict]:
    """The documents of the first `n` batches (all, for a finite stream), and the state after them."""
    seen, state = [], None
    for batch, state in batches(stream, workers):
        seen += [ids[tuple(row)] for row in batch.tolist()]
        if n is not None and len(seen) == n * stream.batch_size:
            break
    return seen, state


@pytest.mark.parametrize("before, after, streams, shuffle", [
    (2, 1, 2, 0), (1, 2, 2, 0), (2, 3, 6, 4), (3, 2, 6, 0), (4, 1, 4, 3)])
def test_streams_dealt_to_another_world_size_read_every_document_once(corpus, before, after, streams, shuffle):
    """`before` processes read a few batches each; their states, dealt to `after` processes, read
    the rest of two epochs: each document is read exactly twice. (With shuffle buffers, the
    last few of each stream stay in its buffer when the stream ends.)"""
    path, ids = corpus
    kw = dict(seq_len=SEQ, batch_size=1, shuffle_buffer=shuffle, seed=2, streams=streams, max_epochs=2)
    spec, seen, states = DataSpec.parse(str(path)), [], []
    for rank in range(before):
        got, state = read(BlockStream(spec, rank=rank, world_size=before, **kw), ids, 3 + rank, workers=rank % 2)
        seen += got
        states.append(state)
    for rank in range(after):
        got, _ = read(BlockStream(spec, rank=rank, world_size=after, state=states, **kw), ids)
        assert {i % streams % after for i in got} == {rank}  # its own streams' documents (stream = i % streams)
        seen += got
    twice = Counter(2 * list(range(DOCS)))
    assert not Counter(seen) - twice, sorted(seen)  # none more than twice
    assert sum((twice - Counter(seen)).values()) <= streams * shuffle, sorted(seen)  # none missing, but buffered


def test_a_state_keeps_its_layout_with_one_stream_per_process(corpus):
    """One stream per process: the state is the layout from before streams (a flat dict, its
    stream that of its rank), so checkpoints saved before streams resume unchanged, exactly."""
    path, ids = corpus
    spec = DataSpec.parse(str(path))
    _, state = read(BlockStream(spec, SEQ, 2, rank=1, world_size=2), ids, 2)
    assert {"epoch", "source", "carry", "rank", "world_size"} <= state.keys() and "turn" not in state
    _, two = read(BlockStream(spec, SEQ, 2, rank=0, world_size=1, streams=2), ids, 2)
    assert {"0.source", "1.source", "turn"} <= two.keys() and two["streams"] == 2
    with pytest.raises(Exception, match="split into 2 stream"):
        BlockStream(spec, SEQ, 2, rank=0, world_size=3, state=[state])


# -- a run saved by one number of processes, resumed on another ----------------------------------

B, STEPS = 2, 9  # batch per process; the run's steps, saved every 3

# Records every batch a trainer takes (its token ids, a line per batch: a step), one file per
# process: a sitecustomize for the processes a launcher starts; the same function, in-process.
HOOK = """
import json, os

from smolctl import loader


def recording(inner):
    def batches(stream, num_workers=None):
        it, path = inner(stream, num_workers), os.path.join(os.environ["IDS_DIR"], f"rank{stream.rank}.jsonl")
        try:
            for batch, state in it:
                with open(path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(batch.tolist()) + "\\n")
                yield batch, state
        finally:
            it.close()
    return batches


if __name__ == "sitecustomize":
    loader.batches = recording(loader.batches)
"""


def test_one_process_resumed_on_two_and_back_on_one(tmp_path, corpus, cli, monkeypatch):
    """One process with data_streams: 2 (its default, one stream, could not be shared by two) trains
    to step 9; resumed from step 3 on two processes, then from step 6 on one again. Across the three,
    each stream's documents come in its own order, none skipped or repeated within an epoch; steps,
    tokens, the optimizer and the schedule continue, and each resume says what changed, once."""
    import smolctl.run
    from smolctl.checkpoint import read_optimizer

    path, ids = corpus
    hook = {}
    exec(HOOK, hook)
    monkeypatch.setattr(smolctl.run, "batches", hook["recording"](smolctl.run.batches))
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HOOK)
    model = ", ".join(f"{k}: {v}" for k, v in MICRO.items())
    (tmp_path / "micro.yaml").write_text(
        f"model: {{preset: tiny, {model}}}\ndata: {path}\nbatch_size: {B}\nseq_len: {SEQ}\nmixed_precision: 'no'\n"
        f"log_every: 1\nsave_every: 3\nlr: 0.01\nnum_workers: 0\ndevice: cpu\nmax_steps: {STEPS}\n")

    def recorded(phase: str) -> Path:
        (tmp_path / phase).mkdir()
        monkeypatch.setenv("IDS_DIR", str(tmp_path / phase))
        return tmp_path / phase

    def losses() -> dict[int, dict]:
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r for r in rows if r["event"] == "train"}

    one = recorded("one")
    r = cli("train", "--config", tmp_path / "micro.yaml", "--data-streams", 2, "--run-dir", tmp_path / "run",
            "--no-dashboard")
    assert r.exit_code == 0, r.output
    straight = losses()
    two = recorded("two")
    r = subprocess.run([sys.executable, "-m", "smolctl", "resume", "--num-processes", "2", "--run-dir", "run",
                        "--from", "3", "--no-dashboard"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**env(tmp_path), "IDS_DIR": str(two), "PYTHONPATH": os.pathsep.join(
                           [str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("World size 1 -> 2: data positions re-dealt; not bit-exact") == 1, r.stdout
    back = recorded("back")
    r = cli("resume", "--run-dir", tmp_path / "run", "--from", "6", "--no-dashboard")
    assert r.exit_code == 0, r.output
    assert r.output.count("World size 2 -> 1: data positions re-dealt; not bit-exact") == 1, r.output

    def steps(folder: Path, rank: int, n: int | None = None) -> list[int]:
        lines = (folder / f"rank{rank}.jsonl").read_text().splitlines()[:n]
        return [ids[tuple(row)] for line in lines for row in json.loads(line)]

    read = steps(one, 0, 3) + steps(two, 0, 3) + steps(two, 1, 3) + steps(back, 0)
    assert len(read) == B * (3 + 3 * 2 + 3)
    for s in (0, 1):  # stream s: documents s, s + 2, ...; each process reads its streams in their order
        mine = [i for i in read if i % 2 == s]
        assert mine == (list(range(s, DOCS, 2)) * 2)[:len(mine)], (s, mine)
    train = losses()
    assert sorted(train) == list(range(1, STEPS + 1))  # each step once
    assert all(train[s]["lr"] == straight[s]["lr"] for s in train)  # the schedule continued
    assert train[4]["loss"] < train[1]["loss"] - 0.1 and train[4]["loss"] != straight[4]["loss"]  # its weights, other data
    final = tmp_path / "run" / "checkpoints" / "final"
    meta = json.loads((final / "smolctl.json").read_text())
    assert (meta["step"], meta["world_size"], meta["tokens_seen"]) == (STEPS, 1, len(read) * SEQ)
    assert {float(v["step"]) for v in read_optimizer(final)["state"].values()} == {float(STEPS)}  # AdamW's too
