"""Training data: documents -> tokens -> packed blocks, with exactly resumable state.

    spec = DataSpec.parse("sample")             # or "cosmopedia-v2", "org/name", a file, dir or glob
    stream = BlockStream(spec, seq_len=256, batch_size=8, tokenizer=None, rank=0, world_size=1)
    for batch, state in stream:                 # batch: (8, 257) int64; state: JSON-able + tensors
        ...
    for batch, state in batches(stream, 2):     # the same, tokenized in 2 background processes
    stream = BlockStream(..., state=state)      # continues with the very next batch

Every source -- the hub's cosmopedia-v2 or local .jsonl/.json/.parquet/.txt files -- is read through
`datasets.load_dataset(..., streaming=True)`. Documents are tokenized with the run's tokenizer (the
bundled SmolLM2 one by default), each followed by its document separator (SmolLM2: <|endoftext|>,
id 0; see tokenizer.document_separator), and the token stream is cut into consecutive blocks of
seq_len + 1 tokens (inputs = block[:-1], labels = block[1:]): no padding, and every token lands
in exactly one block, tails of documents carrying over into the next block (and across epochs).

The resumable state is ours, not `datasets`' shuffle (which doesn't save its buffer): the
source position (`IterableDataset.state_dict()`, taken from a fresh dataset per epoch), the
carry-over tokens, the optional block shuffle buffer and its RNG, the epoch and counters -- one
set per data stream. The documents are split into streams (one per process by default), dealt out
to the processes; a run saved by N processes resumes on M <= streams, each stream going on from
its own position (not bit for bit: the batches mix other streams), every document read once per
epoch of its stream.

Tokenizing is ~90% of the pipeline's CPU time, so that is what runs in parallel: N worker processes
each read every group of TOKENIZE_DOCS documents as an Arrow table (its text becomes Python only in
the worker that tokenizes it) and tokenize every N-th group; the trainer packs the groups in
document order (loader.py). The blocks, their order and the state are the same for any N. Where
the documents come from, and reading them with one-line errors: corpus.py.
"""

from __future__ import annotations

import array
import itertools
import random
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from smolctl.corpus import (  # noqa: F401 -- DataSpec, SAMPLE_DIR, CHECK_CHARS, first_document: used from here too
    CHECK_CHARS,
    SAMPLE_DIR,
    DataSpec,
    first_document,
    read_guarded,
    reading,
    table_texts,
)
from smolctl.errors import SmolctlError
from smolctl.loader import Failed, auto_workers, batches  # noqa: F401 -- batches, auto_workers: used from here too

TOKENIZE_DOCS = 64  # documents tokenized per call (the Rust tokenizer batches them)
PIECE_CHARS = 1 << 14  # a longer document is tokenized in pieces of about this many characters


