import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import plant_compile

from smolctl import checkpoint as ckpt_io
from smolctl.config import TrainConfig
from smolctl.errors import SmolctlError
from smolctl.schedule import lr_at
from smolctl.train import train

GOLDEN = Path(__file__).parent / "assets" / "golden_losses.json"


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["event"] == "train"]


def test_wsd_schedule():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0).resolved()
    assert [lr_at(s, cfg) for s in (1, 5, 10)] == [0.1, 0.5, 1.0]  # linear warmup
    assert lr_at(11, cfg) == lr_at(80, cfg) == 1.0  # stable
    # decay over the last 20 steps, in 21 strides: step 81 is one stride down, the last step one stride up
    decay = [lr_at(s, cfg) for s in range(81, 101)]
    assert decay == pytest.approx([(21 - k) / 21 for k in range(1, 21)])
    assert lr_at(100, cfg) == pytest.approx(1 / 21)  # the last step still learns
    low = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1).resolved()
    assert lr_at(100, low) == pytest.approx(0.1 + 0.9 / 21)
    assert lr_at(3, TrainConfig(max_steps=3, warmup_steps=0, decay_frac=1.0, lr=1.0).resolved()) == pytest.approx(0.25)


def test_cosine_schedule_and_default_warmup():
    cfg = TrainConfig(max_steps=5000, schedule="cosine", lr=1.0, min_lr=0.1).resolved()
    assert cfg.warmup_steps == 100  # 2% of 5,000 (the recipe's 2,000 scaled to a short run)
    assert lr_at(100, cfg) == 1.0
    # 4,900 steps on 4,901 strides of the half cosine: symmetric about its middle, and the last step
    # as far above min_lr as the first below lr
    assert lr_at(101, cfg) < 1.0 and 1.0 - lr_at(101, cfg) == pytest.approx(lr_at(5000, cfg) - 0.1)
    assert lr_at(5000, cfg) > 0.1 and lr_at(2550, cfg) > 0.55 > lr_at(2551, cfg)
    assert lr_at(2550, cfg) - 0.55 == pytest.approx(0.55 - lr_at(2551, cfg))
    lrs = [lr_at(s, cfg) for s in range(100, 5001)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(3, TrainConfig(max_steps=3, warmup_steps=0, schedule="cosine", lr=1.0).resolved()) > 0
    assert TrainConfig(max_steps=10**6).resolved().warmup_steps == 2000


def test_loss_decreases_and_run_artifacts(micro_cfg, tmp_path):
    run = tmp_path / "run"
    result = train(micro_cfg(max_steps=30, lr=1e-2), run, log_file=tmp_path / "logs" / "run.log")
    assert result.stopped_by is None and result.step == 30
    curve = [loss for _, loss in losses(run)]
    assert len(curve) == 30
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    row = next(r for r in rows if r["event"] == "train")
    assert {"step", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "elapsed_s"} <= set(row)
    assert (run / "loss.png").stat().st_size > 1000
    assert (run / "config.yaml").is_file()
    log = (tmp_path / "logs" / "run.log").read_text()
    assert "step     30/30 | loss" in log and "Done: step 30" in log


def test_golden_loss_curve(micro_cfg, tmp_path):
    """The first steps' losses are pinned: a change to init, data, loss or optimizer shows here.
    Regenerate (after an intended change) with SMOLCTL_REGEN_GOLDEN=1."""
    train(micro_cfg(max_steps=8, save_every=100), tmp_path / "run")
    got = [loss for _, loss in losses(tmp_path / "run")]
    if os.environ.get("SMOLCTL_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    assert got == pytest.approx(json.loads(GOLDEN.read_text()), abs=1e-4)


@pytest.mark.parametrize("shuffle", [0, 6])
def test_resume_is_bit_exact_after_one_and_two_resumes(micro_cfg, tmp_path, shuffle):
    cfg = micro_cfg(shuffle_buffer=shuffle)
    train(cfg, tmp_path / "straight")
    train(cfg, tmp_path / "resumed")
    train(cfg, tmp_path / "resumed", resume="4")  # redo 5..12 from step 4
    train(cfg, tmp_path / "resumed", resume="8")  # and 9..12 once more, from step 8
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [s for s, _ in resumed] == list(range(1, 13))  # no step lost or repeated in metrics.jsonl
    assert resumed == straight  # bit for bit


def test_resume_with_another_number_of_data_workers_is_exact(micro_cfg, tmp_path, monkeypatch):
    """The number of workers moves the tokenizing, not the blocks: resume may change it (no
    --allow-config-change: num_workers is resumable) and the run continues bit for bit."""
    from smolctl import data

    monkeypatch.setattr(data, "TOKENIZE_DOCS", 3)  # 8 chunks an epoch, shared out among the workers
    train(micro_cfg(num_workers=0), tmp_path / "straight")
    train(micro_cfg(num_workers=2), tmp_path / "resumed")
    train(micro_cfg(num_workers=3), tmp_path / "resumed", resume="4")
    train(micro_cfg(num_workers=1), tmp_path / "resumed", resume="8")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_checkpoint_contents_and_manifest(micro_cfg, tmp_path):
    train(micro_cfg(max_steps=4), tmp_path / "run")
    final = tmp_path / "run" / "checkpoints" / "final"
    names = {p.name for p in final.iterdir()}
    assert names == {"config.json", "model.safetensors", "smolctl.json", "optimizer.safetensors", "optimizer.json",
                     "rng-rank0.json", "rng-rank0.safetensors", "data-rank0.json", "data-rank0.safetensors",
                     "manifest.json",
                     "tokenizer.json", "tokenizer_config.json"}  # no chat_template.jinja: a base model
    manifest = json.loads((final / "manifest.json").read_text())["files"]
    assert set(manifest) == names - {"manifest.json"}
    meta = json.loads((final / "smolctl.json").read_text())
    assert meta["step"] == 4 and meta["tokens_seen"] == 4 * 2 * 16 and meta["train"]["max_steps"] == 4
    ckpt_io.verify(final)
    # A checkpoint is an HF model directory too.
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 1


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corruption_is_detected_and_latest_skips_it(micro_cfg, tmp_path, damage):
    run = tmp_path / "run"
    train(micro_cfg(max_steps=8, save_every=4), run)
    victim = run / "checkpoints" / "final" / "optimizer.safetensors"
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    victim.write_bytes(bytes(data))
    with pytest.raises(SmolctlError, match="optimizer.safetensors is corrupt"):
        ckpt_io.verify(victim.parent)
    said = []
    assert ckpt_io.find_checkpoint(run, "latest", say=said.append).name == "step-00000004"
    assert "Skipping damaged checkpoint" in said[0] and "optimizer.safetensors" in said[0]


def test_interrupted_save_leaves_previous_checkpoint_latest(micro_cfg, tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = {"n": 0}
    real = ckpt_io.save_rank_state

    def crash_on_second_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_io, "save_rank_state", crash_on_second_save)
    with pytest.raises(SmolctlError, match="could not save checkpoint .*step-00000008: No space left on device") as e:
        train(micro_cfg(max_steps=12, save_every=4), run)
    assert e.value.exit_code == 1 and "the last good checkpoint is" in str(e.value)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the half-written save is cleaned up
    assert ckpt_io.find_checkpoint(run, "latest").name == "step-00000004"
    assert [s for s, _ in ckpt_io.checkpoints(run)] == [4]  # the half-written step 8 is not a checkpoint
    monkeypatch.setattr(ckpt_io, "save_rank_state", real)
    train(micro_cfg(max_steps=12, save_every=4), run, resume="latest")
    assert ckpt_io.find_checkpoint(run, "latest").name == "final"


def test_keep_last_prunes_old_step_checkpoints(micro_cfg, tmp_path):
    train(micro_cfg(max_steps=12, save_every=2, keep_last=2), tmp_path / "run")
    assert [p.name for _, p in ckpt_io.checkpoints(tmp_path / "run")] == ["step-00000008", "step-00000010", "final"]


def test_nan_steps_are_skipped_then_training_stops(micro_cfg, tmp_path, monkeypatch):
    from smolctl.loss import CausalLMLoss

    with pytest.raises(SmolctlError, match="lr must be positive and finite, got inf"):
        micro_cfg(lr=float("inf"))  # what used to make the steps NaN is refused now
    real = CausalLMLoss.forward
    monkeypatch.setattr(CausalLMLoss, "forward", lambda self, x, y: real(self, x, y) * float("nan"))
    events = []
    with pytest.raises(SmolctlError, match="training diverged: 3 non-finite steps in a row") as e:
        train(micro_cfg(max_bad_steps=3, save_every=100), tmp_path / "run", sinks=[events.append])
    assert e.value.exit_code == 1
    assert [r["bad_steps"] for r in events if r["event"] == "skip"] == [1, 2, 3]
    assert not (tmp_path / "run").exists()  # it never saved a checkpoint: the fresh run is undone


def test_resume_errors(micro_cfg, tmp_path):
    run = tmp_path / "run"
    train(micro_cfg(max_steps=4), run)
    with pytest.raises(SmolctlError, match="no checkpoint at step 3. Checkpoints: 4"):
        train(micro_cfg(max_steps=8), run, resume="3")
    with pytest.raises(SmolctlError, match="different model config"):
        train(micro_cfg(max_steps=8, model={"num_layers": 2, "hidden_size": 32, "num_heads": 2,
                                            "num_kv_heads": 1, "intermediate_size": 64}), run, resume="latest")
    with pytest.raises(SmolctlError, match="already has checkpoints.*smolctl resume"):
        train(micro_cfg(max_steps=4), run)


def test_eval_and_sample_events(micro_cfg, tmp_path, corpus):
    from transformers import LlamaForCausalLM

    from smolctl.tokenizer import load_tokenizer

    train(micro_cfg(max_steps=4, eval_every=2, sample_every=4, eval_data=str(corpus), eval_tokens=64,
                    sample_tokens=8), tmp_path / "r")
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(r["tokens"] >= 64 for r in evals)
    samples = [r for r in rows if r["event"] == "sample"]
    assert [(r["step"], r["prompt"]) for r in samples] == [(4, "Once upon a time")]
    # the sample is the greedy continuation by the step-4 weights (the final checkpoint), as transformers decodes it
    model, tok = LlamaForCausalLM.from_pretrained(tmp_path / "r" / "checkpoints" / "final"), load_tokenizer()
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    new = model.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:]
    assert samples[0]["text"] == tok.decode(new, skip_special_tokens=True) and len(new) == 8


def test_throughput_leaves_out_evals_samples_and_saves(micro_cfg, tmp_path, corpus):
    """A train row's tokens/s counts its steps' time only. Each eval here is held up by half a
    second (a sink slow to show its progress, as a terminal can be): the rows' `aside_s` is the sum
    of the `seconds` of the evals, samples and saves since the row before, and what is left of the
    time between two rows after taking it out is at least the steps' time that tokens/s implies."""
    slept = []

    def slow_display(e):
        if e["event"] == "phase" and e["text"].startswith("evaluating 0/"):
            t = time.perf_counter()
            time.sleep(0.5)
            slept.append(time.perf_counter() - t)

    cfg = micro_cfg(max_steps=8, log_every=4, eval_every=2, sample_every=2, save_every=2, eval_data=str(corpus),
                    eval_tokens=64, sample_tokens=4)
    train(cfg, tmp_path / "r", sinks=[slow_display])
    events = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["event"] == "phase"]  # progress is for live displays only
    assert "evaluating" not in (tmp_path / "r" / "train.log").read_text()
    rows = [e for e in events if e["event"] == "train"]
    assert [r["step"] for r in rows] == [4, 8] and len(slept) == 4
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4, 6, 8] and all(e["seconds"] >= s for e, s in zip(evals, slept))
    aside, previous = 0.0, 0.0
    for e in events:
        if e["event"] in ("eval", "sample", "checkpoint"):
            aside += e["seconds"]
        elif e["event"] == "train":
            assert e["aside_s"] == pytest.approx(aside, rel=1e-9, abs=1e-9)
            assert e["aside_s"] >= 0.5  # this window's evals (at steps 2 and 4, or 6)
            steps_s = 4 * cfg.batch_size * cfg.seq_len / e["tokens_per_s"]
            assert steps_s <= e["elapsed_s"] - previous - e["aside_s"]
            aside, previous = 0.0, e["elapsed_s"]


