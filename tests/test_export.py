"""`smolctl export`: the files transformers and llama.cpp load, and agree with us on.

The tiny model is trained for a few seconds on a short text (TRAIN) so that its next-token
distribution is peaked: a random model's logits are near-flat, and argmax ties would flip under
any rounding. llama.cpp runs with an f32 KV cache so that the f32 comparison measures the file,
not llama.cpp's default f16 cache.
"""

import functools
import json

import numpy as np
import pytest
import torch

from smolctl.config import ModelConfig

TRAIN = """The river runs through the middle of the old town, and on summer evenings the people walk along its banks. Children play near the water while their parents sit on wooden benches and talk about the day. The baker closes his shop at six, and the smell of fresh bread stays in the street until dark.
In the morning the market opens early. Farmers bring apples, potatoes, cheese and eggs from the villages in the hills. The square fills with voices, and the old church bell rings every hour. Most people buy what they need for the week and then stop for a cup of coffee at the small cafe by the fountain.
The school is on the other side of the bridge. Every day the teachers ask the children to read a story, write a few sentences and solve some problems with numbers. After lunch they go outside to play, and in the afternoon they learn about plants, animals, the weather and the history of the town."""

HELD_OUT = """On a cold morning in the spring, the teacher walked across the bridge to the market. She bought bread from the baker, a few apples and some cheese, and then she sat down at the cafe by the fountain with a cup of coffee. The children were already playing near the river, and the church bell rang nine times. Later that day she asked the class to write a short story about the town, and about the farmers who bring their eggs and potatoes from the villages in the hills."""

PROMPT = "In the morning the market"
TINY = dict(hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=2, intermediate_size=128, max_seq_len=512)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    from smolctl.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok):
    """A tiny checkpoint trained on TRAIN: 20 full-text AdamW steps take the loss from ≈ 11 to < 1."""
    from smolctl.model import build_model
    from smolctl.model_io import save_model

    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    model = build_model(cfg)
    ids = torch.tensor([tok(TRAIN).input_ids])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(20):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1
    path = tmp_path_factory.mktemp("tiny")
    save_model(model, cfg, path)
    return path, model.eval(), cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny):
    """exported("gguf", "q8_0") -> the path of that export of the tiny model (made once)."""
    from smolctl.export import export

    root, cache = tmp_path_factory.mktemp("exports"), {}

    def get(fmt, dtype):
        if (fmt, dtype) not in cache:
            out = root / (f"tiny-{dtype}" if fmt == "hf" else f"tiny.{dtype}.gguf")
            cache[fmt, dtype] = export(tiny[0], fmt, out, dtype=dtype).path
        return cache[fmt, dtype]

    return get


def our_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def our_greedy(model, ids, n):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        return model.generate(torch.tensor([ids]), **kw)[0, len(ids):].tolist()


# -- Hugging Face ----------------------------------------------------------------------------


def test_hf_export_loads_in_transformers_and_matches(tiny, exported, tok):
    from transformers import AutoModelForCausalLM

    _, model, _ = tiny
    hf, info = AutoModelForCausalLM.from_pretrained(exported("hf", "fp32"), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    ids = tok(HELD_OUT).input_ids
    assert np.abs(our_logits(hf, ids) - our_logits(model, ids)).max() <= 1e-5
    prompt = tok(PROMPT).input_ids
    assert our_greedy(hf, prompt, 32) == our_greedy(model, prompt, 32)


def test_hf_tokenizer_and_generation_config(exported, tok):
    from transformers import AutoTokenizer, GenerationConfig

    out = exported("hf", "fp32")
    loaded = AutoTokenizer.from_pretrained(out)
    assert loaded.bos_token == loaded.eos_token == "<|endoftext|>" and loaded.eos_token_id == 0
    text = "Hello world 2024! <|im_start|>user\nhi<|im_end|>"
    assert loaded(text).input_ids == tok(text).input_ids
    assert loaded.chat_template is None  # trained from scratch: a base model (tests/test_interop.py)
    # transformers 4.x reads these two; 5.x writes names 4.x does not know
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert conf["tokenizer_class"] == "PreTrainedTokenizerFast" and conf["model_max_length"] == TINY["max_seq_len"]
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == ModelConfig(**TINY).rope_theta and config["pad_token_id"] == 0
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (0, 0, 0)  # <|endoftext|>


def test_hf_round_trip_is_bit_identical(tiny, exported):
    from smolctl.model_io import load_model, model_state

    _, model, cfg = tiny
    back, back_cfg = load_model(exported("hf", "fp32"))
    ours, theirs = model_state(model), model_state(back)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert back_cfg.to_hf().to_dict() == cfg.to_hf().to_dict()


def test_hf_bf16_holds_the_rounded_weights(tiny, exported):
    from safetensors.torch import load_file

    from smolctl.model_io import model_state

    out = exported("hf", "bf16")
    stored = load_file(str(out / "model.safetensors"))
    ours = model_state(tiny[1])
    assert all(stored[k].dtype == torch.bfloat16 and torch.equal(stored[k], v.bfloat16()) for k, v in ours.items())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


# -- GGUF / llama.cpp ------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def gguf_reader(path):
    import gguf

    return gguf.GGUFReader(path)  # ≈ 2 s: it indexes every token and merge string


def read_gguf_state(path, cfg):
    """HF-named float32 tensors from a GGUF file: dequantized, Q/K rows un-permuted."""
    import gguf

    from smolctl.gguf_io import from_gguf_rows, gguf_to_hf_name

    state = {}
    for t in gguf_reader(path).tensors:
        name = gguf_to_hf_name(t.name)
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        if name.endswith("q_proj.weight"):
            w = from_gguf_rows(w, cfg.num_heads)
        elif name.endswith("k_proj.weight"):
            w = from_gguf_rows(w, cfg.num_kv_heads)
        state[name] = np.ascontiguousarray(w, dtype=np.float32)
    return state


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


def test_gguf_f32_greedy_and_logits_match_llama_cpp(tiny, exported, tok, llama):
    _, model, _ = tiny
    llm = llama(exported("gguf", "f32"))
    ids = tok(HELD_OUT).input_ids
    assert np.abs(llama_logits(llm, ids) - our_logits(model, ids)).max() < 1e-3
    prompt, theirs = tok(PROMPT).input_ids, []
    llm.reset()
    llm.eval(prompt)
    for _ in range(64):  # greedy through llama.cpp's KV cache, no stopping at eos
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(theirs[-1:])
    assert theirs == our_greedy(model, prompt, 64)
    text = "Hello world 2024! <|im_start|>user\nhi<|im_end|>"  # llama.cpp tokenizes from our metadata
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text).input_ids


