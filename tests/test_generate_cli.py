import json

import pytest
import torch
from transformers import LlamaForCausalLM

from smolctl.tokenizer import load_tokenizer


def test_generate_streams_the_greedy_continuation(cli, tiny_base_dir):
    r = cli("generate", "Once upon a time", "--model", tiny_base_dir, "-n", "6", "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    model = LlamaForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)  # transformers alone, as a reference
    tok = load_tokenizer()  # the directory has no tokenizer: the bundled one
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    new = model.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:]
    assert len(new) == 6 and r.stdout == tok.decode(new, skip_special_tokens=True) + "\n"
    assert "tokens/s" in r.stderr


def test_generate_json_samples(cli, tiny_base_dir, tmp_path):
    (tmp_path / "p.txt").write_text("Hello")
    r = cli("generate", "--prompt-file", tmp_path / "p.txt", "--model", tiny_base_dir, "-n", "5",
            "--temperature", "1", "--top-k", "40", "--seed", "3", "--num-samples", "2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["prompt"] == "Hello" and out["sampling"]["seed"] == 3 and len(out["samples"]) == 2
    for s in out["samples"]:
        assert s["new_tokens"] == len(s["new_token_ids"]) <= 5 and s["prompt_tokens"] == 1
        assert {"text", "finish_reason", "prefill_s", "decode_s", "decode_tokens_per_s"} <= s.keys()
    again = json.loads(cli("generate", "--prompt-file", tmp_path / "p.txt", "--model", tiny_base_dir, "-n", "5",
                           "--temperature", "1", "--top-k", "40", "--seed", "3", "--num-samples", "2",
                           "--json").stdout)
    assert [s["new_token_ids"] for s in again["samples"]] == [s["new_token_ids"] for s in out["samples"]]


@pytest.mark.parametrize("args, words", [
    (["generate", "hi"], "no model given: pass --model"),
    (["generate", "hi", "--model", "/no/such/model"], "--model /no/such/model: no such file or directory"),
    (["generate", "hi", "--model", "smollm2-instruct"], "smollm2-instruct is not imported yet. Run `smolctl import`"),
    (["generate", "hi", "--model", "{base}", "--temperature", "-1"], "--temperature must be >= 0"),
    (["generate", "hi", "--model", "{base}", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "hi", "--model", "{base}", "--top-p", "1.1"], "--top-p must be in (0, 1]"),
    (["generate", "hi", "--model", "{base}", "--top-k", "-1"], "--top-k must be >= 0"),
    (["generate", "", "--model", "{base}"], "the prompt is empty"),
    (["generate", "word " * 70, "--model", "{base}"], "tokens; the model's context is 64"),
    (["generate", "--model", "{base}", "--prompt-file", "/no/file.txt"], "prompt file not found"),
    (["generate", "--model", "{base}", "--prompt-file", "/dev/zero"], "prompt file /dev/zero is not a regular file"),
    (["generate", "--model", "{base}", "--prompt-file", "{tmp}"], "is a directory, not a file"),
    (["chat", "--model", "{base}", "--top-k", "-1"], "--top-k must be >= 0"),
    (["chat", "--model", "{qwen}"], "is a 'qwen2' model; smolctl reads only llama-architecture GGUF files"),
    (["import", "{qwen}", "--out", "{tmp}/x"], "is a 'qwen2' model"),
    (["import", "/no/such.gguf"], "GGUF file not found"),
    (["chat", "--model", "HuggingFaceTB/SmolLM2-135M"], "cannot reach the Hugging Face hub"),
])
def test_bad_input_is_one_line_exit_2(cli, tiny_base_dir, tmp_path, models_dir, args, words):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    args = [a.format(base=tiny_base_dir, qwen=tmp_path / "qwen.gguf", tmp=tmp_path) for a in args]
    r = cli(*args)
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and words in r.output, r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("command", ["generate", "chat", "import"])
def test_help_imports_neither_torch_nor_transformers(command):
    import subprocess
    import sys

    code = (f"import sys\nfrom smolctl.cli import app\ntry:\n    app([{command!r}, '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in p.stdout, p.stdout + p.stderr
