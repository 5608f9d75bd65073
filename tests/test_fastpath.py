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


def q4_1_reference(w: torch.Tensor) -> torch.Tensor:
    """What 4-bit weights in groups of GROUP mean, written out: each group keeps its min and
    scale = (max - min) / 15 (both stored in bf16, as zero = min + 8 * scale) and codes q in 0..15;
    the weight is (q - 8) * scale + zero."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // GROUP, GROUP)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    q = ((g - lo) / scale).round().clamp(0, 15)
    zero = (lo + 8 * scale).bfloat16().float()
    return ((q - 8) * scale.bfloat16().float() + zero).reshape(rows, cols)


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


def test_int4_model_computes_with_its_dequantized_weights():
    """The int4 model against a plain fp32 model holding the dequantized weights (the lm_head rounded
    to bf16, as the fast path keeps it): off by no more than bf16 rounding (that same plain model run
    in bf16), and far closer to it than to the unquantized model."""
    model, prompt = tiny_model_and_prompt()
    unquantized = build_model(ModelConfig(**TINY)).eval()
    unquantized.load_state_dict(model.state_dict())
    reference = build_model(ModelConfig(**TINY)).eval()
    with torch.no_grad():
        for (name, w), ref in zip(model.named_parameters(), reference.parameters()):
            ref.copy_(q4_1_reference(w) if name.endswith("proj.weight") else w.bfloat16().float())
    rounded = build_model(ModelConfig(**TINY)).eval()
    rounded.load_state_dict(reference.state_dict())
    rounded.to(torch.bfloat16)
    fast = fast_cpu_decoding(model, int4=True)  # quantizes from the fp32 weights
    assert isinstance(fast.model.layers[0].mlp.up_proj, Int4Linear) and isinstance(fast.lm_head, MvLinear)
    ids = torch.tensor([prompt + list(range(1000, 40000, 1300))])  # 34 positions
    with torch.no_grad():
        want = reference(ids).logits[0]
        got, bf16, unq = (m(ids).logits[0].float() for m in (fast, rounded, unquantized))

    def off(x):
        return (x - want).abs().mean().item()

    # measured: fast 0.034, bf16 rounding 0.039, unquantized 0.73 (mean |logit error|; logits span ~±10)
    assert off(got) < 1.5 * off(bf16) and off(unq) > 10 * off(got)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9  # 97% measured; bf16 alone 94%


def test_generate_cli_quantized(cli, tiny_base_dir):
    r = cli("generate", "Hello", "--model", tiny_base_dir, "-n", "4", "--quantize", "int4")
    assert r.exit_code == 0, r.output
    r = cli("generate", "Hello", "--model", tiny_base_dir, "--quantize", "int4", "--dtype", "fp32")
    assert r.exit_code == 2 and "--quantize int4 computes in bf16" in r.output
