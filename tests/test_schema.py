"""One schema for every config value: config files, flags, config.yaml and smolctl.json.

Through the real CLI (in-process): values coerced as meant ("3e-3" is 0.003), bad ranges and types
refused in one line naming the key before anything is created, unknown keys answered with the
nearest valid one, the train/resume options generated from the field metadata, damaged
checkpoint metadata skipped by resume and refused by the loaders, edited config.yaml refused by
resume unless --allow-config-change, the log window carried across a resume, and resuming a
complete run exiting 0.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import MICRO, write_corpus

from smolctl import checkpoint as ckpt_io
from smolctl.config import RESUMABLE, ModelConfig, TrainConfig
from smolctl.errors import SmolctlError
from smolctl.metadata import read_meta
from smolctl.schema import describe_default, specs

MODEL_YAML = "model: {preset: tiny, " + ", ".join(f"{k}: {v}" for k, v in MICRO.items()) + "}\n"
BASE_YAML = "data: corpus.jsonl\nbatch_size: 2\nseq_len: 16\nmixed_precision: 'no'\ndevice: cpu\nnum_workers: 0\n"


@pytest.fixture
def micro(tmp_path):
    """micro.yaml (the micro model, a local corpus, CPU) in the working directory."""
    write_corpus(tmp_path / "corpus.jsonl")
    (tmp_path / "micro.yaml").write_text(MODEL_YAML + BASE_YAML)
    return tmp_path / "micro.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished micro run: step-00000002 and final/ (step 4), log every step."""
    from smolctl.train import train

    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "corpus.jsonl")
    cfg = TrainConfig(preset="tiny", model=dict(MICRO), data=str(corpus), batch_size=2, seq_len=16, max_steps=4,
                      save_every=2, log_every=1, mixed_precision="no", device="cpu", num_workers=0)
    train(cfg, root / "run", log_file=root / "run.log")
    return root / "run"


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def one_error_line(r) -> str:
    assert "Traceback" not in r.output and not (r.exception and not isinstance(r.exception, SystemExit)), r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, r.output
    return lines[0]