class BlockStream:
    """Yields (batch of blocks, state after that batch) forever, epoch after epoch.

    Two halves: `chunks()` reads and tokenizes the documents (the expensive part), TOKENIZE_DOCS
    at a time; `pack()` cuts their tokens into blocks, in document order, and keeps the state. Any
    number of processes can run `chunks()`, each tokenizing every N-th chunk, while one `pack()`
    takes the chunks back in order (see `batches`): the blocks, their order and the states are the
    same for any number of workers. `tokenizer` is a loaded tokenizer (the run's or the model's),
    None for the bundled one.

    Streams: the documents are split into `streams` shares (default: one per process), each with
    its own position, carry-over and shuffle buffer; process `rank` takes streams rank, rank +
    world_size, ... and reads them a chunk at a time, in turn, the stream with the fewest epochs
    behind it first. A state holds the positions of this process's streams; `state` may be one
    process's state or every process's (a list), which a run with another world size deals out
    anew: each stream goes on where it stopped, whichever process now reads it.
    """

    def __init__(self, spec: DataSpec, seq_len: int, batch_size: int, tokenizer=None,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0, seed: int = 0,
                 state: dict[str, Any] | list[dict[str, Any]] | None = None, max_epochs: int | None = None,
                 streams: int | None = None):
        states = [] if not state else [state] if isinstance(state, dict) else list(state)
        saved, self.positions = stream_states(states)
        self.streams = saved or streams or world_size
        if self.streams < world_size:
            raise SmolctlError(f"the data is split into {self.streams} stream(s), fewer than the {world_size} "
                               "processes: each process needs one of its own",
                               hint="Set data_streams to at least the number of processes")
        self.mine = list(range(rank, self.streams, world_size))  # this process's streams
        if states and any(s not in self.positions for s in self.mine):
            raise SmolctlError(f"this data state holds stream(s) {sorted(self.positions)}, not stream(s) "
                               f"{self.mine} of rank {rank} of {world_size} processes",
                               hint="Resume from the data states of every process of the run")
        # whose turn it is among this process's streams: continued at the same world size, else from the first
        own = [st for st in states if (st.get("rank", 0), st.get("world_size", 1)) == (rank, world_size)]
        self.turn = own[0].get("turn", 0) if own else 0
        self.spec, self.seq_len, self.batch_size = spec, seq_len, batch_size
        self.tokenizer, self.rank, self.world_size = tokenizer, rank, world_size
        self.shuffle_buffer, self.seed, self.max_epochs = shuffle_buffer, seed, max_epochs

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        return self.pack(self.chunks())

    def chunks(self, worker: int = 0, workers: int = 1) -> Iterator[Chunk]:
        """Chunk i (the i-th TOKENIZE_DOCS documents of one stream, the streams taking turns from
        where this stream of chunks starts; an epoch's last chunk may be shorter) tokenized, for
        each i with i % workers == worker. Every worker reads every chunk, as an Arrow table -- a
        few percent of the cost -- and tokenizes its own. The order is decided by what is read,
        never by the tokens: the same for every worker."""
        from smolctl.tokenizer import document_separator, load_tokenizer

        tok = load_tokenizer() if self.tokenizer is None else self.tokenizer
        separator = document_separator(tok)
        readers = {s: self._tables(s) for s in self.mine}
        heads = {s: next(readers[s], None) for s in self.mine}  # each stream's next table, read ahead
        turn, index = self.turn, 0
        while any(head is not None for head in heads.values()):
            # the next stream in turn among those with the fewest epochs behind them: every document
            # of this process's streams is read once before any is read again
            low = min(head[0] for head in heads.values() if head is not None)
            order = self.mine[turn:] + self.mine[:turn]
            s = next(s for s in order if heads[s] is not None and heads[s][0] == low)
            turn = (self.mine.index(s) + 1) % len(self.mine)
            epoch, docs, source, seekable, read = heads[s]
            if index % workers == worker:
                ids = token_ids(tok, table_texts(docs, self.spec), separator).numpy()
                yield Chunk(index, epoch, docs.num_rows, ids, source, seekable, read, s)
            index += 1
            heads[s] = next(readers[s], None)

    def _tables(self, stream: int) -> Iterator[tuple]:
        """Stream `stream`'s documents from its saved position on, TOKENIZE_DOCS at a time: (epoch,
        Arrow table, source position after it, seekable, rows per read)."""
        st = self.positions.get(stream, {})
        epoch, source_state = st.get("epoch", 0), st.get("source")
        seekable = st.get("seekable", not st)  # states saved before row-group seeking count rows per file
        # Documents per read: a source position is the dataset's state after a read of this many
        # rows, and means something else after reads of another size. States saved before
        # chunk-sized reads resume one row at a time, to the end of their epoch.
        read = st.get("read_rows", 1 if source_state is not None else TOKENIZE_DOCS)
        while self.max_epochs is None or epoch < self.max_epochs:
            with reading(self.spec):
                ds = self.spec.open(stream, self.streams, seekable).with_format("arrow")
                if source_state is not None:
                    ds.load_state_dict(source_state)
            epoch_docs = 0
            for docs in read_guarded(self.spec, _chunk_tables(ds, read)):
                epoch_docs += docs.num_rows
                yield epoch, docs, ds.state_dict(), seekable, read
            if epoch_docs == 0 and source_state is None:
                raise SmolctlError(f"the corpus is empty: {self.spec.describe()} has no documents"
                                   + (f" for stream {stream} of {self.streams}" if self.streams > 1 else ""),
                                   hint=f"Point {self.spec.flags[0]} at files with text in them"
                                        + (", or use fewer data streams" if self.streams > 1 else ""))
            epoch, source_state, seekable, read = epoch + 1, None, True, TOKENIZE_DOCS

    def pack(self, chunks: Iterator[Chunk]) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """The chunks' tokens cut into blocks of seq_len + 1, each stream's through its optional
        shuffle buffer, batch_size at a time, each batch with the state that resumes right after it."""
        packers = {s: _Packer(self.positions.get(s), self.seq_len + 1, self.shuffle_buffer, self.seed * 1000 + s)
                   for s in self.mine}
        turn = self.turn
        ready: list[torch.Tensor] = []  # blocks coming out of the (optional) shuffle buffers
        # First the whole blocks a resumed state still carries (a stream dealt to this process may
        # read nothing more for a while), then each chunk's, as they arrive.
        carried = ((s, None) for s in self.mine)
        for s, chunk in itertools.chain(carried, ((c.stream, c) for c in _in_order(chunks))):
            if chunk is not None:  # the next stream in turn after this chunk's
                turn = (self.mine.index(s) + 1) % len(self.mine)
            for blk in packers[s].add(chunk):
                ready.append(blk)
                if len(ready) == self.batch_size:
                    yield torch.stack(ready), self._state(packers, turn)
                    ready = []

    def _state(self, packers: dict[int, _Packer], turn: int) -> dict[str, Any]:
        """This process's state: with one stream per process, that stream's (the layout from before
        streams); else each stream's keys prefixed with its number ("3.carry"), and whose turn it is."""
        where = {"rank": self.rank, "world_size": self.world_size}
        if self.streams == self.world_size:
            return {**packers[self.rank].state(), **where}
        state = {**where, "streams": self.streams, "turn": turn}
        for s, packer in packers.items():
            state.update({f"{s}.{k}": v for k, v in packer.state().items()})
        return state


