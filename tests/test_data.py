import json
import os
import time

import pytest
import torch
from conftest import write_corpus

from smolctl import corpus, data
from smolctl.data import BlockStream, DataSpec, auto_workers, batches
from smolctl.errors import SmolctlError
from smolctl.tokenizer import load_tokenizer


def stream_tokens(paths, epochs=1):
    """The reference token stream: every document's tokens followed by <|endoftext|>."""
    tok = load_tokenizer()
    docs = [json.loads(line)["text"] for p in paths for line in open(p, encoding="utf-8")]
    out = []
    for _ in range(epochs):
        for d in docs:
            out += tok(d, add_special_tokens=False).input_ids + [0]
    return out


def take(stream, n=None, workers=0):
    out = []
    for batch, state in batches(stream, workers):
        out.append((batch, state))
        if n is not None and len(out) == n:
            break
    return out


def test_packing_uses_every_token_once_across_blocks_and_epochs(corpus):
    spec = DataSpec.parse(str(corpus))
    got = take(BlockStream(spec, seq_len=15, batch_size=3, max_epochs=2))
    assert all(b.shape == (3, 16) and b.dtype == torch.long for b, _ in got)
    flat = torch.cat([b.flatten() for b, _ in got]).tolist()
    ref = stream_tokens([corpus], epochs=2)
    assert flat == ref[:len(flat)]  # nothing dropped or padded, in order
    assert len(ref) - len(flat) < 3 * 16  # only the last partial batch is still in the carry
    assert got[-1][1]["epoch"] == 1


@pytest.mark.parametrize("shuffle", [0, 5])
@pytest.mark.parametrize("workers", [0, 1])
def test_resume_twice_gives_the_identical_stream(corpus, shuffle, workers):
    spec = DataSpec.parse(str(corpus))
    kw = dict(seq_len=15, batch_size=2, shuffle_buffer=shuffle, seed=3, max_epochs=3)
    straight = take(BlockStream(spec, **kw))
    first = take(BlockStream(spec, **kw), 7, workers)
    second = take(BlockStream(spec, state=first[-1][1], **kw), 9, workers)
    rest = take(BlockStream(spec, state=second[-1][1], **kw), workers=workers)
    resumed = [b for b, _ in first + second + rest]
    assert len(resumed) == len(straight)
    assert all(torch.equal(a, b) for a, (b, _) in zip(resumed, straight))