MICRO_YAML = ("model: {{preset: tiny, num_layers: 1, hidden_size: 32, num_heads: 2, num_kv_heads: 1, "
              "intermediate_size: 64}}\ndata: {corpus}\nbatch_size: 2\nseq_len: 16\nmixed_precision: 'no'\ncompile: false\n"
              "device: cpu\nlog_every: 1\n")


def _run_cli(args, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "smolctl", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_finishes_the_step_saves_and_prints_the_resume_command(tmp_path, corpus, sig, code):
    (tmp_path / "micro.yaml").write_text(MICRO_YAML.format(corpus=corpus))
    p = _run_cli(["train", "--config", "micro.yaml", "--max-steps", "100000", "--run-dir", "run"], tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or '"train"' not in metrics.read_text()):
        time.sleep(0.2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == code, err
    assert "smolctl resume --run-dir run --from" in err and "Traceback" not in err
    step = int(err.split("--from ")[1].split()[0])
    assert (tmp_path / "run" / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()


def test_bf16_mixed_precision_trains_with_fp32_master_weights(tmp_path, corpus):
    """In a process of its own: Accelerate's state (the precision) is set once per process."""
    from safetensors import safe_open

    (tmp_path / "micro.yaml").write_text(MICRO_YAML.format(corpus=corpus))
    p = _run_cli(["train", "--config", "micro.yaml", "--mixed-precision", "bf16", "--max-steps", "20", "--lr", "1e-2",
                  "--run-dir", "run", "--no-dashboard"], tmp_path)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "mixed precision bf16" in rows[0]["text"]  # autocast was on, not a silent fp32 run
    curve = [loss for _, loss in losses(tmp_path / "run")]
    assert len(curve) == 20 and all(map(math.isfinite, curve))
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    with safe_open(tmp_path / "run" / "checkpoints" / "final" / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # autocast computes in bf16, stores fp32


@pytest.mark.heavy
def test_compile_auto_measures_and_compiled_steps_match_eager(micro_cfg, tmp_path, monkeypatch):
    """compile: auto. measure_compile times the run's layer graph eager and compiled (which also
    fills inductor's cache for the run). Where the figures say compiling pays (planted: the micro
    run is far too short to pay for real), the run compiles before step 1 and says how long that
    took; config.yaml keeps the decision; each layer fused by inductor takes the same steps as
    eager, to float rounding; and --resume auto sees the same run."""
    from smolctl import perf
    from smolctl.autotune import cache_file
    from smolctl.run import _same_run, planned_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a cold inductor cache, an empty autotune.json
    cfg = micro_cfg(max_steps=3, save_every=100, compile=None)
    mcfg, device = cfg.model_config(), torch.device("cpu")
    timed = perf.measure_compile(mcfg, cfg.batch_size, cfg.seq_len, "no", device, eager_attention=True)
    assert sorted(timed) == ["compile_s", "compiled_ms", "cpu_share", "eager_ms"] and min(timed.values()) > 0, timed

    monkeypatch.setattr(perf, "MEASURE_FROM_S", 0.0)
    plant_compile(cache_file(), mcfg, {"eager_ms": 10.0, "compiled_ms": 5.0, "compile_s": 0.001},
                  cfg.batch_size, cfg.seq_len)
    train(micro_cfg(max_steps=3, save_every=100), tmp_path / "eager")
    train(cfg, tmp_path / "compiled")
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert [s for s, _ in compiled] == [1, 2, 3]
    assert [loss for _, loss in compiled] == pytest.approx([loss for _, loss in eager], abs=1e-3)
    said = [json.loads(line) for line in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    compiling = [e for e in said if "compile_s" in e]
    assert len(compiling) == 1 and compiling[0]["compile_s"] > 0
    assert compiling[0]["text"].startswith("Compiled the decoder layers in ") and "(auto: on, " in compiling[0]["text"]
    assert ", compiled, " in said[0]["text"]  # the start line
    assert TrainConfig.from_file(tmp_path / "compiled" / "config.yaml").compile is True
    assert TrainConfig.from_file(tmp_path / "eager" / "config.yaml").compile is False

    # the same job started again (--resume auto, compile still auto) is the same run: compiled
    relaunched = planned_config(cfg, tmp_path / "compiled", "auto", overwrite=False)
    assert relaunched.compile is True and _same_run(relaunched, tmp_path / "compiled")


def test_report_to_tensorboard_writes_an_event_file(micro_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = micro_cfg(max_steps=4, report_to="tensorboard", save_every=100)
    train(cfg, tmp_path / "run")
    event_files = list((tmp_path / "run").glob("*/events.out.tfevents.*"))  # <run dir>/<run name>/; hparams below
    assert len(event_files) == 1, event_files
    events = EventAccumulator(str(event_files[0])).Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(s, pytest.approx(loss, rel=1e-6)) for s, loss in losses(tmp_path / "run")]
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([lr_at(s, cfg.resolved()) for s in range(1, 5)])


def test_one_step_equals_a_plain_transformers_step(micro_cfg, tmp_path):
    """Step 1 of our loop (chunked loss, fused AdamW, clipping, schedule) against transformers'
    own loss (labels=) and torch's AdamW from the same init on the same batch: this anchors the
    golden curve outside our code."""
    from accelerate.utils import set_seed
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from smolctl.data import BlockStream, DataSpec
    from smolctl.model import build_model

    cfg = micro_cfg(max_steps=1, warmup_steps=0, lr=1e-2, save_every=100).resolved()
    train(cfg, tmp_path / "run")
    (_, our_loss), = losses(tmp_path / "run")
    ours = load_file(tmp_path / "run" / "checkpoints" / "final" / "model.safetensors")

    set_seed(cfg.seed)  # the init the run started from (our init, copied into a plain transformers model)
    init = build_model(cfg.model_config()).state_dict()
    ref = LlamaForCausalLM(cfg.model_config().to_hf())
    ref.load_state_dict(init)
    stream = BlockStream(DataSpec.parse(cfg.data, cfg.text_column), cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    batch, _ = next(iter(stream))
    loss = ref(input_ids=batch, labels=batch).loss  # transformers shifts: position t predicts t+1
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip)
    matrices = [p for p in ref.parameters() if p.dim() >= 2]
    norms = [p for p in ref.parameters() if p.dim() < 2]
    torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": norms, "weight_decay": 0}],
                      lr=lr_at(1, cfg), betas=(cfg.beta1, cfg.beta2), eps=cfg.eps).step()

    assert our_loss == pytest.approx(loss.item(), abs=1e-5)
    expected = {k: v for k, v in ref.state_dict().items() if k in ours}
    assert set(expected) == set(ours) and "model.embed_tokens.weight" in ours
    for name, w in expected.items():
        # Adam's first step moves each weight by ~lr = 1e-2; 1e-5 leaves room for the embedding rows whose
        # gradient is ~eps, where m / (sqrt(v) + eps) turns float rounding into ~3e-6 (18 of 1.5M entries)
        torch.testing.assert_close(ours[name], w, rtol=0, atol=1e-5, msg=name)
