import json
from pathlib import Path

import pytest
import torch

from smolctl.config import ModelConfig
from smolctl.model import build_model, param_breakdown


def formula(cfg: ModelConfig) -> dict:
    """The closed-form count, written independently of the module tree."""
    h, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    attn = h * cfg.num_heads * hd * 2 + h * cfg.num_kv_heads * hd * 2  # q, o + k, v
    mlp = 3 * h * i
    layer = attn + mlp + 2 * h
    emb = cfg.vocab_size * h
    head = 0 if cfg.tie_embeddings else emb
    return {"attention": attn, "mlp": mlp, "layer": layer, "embedding": emb,
            "total": emb + cfg.num_layers * layer + h + head}


@pytest.mark.parametrize("cfg", [
    ModelConfig.from_preset("smollm2-135m"),
    ModelConfig.from_preset("tiny"),
    ModelConfig(hidden_size=64, num_heads=4, num_kv_heads=1, num_layers=3, intermediate_size=96,
                vocab_size=1000, tie_embeddings=False),
], ids=["135m", "tiny", "untied"])
def test_counts_match_formula_and_numel(cfg):
    model = build_model(cfg, device="meta")
    counts = param_breakdown(model)
    expected = formula(cfg)
    # parameters() lists a tied weight once, so its sum is the total whether tied or not
    assert counts["total"] == expected["total"] == sum(p.numel() for p in model.parameters())
    assert counts["per_layer"]["attention_total"] == expected["attention"]
    assert counts["per_layer"]["mlp_total"] == expected["mlp"]
    assert counts["per_layer"]["total"] == expected["layer"]
    assert counts["embedding"] == expected["embedding"]
    assert counts["lm_head"] == (0 if cfg.tie_embeddings else expected["embedding"])
    assert counts["tied"] == cfg.tie_embeddings


def test_135m_is_the_seeds_model():
    """The seed's printed LlamaConfig, built by transformers alone, has the same parameters as our preset."""
    from transformers import LlamaConfig, LlamaForCausalLM

    text = (Path(__file__).parent / "assets" / "seed_config.txt").read_text()
    seed = LlamaConfig(**json.loads(text[text.index("{"):]))
    with torch.device("meta"):
        reference = LlamaForCausalLM(seed)
    ours = build_model(ModelConfig.from_preset("smollm2-135m"), device="meta")
    assert param_breakdown(ours)["total"] == sum(p.numel() for p in reference.parameters())
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}
    assert ModelConfig.from_hf(seed, name="smollm2-135m") == ModelConfig.from_preset("smollm2-135m")


def test_module_print_is_the_seeds():
    seed = (Path(__file__).parent / "assets" / "seed_module_tree.txt").read_text().rstrip("\n")
    ours = str(build_model(ModelConfig.from_preset("smollm2-135m"), device="meta"))
    # transformers 5 prints SiLUActivation() where 4.48 printed SiLU(); nothing else may differ.
    assert ours.replace("(act_fn): SiLUActivation()", "(act_fn): SiLU()") == seed


def test_meta_build_allocates_nothing():
    model = build_model(ModelConfig.from_preset("smollm2-135m"), device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_init_std_and_seeding():
    cfg = ModelConfig.from_preset("tiny")
    torch.manual_seed(0)
    a = build_model(cfg)
    torch.manual_seed(0)
    b = build_model(cfg)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    w = a.model.layers[0].mlp.up_proj.weight
    assert w.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert torch.equal(a.model.norm.weight, torch.ones_like(a.model.norm.weight))
    assert a.lm_head.weight is a.model.embed_tokens.weight


def test_custom_init_std():
    cfg = ModelConfig.from_preset("tiny")
    cfg.init_std = 0.2
    w = build_model(cfg).model.embed_tokens.weight
    assert w.std().item() == pytest.approx(0.2, rel=0.02)