# -- several workers -----------------------------------------------------------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 documents: the 24-document corpus is 8 chunks an epoch, shared out among the
    workers (DataLoader workers are forked, so they see the patched value)."""
    monkeypatch.setattr(data, "TOKENIZE_DOCS", 3)


def same(got, want) -> bool:
    """Two runs of (batch, state): the same batches, and states that resume alike."""
    def equal(a, b):
        return torch.equal(a, b) if torch.is_tensor(a) else a == b

    return len(got) == len(want) and all(
        torch.equal(b1, b2) and s1.keys() == s2.keys() and all(equal(s1[k], s2[k]) for k in s1)
        for (b1, s1), (b2, s2) in zip(got, want))


@pytest.mark.parametrize("shuffle", [0, 5])
def test_any_number_of_workers_gives_the_same_blocks_and_states(corpus, small_chunks, shuffle):
    spec = DataSpec.parse(str(corpus))
    kw = dict(seq_len=15, batch_size=2, shuffle_buffer=shuffle, seed=3, max_epochs=2)
    inline = take(BlockStream(spec, **kw))
    assert len({s["docs"] for _, s in inline}) > 6  # the batches end in many chunks: every worker had some
    for workers in (1, 2, 3):
        assert same(take(BlockStream(spec, **kw), workers=workers), inline), workers


@pytest.mark.parametrize("shuffle", [0, 5])
def test_a_resume_may_change_the_number_of_workers(corpus, small_chunks, shuffle):
    spec = DataSpec.parse(str(corpus))
    kw = dict(seq_len=15, batch_size=2, shuffle_buffer=shuffle, seed=3, max_epochs=2)

    def resumed(workers):  # 7 batches (mid-chunk, mid-epoch), 30 more (into epoch 2), the rest
        out, state = [], None
        for n, w in zip((7, 30, None), workers):
            out += take(BlockStream(spec, state=state, **kw), n, w)
            state = out[-1][1]
        return out

    straight = take(BlockStream(spec, **kw), workers=1)
    got = resumed((2, 3, 0))
    assert got[36][1]["epoch"] == 1
    assert len(got) == len(straight) and all(torch.equal(a, b) for (a, _), (b, _) in zip(got, straight))
    assert same(got, resumed((0, 0, 0)))  # and the states (datasets' counters differ after a resume)


def test_an_error_in_a_later_workers_share_arrives_after_the_blocks_before_it(tmp_path, small_chunks):
    """Document 4 is in chunk 1, worker 1's: chunk 0's blocks come out, then its one-line error."""
    path = write_corpus(tmp_path / "c.jsonl", n_docs=9)
    lines = path.read_text().splitlines()
    lines[4] = json.dumps({"text": None})
    path.write_text("\n".join(lines) + "\n")
    got = []
    with pytest.raises(SmolctlError, match="holds NoneType, not text"):
        for item in batches(BlockStream(DataSpec.parse(str(path)), seq_len=3, batch_size=1), 2):
            got.append(item[0])
    chunk0 = stream_tokens([write_corpus(tmp_path / "first3.jsonl", n_docs=3)])
    assert torch.cat(got).flatten().tolist() == chunk0[:len(got) * 4] and len(chunk0) - len(got) * 4 < 4


@pytest.mark.parametrize("cores, processes, workers", [(1, 1, 1), (2, 1, 1), (8, 1, 4), (16, 1, 4),
                                                       (8, 2, 3), (16, 8, 1)])
def test_auto_workers_leaves_a_core_to_each_trainer(monkeypatch, cores, processes, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert auto_workers() == workers


def test_shuffle_changes_order_not_content(corpus):
    spec = DataSpec.parse(str(corpus))
    plain = take(BlockStream(spec, seq_len=15, batch_size=1, max_epochs=1))
    mixed = take(BlockStream(spec, seq_len=15, batch_size=1, shuffle_buffer=8, seed=1, max_epochs=1))
    plain_rows = [tuple(b[0].tolist()) for b, _ in plain]
    mixed_rows = [tuple(b[0].tolist()) for b, _ in mixed]
    assert plain_rows != mixed_rows[:len(plain_rows)]
    assert set(mixed_rows) <= set(plain_rows)  # only reordered (the buffer's tail waits for epoch 2)


def test_ranks_see_disjoint_data(tmp_path):
    paths = [write_corpus(tmp_path / f"part{i}.jsonl", seed=i) for i in range(2)]
    spec = DataSpec.parse(str(tmp_path))
    seen = []
    for rank in range(2):
        blocks = take(BlockStream(spec, seq_len=15, batch_size=1, rank=rank, world_size=2, max_epochs=1))
        seen.append({tuple(b[0].tolist()) for b, _ in blocks})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    tok = load_tokenizer()
    doc0 = tok(json.loads(open(paths[0]).readline())["text"], add_special_tokens=False).input_ids
    assert any(tuple(doc0[:8]) == row[:8] for row in seen[0])  # rank 0 got part0 (whole-file sharding)


def test_more_processes_than_streams_is_refused(corpus):
    """One stream (a one-process run's default) cannot be shared by two processes (see
    test_resume_world_size.py for what streams allow)."""
    spec = DataSpec.parse(str(corpus))
    state = take(BlockStream(spec, seq_len=15, batch_size=1), 2)[-1][1]
    with pytest.raises(SmolctlError, match="split into 1 stream.*fewer than the 2 processes") as e:
        take(BlockStream(spec, seq_len=15, batch_size=1, rank=0, world_size=2, state=state), 1)
    assert "data_streams" in e.value.hint


def test_local_formats_go_through_datasets_streaming(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("A text file is one document.\nWith two lines.", encoding="utf-8")
    datasets.Dataset.from_dict({"body": ["parquet row one", "parquet row two"]}).to_parquet(tmp_path / "b.parquet")
    txt = DataSpec.parse(str(tmp_path / "*.txt"))
    assert (txt.kind, txt.files) == ("text", (str(tmp_path / "a.txt"),))
    ds = txt.open()
    assert isinstance(ds, datasets.IterableDataset)
    assert [r["text"] for r in ds] == ["A text file is one document.\nWith two lines."]
    pq = DataSpec.parse(str(tmp_path / "b.parquet"), text_column="body")
    blocks = take(BlockStream(pq, seq_len=3, batch_size=1, max_epochs=1))
    tok = load_tokenizer()
    ref = tok("parquet row one", add_special_tokens=False).input_ids + [0]
    assert blocks[0][0][0].tolist() == ref[:4]


def test_sample_corpus_name(tmp_path, monkeypatch):
    spec = DataSpec.parse("sample")
    assert spec.kind == "parquet" and spec.files[0].endswith("smolctl/assets/sample/train.parquet")
    assert DataSpec.parse("sample", split="heldout").files[0].endswith("smolctl/assets/sample/heldout.parquet")
    monkeypatch.setattr(corpus, "SAMPLE_DIR", tmp_path)  # an installation that lost its package data
    with pytest.raises(SmolctlError, match="the bundled sample corpus is missing .*installation is broken") as e:
        DataSpec.parse("sample")
    assert e.value.exit_code == 1 and "Reinstall smolctl" in e.value.hint


@pytest.mark.parametrize("setup, words", [
    (lambda p: p.write_text(""), "the corpus is empty"),
    (lambda p: p.write_text('{"body": "x"}\n'), "no 'text' column (columns: body). Pick one with --text-column"),
    (lambda p: p.write_text('{"text": 5}\n'), "holds int, not text"),
])
def test_bad_corpora(tmp_path, setup, words):
    path = tmp_path / "bad.jsonl"
    setup(path)
    with pytest.raises(SmolctlError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        take(BlockStream(DataSpec.parse(str(path)), seq_len=7, batch_size=1), 1)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_non_utf8_text_is_a_clear_error(tmp_path, workers):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(SmolctlError, match="not UTF-8"):
        take(BlockStream(DataSpec.parse(str(tmp_path / "latin1.txt")), seq_len=7, batch_size=1), 1, workers)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_files_that_disagree_are_a_clear_error_wherever_they_are_read(tmp_path, workers):
    """The second file has a column the first has not: datasets fails on it mid-stream (here in the
    third chunk), in a worker or inline; the trainer gets one line, not a worker's traceback."""
    write_corpus(tmp_path / "a.jsonl", n_docs=2 * data.TOKENIZE_DOCS + 10)
    write_corpus(tmp_path / "b.jsonl", n_docs=5, extra={"meta": 1})
    with pytest.raises(SmolctlError, match=r"cannot read 2 local json file\(s\): .*b.jsonl has the columns "
                                           r"\(text, meta\), not the dataset's \(text\)") as e:
        take(BlockStream(DataSpec.parse(str(tmp_path)), seq_len=7, batch_size=1, max_epochs=1), None, workers)
    assert "same columns" in e.value.hint