def files(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def train_rows(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keep = ("loss", "lr", "grad_norm", "tokens_seen")
    return {r["step"]: {k: r[k] for k in keep} for r in rows if r["event"] == "train"}


# -- config files: values as they are meant ---------------------------------------------------------

@pytest.mark.parametrize("suffix, text", [
    (".yaml", "lr: 3e-3\nmax_steps: 5e3\nbeta2: '0.99'\ncompile: 'yes'\nmixed_precision: no\n"
              "model: {preset: tiny, hidden_size: '64'}\n"),
    (".toml", 'lr = "3e-3"\nmax_steps = 5000.0\nbeta2 = "0.99"\ncompile = "yes"\nmixed_precision = "no"\n'
              '[model]\npreset = "tiny"\nhidden_size = "64"\n'),
    (".json", '{"lr": "3e-3", "max_steps": "5000", "beta2": 0.99, "compile": true, "mixed_precision": "no", '
              '"model": {"preset": "tiny", "hidden_size": 64}}'),
])
def test_config_files_take_numbers_written_as_text(tmp_path, suffix, text):
    path = tmp_path / f"run{suffix}"
    path.write_text(text)
    cfg = TrainConfig.from_file(path)
    assert (cfg.lr, cfg.max_steps, cfg.beta2, cfg.compile, cfg.mixed_precision) == (0.003, 5000, 0.99, True, "no")
    assert type(cfg.lr) is float and type(cfg.max_steps) is int
    assert cfg.model_config().hidden_size == 64 and cfg.preset == "tiny"


def test_a_yaml_config_with_string_numbers_trains(cli, micro):
    micro.write_text(micro.read_text() + "lr: 3e-3\nmin_lr: 1e-4\neps: 1e-6\n")  # all three are strings to YAML
    r = cli("train", "--config", micro, "--max-steps", 2, "--run-name", "s")
    assert r.exit_code == 0, r.output
    saved = read_meta(Path("runs/s/checkpoints/final")).train
    assert (saved.lr, saved.min_lr, saved.eps) == (0.003, 1e-4, 1e-6)


@pytest.mark.parametrize("line, words", [
    ("lr: abc", "lr must be a number, got 'abc'"),
    ("lr: .inf", "lr must be positive and finite, got inf"),
    ("seed: -1", "seed must be between 0 and 4,294,967,295, got -1"),
    ("seed: 4294967296", "seed must be between 0 and 4,294,967,295"),
    ("beta1: 1.0", "beta1 must be at least 0 and below 1, got 1.0"),
    ("keep_last: 0", "keep_last must be positive, got 0"),
    ("max_steps: 2.5", "max_steps must be an integer, got 2.5"),
    ("batch_size: true", "batch_size must be an integer, got True"),
    ("compile: maybe", "compile must be true, false or null, got 'maybe'"),
    ("schedule: linear", "schedule must be wsd or cosine, got 'linear'"),
    ("sample_prompt: ''", "sample_prompt must not be empty"),
    ("min_lr: 0.5", "--min-lr 0.5 is above --lr 0.003"),
    ("grad_clip: 0", "grad_clip must be positive, got 0"),
    ("decay_frac: 1.5", "decay_frac must be between 0 and 1, got 1.5"),
    ("data: 5", "data must be text, got 5"),
    ("model: {preset: tiny, num_layers: 1000000}", "num_layers must be between 1 and 1024, got 1000000"),
    ("model: {preset: tiny, num_kv_heads: 3}", "num_heads 4 is not divisible by num_kv_heads 3"),
    ("model: {preset: tiny, eos_token_id: 49152}", "eos_token_id 49152 is not below vocab_size 49152"),
])
def test_bad_config_values_are_one_line_and_create_nothing(cli, micro, tmp_path, line, words):
    text = micro.read_text()
    if line.startswith("model:"):  # in place of the micro model
        text = text.replace(MODEL_YAML, "")
    micro.write_text(text + line + "\n")
    r = cli("train", "--config", micro, "--max-steps", 2, "--run-name", "bad")
    assert r.exit_code == 2, r.output
    assert words in one_error_line(r)
    assert not Path("runs").exists() and not Path("logs").exists()


@pytest.mark.parametrize("text, words", [
    ("sead: 1\n", "unknown training config keys: sead (did you mean seed?)"),
    ("learning_rate: 0.1\nwarmup: 3\n", "unknown training config keys: learning_rate, warmup (did you mean "
                                       "warmup_steps?)"),
    ("model: {preset: tiny, hiden_size: 64}\n", "unknown model config keys: hiden_size (did you mean hidden_size?)"),
])
def test_unknown_keys_name_the_nearest_valid_one(cli, tmp_path, text, words):
    (tmp_path / "t.yaml").write_text(text)
    r = cli("train", "--config", tmp_path / "t.yaml")
    assert r.exit_code == 2 and words in one_error_line(r) and "Valid keys: " in one_error_line(r)


def test_count_params_refuses_an_absurd_model_at_once(cli, tmp_path):
    (tmp_path / "m.yaml").write_text("preset: tiny\nnum_layers: 1000000\n")
    r = cli("count-params", "--config", tmp_path / "m.yaml")
    assert r.exit_code == 2 and "num_layers must be between 1 and 1024, got 1000000" in one_error_line(r)


# -- flags -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--seed", "-1"], "--seed must be between 0 and 4,294,967,295, got -1"),
    (["--keep-last", "0"], "--keep-last must be positive, got 0"),
    (["--keep-last", "-2"], "--keep-last must be positive, got -2"),
    (["--lr", "inf"], "--lr must be positive and finite, got inf"),
    (["--beta2", "1"], "--beta2 must be at least 0 and below 1, got 1.0"),
    (["--eps", "0"], "--eps must be positive, got 0.0"),
    (["--sample-prompt", ""], "--sample-prompt must not be empty"),
    (["--weight-decay", "-0.1"], "--weight-decay must not be negative, got -0.1"),
    (["--eval-tokens", "0"], "--eval-tokens must be positive, got 0"),
])
def test_bad_flags_are_refused_before_anything_is_created(cli, micro, args, words):
    r = cli("train", "--config", micro, "--max-steps", 2, "--run-name", "bad", *args)
    assert r.exit_code == 2, r.output
    assert words in one_error_line(r)
    assert not Path("runs").exists() and not Path("logs").exists()


