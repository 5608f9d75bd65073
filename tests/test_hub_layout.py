"""The hub path without a network: a local directory laid out like HuggingFaceTB/smollm-corpus, read
through the same `load_dataset(path, "cosmopedia-v2", streaming=True)` call as the hub, trained on,
resumed from, and split over ranks by shard."""

import json
import random

import pytest
from conftest import WORDS

from smolctl import data
from smolctl.data import BlockStream, DataSpec

# 7 row groups per shard; documents are read 64 at a time, so resume points land inside shards
SHARDS, DOCS, ROW_GROUP = 4, 100, 16

README = """---
license: odc-by
dataset_info:
- config_name: cosmopedia-v2
  features:
  - {name: prompt, dtype: string}
  - {name: text, dtype: string}
  - {name: token_length, dtype: int64}
  - {name: audience, dtype: string}
  - {name: format, dtype: string}
  - {name: seed_data, dtype: string}
configs:
- config_name: cosmopedia-v2
  data_files:
  - split: train
    path: cosmopedia-v2/train-*
- config_name: python-edu
  data_files:
  - split: train
    path: python-edu/train-*
---
# SmolLM-Corpus (a local copy, laid out as on the hub)
"""


def cosmopedia_rows(shard: int, n: int) -> list[dict]:
    rng = random.Random(shard)
    rows = []
    for i in range(n):
        text = f"Shard {shard} doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 50))) + "."
        rows.append({"prompt": f"Write about {rng.choice(WORDS)}.", "text": text, "token_length": len(text.split()),
                     "audience": rng.choice(["general", "college_students"]), "format": "textbook",
                     "seed_data": rng.choice(["web_samples_v2", "stanford"])})
    return rows