def test_encode_gives_what_the_tokenizers_call_gives():
    """The direct `tokenizers` call, and its fallback where the backend would truncate (a
    tokenizer.json with truncation set: transformers' call turns it off, the backend would not)."""
    import copy
    import random

    tok = load_tokenizer()
    rng = random.Random(1)
    bits = ["a", "Zz", " ", "\n", "1", "234", ". ", "é", "中文", "<|endoftext|>", "<|im_start|>", "🙂", "\u00a0"]
    texts = ["".join(rng.choice(bits) for _ in range(rng.randint(0, 200))) for _ in range(50)]
    want = tok(texts, add_special_tokens=False)["input_ids"]
    assert data.encode(tok, texts) == want
    truncating = copy.deepcopy(tok)
    truncating.backend_tokenizer.enable_truncation(8)
    assert data.encode(truncating, texts) == want and max(map(len, want)) > 8


def test_missing_path():
    with pytest.raises(SmolctlError, match="no such file or directory"):
        DataSpec.parse("/no/such/corpus.jsonl")


def test_offline_hub_fails_fast_naming_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(SmolctlError, match="cannot reach the Hugging Face hub.*--data sample"):
        take(BlockStream(DataSpec.parse("cosmopedia-v2"), seq_len=7, batch_size=1), 1)
    assert time.perf_counter() - t < 10
