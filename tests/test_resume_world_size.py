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
import torch
from conftest import MICRO
from test_distributed import SEQ, env, exact_docs, train_losses, write_jsonl

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