@pytest.mark.parametrize("dtype, floor", [
    ("f16", 0.99),
    # The tiny test model meets the 99% bar. On the real SmolLM2-135M llama.cpp's q8_0 agrees
    # only ~96% (its q8_0 matmuls also round the activations to 8 bits; torch on the same file's
    # dequantized weights agrees 98.4-98.8%, and upstream's own Q4_1 file 96.6-97.6% against its
    # own weights): the loss is in llama.cpp's arithmetic, not the file (test_gguf_round_trip).
    ("q8_0", 0.99),
])
def test_gguf_quantized_argmax_agrees_on_held_out_text(tiny, exported, tok, llama, dtype, floor):
    _, model, _ = tiny
    ids = tok(HELD_OUT).input_ids
    theirs = llama_logits(llama(exported("gguf", dtype)), ids)
    agreement = (theirs.argmax(-1) == our_logits(model, ids).argmax(-1)).mean()
    assert agreement >= floor, f"{dtype}: {agreement:.1%} over {len(ids)} tokens"


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_round_trip(tiny, exported, dtype):
    """Read back (dequantize, un-permute, rename): f32 is bit-identical, f16/bf16 are exactly
    the rounded weights, q8_0 is within half a quantisation step of each 32-weight block."""
    from smolctl.model_io import model_state

    _, model, cfg = tiny
    back = read_gguf_state(exported("gguf", dtype), cfg)
    ours = {k: v.numpy() for k, v in model_state(model).items()}
    assert back.keys() == ours.keys()  # tied: no output.weight
    for name, w in ours.items():
        if w.ndim == 1 or dtype == "f32":  # norms are always f32
            expected = w
        elif dtype == "f16":
            expected = w.astype(np.float16).astype(np.float32)
        elif dtype == "bf16":
            expected = torch.from_numpy(w).bfloat16().float().numpy()
        else:
            blocks = w.reshape(-1, 32)
            step = np.abs(blocks).max(-1, keepdims=True) / 127
            # half a step of rounding, plus the block scale's own rounding to f16 (2^-11 relative)
            assert (np.abs(back[name].reshape(-1, 32) - blocks) <= step * (0.5 + 127 * 2**-11)).all(), name
            continue
        assert np.array_equal(back[name], expected), name