def test_resume_flags_go_through_the_same_schema(cli, run):
    before = files(run)
    r = cli("resume", "--run-dir", run, "--keep-last", -1, "--max-steps", 8)
    assert r.exit_code == 2 and "--keep-last must be positive, got -1" in one_error_line(r)
    assert files(run) == before


def test_train_options_are_generated_from_the_fields():
    """Every TrainConfig field (but the model's own, which a config file holds) is a train flag with
    its help and default; resume gets exactly the fields that keep the trajectory."""
    from typer.main import get_command

    from smolctl.cli import app

    commands = get_command(app).commands
    for command, names in (("train", [n for n in specs(TrainConfig) if n != "model"]), ("resume", RESUMABLE)):
        params = {p.name: p for p in commands[command].params}
        for name in names:
            spec, param = specs(TrainConfig)[name], params[name]
            assert spec.flag() in param.opts and param.help.startswith(spec.meta["help"].rstrip(".")), name
            if spec.default is not None:
                assert param.help.endswith(f" (default {describe_default(spec)})."), name
        config_fields = {n for n in params if n in specs(TrainConfig)}
        assert config_fields == set(names), command
    assert "batch_size" not in RESUMABLE and "max_steps" in RESUMABLE


def test_generated_flags_reach_the_config(cli, micro):
    r = cli("train", "--config", micro, "--max-steps", 2, "--run-name", "f", "--beta1", "0.8", "--beta2", "0.99",
            "--eps", "1e-6", "--grad-clip", "0.5", "--weight-decay", "0.1", "--min-lr", "1e-4", "--decay-frac",
            "0.5", "--sample-prompt", "Hi", "--eval-tokens", "64", "--no-compile", "--seed", "7")
    assert r.exit_code == 0, r.output
    saved = TrainConfig.from_file("runs/f/config.yaml")
    assert (saved.beta1, saved.beta2, saved.eps, saved.grad_clip, saved.weight_decay, saved.min_lr,
            saved.decay_frac, saved.sample_prompt, saved.eval_tokens, saved.compile, saved.seed) == \
        (0.8, 0.99, 1e-6, 0.5, 0.1, 1e-4, 0.5, "Hi", 64, False, 7)


