import pytest

from smolctl.errors import SmolctlError
from smolctl.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def test_special_tokens(tok):
    assert len(tok) == 49152
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.bos_token_id == tok.eos_token_id == 0
    assert tok("Hello world").input_ids == [19556, 905]  # as llama.cpp tokenizes it


@pytest.mark.parametrize("text", ["The quick brown fox.", "  spaces\tand\nnewlines ",
                                  "Ünïcödé — 世界, emoji 🙂, math ∑x²", ""])
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_chat_template_renders_chatml_with_generation_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "What is gravity?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nWhat is gravity?<|im_end|>\n<|im_start|>assistant\n")
    custom = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi"}], tokenize=False)
    assert custom.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "SmolLM" not in custom


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(SmolctlError, match="no tokenizer in"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(SmolctlError, match="tokenizer not found"):
        load_tokenizer(str(tmp_path / "missing" / "deeper" / "x"))


def test_hub_id_offline_is_a_fast_clear_error(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(SmolctlError, match="cannot reach the Hugging Face hub"):
        load_tokenizer("HuggingFaceTB/SmolLM2-135M")
    assert time.perf_counter() - t < 5
