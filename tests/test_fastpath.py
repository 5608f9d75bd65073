import pytest
import torch
from torch.nn import functional as F

from smolctl.config import ModelConfig
from smolctl.fastpath import GROUP, Int4Linear, MvLinear, fast_cpu_decoding
from smolctl.generation import Generation, Sampling
from smolctl.model import build_model
from smolctl.tokenizer import load_tokenizer

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
    rows, cols = 32, 128
    q = torch.randint(0, 16, (rows, cols // GROUP, GROUP)).float()
    q[..., 0], q[..., 1] = 0, 15  # every group spans the full code range, as Q4_1's min/max do
    scale = torch.rand(rows, cols // GROUP, 1).bfloat16().float() * 0.01 + 0.001
    lo = -8 * scale  # zero = lo + 8*scale = 0: exact in bf16
    w = (q * scale + lo).reshape(rows, cols)
    x = torch.randn(3, cols, dtype=torch.bfloat16)
    got = Int4Linear(w)(x).float()
    want = x.float() @ w.T
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_int4_error_is_a_quantization_error():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    err = (Int4Linear(w)(x).float() - x.float() @ w.T).abs().mean() / (x.float() @ w.T).abs().mean()
    assert 0 < err < 0.1


@pytest.mark.parametrize("int4", [False, True])
def test_fast_models_decode_like_the_plain_one(int4):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY)).eval()
    tok = load_tokenizer()
    prompt = tok("The quick brown fox").input_ids

    def greedy(m):
        gen = Generation(m, tok, [prompt], Sampling(max_new_tokens=8), stop_ids=set())
        list(gen)
        return gen.results[0].token_ids

    plain = build_model(ModelConfig(**TINY)).eval()
    plain.load_state_dict(model.state_dict())
    plain.to(torch.bfloat16)
    fast = fast_cpu_decoding(model if int4 else model.to(torch.bfloat16), int4=int4)  # int4 quantizes from fp32
    assert next(fast.parameters()).dtype == torch.bfloat16
    if int4:
        assert isinstance(fast.model.layers[0].mlp.up_proj, Int4Linear) and isinstance(fast.lm_head, MvLinear)
        assert len(greedy(fast)) == 8
    else:  # the same bf16 weights through another kernel: the same tokens
        assert greedy(fast) == greedy(plain)
        assert set(fast.state_dict()) == set(plain.state_dict())


def test_generate_cli_quantized(cli, tiny_base_dir):
    r = cli("generate", "Hello", "--model", tiny_base_dir, "-n", "4", "--quantize", "int4")
    assert r.exit_code == 0, r.output
    r = cli("generate", "Hello", "--model", tiny_base_dir, "--quantize", "int4", "--dtype", "fp32")
    assert r.exit_code == 2 and "--quantize int4 computes in bf16" in r.output