def test_gguf_metadata_and_tokenizer(tiny, exported, tok):
    import gguf

    cfg = tiny[2]
    fields = gguf_reader(exported("gguf", "q8_0")).fields
    get = lambda key: fields[key].contents()  # noqa: E731
    assert get("general.architecture") == "llama"
    assert get("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert [get(f"llama.{k}") for k in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                                        "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
                                        "vocab_size")] == [
        cfg.max_seq_len, cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
        cfg.head_dim, cfg.vocab_size]
    assert get("llama.rope.freq_base") == cfg.rope_theta
    assert get("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.rms_norm_eps)
    vocab = tok.get_vocab()
    assert get("tokenizer.ggml.model") == "gpt2" and get("tokenizer.ggml.pre") == "smollm"
    assert get("tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    types = get("tokenizer.ggml.token_type")
    assert [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL] == sorted(tok.added_tokens_decoder)
    assert len(get("tokenizer.ggml.merges")) == len(json.loads(tok.backend_tokenizer.to_str())["model"]["merges"])
    assert [get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")] == [0, 0, 0, 0]
    assert get("tokenizer.ggml.add_bos_token") is False
    # a base model: no chat template and no end-of-turn token (a chat model keeps both: test_interop.py)
    assert "tokenizer.chat_template" not in fields and "tokenizer.ggml.eot_token_id" not in fields
    n_params = sum(p.numel() for p in tiny[1].parameters())  # ~3.2M, the tied embedding counted once
    assert get("general.name") == "tiny0" and get("general.size_label") == f"{n_params / 1e6:.1f}M"


# -- the command: UX and refusals ------------------------------------------------------------


def test_cli_writes_gguf_with_summary_and_refuses_to_overwrite(cli, tiny, tmp_path):
    out = tmp_path / "m.gguf"
    r = cli("export", "--model", tiny[0], "--out", out, "--dtype", "q8_0")
    assert r.exit_code == 0, r.output
    assert "m.gguf" in r.output and f"{out.stat().st_size:,}" in r.output
    assert "llama-cli -m" in r.output and "ollama create" in r.output
    before = out.read_bytes()
    r = cli("export", "--model", tiny[0], "--out", out)
    assert r.exit_code == 2 and "already exists" in r.output and "--force" in r.output
    assert out.read_bytes() == before
    r = cli("export", "--model", tiny[0], "--out", out, "--dtype", "f32", "--force")
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > len(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary left behind


def test_cli_hf_refuses_non_empty_dir_and_force_replaces_only_an_export(cli, tiny, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = cli("export", "--model", tiny[0], "--format", "hf", "--out", out)
    assert r.exit_code == 2 and "already exists. Pass --force" in r.output
    r = cli("export", "--model", tiny[0], "--format", "hf", "--out", out, "--force")  # not something export wrote
    assert r.exit_code == 2 and "refusing to replace" in r.output and "not a Hugging Face export written by smolctl" in r.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    r = cli("export", "--model", tiny[0], "--format", "hf", "--out", out)  # an empty directory is fine
    assert r.exit_code == 0, r.output
    (out / "notes.txt").write_text("mine")  # an earlier export holding a file of the user's: theirs now
    r = cli("export", "--model", tiny[0], "--format", "hf", "--out", out, "--force")
    assert r.exit_code == 2 and "not a Hugging Face export written by smolctl" in r.output
    (out / "notes.txt").unlink()
    r = cli("export", "--model", tiny[0], "--format", "hf", "--out", out, "--force")  # an earlier export: replaced
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file()
    assert "from_pretrained" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


@pytest.mark.parametrize("args, words", [
    (["--format", "onnx"], "unknown export format 'onnx'"),
    (["--format", "gguf", "--dtype", "q4_0"], "unknown dtype 'q4_0' for --format gguf"),
    (["--format", "hf", "--dtype", "q8_0"], "unknown dtype 'q8_0' for --format hf"),
    (["--model", "/no/such/model"], "no such file or directory"),
    (["--out", "{tmp}/a-file/out.gguf"], "cannot write to"),  # a parent that is a file: unwritable even for root
    (["--format", "gguf", "--out", "{tmp}"], "is a directory"),
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(cli, tiny, tmp_path, args, words):
    (tmp_path / "a-file").write_text("x")
    argv = {"--model": str(tiny[0]), "--out": str(tmp_path / "out.gguf")}
    for flag, value in zip(args[::2], args[1::2]):
        argv[flag] = value.format(tmp=tmp_path)
    r = cli("export", *[x for kv in argv.items() for x in kv])
    assert r.exit_code == 2, r.output
    assert r.output.strip().count("\n") == 0 and words in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_interrupted_export_leaves_nothing(tiny, tmp_path):
    from smolctl.export import export

    def interrupt(what, done, total):
        if total is not None:  # the first bytes are written: Ctrl-C
            raise KeyboardInterrupt

    for fmt, out in (("gguf", tmp_path / "m.gguf"), ("hf", tmp_path / "hf")):
        with pytest.raises(KeyboardInterrupt):
            export(tiny[0], fmt, out, progress=interrupt)
        assert list(tmp_path.iterdir()) == []


def test_export_refuses_to_write_over_its_own_source(tiny):
    from smolctl.errors import SmolctlError
    from smolctl.export import export

    with pytest.raises(SmolctlError, match="is, holds or lies inside the model being exported"):
        export(tiny[0], "hf", tiny[0], force=True)
