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
carry-over tokens, the optional block shuffle buffer and its RNG, the epoch and counters.

Tokenizing is ~90% of the pipeline's CPU time, so that is what runs in parallel: N worker processes
each read every group of TOKENIZE_DOCS documents as an Arrow table (its text becomes Python only in
the worker that tokenizes it) and tokenize every N-th group; the trainer packs the groups in
document order. The blocks, their order and the state are the same for any N.
"""

from __future__ import annotations

import array
import contextlib
import glob
import itertools
import os
import random
import re
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from smolctl.artifacts import UTF8_HINT
from smolctl.errors import SmolctlError

SAMPLE_DIR = Path(__file__).resolve().parent / "assets" / "sample"  # package data: {train,heldout}.parquet
HUB_DEFAULT = ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
TOKENIZE_DOCS = 64  # documents tokenized per call (the Rust tokenizer batches them)
PIECE_CHARS = 1 << 14  # a longer document is tokenized in pieces of about this many characters
CHECK_DOCS = 1000  # documents the pre-check (first_document) looks at, at most, for one with text
CHECK_CHARS = 1 << 16  # characters of it the pre-check tokenizes


@dataclass(frozen=True)
class DataSpec:
    """Where documents come from. `kind` is "hub" or a `datasets` builder (json, parquet, text)."""

    kind: str
    path: str  # hub repo id, or "" for local files
    name: str | None = None  # hub config name
    files: tuple[str, ...] = ()
    text_column: str = "text"
    # what the messages call the data and its text column: the flags, or the config keys when the
    # values come from a run's config.yaml (resume has no --data)
    flags: tuple[str, str] = field(default=("--data", "--text-column"), compare=False)

    @classmethod
    def parse(cls, data: str, text_column: str = "text", split: str = "train",
              flags: tuple[str, str] = ("--data", "--text-column")) -> DataSpec:
        """'sample' (the bundled corpus; split 'train' or 'heldout'), 'cosmopedia-v2' (the seed's
        hub stream), 'org/name[:config]' (a hub dataset), 'DIR:config' (a local copy of a hub
        dataset repo, read the same way), or local files: a file, directory or glob."""
        flag = flags[0]
        if data == "sample":
            path = SAMPLE_DIR / f"{split}.parquet"
            if not path.is_file():
                raise SmolctlError(f"the bundled sample corpus is missing ({path}): this installation is broken",
                                   hint=f"Reinstall smolctl with pip, "
                                        f"or point {flag} at your files", exit_code=1)
            return cls("parquet", "", files=(str(path),), text_column=text_column, flags=flags)
        if data in ("cosmopedia-v2", "smollm-corpus", "hub"):
            return cls("hub", HUB_DEFAULT[0], HUB_DEFAULT[1], text_column=text_column, flags=flags)
        files = _local_files(data)
        if files and not any(os.path.getsize(f) for f in files):
            raise SmolctlError(f"the corpus is empty: {flag} {data} has only empty files",
                               hint=f"Point {flag} at files with text in them")
        files = [f for f in files if os.path.getsize(f)]  # datasets' json reader chokes on empty files
        if files:
            kinds = {LOCAL_BUILDERS.get(Path(f).suffix.lower()) for f in files}
            if None in kinds or len(kinds) > 1:
                raise SmolctlError(f"{flag} {data}: files must all be .jsonl/.json, .parquet or .txt, "
                                   "one kind at a time")
            return cls(kinds.pop(), "", files=tuple(files), text_column=text_column, flags=flags)
        repo, _, config = data.partition(":")
        if config and Path(repo).expanduser().is_dir():  # a local copy of a hub dataset repo: DIR:config
            return cls("hub", str(Path(repo).expanduser()), config, text_column=text_column, flags=flags)
        from smolctl.hub import looks_like_hub_id, no_local_match

        if looks_like_hub_id(repo):
            return cls("hub", repo, config or None, text_column=text_column, flags=flags)
        hint = ("Pass a .jsonl/.json/.parquet/.txt path, a directory or glob of them, "
                "'sample' for the bundled corpus, or 'cosmopedia-v2'")
        if Path(data).expanduser().is_dir():
            raise SmolctlError(f"{flag} {data}: the directory holds no .jsonl/.json/.parquet/.txt files", hint=hint)
        raise SmolctlError(no_local_match(data, flag), hint=hint)

    def describe(self) -> str:
        if self.kind == "hub":
            where = "a local copy of a hub dataset" if self.local_hub else "from the Hugging Face hub"
            return f"{self.path}" + (f" ({self.name})" if self.name else "") + f" {where}"
        return f"{len(self.files)} local {self.kind} file(s)" if len(self.files) > 1 else self.files[0]

    @property
    def local_hub(self) -> bool:
        return self.kind == "hub" and os.path.isdir(self.path)

    def open(self, rank: int = 0, world_size: int = 1, seekable: bool = True):
        """A fresh streaming `datasets.IterableDataset` over the documents, this rank's share.

        Ranks get whole files (hub shards) when their number divides by the world size, else
        every N-th document. `seekable`: parquet files are read as one source shard per row group,
        so that a resume (datasets' state_dict: a shard index and a row within it) starts at the
        row group it stopped in instead of decoding the file from its start up to there; the
        documents and their order are the same either way.
        """
        import datasets

        if self.kind == "hub":
            from smolctl.hub import require_hub

            if not self.local_hub:
                flag = self.flags[0]
                require_hub(f"dataset {self.path}",
                            hint=f"Pass {flag} sample for the bundled corpus, or {flag} PATH for local files")
            ds = datasets.load_dataset(self.path, self.name, split="train", streaming=True)
        else:
            extra = {"sample_by": "document"} if self.kind == "text" else {}
            ds = datasets.load_dataset(self.kind, data_files=list(self.files), split="train", streaming=True, **extra)
        if world_size > 1 and ds.n_shards % world_size == 0:
            ds = ds.shard(world_size, rank, contiguous=False)  # the files split_dataset_by_node would give
        elif world_size > 1:
            from datasets.distributed import split_dataset_by_node

            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size, strategy="examples")
        return ds.reshard() if seekable else ds


def first_document(spec: DataSpec, tokenizer: str | None = None) -> list[int]:
    """Open the data and tokenize the start of its first document with text: a corpus that cannot
    be read fails here, in one line, before a run creates anything. Bounded, whatever the corpus:
    at most CHECK_DOCS documents are looked at and CHECK_CHARS characters tokenized (a 200 MB
    one-line document is not tokenized whole). A corpus with no text in those documents (empty,
    or only whitespace) is refused: training on it would learn document separators."""
    from smolctl.tokenizer import load_tokenizer

    seen, text = 0, None
    with _reading(spec):
        for row in itertools.islice(iter(spec.open()), CHECK_DOCS):
            seen += 1
            if (candidate := _text(row, spec)).strip():
                text = candidate
                break
    if seen == 0:
        raise SmolctlError(f"the corpus is empty: {spec.describe()} has no documents",
                           hint=f"Point {spec.flags[0]} at files with text in them")
    if text is None:
        which = f"its {seen:,} document(s)" if seen < CHECK_DOCS else f"its first {seen:,} documents"
        raise SmolctlError(f"the corpus has no text to train on: {which} in {spec.describe()} hold only whitespace",
                           hint=f"Point {spec.flags[0]} at files with text in them")
    return load_tokenizer(tokenizer)(text[:CHECK_CHARS], add_special_tokens=False)["input_ids"]


@contextlib.contextmanager
def _reading(spec: DataSpec):
    """An error reading the corpus, at its first document or its millionth, as one line: datasets,
    pyarrow and the json reader raise many exception types for files that are not what their
    suffix says, or that disagree with each other (columns, types)."""
    try:
        yield
    except SmolctlError:
        raise
    except UnicodeDecodeError as e:
        raise SmolctlError(f"the corpus has bytes that are not UTF-8 ({e.reason} at byte {e.start})",
                           hint=UTF8_HINT) from None
    except Exception as e:
        if hasattr(e, "table_column_names") and hasattr(e, "requested_column_names"):  # datasets' CastError
            odd = _files_with_columns(spec, e.table_column_names)
            which = _listed(odd, 3) + (" has" if len(odd) == 1 else " have") if odd else "a file has"
            raise SmolctlError(f"cannot read {spec.describe()}: {which} the columns ({_listed(e.table_column_names)}), "
                               f"not the dataset's ({_listed(e.requested_column_names)})",
                               hint="Give every file the same columns, or point "
                                    f"{spec.flags[0]} at the files that share them") from None
        reason = textwrap.shorten(str(e), 300, placeholder=" ...")  # whole words, one line
        raise SmolctlError(f"cannot read {spec.describe()}: {type(e).__name__}: {reason}",
                           hint="Check that every file is what its suffix says (.jsonl: one JSON object per "
                                "line; .parquet: a Parquet file; text: UTF-8) and that all have the same "
                                "columns and types") from None


def _listed(names, most: int = 8) -> str:
    """'a, b, c' -- whole names, at most `most` of them, then how many more."""
    names = list(names)
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _files_with_columns(spec: DataSpec, columns) -> list[str]:
    """The corpus files whose columns are `columns` (datasets' cast errors name none). Parquet
    files by their schema, JSON lines by their first object's keys; a hub dataset's files only
    when it is a local copy."""
    import json

    files = list(spec.files)
    if spec.local_hub:
        with contextlib.suppress(Exception):
            import datasets

            builder = datasets.load_dataset_builder(spec.path, spec.name)
            files = [str(f) for split in builder.config.data_files.values() for f in split]
    found = []
    for f in files:
        with contextlib.suppress(Exception):
            if f.endswith(".parquet"):
                import pyarrow.parquet as pq

                names = pq.read_schema(f).names
            elif f.endswith((".jsonl", ".json")):
                with open(f, encoding="utf-8") as lines:
                    names = list(json.loads(next(line for line in lines if line.strip())))
            else:
                continue
            if set(names) == set(columns):
                found.append(f)
    return found


def _read(spec: DataSpec, items: Iterator) -> Iterator:
    """`items`, each read inside `_reading`."""
    end = object()
    while True:
        with _reading(spec):
            item = next(items, end)
        if item is end:
            return
        yield item


def _local_files(data: str) -> list[str]:
    path = Path(data).expanduser()
    if path.is_file():
        return [str(path)]
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in LOCAL_BUILDERS and p.is_file())
    if any(c in data for c in "*?["):
        return sorted(f for f in glob.glob(os.path.expanduser(data), recursive=True) if os.path.isfile(f))
    return []


class BlockStream:
    """Yields (batch of blocks, state after that batch) forever, epoch after epoch.

    Two halves: `chunks()` reads and tokenizes the documents (the expensive part), TOKENIZE_DOCS
    at a time; `pack()` cuts their tokens into blocks, in document order, and keeps the state. Any
    number of processes can run `chunks()`, each tokenizing every N-th chunk, while one `pack()`
    takes the chunks back in order (see `batches`): the blocks, their order and the states are the
    same for any number of workers. `tokenizer` is a loaded tokenizer (the run's or the model's),
    None for the bundled one.
    """

    def __init__(self, spec: DataSpec, seq_len: int, batch_size: int, tokenizer=None,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0, seed: int = 0,
                 state: dict[str, Any] | None = None, max_epochs: int | None = None):
        st = dict(state or {})
        if st and (st.get("world_size", 1), st.get("rank", 0)) != (world_size, rank):
            raise SmolctlError(f"this data state was saved by rank {st.get('rank')} of {st.get('world_size')} "
                               f"processes, not rank {rank} of {world_size}",
                               hint="Resume with the same number of processes as the run was saved with")
        self.spec, self.seq_len, self.batch_size = spec, seq_len, batch_size
        self.tokenizer, self.rank, self.world_size = tokenizer, rank, world_size
        self.shuffle_buffer, self.seed, self.state, self.max_epochs = shuffle_buffer, seed, st, max_epochs

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        return self.pack(self.chunks())

    def chunks(self, worker: int = 0, workers: int = 1) -> Iterator[Chunk]:
        """Chunk i (the i-th TOKENIZE_DOCS documents from where the stream starts; an epoch's last
        chunk may be shorter) tokenized, for each i with i % workers == worker. Every worker reads
        every chunk, as an Arrow table -- a few percent of the cost -- and tokenizes its own."""
        from smolctl.tokenizer import document_separator, load_tokenizer

        tok = load_tokenizer() if self.tokenizer is None else self.tokenizer
        separator = document_separator(tok)
        st = self.state
        epoch, source_state, index = st.get("epoch", 0), st.get("source"), 0
        seekable = st.get("seekable", not st)  # states saved before row-group seeking count rows per file
        # Documents per read: a source position is the dataset's state after a read of this many
        # rows, and means something else after reads of another size. States saved before
        # chunk-sized reads resume one row at a time, to the end of their epoch.
        read = st.get("read_rows", 1 if source_state is not None else TOKENIZE_DOCS)
        while self.max_epochs is None or epoch < self.max_epochs:
            with _reading(self.spec):
                ds = self.spec.open(self.rank, self.world_size, seekable).with_format("arrow")
                if source_state is not None:
                    ds.load_state_dict(source_state)
            epoch_docs = 0
            for docs in _read(self.spec, _chunk_tables(ds, read)):
                epoch_docs += docs.num_rows
                if index % workers == worker:
                    ids = token_ids(tok, _texts(docs, self.spec), separator).numpy()
                    yield Chunk(index, epoch, docs.num_rows, ids, ds.state_dict(), seekable, read)
                index += 1
            if epoch_docs == 0 and source_state is None:
                raise SmolctlError(f"the corpus is empty: {self.spec.describe()} has no documents",
                                   hint=f"Point {self.spec.flags[0]} at files with text in them")
            epoch, source_state, seekable, read = epoch + 1, None, True, TOKENIZE_DOCS

    def pack(self, chunks: Iterator[Chunk]) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """The chunks' tokens cut into blocks of seq_len + 1, through the optional shuffle buffer,
        batch_size at a time, each batch with the state that resumes right after it."""
        st = self.state
        block = self.seq_len + 1
        # Tokens not yet in a block: one int32 tensor, never changed in place (a state may hold a
        # view of it), read from `pos` on. Cheap to keep, to pass to the trainer, and to save.
        carry, pos = torch.as_tensor(st.get("carry", []), dtype=torch.int32), 0
        buffer: list[torch.Tensor] = list(st["buffer"].unbind(0)) if "buffer" in st else []
        rng = random.Random(self.seed * 1000 + self.rank)
        if "rng" in st:
            rng.setstate(tuples(st["rng"]))
        docs, tokens = st.get("docs", 0), st.get("tokens", 0)
        ready: list[torch.Tensor] = []  # blocks coming out of the (optional) shuffle buffer
        for expected, chunk in enumerate(chunks):
            if chunk.error is not None:
                raise SmolctlError(*chunk.error)
            if chunk.index != expected:  # the DataLoader hands out workers' items round-robin
                raise RuntimeError(f"data chunk {chunk.index} arrived where chunk {expected} belongs")
            docs += chunk.docs
            carry = torch.cat([carry[pos:], torch.from_numpy(chunk.tokens)])
            pos = len(carry) // block * block  # the whole blocks, cut in one go (int64: the model's ids)
            for n, blk in enumerate(carry[:pos].view(-1, block).long().unbind(0), start=1):
                tokens += block
                if self.shuffle_buffer:
                    buffer.append(blk)
                    if len(buffer) < self.shuffle_buffer:
                        continue
                    i = rng.randrange(len(buffer))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    blk = buffer.pop()
                ready.append(blk)
                if len(ready) == self.batch_size:
                    state = {"epoch": chunk.epoch, "source": chunk.source, "seekable": chunk.seekable,
                             "read_rows": chunk.read_rows,
                             "carry": carry[n * block:], "rng": rng.getstate(), "docs": docs, "tokens": tokens,
                             "rank": self.rank, "world_size": self.world_size}
                    if buffer:  # one tensor, not a list of them: what the checkpoint saves
                        state["buffer"] = torch.stack(buffer)
                    yield torch.stack(ready), state
                    ready = []


@dataclass
class Chunk:
    """TOKENIZE_DOCS documents' tokens as a worker hands them to the packer: `index` counts
    chunks from where the stream started, `source` is the source position after these documents.
    Or, from a worker, the one-line error that stopped it (re-raised by the packer)."""

    index: int
    epoch: int = 0
    docs: int = 0
    # int32, as a NumPy array: pickled through the DataLoader's pipe as bytes, 3x cheaper for the
    # trainer than a tensor's shared-memory file descriptor
    tokens: np.ndarray | None = None
    source: dict | None = None
    seekable: bool = True
    read_rows: int = TOKENIZE_DOCS
    error: tuple[str, str | None, int] | None = None  # a SmolctlError's message, hint and exit code


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


def _text(row: dict, spec: DataSpec) -> str:
    """The text of a document, a row as a dict."""
    _require_column(row, spec)
    return _require_str(row[spec.text_column], spec)


def _texts(docs, spec: DataSpec) -> list[str]:
    """The texts of documents, an Arrow table's rows."""
    _require_column(docs.column_names, spec)
    texts = docs[spec.text_column].to_pylist()
    for text in texts:
        _require_str(text, spec)
    return texts


def _require_column(columns, spec: DataSpec) -> None:
    if spec.text_column not in columns:
        raise SmolctlError(f"the corpus has no {spec.text_column!r} column (columns: {', '.join(columns)})",
                           hint=f"Pick one with {spec.flags[1]}")


def _require_str(text, spec: DataSpec) -> str:
    if not isinstance(text, str):
        raise SmolctlError(f"column {spec.text_column!r} holds {type(text).__name__}, not text",
                           hint=f"Pick a text column with {spec.flags[1]}")
    return text


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
    with _reading(spec):
        ds = spec.open().with_format("arrow")
    for docs in _read(spec, _chunk_tables(ds, TOKENIZE_DOCS)):
        for ids in encode(tok, _texts(docs, spec)):
            yield ids + [separator]


def tuples(x):
    """JSON turns random.getstate()'s nested tuples into lists; setstate wants tuples back."""
    return tuple(tuples(v) for v in x) if isinstance(x, list) else x


def batches(stream: BlockStream, num_workers: int | None = None) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
    """Iterate a BlockStream: the documents tokenized in `num_workers` background processes (0:
    in this one; None: `auto_workers()`), packed here, in document order. The blocks and the
    states are the same for any number of workers, so a run may resume with another number."""
    workers = auto_workers() if num_workers is None else num_workers
    pin = torch.cuda.is_available()  # page-locked batches make `.to(cuda, non_blocking=True)` asynchronous
    if workers == 0:
        for batch, state in stream:
            yield (batch.pin_memory() if pin else batch), state
        return
    # batch_size=None, collate_fn: a chunk passes as it is (the default `default_convert` walks it).
    # Worker w gets the w-th, (w+N)-th... request and in_order hands the results back in request
    # order: worker w's items are chunks w, w+N, ... (the packer checks each index).
    loader = torch.utils.data.DataLoader(_Chunks(stream), batch_size=None, num_workers=workers,
                                         collate_fn=_as_is, prefetch_factor=4, in_order=True,
                                         worker_init_fn=_worker_init)
    it = iter(loader)
    try:
        for batch, state in stream.pack(it):
            yield (batch.pin_memory() if pin else batch), state
    finally:
        _stop_workers(it)


def auto_workers() -> int:
    """The default number of data workers: one per CPU core this process can spare -- the cores it
    may use, shared by the training processes on this machine, less one for the trainer itself --
    from 1 to 4. One worker tokenizes ~0.3-0.45M tokens/s on one core of a recent Xeon, two
    ~0.5-0.75M (benchmarks/README.md); one H200 training SmolLM2-135M at 45% MFU consumes ~0.36M."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's (and so accelerate launch's)
    return max(1, min(4, cores // max(1, processes) - 1))


class _Chunks(torch.utils.data.IterableDataset):
    """A BlockStream's chunks, as one DataLoader worker of several sees them: its own share."""

    def __init__(self, stream: BlockStream):
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[Chunk]:
        info = torch.utils.data.get_worker_info()
        try:
            yield from self.stream.chunks(info.id, info.num_workers)
        except SmolctlError as e:  # no traceback through the worker: the packer raises it in the trainer
            yield Chunk(-1, error=(e.message, e.hint, e.exit_code))


def _as_is(item: Chunk) -> Chunk:
    return item


def _stop_workers(it) -> None:
    """Shut the workers down now, however the iteration ended. Left to garbage collection, an
    iterator kept alive by an exception's traceback outlives the trainer's last line, and at exit
    the interpreter waits forever for a worker that ignores SIGTERM (seen: a crash that hung)."""
    shutdown = getattr(it, "_shutdown_workers", None)  # DataLoader's own orderly shutdown
    if shutdown is not None:
        shutdown()
    for worker in getattr(it, "_workers", ()):
        if worker.is_alive():
            worker.kill()


def _worker_init(worker_id: int) -> None:
    """Ctrl-C and SIGTERM are the trainer's to handle (finish the step, save): the worker must
    outlive them, also when they reach the whole process group (a terminal, a scheduler).

    But never its trainer: a worker whose trainer died (SIGKILL, OOM killer) would live on, blocked
    on a full queue that nobody reads, holding the launcher's stdout open (seen: 70 minutes). So
    it gets SIGKILL when the trainer dies (Linux: PR_SET_PDEATHSIG), and, everywhere, a watchdog
    thread exits it once its parent is gone.

    Each worker is one core's worth of tokenizing: the tokenizer's own thread pool stays off."""
    import signal
    import threading

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True, name="smolctl-orphan-check").start()


def _exit_when_orphaned(parent: int, every_s: float = 0.5) -> None:
    while os.getppid() == parent:  # re-parented (to init or a subreaper) once the trainer is gone
        time.sleep(every_s)
    os._exit(1)