@pytest.mark.parametrize("argv", [["train", "--help"], ["resume", "--help"], ["eval", "--help"]])
def test_generated_help_imports_no_torch(argv):
    code = textwrap.dedent(f"""
        import sys
        from smolctl.cli import app
        try:
            app({argv!r})
        except SystemExit:
            pass
        print("HEAVY", [m for m in ("torch", "transformers", "datasets", "accelerate") if m in sys.modules])
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in p.stdout, p.stdout + p.stderr
    assert ("--tokens" if argv[0] == "eval" else "--max-steps") in p.stdout


def test_eval_tokens_is_one_vocabulary(cli, trained):
    r = cli("eval", "--model", trained, "--tokens", -5)
    assert r.exit_code == 2 and "--tokens must be positive, got -5" in one_error_line(r)
    assert specs(TrainConfig)["eval_tokens"].default == 32768


# -- checkpoint metadata ---------------------------------------------------------------------------

def reseal(ckpt: Path) -> None:
    """Rewrite the manifest to match the files, as if the damage had been written by smolctl itself:
    only the metadata check can catch it then."""
    manifest = {"files": {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
                          for p in sorted(ckpt.iterdir()) if p.name != ckpt_io.MANIFEST}, "time": 0.0}
    manifest["sha256"] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    (ckpt / ckpt_io.MANIFEST).write_text(json.dumps(manifest))


def edit_meta(ckpt: Path, edit) -> None:
    meta = json.loads((ckpt / "smolctl.json").read_text())
    edit(meta)
    (ckpt / "smolctl.json").write_text(json.dumps(meta))
    reseal(ckpt)


@pytest.mark.parametrize("damage, words", [
    (lambda m: m.update(step="4"), "step must be an integer or null, got '4'"),
    (lambda m: m.pop("tokens_seen"), "not a training checkpoint (no tokens_seen)"),
    (lambda m: m["train"].update(lr="3e-3"), "lr must be a number, got '3e-3'"),
    (lambda m: m["model"].update(num_layers=0), "num_layers must be between 1 and 1024, got 0"),
    (lambda m: m.update(world_size=0), "world_size must be positive, got 0"),
    (lambda m: m.update(bogus=1), "unknown checkpoint metadata keys: bogus"),
])
def test_resume_latest_skips_damaged_metadata_saying_why(cli, run, damage, words):
    edit_meta(run / "checkpoints" / "final", damage)
    r = cli("resume", "--run-dir", run, "--from", "latest", "--max-steps", 5, "--no-dashboard")
    assert r.exit_code == 0, r.output
    skipped = [line for line in r.output.splitlines() if line.startswith("Skipping damaged checkpoint")]
    assert len(skipped) == 1 and words in skipped[0] and "final/smolctl.json" in skipped[0], r.output
    assert "Resuming from" in r.output and "step-00000002 (step 2)" in r.output and "Done: step 5" in r.output


def test_resume_latest_skips_metadata_that_is_not_json(cli, run):
    (run / "checkpoints" / "final" / "smolctl.json").write_text("{garbage")  # manifest untouched: both catch it
    r = cli("resume", "--run-dir", run, "--from", "latest", "--max-steps", 5, "--no-dashboard")
    assert r.exit_code == 0, r.output
    assert "Skipping damaged checkpoint: checkpoint metadata" in r.output and "not valid JSON" in r.output
    assert "step-00000002 (step 2)" in r.output


def test_a_step_checkpoint_whose_metadata_names_another_step_is_refused(cli, run):
    edit_meta(run / "checkpoints" / "step-00000002", lambda m: m.update(step=3))
    r = cli("resume", "--run-dir", run, "--from", 2, "--max-steps", 5)
    assert r.exit_code == 2 and "it says step 3 in a directory named step-00000002" in one_error_line(r)


@pytest.mark.parametrize("argv", [["eval", "--model", "{ckpt}", "--data", "{corpus}", "--seq-len", "16"],
                                  ["generate", "Hi", "--model", "{ckpt}", "--max-new-tokens", "2"],
                                  ["export", "--model", "{ckpt}", "--out", "out.gguf"],
                                  ["inspect", "--model", "{ckpt}"],
                                  ["count-params", "--model", "{ckpt}"]])
@pytest.mark.parametrize("garbage", ["{not json", '{"model": {"num_layers": "1"}}', "[1, 2]"])
def test_readers_refuse_damaged_metadata_in_one_line(cli, trained, run, tmp_path, argv, garbage):
    ckpt = run / "checkpoints" / "final"
    (ckpt / "smolctl.json").write_text(garbage)
    before = files(tmp_path)
    r = cli(*[a.format(ckpt=ckpt, corpus=trained.parent / "corpus.jsonl") for a in argv])
    assert r.exit_code == 2, r.output
    assert f"checkpoint metadata {ckpt / 'smolctl.json'}" in one_error_line(r)
    assert files(tmp_path) == before


def test_read_meta_round_trips_what_training_wrote(trained):
    meta = read_meta(trained / "checkpoints" / "final", training=True)
    assert (meta.step, meta.world_size, meta.train.max_steps, meta.log_steps) == (4, 1, 4, 0)
    assert meta.model == ModelConfig.from_dict({"preset": "tiny", **MICRO})
    with pytest.raises(SmolctlError, match="has no smolctl.json"):
        read_meta(trained)


# -- resume and an edited config.yaml --------------------------------------------------------------

def edit_config(run: Path, **changes) -> None:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg.update(changes)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


@pytest.mark.parametrize("changes, words", [
    (dict(seq_len=8), "seq_len: 16 -> 8"),
    (dict(batch_size=4, grad_accum=2), "batch_size: 2 -> 4; grad_accum: 1 -> 2"),
    (dict(seed=7), "seed: 42 -> 7"),
    (dict(shuffle_buffer=4), "shuffle_buffer: 0 -> 4"),
    (dict(schedule="cosine"), "schedule: 'wsd' -> 'cosine'"),
    (dict(lr="1e-3"), "lr: 0.003 -> 0.001"),
    (dict(data="elsewhere.jsonl"), "data: "),
])
def test_resume_refuses_a_config_edit_that_breaks_exactness(cli, run, changes, words):
    edit_config(run, **changes)
    before = files(run)
    r = cli("resume", "--run-dir", run, "--max-steps", 6)
    assert r.exit_code == 2, r.output
    line = one_error_line(r)
    assert words in line and "config.yaml differs from the config final was trained with" in line
    assert "--allow-config-change" in line
    assert files(run) == before


def test_resume_accepts_the_edit_with_the_flag_and_bookkeeping_edits_without(cli, run):
    edit_config(run, lr=0.001)
    r = cli("resume", "--run-dir", run, "--max-steps", 6, "--allow-config-change", "--no-dashboard")
    assert r.exit_code == 0, r.output
    assert read_meta(run / "checkpoints" / "final").train.lr == 0.001
    edit_config(run, log_every=2, save_every=3, keep_last=1, eval_every=0, sample_tokens=8)
    r = cli("resume", "--run-dir", run, "--max-steps", 8, "--no-dashboard")
    assert r.exit_code == 0, r.output
    assert "Done: step 8" in r.output


# -- exactness gaps --------------------------------------------------------------------------------

def test_metrics_rows_after_an_off_window_resume_equal_the_uninterrupted_run(cli, micro):
    """log every 3, save every 4: the checkpoint at step 4 is mid-window (step 4 of 4-6), and the
    row at step 6 must average steps 4-6 as the uninterrupted run did, not 5-6."""
    r = cli("train", "--config", micro, "--max-steps", 9, "--log-every", 3, "--save-every", 4, "--run-name", "w")
    assert r.exit_code == 0, r.output
    whole = train_rows(Path("runs/w"))
    assert sorted(whole) == [3, 6, 9]
    r = cli("resume", "--run-dir", "runs/w", "--from", 4, "--no-dashboard")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in Path("runs/w/metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in rows if r_["event"] == "train"] == [3, 6, 9]  # each step logged once
    assert train_rows(Path("runs/w")) == whole
    meta = read_meta(Path("runs/w/checkpoints/step-00000008"))
    assert meta.log_steps == 2 and len(meta.log_loss_sums) == 1  # steps 7 and 8 of the window 7-9


def test_resuming_a_complete_run_exits_0_and_changes_nothing(cli, run):
    before = files(run)
    r = cli("resume", "--run-dir", run, "--from", "latest")
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"Run {run} is complete at step 4. Pass --max-steps N (above 4) to extend it"
    assert files(run) == before
    r = cli("resume", "--run-dir", run, "--max-steps", 3)  # below the run's step: a mistake
    assert r.exit_code == 2 and "is at step 4, which is not before --max-steps 3" in one_error_line(r)


def test_a_run_stopped_during_its_last_step_finishes_on_resume(cli, run):
    """A signal during the last step saves step-<max_steps> and no final/: resume completes it."""
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "final", ckpts / "step-00000004")
    shutil.rmtree(ckpts / "final")
    r = cli("resume", "--run-dir", run, "--from", "latest", "--no-dashboard")
    assert r.exit_code == 0, r.output
    assert "Done: step 4" in r.output and (ckpts / "final").is_dir()
