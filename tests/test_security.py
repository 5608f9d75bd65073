"""Security: no code from model files ever runs.

- never trust_remote_code (checked in the source, and a tokenizer with custom code runs none);
- nothing is unpickled from a checkpoint or model directory: malicious pickles planted where
  PyTorch/Trainer checkpoints keep theirs are ignored, or refused when they stand in for weights;
- chat templates render in transformers' jinja2 sandbox;
- write locations come from the command line only (see test_bad_input_matrix.py for --run-name
  and config files naming write paths); a manifest cannot name a file outside its directory.
"""

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MICRO, write_corpus

from smolctl import checkpoint as ckpt_io
from smolctl.errors import SmolctlError
from smolctl.model_io import load_model

SOURCE = Path(__file__).resolve().parent.parent / "smolctl"
# Where torch.save / transformers' Trainer / accelerate.save_state put pickles.
PICKLE_NAMES = ["pytorch_model.bin", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin",
                "random_states_0.pkl", "model.ckpt"]


class Payload:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_the_source_never_trusts_remote_code_nor_unpickles():
    offenders = []
    for path in SOURCE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for pattern in (r"trust_remote_code\s*=\s*(?!False)", r"\bpickle\.load", r"\bdill\b", r"\bjoblib\b",
                        r"allow_pickle\s*=\s*True", r"weights_only\s*=\s*False"):
            offenders += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path.name}: torch.load without weights_only=True")
    assert not offenders


