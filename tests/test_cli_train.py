import json

import pytest
from conftest import MICRO


@pytest.fixture
def micro_yaml(tmp_path, corpus):
    path = tmp_path / "micro.yaml"
    model = ", ".join(f"{k}: {v}" for k, v in MICRO.items())
    path.write_text(f"model: {{preset: tiny, {model}}}\ndata: {corpus}\nbatch_size: 2\nseq_len: 16\n"
                    "mixed_precision: 'no'\ndevice: cpu\nnum_workers: 0\n")
    return path


def test_train_then_resume_through_the_cli(cli, tmp_path, micro_yaml, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("train", "--config", micro_yaml, "--max-steps", 6, "--save-every", 3, "--log-every", 1,
            "--run-name", "demo", "--lr", "0.01")
    assert r.exit_code == 0, r.output
    assert "step      6/6 | loss" in r.output  # plain lines off a terminal
    saved = json.loads((tmp_path / "runs/demo/checkpoints/final/smolctl.json").read_text())
    assert saved["train"]["lr"] == 0.01 and saved["train"]["batch_size"] == 2  # flag over file
    r = cli("resume", "--from", 3, "--num-workers", 2)  # the newest run under runs/; any number of workers
    assert r.exit_code == 0, r.output
    assert "Resuming from runs/demo/checkpoints/step-00000003 (step 3)" in r.output
    r = cli("resume", "--run-dir", "runs/demo", "--max-steps", 8)  # extend from latest (final, step 6)
    assert r.exit_code == 0, r.output
    assert "step      8/8" in r.output
    log = (tmp_path / "runs" / "demo" / "train.log").read_text()
    steps = [int(line.split(" step ")[1].split("/")[0]) for line in log.splitlines() if "/" in line.split(" step ")[-1][:12]]
    assert steps == list(range(1, 9))  # resume appended, nothing repeated


@pytest.mark.parametrize("args, words", [
    (["--batch-size", "0"], "--batch-size must be between 1 and 65,536"),
    (["--max-steps", "-5"], "--max-steps must be positive"),
    (["--seq-len", "4096"], "--seq-len 4096 exceeds the model's max positions (1024)"),
    (["--mixed-precision", "fp8"], "--mixed-precision must be auto, no, bf16 or fp16"),
    (["--num-workers", "65"], "--num-workers must be between 0 and 64"),
    (["--report-to", "mlflow"], "--report-to must be tensorboard, wandb or none"),
    (["--data", "/no/such/file.jsonl"], "--data /no/such/file.jsonl: no such file or directory"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--run-dir", "/proc/forbidden/run"], "cannot write to run directory"),
])
def test_train_bad_input(cli, tmp_path, micro_yaml, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    r = cli("train", "--config", micro_yaml, "--max-steps", 2, *args) if "--max-steps" not in args else \
        cli("train", "--config", micro_yaml, *args)
    assert r.exit_code == 2, r.output
    assert words in r.output and r.output.startswith("Error: ") and r.output.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.safetensors"))


def test_compile_where_torch_compile_cannot_work_is_one_line_and_leaves_nothing(cli, tmp_path, micro_yaml,
                                                                                monkeypatch):
    monkeypatch.chdir(tmp_path)
    import torch._inductor.config

    # what CXX would say, read when inductor is first imported (maybe by an earlier test)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-compiler")))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # nothing compiled to reuse
    r = cli("train", "--config", micro_yaml, "--max-steps", 2, "--seq-len", 12, "--run-dir", "run", "--compile")
    assert r.exit_code == 1, r.output
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("Error: torch.compile failed here: ")
    assert "Train with --no-compile" in r.stderr and not (tmp_path / "run").exists()


def test_unknown_config_keys(cli, tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: 0.1\nlearning_rate: 0.2\n")
    r = cli("train", "--config", tmp_path / "bad.yaml")
    assert r.exit_code == 2 and "unknown training config keys: learning_rate" in r.output


def test_resume_without_runs(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("resume", "--from", 500)
    assert r.exit_code == 2 and "no runs under runs/" in r.output


def test_eval_command(cli, tmp_path, micro_yaml, corpus, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("train", "--config", micro_yaml, "--max-steps", 3, "--run-name", "e").exit_code == 0
    r = cli("eval", "--model", "runs/e", "--data", corpus, "--seq-len", 16, "--tokens", 64, "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])
    assert result["tokens"] >= 64 and result["perplexity"] == pytest.approx(2.718281828 ** result["loss"])


def test_train_takes_device_auto(cli, tmp_path, micro_yaml):
    """The README lists auto among --device's values; train used to refuse it ("not a device")."""
    r = cli("train", "--config", micro_yaml, "--device", "auto", "--max-steps", 1, "--run-dir", tmp_path / "auto")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "auto/checkpoints/final").is_dir()
