"""Held-out evaluation scores every next-token prediction up to the requested amount: a final
partial window and a final partial batch included, no padding counted."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_GEN, write_corpus
from torch.nn import functional as F

from smolctl.data import SAMPLE_DIR, DataSpec
from smolctl.loss import CausalLMLoss, evaluate

SEQ, BATCH = 16, 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random model saved as an HF directory (transformers loads it on its own)."""
    from smolctl.config import ModelConfig
    from smolctl.model import build_model
    from smolctl.model_io import save_model

    torch.manual_seed(3)
    cfg = ModelConfig(**TINY_GEN)
    out = tmp_path_factory.mktemp("eval-model")
    save_model(build_model(cfg), cfg, out)
    return out


def stream_of(path: Path) -> list[int]:
    """The token stream of a .jsonl or .parquet corpus, by hand: each document's ids, then
    <|endoftext|> (id 0)."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from smolctl.tokenizer import BUNDLED

    tok = AutoTokenizer.from_pretrained(str(BUNDLED))
    if path.suffix == ".parquet":
        texts = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    else:
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    ids = []
    for text in texts:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [0]
    return ids


def reference_loss(model_dir: Path, ids: list[int], tokens: int) -> tuple[float, int]:
    """transformers' LlamaForCausalLM over windows of SEQ + 1 tokens stepping by SEQ: every token
    of ids[1 : tokens + 1] predicted once."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = ids[:tokens + 1]
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, SEQ):
            w = torch.tensor(ids[start:start + SEQ + 1])
            logits = hf(input_ids=w[None, :-1]).logits[0]
            total += F.cross_entropy(logits.double(), w[1:], reduction="sum").item()
    return total / (len(ids) - 1), len(ids) - 1


@pytest.mark.parametrize("tokens", [10**6, 50, SEQ * BATCH * 2])
def test_evaluate_scores_every_prediction_up_to_the_amount(tmp_path, model_dir, tokens):
    from smolctl.model_io import load_model

    corpus = write_corpus(tmp_path / "heldout.jsonl", n_docs=9, seed=4)
    ids = stream_of(corpus)
    windows = -(-(len(ids) - 1) // SEQ)
    assert (len(ids) - 1) % SEQ and windows % BATCH  # the whole stream ends in a short window and batch
    model, _ = load_model(model_dir, dtype=torch.float32)
    loss, n = evaluate(CausalLMLoss(model), DataSpec.parse(str(corpus)), seq_len=SEQ, batch_size=BATCH,
                       tokens=tokens, device="cpu")
    want, want_n = reference_loss(model_dir, ids, tokens)
    assert n == want_n == min(tokens, len(ids) - 1)
    assert loss == pytest.approx(want, rel=1e-5)


def test_eval_command_scores_all_the_data_when_asked_for_more(cli, tmp_path, model_dir):
    """Asked for more tokens than the data has, all of it is scored, and the line says so."""
    ids = stream_of(write_corpus(tmp_path / "heldout.jsonl", n_docs=12, seed=5))
    asked = len(ids) + 1000
    r = cli("eval", "--model", model_dir, "--data", tmp_path / "heldout.jsonl", "--seq-len", 64, "--tokens", asked)
    assert r.exit_code == 0, r.output
    assert f"scored {len(ids) - 1:,} tokens (all the data has; --tokens asked for {asked:,})" in r.output


def test_eval_command_defaults_to_the_samples_held_out_split(cli, model_dir):
    r = cli("eval", "--model", model_dir, "--seq-len", 64, "--tokens", 1000, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])
    assert result["tokens"] == result["tokens_requested"] == 1000
    assert Path(result["data"]) == SAMPLE_DIR / "heldout.parquet"


def test_eval_of_data_with_nothing_to_predict_is_one_line(cli, tmp_path, model_dir):
    (tmp_path / "one.jsonl").write_text('{"text": ""}\n')  # one document: <|endoftext|> alone
    r = cli("eval", "--model", model_dir, "--data", tmp_path / "one.jsonl")
    assert r.exit_code == 2 and "fewer than 2 tokens" in r.output and r.output.count("\n") == 1
