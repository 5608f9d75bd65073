"""The model config: one dataclass, the single source of truth for the architecture.

    cfg = ModelConfig.from_preset("smollm2-135m")   # the seed's SmolLM2-135M
    cfg = ModelConfig.from_file("my.yaml")          # JSON, YAML or TOML; flat or under `model:`
    cfg = ModelConfig.from_dir("runs/x/checkpoints/step-00000500")  # a checkpoint or HF dir
    hf = cfg.to_hf()                                # transformers' LlamaConfig
    cfg == ModelConfig.from_hf(hf)                  # round trip

Everything else (the model, checkpoints, exports, the parameter count) is derived from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolctl.errors import SmolctlError


@dataclass
class ModelConfig:
    name: str = "custom"
    vocab_size: int = 49152  # the SmolLM2 tokenizer's 49,152 tokens (a multiple of 64)
    hidden_size: int = 576
    intermediate_size: int = 1536  # SwiGLU width, 8/3 * hidden rounded up
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3  # grouped-query attention: 3 query heads share each K/V head
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_seq_len: int = 2048  # max_position_embeddings; the pretraining context
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares the embedding matrix (saves 28M params)
    bos_token_id: int = 0  # <|endoftext|> starts and ends documents in pretraining
    eos_token_id: int = 0
    init_std: float | None = None  # None: 1/sqrt(hidden_size), SmolLM2's 0.041666...

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "max_seq_len"):
            value = getattr(self, f)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise SmolctlError(f"invalid model config: {f} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise SmolctlError(
                f"invalid model config: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}", hint="Pick sizes where hidden_size % num_heads == 0")
        if self.num_heads % self.num_kv_heads:
            raise SmolctlError(
                f"invalid model config: num_heads {self.num_heads} is not divisible by "
                f"num_kv_heads {self.num_kv_heads}", hint="Pick sizes where num_heads % num_kv_heads == 0")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.init_std is None:
            self.init_std = 1 / math.sqrt(self.hidden_size)
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0 or self.init_std <= 0:
            raise SmolctlError("invalid model config: rope_theta, rms_norm_eps and init_std must be > 0")

    # -- presets ---------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str) -> ModelConfig:
        if name not in PRESETS:
            raise SmolctlError(f"unknown preset {name!r}", hint=f"Valid presets: {', '.join(PRESETS)}")
        return cls(name=name, **PRESETS[name])

    # -- transformers ----------------------------------------------------------------------

    def to_hf(self, **extra: Any):
        """transformers' LlamaConfig for this architecture (the one place names are mapped)."""
        from transformers import LlamaConfig

        return LlamaConfig(
            architectures=["LlamaForCausalLM"],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_seq_len,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            initializer_range=self.init_std,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            **extra,
        )

    @classmethod
    def from_hf(cls, hf: Any, name: str = "custom") -> ModelConfig:
        """From a LlamaConfig or its dict (config.json)."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        if d.get("model_type", "llama") != "llama":
            raise SmolctlError(f"unsupported model_type {d.get('model_type')!r}: smolctl handles Llama-architecture models")
        if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
            raise SmolctlError("unsupported Llama variant: smolctl models use SiLU and no biases")
        rope = d.get("rope_parameters") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
            raise SmolctlError("unsupported RoPE scaling: smolctl models use plain RoPE")

        def token_id(key: str) -> int:
            v = d.get(key)
            v = v[0] if isinstance(v, list) else v
            return 0 if v is None else int(v)

        return cls(
            name=name,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=d["num_attention_heads"],
            num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            max_seq_len=d.get("max_position_embeddings", 2048),
            rope_theta=float(theta),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            tie_embeddings=d.get("tie_word_embeddings", True),
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
            init_std=d.get("initializer_range"),
        )

    # -- files -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """From our own field names; a `preset` key starts from that preset."""
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known - {"preset"})
        if unknown:
            raise SmolctlError(f"unknown model config keys: {', '.join(unknown)}",
                               hint=f"Valid keys: preset, {', '.join(sorted(known))}")
        if "preset" in d:
            base = cls.from_preset(d.pop("preset")).to_dict()
            base.update(head_dim=None, init_std=None)  # re-derived unless given
            d = {**base, **d}
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_mapping(path, self.to_dict())

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        """A model config file: ours (flat, or under a `model:` key) or an HF config.json."""
        d = read_mapping(path)
        if "model" in d and isinstance(d["model"], (dict, str)):
            d = d["model"]
            if isinstance(d, str):
                return cls.from_preset(d)
        if "model_type" in d or "num_hidden_layers" in d:
            return cls.from_hf(d, name=Path(path).stem)
        return cls.from_dict(d)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """A checkpoint or HF model directory (its config.json). A run directory, a .gguf or an
        imported name: `smolctl.sources.model_config`, which resolves them first."""
        path = Path(path)
        if path.is_file():
            raise SmolctlError(f"{path} is a file, not a model directory",
                               hint="Pass its directory, or a config file with --config")
        if (path / "config.json").is_file():
            return cls.from_file(path / "config.json")
        raise SmolctlError(f"{path} is neither a checkpoint nor an HF model directory (no config.json)",
                           hint="Pass a run directory, a checkpoint directory or an HF model directory")


DEFAULT_PRESET = "smollm2-135m"
PRESETS: dict[str, dict[str, Any]] = {
    # HuggingFaceTB/SmolLM2-135M, exactly as the seed prints it: 134,515,008 parameters.
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, max_seq_len=2048, rope_theta=100000.0, rms_norm_eps=1e-5,
    ),
    # Same tokenizer and architecture family, 7.1M parameters (6.3M of them the embedding):
    # trains at > 1,000 tokens/s on a 2-core CPU, for demos and tests.
    "tiny": dict(
        vocab_size=49152, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
        num_kv_heads=2, max_seq_len=1024, rope_theta=100000.0, rms_norm_eps=1e-5,
    ),
}


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a JSON, YAML or TOML file into a dict, with one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise SmolctlError(f"config file not found: {path}", hint="Check the path")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        elif suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            raise SmolctlError(f"unsupported config file type {path.suffix!r}: {path}",
                               hint="Use .json, .yaml/.yml or .toml")
    except SmolctlError:
        raise
    except Exception as e:  # parse errors of three libraries, one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SmolctlError(f"malformed config file {path}: {first}", hint="Fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SmolctlError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def write_mapping(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    else:
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def resolve_model_config(preset: str | None = None, config: str | Path | None = None,
                         model: str | Path | None = None) -> ModelConfig:
    """The config named by one of --preset / --config / --model (the preset default is 135M)."""
    given = [x for x in (preset, config, model) if x is not None]
    if len(given) > 1:
        raise SmolctlError("give only one of --preset, --config and --model")
    if config is not None:
        return ModelConfig.from_file(config)
    if model is not None:
        from smolctl.sources import model_config

        return model_config(model)
    return ModelConfig.from_preset(preset or DEFAULT_PRESET)


@dataclass
class TrainConfig:
    # model: a preset, optionally overridden field by field (a config file's `model:` section)
    preset: str | None = None  # None: smollm2-135m, or the init_from model's config
    model: dict[str, Any] = field(default_factory=dict)
    init_from: str | None = None  # continued pretraining: start from this model's weights (any --model source)
    # data
    data: str = "cosmopedia-v2"  # the seed's stream; "sample" is the bundled corpus
    text_column: str = "text"
    eval_data: str | None = None  # None: the held-out split when --data sample, else no eval
    tokenizer: str | None = None  # None: the bundled SmolLM2 tokenizer
    shuffle_buffer: int = 0  # blocks held for shuffling (0: stream order)
    num_workers: int = 1  # a background DataLoader worker tokenizes and packs
    # batch: tokens per optimizer step = batch_size * seq_len * grad_accum * processes
    batch_size: int = 8  # micro-batch per device
    seq_len: int | None = None  # None: the model's max_seq_len (2048 for SmolLM2-135M)
    grad_accum: int = 1
    # optimizer and schedule: the SmolLM2-135M recipe (huggingface/smollm config_smollm2_135M.yaml)
    lr: float = 3e-3
    min_lr: float = 0.0
    schedule: str = "wsd"  # warmup-stable-decay, or "cosine"
    warmup_steps: int | None = None  # None: 2% of max_steps, at most 2000 (the recipe's value)
    decay_frac: float = 0.2  # WSD: linear decay to min_lr over the last 20% of steps
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    # loop
    max_steps: int = 5000
    mixed_precision: str = "auto"  # auto: accelerate launch's setting, else bf16 on GPUs that support it
    compile: bool = False
    seed: int = 42
    device: str | None = None  # None: what Accelerate picks
    save_every: int = 500
    keep_last: int | None = None
    eval_every: int = 0  # 0: only at the end
    eval_tokens: int = 32768
    sample_every: int = 0
    sample_prompt: str = "Once upon a time"
    sample_tokens: int = 32
    log_every: int = 10
    report_to: str = "none"  # tensorboard, wandb or none
    max_bad_steps: int = 10  # stop after this many non-finite steps in a row
    peak_tflops: float | None = None  # the device's peak for MFU; None: from a table of GPUs

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({"preset": self.preset or DEFAULT_PRESET, **self.model})

    def with_init_model(self) -> TrainConfig:
        """For a fresh run from `init_from`: that model's config and tokenizer, pinned into this
        config (written to config.yaml, so that a resume never reads the source again).

        The model config comes from the source. An explicit one (a preset, a `model:` section)
        that differs from it anywhere but the name and the init std is refused, and so is a
        tokenizer with more tokens than the model's vocabulary.
        """
        from smolctl.sources import model_config, tokenizer_of
        from smolctl.tokenizer import load_tokenizer

        source = model_config(self.init_from)
        if self.preset is not None or self.model:
            mine = self.model_config()
            diff = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("name", "init_std")
                    and getattr(mine, f.name) != getattr(source, f.name)]
            if diff:
                raise SmolctlError(f"--init-from {self.init_from} does not fit this run's model config ("
                                   + ", ".join(f"{k} {getattr(source, k)} there, {getattr(mine, k)} here" for k in diff)
                                   + ")", hint="Leave --preset and the config's model section out: "
                                               "the model config comes from --init-from")
        tokenizer = self.tokenizer if self.tokenizer is not None else tokenizer_of(self.init_from)
        n_tokens = len(load_tokenizer(tokenizer))
        if n_tokens > source.vocab_size:
            raise SmolctlError(f"the tokenizer has {n_tokens:,} tokens, more than the "
                               f"vocabulary of --init-from {self.init_from} ({source.vocab_size:,})",
                               hint="Use the model's own tokenizer (leave --tokenizer out)")
        model = dataclasses.replace(source, name=Path(self.init_from).stem)  # not config.json's "config"
        return dataclasses.replace(self, preset=None, model=model.to_dict(), tokenizer=tokenizer)

    def resolved(self) -> TrainConfig:
        """Fill the derived defaults and check every value; raises SmolctlError."""
        cfg = dataclasses.replace(self)
        mcfg = cfg.model_config()
        cfg.seq_len = cfg.seq_len or mcfg.max_seq_len
        if cfg.warmup_steps is None:
            cfg.warmup_steps = min(2000, max(1, round(0.02 * cfg.max_steps)))
        checks = [
            (cfg.max_steps > 0, f"--max-steps must be positive, got {cfg.max_steps}"),
            (cfg.batch_size > 0, f"--batch-size must be positive, got {cfg.batch_size}"),
            (cfg.grad_accum > 0, f"--grad-accum must be positive, got {cfg.grad_accum}"),
            (cfg.seq_len > 0, f"--seq-len must be positive, got {cfg.seq_len}"),
            (cfg.seq_len <= mcfg.max_seq_len,
             f"--seq-len {cfg.seq_len} exceeds the model's max positions ({mcfg.max_seq_len})"),
            (cfg.lr > 0 and cfg.min_lr >= 0, "--lr must be positive and min_lr non-negative"),
            (cfg.schedule in ("wsd", "cosine"), f"schedule must be wsd or cosine, got {cfg.schedule!r}"),
            (0 <= cfg.decay_frac <= 1, "decay_frac must be within [0, 1]"),
            (cfg.mixed_precision in ("auto", "no", "bf16", "fp16"),
             f"--mixed-precision must be auto, no, bf16 or fp16, got {cfg.mixed_precision!r}"),
            (cfg.save_every > 0, f"--save-every must be positive, got {cfg.save_every}"),
            (cfg.max_bad_steps > 0, f"--max-bad-steps must be at least 1, got {cfg.max_bad_steps}"),
            (cfg.log_every > 0, f"--log-every must be positive, got {cfg.log_every}"),
            (min(cfg.eval_every, cfg.sample_every, cfg.shuffle_buffer, cfg.warmup_steps) >= 0,
             "--eval-every, --sample-every, --shuffle-buffer and warmup must not be negative"),
            (cfg.num_workers in (0, 1), "--num-workers must be 0 or 1 (one ordered stream per rank)"),
            (cfg.report_to in ("none", "tensorboard", "wandb"), "--report-to must be tensorboard, wandb or none"),
        ]
        for ok, message in checks:
            if not ok:
                raise SmolctlError(message)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SmolctlError(f"unknown training config keys: {', '.join(unknown)}",
                               hint=f"Valid keys: {', '.join(sorted(known))}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """A YAML/TOML/JSON file: training keys at the top level (or under `train:`), the model as
        `preset:` and/or a `model:` mapping of ModelConfig fields (or a preset name)."""
        d = read_mapping(path)
        d = {**d.pop("train", {}), **d}
        model = d.get("model")
        if isinstance(model, str):
            d["preset"], d["model"] = model, {}
        elif isinstance(model, dict) and "preset" in model:
            d["model"] = dict(model)
            d["preset"] = d["model"].pop("preset")
        return cls.from_dict(d)