@pytest.fixture
def corpus_repo(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "smollm-corpus"
    (root / "cosmopedia-v2").mkdir(parents=True)
    (root / "python-edu").mkdir()
    (root / "README.md").write_text(README)
    for shard in range(SHARDS):
        pq.write_table(pa.Table.from_pylist(cosmopedia_rows(shard, DOCS)), row_group_size=ROW_GROUP,
                       where=root / "cosmopedia-v2" / f"train-{shard:05d}-of-{SHARDS:05d}.parquet")
    pq.write_table(pa.Table.from_pylist([{"blob_id": "x", "text": "def f(): pass"}]),
                   root / "python-edu" / "train-00000-of-00001.parquet")  # another config: not read
    return root


@pytest.fixture
def no_network(monkeypatch):
    """Any check of the hub's reachability fails the test: the local copy must not need one."""
    import smolctl.hub

    def refuse(*a, **k):
        raise AssertionError("the hub was consulted")

    monkeypatch.setattr(smolctl.hub, "hub_reachable", refuse)


def texts(ds) -> list[str]:
    return [row["text"] for row in ds]


def test_a_local_copy_goes_through_the_hub_call(corpus_repo, no_network, monkeypatch):
    import datasets

    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    spec = DataSpec.parse(f"{corpus_repo}:cosmopedia-v2")
    assert (spec.kind, spec.path, spec.name) == ("hub", str(corpus_repo), "cosmopedia-v2")
    assert "a local copy of a hub dataset" in spec.describe()
    ds = spec.open()
    assert calls == [((str(corpus_repo), "cosmopedia-v2"), {"split": "train", "streaming": True})]
    assert texts(ds) == [r["text"] for s in range(SHARDS) for r in cosmopedia_rows(s, DOCS)]  # shard order
    hub = DataSpec.parse("HuggingFaceTB/smollm-corpus:cosmopedia-v2")  # the hub id: the same kind of spec
    assert (hub.kind, hub.name) == ("hub", "cosmopedia-v2")


def test_two_ranks_get_disjoint_whole_shards(corpus_repo, no_network):
    spec = DataSpec.parse(f"{corpus_repo}:cosmopedia-v2")
    every = texts(spec.open())
    ranks = [texts(spec.open(rank, 2)) for rank in range(2)]
    shards = [{t.split(" doc")[0] for t in r} for r in ranks]
    assert shards == [{"Shard 0", "Shard 2"}, {"Shard 1", "Shard 3"}]  # whole files, as datasets assigns them
    assert not set(ranks[0]) & set(ranks[1]) and sorted(ranks[0] + ranks[1]) == sorted(every)
    odd = DataSpec.parse(f"{corpus_repo}:cosmopedia-v2")  # 4 shards over 3 ranks: every 3rd document
    thirds = [texts(odd.open(rank, 3)) for rank in range(3)]
    assert [t for r in zip(*thirds) for t in r] == every[:len(thirds[-1]) * 3]


@pytest.mark.parametrize("rank, world", [(0, 1), (1, 2)])
def test_the_stream_resumes_exactly_inside_a_shard(corpus_repo, no_network, rank, world):
    spec = DataSpec.parse(f"{corpus_repo}:cosmopedia-v2")

    def stream(state=None):
        return iter(BlockStream(spec, seq_len=64, batch_size=4, rank=rank, world_size=world, state=state))

    straight = [next(it) for it in [stream()] for _ in range(30)]
    sources = [state["source"] for _, state in straight]
    assert len({json.dumps(s) for s in sources}) >= 3  # several source positions, not one read of everything
    for k in (4, 12, 25):
        resumed = stream(straight[k][1])
        assert [next(resumed)[0].tolist() for _ in range(k + 1, 30)] == [b.tolist() for b, _ in straight[k + 1:]]
    # A state saved before row-group seeking (rows counted per file, no "seekable" key) resumes exactly too.
    old = iter(BlockStream(spec, 64, 4, rank=rank, world_size=world, state={"rank": rank, "world_size": world,
                                                                            "seekable": False}))
    legacy = [next(old) for _ in range(26)][-1][1]
    resumed = stream({k: v for k, v in legacy.items() if k != "seekable"})
    assert [next(resumed)[0].tolist() for _ in range(4)] == [b.tolist() for b, _ in straight[26:]]
    # And one saved when the source was read a row at a time (no "read_rows" key): its position
    # counts single rows, which a chunk-sized read would take for chunks.
    rowwise = [next(it) for it in [iter(BlockStream(spec, 64, 4, rank=rank, world_size=world, state={
        "rank": rank, "world_size": world, "seekable": True, "read_rows": 1}))] for _ in range(30)]
    assert [b.tolist() for b, _ in rowwise] == [b.tolist() for b, _ in straight]
    misread = 0
    for k in (4, 12, 25):
        legacy = rowwise[k][1]
        assert legacy["read_rows"] == 1
        resumed = stream({key: v for key, v in legacy.items() if key != "read_rows"})
        assert [next(resumed)[0].tolist() for _ in range(k + 1, 30)] == [b.tolist() for b, _ in straight[k + 1:]]
        wrong = stream({**legacy, "read_rows": data.TOKENIZE_DOCS})
        misread += [next(wrong)[0].tolist() for _ in range(k + 1, 30)] != [b.tolist() for b, _ in straight[k + 1:]]
    assert misread  # the read size is part of the position


def test_train_and_resume_from_the_local_copy(micro_cfg, corpus_repo, no_network, tmp_path):
    from smolctl.train import train

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if r["event"] == "train"]

    # B8 x S64: about 5 steps per 64 documents read, so step 6's data position is inside shard 1
    cfg = micro_cfg(data=f"{corpus_repo}:cosmopedia-v2", batch_size=8, seq_len=64, max_steps=10, save_every=6)
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed")
    train(cfg, tmp_path / "resumed", resume="6")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 10


def test_a_shard_with_other_columns_is_named_in_one_whole_line(corpus_repo, no_network):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from smolctl.errors import SmolctlError

    odd = corpus_repo / "cosmopedia-v2" / "train-00004-of-00005.parquet"  # last: found after 400 documents
    pq.write_table(pa.Table.from_pylist([{"text": "odd one out", "url": "https://example.com"}]), odd)
    spec = DataSpec.parse(f"{corpus_repo}:cosmopedia-v2")
    with pytest.raises(SmolctlError) as caught:
        for _ in zip(range(10_000), BlockStream(spec, seq_len=64, batch_size=4)):
            pass
    message = str(caught.value)
    assert f"{odd} has the columns (text, url), not the dataset's (prompt, text, token_length, audience, " \
           "format, seed_data)" in message  # the file, and the expected columns whole (it was cut mid-word)
    assert "\n" not in message and len(message) < 500
