"""Where training documents come from: a DataSpec names them (the bundled sample, a hub dataset,
local .jsonl/.json/.parquet/.txt files) and opens them as a streaming `datasets.IterableDataset`;
reading them turns every failure into one line.

    spec = DataSpec.parse("sample")            # or "cosmopedia-v2", "org/name", a file, dir or glob
    ds = spec.open(rank=0, world_size=1)      # a fresh stream over its documents, or one share of them
    first_document(spec)                       # the pre-check a fresh run makes before creating anything
    with reading(spec): ...                    # datasets', pyarrow's and json's errors as one line

data.py tokenizes and packs what this reads.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from smolctl.artifacts import UTF8_HINT
from smolctl.errors import SmolctlError

SAMPLE_DIR = Path(__file__).resolve().parent / "assets" / "sample"  # package data: {train,heldout}.parquet
HUB_DEFAULT = ("HuggingFaceTB/smollm-corpus", "cosmopedia-v2")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
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
    with reading(spec):
        for row in itertools.islice(iter(spec.open()), CHECK_DOCS):
            seen += 1
            if (candidate := row_text(row, spec)).strip():
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
def reading(spec: DataSpec):
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


def read_guarded(spec: DataSpec, items: Iterator) -> Iterator:
    """`items`, each read inside `reading`."""
    end = object()
    while True:
        with reading(spec):
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



def row_text(row: dict, spec: DataSpec) -> str:
    """The text of a document, a row as a dict."""
    _require_column(row, spec)
    return _require_str(row[spec.text_column], spec)


def table_texts(docs, spec: DataSpec) -> list[str]:
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

