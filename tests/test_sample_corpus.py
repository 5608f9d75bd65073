"""The bundled sample corpus (smolctl/assets/sample/, package data) and the rules of the script
that wrote it."""

import importlib.util
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from smolctl.data import SAMPLE_DIR
from smolctl.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
# cosmopedia-v2's columns (HuggingFaceTB/smollm-corpus, config cosmopedia-v2), with their types.
SCHEMA = {"prompt": str, "text": str, "token_length": int, "audience": str, "format": str, "seed_data": str}


def read_split(name):
    return pq.read_table(SAMPLE_DIR / f"{name}.parquet").to_pylist()


@pytest.fixture(scope="module")
def splits():
    return {name: read_split(name) for name in ("train", "heldout")}


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_sample_corpus", ROOT / "tools" / "make_sample_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # llama_cpp is imported only when generating
    return module


def test_rows_have_exactly_cosmopedia_v2_schema(splits):
    for name, rows in splits.items():
        assert rows, f"{name}.parquet is empty"
        for row in rows:
            assert set(row) == set(SCHEMA), row.keys()
            for key, kind in SCHEMA.items():
                assert type(row[key]) is kind, (key, row[key])
            assert row["text"].strip() and row["prompt"].strip() and row["token_length"] > 0


def test_stored_as_zstd_parquet_in_small_row_groups():
    """Compressed, to keep the install small; row groups of a few hundred rows, the steps a resume
    seeks in (DataSpec.open reads parquet one row group at a time)."""
    for name in ("train", "heldout"):
        file = pq.ParquetFile(SAMPLE_DIR / f"{name}.parquet")
        assert [(f.name, str(f.type)) for f in file.schema_arrow] == [
            (key, "int64" if kind is int else "string") for key, kind in SCHEMA.items()]  # cosmopedia's order
        groups = [file.metadata.row_group(i) for i in range(file.metadata.num_row_groups)]
        assert all(g.num_rows <= 512 for g in groups)
        assert {g.column(j).compression for g in groups for j in range(g.num_columns)} == {"ZSTD"}


def test_token_length_is_the_bundled_tokenizers_count(splits):
    tok = load_tokenizer()
    rows = splits["train"][::25] + splits["heldout"][::5]
    counts = [len(ids) for ids in tok([r["text"] for r in rows], add_special_tokens=False).input_ids]
    assert counts == [r["token_length"] for r in rows]


def test_heldout_shares_no_document_or_prompt_with_train(splits):
    train, heldout = splits["train"], splits["heldout"]
    assert not {r["text"] for r in train} & {r["text"] for r in heldout}
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}
    assert len({r["text"] for r in train + heldout}) == len(train) + len(heldout)  # no duplicates


def test_corpus_is_large_and_varied(splits):
    train, heldout = splits["train"], splits["heldout"]
    tokens = {name: sum(r["token_length"] for r in rows) for name, rows in splits.items()}
    assert tokens["train"] >= 2_000_000 and tokens["heldout"] >= 100_000  # a main job reads train once
    assert len(train) >= 5000 and len(heldout) >= 250
    assert sum(len(r["text"].encode()) for r in train) >= 250_000
    assert len({r["audience"] for r in train}) >= 5 and len({r["format"] for r in train}) >= 4
    # a topic's 30 (audience, format) prompts are each used once before any is used again
    assert len({r["text"] for r in train}) == len(train) and len({r["prompt"] for r in train}) >= 0.7 * len(train)


def test_plan_is_seeded_and_holds_out_whole_topics(script):
    plan = script.make_plan(7, n_train=60, n_heldout=9)
    assert plan == script.make_plan(7, n_train=60, n_heldout=9)
    assert plan != script.make_plan(8, n_train=60, n_heldout=9)
    assert script.make_plan(7, n_train=30, n_heldout=9) == plan[:9 + 30]  # fewer docs: a prefix
    train = {j.topic for j in plan if j.split == "train"}
    heldout = {j.topic for j in plan if j.split == "heldout"}
    assert heldout and not train & heldout
    assert len({(j.topic, j.audience, j.format) for j in plan}) == len(plan)


def test_clean_keeps_prose_and_drops_degenerate_output(script):
    prose = ("Volcanoes form where melted rock, called magma, rises from deep inside the Earth. Most of them "
             "sit along the edges of tectonic plates, the giant slabs of crust that slowly drift across the "
             "planet. When one plate slides beneath another, it sinks into the hot mantle and melts. That "
             "molten rock is lighter than the solid rock around it, so it pushes upward through cracks. "
             "Pressure builds as gas bubbles grow inside the magma, much like the fizz in a shaken bottle of "
             "soda. Eventually the crust gives way, and lava, ash and steam burst out of the ground. Over "
             "thousands of years, layer after layer of cooled lava piles up into the cone shape we recognise. "
             "Some volcanoes, such as those in Hawaii, grow over hot spots far from any plate boundary instead.")

    def rec(raw, finish_reason="stop"):
        return {"raw": raw, "finish_reason": finish_reason}

    assert script.clean(rec(prose)) == (prose, "ok")
    text, why = script.clean(rec(prose + " And then the last one was cut", "length"))
    assert why == "ok" and text == prose  # a document cut at max_tokens ends at its last sentence
    assert script.clean(rec("Too short to be a document."))[0] is None
    assert script.clean(rec("The cat sat on the mat and smiled. " * 40))[0] is None