class _Packer:
    """One stream's packing: its tokens not yet in a block, its shuffle buffer and RNG, its counters,
    and the source position of the last chunk it took."""

    def __init__(self, st: dict | None, block: int, shuffle_buffer: int, seed: int):
        st = st or {}
        self.block, self.shuffle_buffer = block, shuffle_buffer
        # Tokens not yet in a block: one int32 tensor, never changed in place (a state may hold a
        # view of it), read from `used` on. Cheap to keep, to pass to the trainer, and to save.
        self.carry, self.used = torch.as_tensor(st.get("carry", []), dtype=torch.int32), 0
        self.buffer: list[torch.Tensor] = list(st["buffer"].unbind(0)) if "buffer" in st else []
        self.rng = random.Random(seed)
        if "rng" in st:
            self.rng.setstate(tuples(st["rng"]))
        self.docs, self.tokens = st.get("docs", 0), st.get("tokens", 0)
        fresh = {"epoch": 0, "source": None, "seekable": True, "read_rows": TOKENIZE_DOCS}
        self.where = {k: st[k] for k in fresh if k in st} if st else fresh

    def add(self, chunk: Chunk | None) -> Iterator[torch.Tensor]:
        """The blocks that come out once `chunk`'s tokens are in (None: the whole blocks carried
        already): each yielded block is counted in `state()` already."""
        self.carry, self.used = self.carry[self.used:], 0
        if chunk is not None:
            self.docs += chunk.docs
            self.where = {"epoch": chunk.epoch, "source": chunk.source, "seekable": chunk.seekable,
                          "read_rows": chunk.read_rows}
            self.carry = torch.cat([self.carry, torch.from_numpy(chunk.tokens)])
        whole = len(self.carry) // self.block * self.block  # the whole blocks, cut in one go (int64: the model's ids)
        for blk in self.carry[:whole].view(-1, self.block).long().unbind(0):
            self.used += self.block
            self.tokens += self.block
            if self.shuffle_buffer:
                self.buffer.append(blk)
                if len(self.buffer) < self.shuffle_buffer:
                    continue
                i = self.rng.randrange(len(self.buffer))
                self.buffer[i], self.buffer[-1] = self.buffer[-1], self.buffer[i]
                blk = self.buffer.pop()
            yield blk

    def state(self) -> dict[str, Any]:
        state = {**self.where, "carry": self.carry[self.used:], "rng": self.rng.getstate(), "docs": self.docs,
                 "tokens": self.tokens}
        if self.buffer:  # one tensor, not a list of them: what the checkpoint saves
            state["buffer"] = torch.stack(self.buffer)
        return state


