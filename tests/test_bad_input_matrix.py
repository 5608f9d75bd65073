"""The bad-input matrix: every command, fed what users get wrong, answers the same way.

Each case asserts: the exit code (2 for usage errors, 1 for the environment), exactly one
`Error: ...` line naming the problem (and, where there is one, the fix), no traceback, and no
partially written output (no file under the working directory or the shared run appears or
changes). Cases run in-process through the real app (the `cli` fixture), offline.
"""

import json
from pathlib import Path

import pytest
from conftest import MICRO, write_corpus

MODEL_YAML = "model: {preset: tiny, " + ", ".join(f"{k}: {v}" for k, v in MICRO.items()) + "}\n"
HF_CONFIG = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A finished micro run (step-00000002, final at 4) and a run without checkpoints."""
    from smolctl.config import TrainConfig
    from smolctl.train import train

    root = tmp_path_factory.mktemp("shared")
    corpus = write_corpus(root / "corpus.jsonl")
    cfg = TrainConfig(preset="tiny", model=dict(MICRO), data=str(corpus), batch_size=2, seq_len=16, max_steps=4,
                      save_every=2, mixed_precision="no", device="cpu", num_workers=0)
    train(cfg, root / "run", log_file=root / "run.log")
    (root / "empty-run" / "checkpoints").mkdir(parents=True)
    (root / "empty-run" / "config.yaml").write_text((root / "run" / "config.yaml").read_text())
    return root


def files(*roots: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in root.rglob("*") if p.is_file()}


# Files a case can ask for, created in its working directory before it runs.
SETUP = {
    "corpus": lambda d: write_corpus(d / "corpus.jsonl"),
    "micro": lambda d: (write_corpus(d / "corpus.jsonl"),
                        (d / "micro.yaml").write_text(MODEL_YAML + "data: corpus.jsonl\nbatch_size: 2\nseq_len: 16\n"
                                                      "mixed_precision: 'no'\ndevice: cpu\nnum_workers: 0\n")),
    "empty": lambda d: (d / "empty.jsonl").write_text(""),
    "nocolumn": lambda d: (d / "nocol.jsonl").write_text('{"body": "text"}\n'),
    "intcolumn": lambda d: (d / "int.jsonl").write_text('{"text": 5}\n'),
    "latin1": lambda d: (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1")),
    "csv": lambda d: (d / "data.csv").write_text("text\nhello\n"),
    "short": lambda d: (d / "short.jsonl").write_text('{"text": ""}\n'),  # one token: nothing to predict
    "dangling": lambda d: (d / "gone").symlink_to(d / "nowhere"),
    "mixed": lambda d: ((d / "mixed").mkdir(), write_corpus(d / "mixed" / "a.jsonl"),  # files that disagree
                        write_corpus(d / "mixed" / "b.jsonl", extra={"id": 7})),
    "badyaml": lambda d: (d / "bad.yaml").write_text("model: [unclosed\n"),
    "badjson": lambda d: (d / "bad.json").write_text("{not json"),
    "listyaml": lambda d: (d / "list.yaml").write_text("- a\n- b\n"),
    "txtconfig": lambda d: (d / "cfg.txt").write_text("hidden_size: 64\n"),
    "indivisible": lambda d: (d / "m.yaml").write_text("hidden_size: 100\nnum_heads: 3\nnum_kv_heads: 1\n"),
    "zerolayers": lambda d: (d / "m.yaml").write_text("preset: tiny\nnum_layers: 0\n"),
    "unknownkey": lambda d: (d / "m.yaml").write_text("preset: tiny\nhiden_size: 64\n"),
    "unknowntrain": lambda d: (d / "t.yaml").write_text("preset: tiny\nlearning_rate: 0.1\n"),
    "writepath": lambda d: (d / "t.yaml").write_text("preset: tiny\nrun_dir: /tmp/elsewhere\nlog_file: /etc/x\n"),
    "gpt2": lambda d: ((d / "gpt2").mkdir(), (d / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')),
    "yarn": lambda d: ((d / "yarn").mkdir(), (d / "yarn" / "config.json").write_text(json.dumps(
        {**HF_CONFIG, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}))),
    "emptydir": lambda d: (d / "emptydir").mkdir(),
    "noweights": lambda d: ((d / "hf").mkdir(), (d / "hf" / "config.json").write_text(json.dumps(HF_CONFIG))),
    "binonly": lambda d: ((d / "hf").mkdir(), (d / "hf" / "config.json").write_text(json.dumps(HF_CONFIG)),
                          (d / "hf" / "pytorch_model.bin").write_bytes(b"\x80\x04N.")),
    "garbageweights": lambda d: ((d / "hf").mkdir(), (d / "hf" / "config.json").write_text(json.dumps(HF_CONFIG)),
                                 (d / "hf" / "model.safetensors").write_bytes(b"\x80\x04 not safetensors")),
    "wrongweights": lambda d: _wrong_weights(d),
    "existing": lambda d: None,  # uses the shared run
}


def _wrong_weights(d: Path) -> None:
    import torch
    from safetensors.torch import save_file

    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text(json.dumps(HF_CONFIG))
    save_file({"model.embed_tokens.weight": torch.zeros(10, 10)}, str(d / "hf" / "model.safetensors"))


# Corpora named in arguments as {key}: the file SETUP[key] writes.
DATA = {"empty": "empty.jsonl", "nocolumn": "nocol.jsonl", "intcolumn": "int.jsonl", "latin1": "latin1.txt",
        "csv": "data.csv", "short": "short.jsonl", "mixed": "mixed"}

U = 2  # usage / bad input
E = 1  # the environment (disk, memory) or a run that failed

# (id, setup, argv, exit code, words the error line must contain: the problem, and the fix)
CASES = [
    # -- the command line itself
    ("unknown-command", None, ["frobnicate"], U, ["No such command 'frobnicate'", "smolctl -h"]),
    ("unknown-option", None, ["train", "--bogus"], U, ["No such option: --bogus", "smolctl train -h"]),
    ("not-an-integer", None, ["train", "--batch-size", "abc"], U, ["'--batch-size'", "valid integer"]),
    ("missing-value", None, ["inspect", "--preset"], U, ["'--preset' requires an argument"]),
    # -- inspect / count-params: presets, config files, model directories
    ("unknown-preset", None, ["inspect", "--preset", "huge"], U, ["unknown preset 'huge'", "Valid presets"]),
    ("config-missing", None, ["inspect", "--config", "nope.yaml"], U, ["config file not found: nope.yaml"]),
    ("config-a-device", None, ["inspect", "--config", "/dev/null"], U,
     ["config file /dev/null is not a regular file (it is a character device)"]),
    ("config-malformed-yaml", "badyaml", ["inspect", "--config", "bad.yaml"], U, ["malformed config file", "Fix"]),
    ("config-malformed-json", "badjson", ["count-params", "--config", "bad.json"], U, ["malformed config file"]),
    ("config-not-a-mapping", "listyaml", ["inspect", "--config", "list.yaml"], U, ["must hold a mapping"]),
    ("config-wrong-type", "txtconfig", ["inspect", "--config", "cfg.txt"], U, ["unsupported config file type",
                                                                                 ".yaml"]),
    ("config-indivisible", "indivisible", ["count-params", "--config", "m.yaml"], U, ["not divisible by num_heads"]),
    ("config-zero-layers", "zerolayers", ["inspect", "--config", "m.yaml"], U,
     ["num_layers must be between 1 and 1024, got 0"]),
    ("config-unknown-key", "unknownkey", ["inspect", "--config", "m.yaml"], U, ["unknown model config keys: hiden_size",
                                                                                  "Valid keys"]),
    ("two-model-sources", None, ["inspect", "--preset", "tiny", "--model", "x"], U, ["only one of --preset"]),
    ("model-missing", None, ["count-params", "--model", "no/such/dir"], U, ["--model no/such/dir: no such file or directory", "Pass a run"]),
    ("model-dangling-link", "dangling", ["inspect", "--model", "gone"], U,
     ["--model gone is a symbolic link to", "nowhere, which does not exist", "Pass a run"]),
    ("model-empty-dir", "emptydir", ["inspect", "--model", "emptydir"], U, ["is neither a run, a checkpoint nor an HF model directory", "Pass a run"]),
    ("model-is-a-file", "corpus", ["inspect", "--model", "corpus.jsonl"], U, ["is not a model", "Pass a run"]),
    ("model-is-a-config", "indivisible", ["count-params", "--model", "m.yaml"], U,
     ["is not a model", "A model config file goes to --config"]),
    ("model-not-llama", "gpt2", ["inspect", "--model", "gpt2"], U, ["unsupported model_type 'gpt2'"]),
    ("model-rope-scaling", "yarn", ["count-params", "--model", "yarn"], U, ["unsupported RoPE scaling"]),
    # -- train: flags
    ("batch-size-zero", "micro", ["train", "--config", "micro.yaml", "--batch-size", "0"], U,
     ["--batch-size must be between 1 and 65,536"]),
    ("max-steps-negative", "micro", ["train", "--config", "micro.yaml", "--max-steps", "-5"], U,
     ["--max-steps must be positive"]),
    ("grad-accum-zero", "micro", ["train", "--config", "micro.yaml", "--grad-accum", "0"], U,
     ["--grad-accum must be between 1 and 65,536"]),
    ("seq-len-too-long", "micro", ["train", "--config", "micro.yaml", "--seq-len", "4096"], U,
     ["--seq-len 4096 exceeds the model's max positions (1024)"]),
    ("lr-not-positive", "micro", ["train", "--config", "micro.yaml", "--lr", "0"], U, ["--lr must be positive"]),
    ("lr-nan", "micro", ["train", "--config", "micro.yaml", "--lr", "nan"], U, ["--lr must be positive"]),
    ("schedule-unknown", "micro", ["train", "--config", "micro.yaml", "--schedule", "linear"], U,
     ["schedule must be wsd or cosine"]),
    ("warmup-negative", "micro", ["train", "--config", "micro.yaml", "--warmup-steps", "-1"], U,
     ["must not be negative"]),
    ("mixed-precision-unknown", "micro", ["train", "--config", "micro.yaml", "--mixed-precision", "fp8"], U,
     ["--mixed-precision must be auto, no, bf16 or fp16"]),
    ("num-workers-too-many", "micro", ["train", "--config", "micro.yaml", "--num-workers", "65"], U,
     ["--num-workers must be between 0 and 64"]),
    ("report-to-unknown", "micro", ["train", "--config", "micro.yaml", "--report-to", "mlflow"], U,
     ["--report-to must be tensorboard, wandb or none"]),
    ("max-bad-steps-zero", "micro", ["train", "--config", "micro.yaml", "--max-bad-steps", "0"], U,
     ["--max-bad-steps must be at least 1"]),
    ("num-processes-zero", "micro", ["train", "--config", "micro.yaml", "--num-processes", "0"], U,
     ["--num-processes must be positive"]),
    ("run-name-escapes", "micro", ["train", "--config", "micro.yaml", "--run-name", "../../x"], U,
     ["is not a plain name", "--run-dir"]),
    ("run-dir-unwritable", "micro", ["train", "--config", "micro.yaml", "--run-dir", "/proc/forbidden/run"], U,
     ["cannot write to run directory", "another --run-dir"]),
    ("log-file-unwritable", "micro", ["train", "--config", "micro.yaml", "--max-steps", "1", "--log-file",
                                      "/proc/forbidden.log"], U, ["cannot write the log file", "--log-file"]),
    ("run-dir-has-checkpoints", "micro", ["train", "--config", "micro.yaml", "--run-dir", "{run}"], U,
     ["already has checkpoints", "smolctl resume", "--overwrite"]),
    ("out-of-memory", "micro", ["train", "--config", "micro.yaml", "--batch-size", "64", "--max-steps", "1"], E,
     ["out of memory with batch size 64 x sequence length 16", "--grad-accum"]),
    # -- train: config files
    ("train-config-unknown-key", "unknowntrain", ["train", "--config", "t.yaml"], U,
     ["unknown training config keys: learning_rate", "Valid keys"]),
    ("config-cannot-name-write-paths", "writepath", ["train", "--config", "t.yaml"], U,
     ["unknown training config keys: log_file, run_dir"]),
    ("train-config-malformed", "badyaml", ["train", "--config", "bad.yaml"], U, ["malformed config file"]),
    # -- train: corpora
    ("data-missing", "micro", ["train", "--config", "micro.yaml", "--data", "/no/such/file.jsonl"], U,
     ["--data /no/such/file.jsonl: no such file or directory", "'sample'"]),
    ("data-empty", "micro", ["train", "--config", "micro.yaml", "--data", "{empty}"], U,
     ["the corpus is empty", "files with text"]),
    ("data-no-text-column", "micro", ["train", "--config", "micro.yaml", "--data", "{nocolumn}"], U,
     ["no 'text' column (columns: body)", "--text-column"]),
    ("data-not-text", "micro", ["train", "--config", "micro.yaml", "--data", "{intcolumn}"], U,
     ["holds int, not text", "--text-column"]),
    ("data-not-utf8", "micro", ["train", "--config", "micro.yaml", "--data", "{latin1}", "--max-steps", "1"], U,
     ["not UTF-8", "iconv"]),
    ("data-a-device", "micro", ["train", "--config", "micro.yaml", "--data", "/dev/zero"], U,
     ["--data /dev/zero is not a regular file (it is a character device)"]),
    ("data-files-disagree", "micro", ["train", "--config", "micro.yaml", "--data", "{mixed}", "--max-steps", "9"], U,
     ["cannot read 2 local json file(s): ", "b.jsonl has the columns (text, id), not the dataset's (text)", "same columns"]),
    ("data-wrong-format", "micro", ["train", "--config", "micro.yaml", "--data", "{csv}"], U,
     [".jsonl/.json, .parquet or .txt"]),
    ("data-hub-offline", "micro", ["train", "--config", "micro.yaml", "--data", "cosmopedia-v2"], U,
     ["cannot reach the Hugging Face hub", "--data sample"]),
    ("eval-data-missing", "micro", ["train", "--config", "micro.yaml", "--eval-data", "nope.jsonl"], U,
     ["nope.jsonl: no such file"]),
    # -- resume
    ("resume-no-runs", None, ["resume"], U, ["no runs under runs/", "smolctl train"]),
    ("resume-not-a-run", "corpus", ["resume", "--run-dir", "."], U, ["not a smolctl run directory", "--run-dir"]),
    ("resume-no-checkpoints", None, ["resume", "--run-dir", "{empty_run}"], U, ["has no checkpoints",
                                                                                 "smolctl train"]),
    ("resume-no-such-step", None, ["resume", "--run-dir", "{run}", "--from", "3"], U,
     ["no checkpoint at step 3", "Checkpoints: 2, 4"]),
    ("resume-from-nonsense", None, ["resume", "--run-dir", "{run}", "--from", "yesterday"], U,
     ["--from yesterday: not a checkpoint directory", "'latest'"]),
    ("resume-past-max-steps", None, ["resume", "--run-dir", "{run}", "--max-steps", "3"], U,
     ["is at step 4, which is not before --max-steps 3", "larger --max-steps"]),
    ("resume-bad-flag", None, ["resume", "--run-dir", "{run}", "--batch-size", "4"], U,
     ["No such option: --batch-size"]),
    ("resume-other-world-size", None, ["resume", "--run-dir", "{run}", "--num-processes", "2", "--max-steps", "8"], U,
     ["saved by 1 process(es); this run has 2", "plain smolctl resume"]),
    # -- eval
    ("eval-no-model", None, ["eval"], U, ["eval needs --model", "Pass a run"]),
    ("eval-model-missing", "corpus", ["eval", "--model", "nope", "--data", "corpus.jsonl"], U,
     ["model not found: nope"]),
    ("eval-hub-model-offline", "corpus", ["eval", "--model", "HuggingFaceTB/SmolLM2-135M", "--data", "corpus.jsonl"],
     U, ["cannot reach the Hugging Face hub for model 'HuggingFaceTB/SmolLM2-135M'"]),
    ("eval-tokens-zero", None, ["eval", "--model", "{run}", "--tokens", "0"], U, ["--tokens", "must be positive"]),
    ("eval-batch-size-zero", None, ["eval", "--model", "{run}", "--batch-size", "0"], U,
     ["--batch-size must be positive, got 0"]),
    ("eval-seq-len-too-long", "corpus", ["eval", "--model", "{run}", "--data", "corpus.jsonl", "--seq-len", "5000"],
     U, ["--seq-len 5000 exceeds the model's context (1024)"]),
    ("eval-run-without-checkpoints", "corpus", ["eval", "--model", "{empty_run}", "--data", "corpus.jsonl"], U,
     ["has no complete checkpoint yet"]),
    ("eval-no-weights", "noweights", ["eval", "--model", "hf", "--data", "{corpus}"], U,
     ["no model.safetensors in hf", "safetensors weights"]),
    ("eval-pickle-weights-only", "binonly", ["eval", "--model", "hf", "--data", "{corpus}"], U,
     ["no model.safetensors in hf"]),
    ("eval-garbage-weights", "garbageweights", ["eval", "--model", "hf", "--data", "{corpus}"], U,
     ["hf/model.safetensors is damaged or is not a safetensors file"]),
    ("eval-weights-mismatch", "wrongweights", ["eval", "--model", "hf", "--data", "{corpus}"], U,
     ["does not match its config"]),
    # -- export
    ("export-no-out", None, ["export", "--model", "{run}"], U, ["export needs --model and --out"]),
    ("export-unknown-format", "corpus", ["export", "--model", "{run}", "--format", "zip", "--out", "x"], U,
     ["unknown export format 'zip'", "hf, gguf"]),
    ("export-unknown-dtype", None, ["export", "--model", "{run}", "--out", "m.gguf", "--dtype", "q4_k"], U,
     ["unknown dtype 'q4_k' for --format gguf", "q8_0"]),
    ("export-out-not-empty", "emptydir", ["export", "--model", "{run}", "--out", "."], U,
     ["already exists", "--force"]),
    ("export-out-exists", "corpus", ["export", "--model", "{run}", "--out", "corpus.jsonl", "--format", "gguf"], U,
     ["already exists", "--force"]),
    ("export-over-the-model", None, ["export", "--model", "{run}/checkpoints/final", "--out", "{run}",
                                     "--force"], U, ["holds or lies inside the model being exported"]),
    ("export-unwritable", None, ["export", "--model", "{run}", "--out", "/proc/forbidden/m.gguf"], U,
     ["cannot write"]),
    ("export-model-missing", None, ["export", "--model", "nope", "--out", "m.gguf"], U, ["model not found: nope"]),
    ("eval-data-files-disagree", "corpus", ["eval", "--model", "{run}", "--data", "{mixed}"], U,
     ["cannot read 2 local json file(s): ", "b.jsonl has the columns (text, id), not the dataset's (text)", "same columns"]),
    ("eval-data-too-short", "corpus", ["eval", "--model", "{run}", "--data", "{short}", "--seq-len", "16"], U,
     ["nothing to predict"]),
]


def test_the_matrix_is_big_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    commands = {next(a for a in argv if not a.startswith("-")) for _, _, argv, _, _ in CASES}
    assert {"inspect", "count-params", "train", "resume", "eval", "export"} <= commands


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, cli, shared, tmp_path, monkeypatch):
    name, setup, argv, code, words = case
    if name == "out-of-memory":  # what a GPU says when the batch doesn't fit (no machine is harmed)
        import torch

        from smolctl.loss import CausalLMLoss

        def oom(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")

        monkeypatch.setattr(CausalLMLoss, "forward", oom)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if setup:
        SETUP[setup](tmp_path)
    paths = {"run": shared / "run", "empty_run": shared / "empty-run", "corpus": shared / "corpus.jsonl"}
    for key, made in DATA.items():  # the corpora a case names in its arguments
        if "{" + key + "}" in " ".join(argv):
            SETUP[key](tmp_path)
            paths[key] = tmp_path / made
    argv = [a.format(**paths) for a in argv]
    before = files(tmp_path, shared)
    r = cli(*argv)
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and not (r.exception and not isinstance(r.exception, SystemExit)), r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, r.output
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert files(tmp_path, shared) == before, "the command wrote or changed files"
