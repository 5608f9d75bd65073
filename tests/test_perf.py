import json

import pytest
import torch
from conftest import inject, plant_compile

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


# -- autotune: what `auto` precision means here, measured ----------------------------------------

def tiny_shape():
    """SMALL's matmuls: the real measurement, in milliseconds."""
    from smolctl.autotune import Shape

    return Shape.of(SMALL)


def cache(monkeypatch, tmp_path):
    """A fresh cache directory; figures are kept however busy the machine is (as on a quiet one)."""
    from smolctl import autotune
    from smolctl.autotune import cache_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(autotune, "BUSY_SHARE", 0.0)

    assert cache_file() == tmp_path / "cache" / "smolctl" / "autotune.json"
    return cache_file()


def test_autotune_measures_once_per_machine_and_torch_version(monkeypatch, tmp_path):
    from smolctl.autotune import choose, machine

    path = cache(monkeypatch, tmp_path)
    first = choose("cpu", "train", rows=8, shape=tiny_shape())
    assert not first.cached and first.figures["fp32"] > 0 and first.name in ("fp32", "bf16")
    assert all(isinstance(v, float) or v.startswith("skipped: ") for v in first.figures.values())
    stored = json.loads(path.read_text())["machines"]
    assert list(stored) == [machine("cpu")] and f"torch {torch.__version__}" in machine("cpu")
    again = choose("cpu", "train", rows=8, shape=tiny_shape())
    assert again.cached and again.figures == first.figures and again.name == first.name
    # the same figures under another torch's key (an upgrade): measured again, both kept
    path.write_text(path.read_text().replace(f"torch {torch.__version__}", "torch 0.0.1"))
    third = choose("cpu", "train", rows=8, shape=tiny_shape())
    assert not third.cached
    assert sorted(json.loads(path.read_text())["machines"]) == sorted([machine("cpu"), machine("cpu").replace(
        f"torch {torch.__version__}", "torch 0.0.1")])
    # decoding is timed at one row: another entry, measured
    assert not choose("cpu", "decode", rows=4096, shape=tiny_shape()).cached


def test_figures_measured_on_a_busy_machine_are_used_but_not_kept(monkeypatch, tmp_path):
    from smolctl import autotune

    path = cache(monkeypatch, tmp_path)
    monkeypatch.setattr(autotune, "BUSY_SHARE", 100.0)  # every measurement counts as taken on a busy machine
    first = autotune.choose("cpu", "train", rows=8, shape=tiny_shape())
    assert 0 < first.figures["cpu_share"] < 100 and not path.exists()
    assert "a busy machine, so not cached" in autotune.describe(first)
    assert not autotune.choose("cpu", "train", rows=8, shape=tiny_shape()).cached