def _in_order(chunks: Iterator) -> Iterator[Chunk]:
    """The chunks, checked: a worker's one-line error raised here, in the trainer."""
    for expected, chunk in enumerate(chunks):
        if isinstance(chunk, Failed):
            raise chunk.error()
        if chunk.index != expected:  # the DataLoader hands out workers' items round-robin
            raise RuntimeError(f"data chunk {chunk.index} arrived where chunk {expected} belongs")
        yield chunk


def stream_states(states: list[dict[str, Any]]) -> tuple[int | None, dict[int, dict[str, Any]]]:
    """(the number of streams, each stream's own state) out of processes' states, either layout (a
    state saved before streams is stream `rank` of `world_size`); (None, {}) for none."""
    count, streams = None, {}
    for st in states:
        count = st.get("streams", st.get("world_size", 1))
        if "turn" not in st:  # one stream per process
            streams[st.get("rank", 0)] = {k: v for k, v in st.items() if k not in ("rank", "world_size")}
            continue
        for key, value in st.items():
            s, dot, k = key.partition(".")
            if dot and s.isdigit():
                streams.setdefault(int(s), {})[k] = value
    return count, streams


@dataclass
class Chunk:
    """TOKENIZE_DOCS documents' tokens as a worker hands them to the packer: `index` counts
    chunks from where the stream started, `source` is the source position after these documents.
    (A worker that fails hands the packer a loader.Failed instead.)"""

    index: int
    epoch: int = 0
    docs: int = 0
    # int32, as a NumPy array: pickled through the DataLoader's pipe as bytes, 3x cheaper for the
    # trainer than a tensor's shared-memory file descriptor
    tokens: np.ndarray | None = None
    source: dict | None = None
    seekable: bool = True
    read_rows: int = TOKENIZE_DOCS
    stream: int = 0  # whose documents these are


def token_ids(tok, texts: list[str], separator: int) -> torch.Tensor:
    """The documents' tokens, each followed by `separator` (<|endoftext|>), as one int32 tensor.

    A document longer than PIECE_CHARS is tokenized in pieces (a 50 MB one whole took 7 GB, and
    long inputs tokenize slower), cut where the tokenizer never joins tokens across (see
    `pieces`): the ids are exactly the whole document's. Calls take TOKENIZE_DOCS pieces at most."""
    cut = PIECE_CHARS if _cuts_at_spaces(tok) else None
    out = array.array("i")  # the ids as C ints (int32): 2x faster to fill than a tensor per document
    call = []  # (piece, ends a document) to tokenize together

    def flush():
        if not call:
            return
        for (_, ends), ids in zip(call, encode(tok, [p for p, _ in call])):
            out.extend(ids)
            if ends:
                out.append(separator)
        call.clear()

    for text in texts:
        chunks = pieces(text, cut) if cut and len(text) > cut else [text]
        for i, piece in enumerate(chunks):
            call.append((piece, i == len(chunks) - 1))
            if len(call) == TOKENIZE_DOCS:
                flush()
    flush()
    return torch.from_numpy(np.frombuffer(out, dtype=np.int32)) if out else torch.zeros(0, dtype=torch.int32)


def pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of about `size` characters, each cut just before a space that sits
    between two non-space characters: byte-level BPE pre-tokenizes such a space with the word after
    it (' word'), so no token spans the cut. A stretch with no such space stays whole."""
    out, start = [], 0
    while len(text) - start > size:
        cut = _cut_point(text, start + 1, start + size)
        if cut is None:
            break
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _cut_point(text: str, lo: int, hi: int) -> int | None:
    """The last ' ' in text[lo:hi] between two non-space characters, else the first one after hi."""
    i = text.rfind(" ", lo, hi)
    while i >= lo and (text[i - 1].isspace() or i + 1 >= len(text) or text[i + 1].isspace()):
        i = text.rfind(" ", lo, i)
    if i >= lo:
        return i
    after = _CUT.search(text, hi)
    return after.start() + 1 if after else None


_CUT = re.compile(r"\S \S")


def _cuts_at_spaces(tok) -> bool:
    """Whether cutting before ' word' keeps the ids exact: a byte-level BPE (GPT-2 style, as
    SmolLM2's) with no normalizer and no prefix space. Other tokenizers get whole documents."""
    import json

    key = id(tok)
    if key not in _CUTS:
        spec = json.loads(tok.backend_tokenizer.to_str())
        pre = spec.get("pre_tokenizer") or {}
        steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
        _CUTS[key] = (spec.get("normalizer") is None and any(p.get("type") == "ByteLevel" for p in steps)
                      and all(p.get("type") in ("ByteLevel", "Digits") and not p.get("add_prefix_space")
                              for p in steps))
    return _CUTS[key]


_CUTS: dict[int, bool] = {}


def _chunk_tables(ds, read: int) -> Iterator:
    """The documents of `ds` (formatted "arrow") about TOKENIZE_DOCS at a time, each group one
    Arrow table, read `read` rows at a time: a source position means what it says only after reads
    of the size it was saved with (states saved before chunk-sized reads: 1)."""
    import pyarrow as pa

    # `ds.iter()`, not `iter(ds)`: in a DataLoader worker that hands each worker only some of the
    # files (shards). The source positions are the same.
    rows = ds.iter(batch_size=read)
    per_chunk = max(1, TOKENIZE_DOCS // read)
    if per_chunk == 1:
        return rows
    groups = iter(lambda: list(itertools.islice(rows, per_chunk)), [])
    return (pa.concat_tables(group, promote_options="default") for group in groups)


def encode(tok, texts: list[str]) -> list[list[int]]:
    """`tok(texts, add_special_tokens=False)["input_ids"]`, ~20% faster: a `tokenizers` backend with
    no truncation or padding set is called directly, through `encode_batch_fast`, which skips the
    character offsets that transformers' call has it compute (and then drops)."""
    backend = getattr(tok, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)
    if fast is None or backend.truncation is not None or backend.padding is not None:
        return tok(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in fast(texts, add_special_tokens=False)]


def token_stream(spec: DataSpec, tokenizer=None) -> Iterator[list[int]]:
    """One pass over `spec`'s documents, in order, as token ids, each document followed by the
    tokenizer's document separator: the stream BlockStream packs, for evaluation (which reads it
    once, unpacked). `tokenizer`: the model's, None for the bundled one."""
    from smolctl.tokenizer import document_separator, load_tokenizer

    tok = load_tokenizer() if tokenizer is None else tokenizer
    separator = document_separator(tok)
    with reading(spec):
        ds = spec.open().with_format("arrow")
    for docs in read_guarded(spec, _chunk_tables(ds, TOKENIZE_DOCS)):
        for ids in encode(tok, table_texts(docs, spec)):
            yield ids + [separator]


def tuples(x):
    """JSON turns random.getstate()'s nested tuples into lists; setstate wants tuples back."""
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x
