import json

import pytest

from smolctl.config import PRESETS, ModelConfig
from smolctl.errors import SmolctlError
from smolctl.sources import resolve_model_config


def seed_config() -> dict:
    from pathlib import Path

    text = (Path(__file__).parent / "assets" / "seed_config.txt").read_text()
    return json.loads(text.split("Config: LlamaConfig", 1)[1])


def test_135m_preset_matches_the_seed_config():
    seed = seed_config()
    ours = ModelConfig.from_preset("smollm2-135m").to_hf().to_dict()
    ours["rope_theta"] = ours["rope_parameters"]["rope_theta"]
    skip = {"_name_or_path", "transformers_version", "torch_dtype", "is_llama_config",
            "rope_interleaved", "rope_scaling", "pretraining_tp", "use_cache"}
    for key, value in seed.items():
        if key not in skip:
            assert ours[key] == value, key
    assert seed["rope_interleaved"] is False and seed["rope_scaling"] is None  # what plain RoPE means


def test_derived_fields():
    cfg = ModelConfig.from_preset("smollm2-135m")
    assert cfg.head_dim == 64
    assert cfg.init_std == pytest.approx(1 / 24)


@pytest.mark.parametrize("name", list(PRESETS))
def test_round_trip_through_llama_config(name):
    cfg = ModelConfig.from_preset(name)
    assert ModelConfig.from_hf(cfg.to_hf(), name=name) == cfg
    assert ModelConfig.from_hf(cfg.to_hf().to_dict(), name=name) == cfg


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_round_trip_through_files(tmp_path, suffix):
    cfg = ModelConfig.from_preset("tiny")
    path = tmp_path / f"model{suffix}"
    if suffix == ".toml":
        path.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.to_dict().items()))
    else:
        cfg.save(path)
    assert ModelConfig.from_file(path) == cfg


def test_toml_is_read_on_python_3_10_with_tomli(tmp_path, monkeypatch):
    """Python 3.10 (requires-python >= 3.10) has no tomllib; pyproject gives it tomli there, the
    package tomllib was made from. Here: tomllib missing, and tomli is that same parser."""
    import sys
    import tomllib

    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "tomli", tomllib)
    path = tmp_path / "model.toml"
    path.write_text('preset = "tiny"\nnum_layers = 2\n')
    assert ModelConfig.from_file(path).num_layers == 2

def test_file_with_model_section_and_preset_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  preset: tiny\n  num_layers: 2\n  hidden_size: 64\ntrain:\n  lr: 0.001\n")
    cfg = ModelConfig.from_file(path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.head_dim) == (2, 64, 16)
    assert cfg.init_std == pytest.approx(1 / 8)  # re-derived from the new hidden size


def test_hf_config_json_and_directories(tmp_path):
    cfg = ModelConfig.from_preset("tiny")
    cfg.to_hf().save_pretrained(tmp_path / "hf")
    assert ModelConfig.from_dir(tmp_path / "hf") == ModelConfig.from_hf(cfg.to_hf(), name="config")
    assert resolve_model_config(model=str(tmp_path / "hf")).num_layers == cfg.num_layers


@pytest.mark.parametrize("kwargs, words", [
    (dict(hidden_size=100, num_heads=3), "not divisible by num_heads"),
    (dict(num_heads=4, num_kv_heads=3, hidden_size=128), "not divisible by num_kv_heads"),
    (dict(num_layers=0), "num_layers must be between 1 and 1024, got 0"),
    (dict(vocab_size=-5), "vocab_size must be between 1 and 1,048,576, got -5"),
])
def test_invalid_values(kwargs, words):
    with pytest.raises(SmolctlError, match=words):
        ModelConfig(**kwargs)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(SmolctlError, match="smollm2-135m, tiny"):
        ModelConfig.from_preset("gpt5")


@pytest.mark.parametrize("name, text, words", [
    ("bad.json", "{not json", "malformed config file"),
    ("bad.yaml", "a: [1, 2", "malformed config file"),
    ("keys.json", '{"hidden": 3}', "unknown model config keys: hidden"),
    ("list.json", "[1, 2]", "must hold a mapping"),
    ("x.ini", "a=1", "unsupported config file type"),
])
def test_bad_config_files(tmp_path, name, text, words):
    (tmp_path / name).write_text(text)
    with pytest.raises(SmolctlError, match=words):
        ModelConfig.from_file(tmp_path / name)


def test_missing_config_file(tmp_path):
    with pytest.raises(SmolctlError, match="config file not found"):
        ModelConfig.from_file(tmp_path / "nope.yaml")