@pytest.fixture
def run(tmp_path, monkeypatch):
    from smolctl.config import TrainConfig
    from smolctl.train import train

    monkeypatch.chdir(tmp_path)
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    cfg = TrainConfig(preset="tiny", model=dict(MICRO), data=str(corpus), batch_size=2, seq_len=16, max_steps=4,
                      save_every=2, mixed_precision="no", device="cpu", num_workers=0)
    train(cfg, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture
def no_unpickling(monkeypatch):
    """Make any file unpickling fail loudly while the commands run (IPC pickling is untouched)."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError(f"something unpickled a file: {args[:1]}")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)


def test_planted_pickles_are_never_executed(run, tmp_path, cli, no_unpickling):
    marker = tmp_path / "PWNED"
    evil = pickle.dumps(Payload(marker))
    final = run / "checkpoints" / "final"
    for d in (run, final, run / "checkpoints" / "step-00000002"):
        for name in PICKLE_NAMES:
            (d / name).write_bytes(evil)
    (tmp_path / "corpus2.jsonl").write_text((tmp_path / "corpus.jsonl").read_text())
    for argv in (["resume", "--run-dir", run, "--max-steps", 6, "--no-dashboard"],  # extra files: not in the manifest
                 ["eval", "--model", run, "--data", "corpus2.jsonl", "--seq-len", 16, "--tokens", 32],
                 ["eval", "--model", final, "--data", "corpus2.jsonl", "--seq-len", 16, "--tokens", 32],
                 ["inspect", "--model", final],
                 ["count-params", "--model", run, "--json"],
                 ["export", "--model", run, "--out", tmp_path / "exported-hf"],
                 ["export", "--model", final, "--out", tmp_path / "exported.gguf"]):
        r = cli(*argv)
        assert r.exit_code == 0, (argv, r.output)
    load_model(final)
    assert not marker.exists()

    # A pickle standing in for the weights, the optimizer or a state file: refused, not run.
    for name in ("model.safetensors", "optimizer.safetensors", "rng-rank0.safetensors", "data-rank0.json"):
        victim = tmp_path / f"victim-{name}"
        shutil.copytree(run, victim)
        (victim / "checkpoints" / "final" / name).write_bytes(evil)
        r = cli("resume", "--run-dir", victim, "--from", victim / "checkpoints" / "final", "--max-steps", 9)
        assert r.exit_code == 2 and f"{name} is corrupt" in r.output, r.output
    (tmp_path / "hf").mkdir()
    shutil.copy(final / "config.json", tmp_path / "hf" / "config.json")
    (tmp_path / "hf" / "model.safetensors").write_bytes(evil)
    r = cli("eval", "--model", tmp_path / "hf", "--data", "corpus2.jsonl")
    assert r.exit_code == 2 and "is damaged or is not a safetensors file" in r.output, r.output
    (tmp_path / "hf" / "model.safetensors").unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(evil)  # an HF dir with pickle weights only
    r = cli("eval", "--model", tmp_path / "hf", "--data", "corpus2.jsonl")
    assert r.exit_code == 2 and "no model.safetensors" in r.output and "safetensors weights" in r.output
    assert not marker.exists()


def test_a_manifest_cannot_name_files_outside_its_checkpoint(run, tmp_path):
    final = run / "checkpoints" / "final"
    manifest = json.loads((final / "manifest.json").read_text())
    manifest.pop("sha256")
    manifest["files"]["../../corpus.jsonl"] = {"sha256": "0" * 64, "bytes": 1}
    manifest["sha256"] = ckpt_io._manifest_sha256(manifest)  # a consistent, crafted manifest
    (final / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SmolctlError, match="manifest.json is corrupt .*'../../corpus.jsonl'"):
        ckpt_io.verify(final)


MALICIOUS_TEMPLATES = [
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ self._TemplateReference__context.joiner.__init__.__globals__.os.system('touch MARKER') }}",
]


@pytest.mark.parametrize("template", MALICIOUS_TEMPLATES)
def test_chat_templates_render_in_the_sandbox(tmp_path, template):
    """A tokenizer directory whose chat template reaches for Python internals: transformers renders
    templates in jinja2's ImmutableSandboxedEnvironment, so it raises SecurityError and runs nothing."""
    from jinja2.exceptions import SecurityError

    from smolctl.tokenizer import BUNDLED, load_tokenizer

    marker = tmp_path / "PWNED"
    shutil.copytree(BUNDLED, tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").write_text(template.replace("MARKER", str(marker)))
    tok = load_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert not marker.exists()
    # The bundled template renders normally.
    text = load_tokenizer().apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text


def evil_tokenizer_dir(tmp_path, tokenizer_class=None):
    """The bundled tokenizer plus an evil.py that auto_map points transformers at; the marker file
    appears if that code ever runs."""
    from smolctl.tokenizer import BUNDLED

    marker, tok = tmp_path / "PWNED", tmp_path / "tok"
    shutil.copytree(BUNDLED, tok)
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    if tokenizer_class:
        cfg["tokenizer_class"] = tokenizer_class
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tok / "evil.py").write_text(f"open({str(marker)!r}, 'w')\n"
                                 "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    return tok, marker


def test_a_tokenizer_with_custom_code_beside_a_known_class_loads_the_known_class(tmp_path):
    """auto_map alone: transformers uses its own class for tokenizer.json and never imports evil.py."""
    from smolctl.tokenizer import load_tokenizer

    tok, marker = evil_tokenizer_dir(tmp_path)
    loaded = load_tokenizer(str(tok))
    assert type(loaded).__module__.startswith("transformers.") and loaded("Hello world").input_ids == [19556, 905]
    assert not marker.exists()


def test_a_tokenizer_that_needs_custom_code_is_refused_without_asking(tmp_path):
    """A class only evil.py defines: transformers' default would ask on stdin whether to run it (and
    a piped "y" would); smolctl refuses without asking, even with "y" waiting on stdin."""
    tok, marker = evil_tokenizer_dir(tmp_path, tokenizer_class="EvilTokenizer")
    code = f"from smolctl.tokenizer import load_tokenizer\nload_tokenizer({str(tok)!r})"
    p = subprocess.run([sys.executable, "-c", code], input="y\n", capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "smolctl never runs code from model files" in p.stderr, p.stderr
    assert "Do you wish to run the custom code" not in p.stdout + p.stderr
    assert not marker.exists()
