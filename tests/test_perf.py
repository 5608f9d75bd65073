import json

import pytest
import torch

from smolctl.config import ModelConfig
from smolctl.model import build_model
from smolctl.perf import device_peak_tflops, flops_per_token

# hidden 8, 2 heads of 4 (1 K/V head), 2 layers, SwiGLU width 16, 32 tokens
SMALL = ModelConfig(hidden_size=8, num_heads=2, num_kv_heads=1, num_layers=2, intermediate_size=16, vocab_size=32,
                    max_seq_len=16)


def test_flops_per_token_by_hand():
    # Weights a token multiplies by, per layer: q 8x8 + k 8x4 + v 8x4 + o 8x8 = 192; gate, up, down
    # 3 x 8x16 = 384. Two layers: 1,152; lm_head 32x8 = 256 (the embedding lookup multiplies nothing).
    # 2 FLOPs per weight forward, 4 backward: 6 x 1,408 = 8,448.
    # Attention, forward, per layer: scores q.k over 10 positions x 8 dims x 2 = 160, and the
    # weighted sum of values 160 more; x3 with backward, x2 layers: 1,920.
    assert flops_per_token(SMALL, seq_len=10) == 8448 + 1920


def test_flops_per_token_is_what_torch_counts():
    """torch's FLOP counter over a real forward and backward (eager attention, whose matmuls it sees)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(SMALL)
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 32, (3, 10))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert counter.get_total_flops() / ids.numel() == flops_per_token(SMALL, seq_len=10)


def test_mfu_in_the_metrics_is_model_flops_over_the_peak(micro_cfg, tmp_path):
    from smolctl.train import train

    cfg = micro_cfg(max_steps=3, peak_tflops=0.5, save_every=100)
    train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fpt = flops_per_token(cfg.model_config(), cfg.seq_len)
    train_rows = [r for r in rows if r["event"] == "train"]
    assert len(train_rows) == 3
    for r in train_rows:
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / 0.5e12)


def test_device_peak():
    assert device_peak_tflops(torch.device("cpu"), None) is None  # no table entry for CPUs: no MFU
    assert device_peak_tflops(torch.device("cpu"), 7.5) == 7.5