@pytest.mark.parametrize("damage", ["{not json", "[1, 2]", '{"version": 1, "machines": {"x": 3}}', ""])
def test_a_damaged_autotune_cache_is_ignored_and_rewritten(monkeypatch, tmp_path, damage):
    from smolctl.autotune import choose, machine

    path = cache(monkeypatch, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(damage)
    assert not choose("cpu", "eval", rows=8, shape=tiny_shape()).cached
    assert machine("cpu") in json.loads(path.read_text())["machines"]
    assert choose("cpu", "eval", rows=8, shape=tiny_shape()).cached


@pytest.mark.parametrize("figures, train, decode", [
    ({"fp32": 100.0, "bf16": 300.0, "fp16": 400.0}, "bf16", "fp16"),  # fp16 trains on CUDA only
    ({"fp32": 100.0, "bf16": 300.0, "fp16": 310.0}, "bf16", "bf16"),  # fp16 must beat bf16 clearly too
    ({"fp32": 100.0, "bf16": 110.0, "fp16": 90.0}, "fp32", "fp32"),  # a half-width type must clearly win
    ({"fp32": 100.0, "bf16": "skipped: no native CPU kernels", "fp16": 99.0}, "fp32", "fp32"),
])
def test_the_auto_choice_follows_the_figures(monkeypatch, tmp_path, figures, train, decode):
    from smolctl.autotune import choose, describe, train_precision
    from smolctl.dtypes import pick_dtype, torch_dtype

    inject(cache(monkeypatch, tmp_path), tiny_shape(), figures)
    assert choose("cpu", "train", rows=8, shape=tiny_shape()).name == train
    assert train_precision("cpu", 8, tiny_shape())[0] == {"fp32": "no"}.get(train, train)
    said = []
    assert pick_dtype("auto", "cpu", "decode", 1, SMALL, said.append)[0] == torch_dtype(decode)
    assert said == [describe(choose("cpu", "decode", shape=tiny_shape()))] and "(cached;" in said[0]


def test_training_on_auto_precision_takes_the_measured_choice(monkeypatch, tmp_path, micro_cfg, cli):
    """`mixed_precision: auto` trains in what the (injected) figures favour, and `train --verbose`
    shows them. (A bf16 run needs a process of its own -- Accelerate sets the precision once per
    process -- and test_train's bf16 test has one: here the choice itself is checked for bf16.)"""
    from smolctl.autotune import Shape
    from smolctl.run import mixed_precision

    path = cache(monkeypatch, tmp_path)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = micro_cfg(max_steps=1, save_every=100, mixed_precision="auto").resolved()
    rows = [min(cfg.batch_size * cfg.seq_len, 256)]
    inject(path, Shape.of(cfg.model_config()), {"fp32": 100.0, "bf16": 400.0}, rows)
    said = []
    assert mixed_precision(cfg, said.append) == "bf16" and "auto: bf16, its matmuls ran 4.0x" in said[0]

    inject(path, Shape.of(cfg.model_config()), {"fp32": 100.0, "bf16": 90.0}, rows)
    model = ", ".join(f"{k}: {v}" for k, v in cfg.model.items())
    (tmp_path / "micro.yaml").write_text(f"model: {{preset: tiny, {model}}}\ndata: {cfg.data}\nbatch_size: "
                                         f"{cfg.batch_size}\nseq_len: {cfg.seq_len}\ndevice: cpu\nnum_workers: 0\n")
    r = cli("train", "--config", "micro.yaml", "--max-steps", 1, "--run-dir", "run", "--no-dashboard", "--verbose")
    assert r.exit_code == 0, r.output
    assert "Precision: auto: fp32, as bf16 matmuls ran only 0.90x fp32's here" in r.stderr and "(cached;" in r.stderr
    assert "mixed precision no," in (tmp_path / "run" / "metrics.jsonl").read_text()


def test_fastest_times_real_calls_once_then_reads_the_cache(monkeypatch, tmp_path):
    import time

    from smolctl.autotune import fastest

    cache(monkeypatch, tmp_path)
    calls = []
    made = []

    def candidates():
        made.append(1)
        return {"slow": lambda: time.sleep(0.01), "quick": lambda: calls.append(1)}

    name, figures, cached = fastest("cpu", "test kernels", ("slow", "quick"), candidates, budget_s=0.05)
    assert name == "quick" and figures["quick"] > figures["slow"] and calls and not cached

    def never():
        raise AssertionError("measured again")

    assert fastest("cpu", "test kernels", ("slow", "quick"), never) == (name, figures, True)
    assert made == [1]  # the candidates are made only to be measured


def test_eval_computes_in_the_measured_dtype_on_device_auto(monkeypatch, tmp_path, cli, tiny_base_dir):
    """eval's --dtype auto follows the (injected) figures for its own rows (batch x seq len), and
    says so with --verbose; --device auto is accepted like everywhere else."""
    from smolctl.autotune import Shape
    from smolctl.model_io import model_config_of

    inject(cache(monkeypatch, tmp_path), Shape.of(model_config_of(tiny_base_dir)), {"fp32": 100.0, "bf16": 400.0},
           rows=[2 * 16])
    runs, said = {}, {}
    for dtype in ("auto", "fp32"):
        r = cli("eval", "--model", tiny_base_dir, "--device", "auto", "--dtype", dtype, "--batch-size", 2,
                "--seq-len", 16, "--tokens", 64, "--json", "--verbose")
        assert r.exit_code == 0, r.output
        runs[dtype], said[dtype] = json.loads(r.stdout), r.stderr
    assert (runs["auto"]["dtype"], runs["fp32"]["dtype"]) == ("bfloat16", "float32")
    assert runs["auto"]["loss"] == pytest.approx(runs["fp32"]["loss"], rel=0.02)  # autocast: near, not equal
    assert "Precision: auto: bf16, its matmuls ran 4.0x" in said["auto"] and "(auto: bf16, " in said["auto"]
    assert "Evaluating" in said["fp32"] and "Precision:" not in said["fp32"]  # fp32 was asked for: no figures


# -- compile: auto, from measured figures ---------------------------------------------------------

@pytest.mark.parametrize("timed, steps, on, says", [
    # 2 layers x 5 ms saved a step: a 30 s compile is repaid after 3,000 steps, within half of 10,000
    ({"eager_ms": 10.0, "compiled_ms": 5.0, "compile_s": 30.0}, 10_000, True,
     "auto: on, compiled layers ran 2.00x eager here, and a 30 s compile is repaid after 3,000 of 10,000 steps"),
    ({"eager_ms": 10.0, "compiled_ms": 5.0, "compile_s": 30.0}, 5_000, False, "repaid after 3,000 of 5,000 steps"),
    ({"eager_ms": 10.0, "compiled_ms": 11.0, "compile_s": 3.0}, 10_000, False,
     "auto: off, compiled layers were not faster here (11.0 ms against 10.0 eager)"),
    ({"failed": "InvalidCxxCompiler: no working C++ compiler found"}, 10_000, False,
     "auto: off, torch.compile failed here (InvalidCxxCompiler: no working C++ compiler found)"),
])
def test_compile_auto_follows_the_measured_figures(monkeypatch, tmp_path, timed, steps, on, says):
    """The figures as cached, or (a failure, which is never cached) as measured."""
    from smolctl import perf
    from smolctl.perf import compile_choice

    plant_compile(cache(monkeypatch, tmp_path), SMALL, None if "failed" in timed else timed)
    monkeypatch.setattr(perf, "measure_compile",
                        lambda *a: dict(timed) if "failed" in timed else pytest.fail("measured, not read from the cache"))
    decided, why = compile_choice(SMALL, 2, 16, "no", torch.device("cpu"), steps)
    assert decided is on and says in why
    # with 4 micro-batches a step, each step saves 4x as much: repaid 4x sooner, in steps
    if "repaid" in says:
        assert compile_choice(SMALL, 2, 16, "no", torch.device("cpu"), steps, grad_accum=4)[0] is True


def test_compile_auto_does_not_measure_a_run_too_short_to_repay_it(monkeypatch, tmp_path):
    """100 steps of 32 tokens at 100 tokens/s of matmuls: 96 s, under MEASURE_FROM_S. Measuring
    would raise here (no compile figures are planted, and measure_compile is replaced)."""
    from smolctl import perf

    plant_compile(cache(monkeypatch, tmp_path), SMALL, None)
    monkeypatch.setattr(perf, "measure_compile", lambda *a: pytest.fail("measured"))
    assert perf.compile_choice(SMALL, 2, 16, "no", torch.device("cpu"), 100) == (
        False, "auto: off, a run this short (96 s of matmuls) cannot repay a compile")



def test_compile_auto_where_torch_compile_fails_is_off_and_measured_again(monkeypatch, tmp_path):
    """No working C++ compiler (inductor's CPU backend needs one): auto says why it does not compile,
    and keeps no figures (installing a compiler must not need the cache deleted)."""
    from smolctl import perf
    from smolctl.perf import compile_choice

    path = cache(monkeypatch, tmp_path)
    plant_compile(path, SMALL, None, batch=3, seq_len=5)
    import torch._inductor.config

    # what CXX would say, read when inductor is first imported (maybe by an earlier test)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-compiler")))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing compiled to reuse
    monkeypatch.setattr(perf, "MEASURE_FROM_S", 0.0)
    decided, why = compile_choice(SMALL, 3, 5, "no", torch.device("cpu"), 10_000)
    assert not decided and why.startswith("auto: off, torch.compile failed here (") and "C++ compiler" in why
    assert "compile" not in path.read_text()


@pytest.mark.parametrize("damaged", [{"eager_ms": 10.0, "compiled_ms": 5.0}, {"eager_ms": "x", "compiled_ms": 5.0,
                                     "compile_s": 1.0}, {"eager_ms": 10.0, "compiled_ms": 0, "compile_s": 1.0}])
def test_a_damaged_compile_entry_is_measured_over(monkeypatch, tmp_path, damaged):
    """An entry a measurement could not have left (a key missing, text for a time, a zero time) is
    measured again and replaced, not divided by; a damaged matmul entry likewise."""
    from smolctl import perf
    from smolctl.autotune import Shape, entry, machine

    path = cache(monkeypatch, tmp_path)
    plant_compile(path, SMALL, damaged)
    stored = json.loads(path.read_text())
    stored["machines"][machine("cpu")][entry(32, Shape.of(SMALL))] = {"bf16": 5.0}  # no fp32
    path.write_text(json.dumps(stored))
    monkeypatch.setattr(perf, "MEASURE_FROM_S", 0.0)
    good = {"eager_ms": 10.0, "compiled_ms": 5.0, "compile_s": 0.001}
    monkeypatch.setattr(perf, "measure_compile", lambda *a: dict(good))
    assert perf.compile_choice(SMALL, 2, 16, "no", torch.device("cpu"), 10_000)[0] is True
    entries = json.loads(path.read_text())["machines"][machine("cpu")]
    assert good in entries.values() and damaged not in entries.values()
    assert entries[entry(32, Shape.of(SMALL))]["fp32"] > 0


@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_the_autotune_cache_path_taken_by_a_pipe_or_a_link_is_left_as_it_is(monkeypatch, tmp_path, kind):
    """Not read (a named pipe would block the read forever), not replaced: measured each time instead."""
    import os

    from smolctl.autotune import choose

    path = cache(monkeypatch, tmp_path)
    path.parent.mkdir(parents=True)
    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"theirs": 1}')
    os.mkfifo(path) if kind == "fifo" else path.symlink_to(theirs)
    assert not choose("cpu", "train", rows=8, shape=tiny_shape()).cached
    assert not choose("cpu", "train", rows=8, shape=tiny_shape()).cached
    assert (path.is_fifo() if kind == "fifo" else path.is_symlink()) and theirs.read_text() == '{"theirs": 1}'
