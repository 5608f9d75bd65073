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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smolctl import fsutil
from smolctl.errors import SmolctlError
from smolctl.schema import check, check_fields, setting, specs, validate

# Bounds on sizes, so that an absurd config is refused at once rather than after minutes of work
# (count-params builds the model, train allocates it): far above any model smolctl trains.
MAX_VOCAB = 1 << 20
MAX_CONTEXT = 1 << 20


@dataclass
class ModelConfig:
    name: str = setting("custom", "A label for the model (the preset's name, or the run's).")
    vocab_size: int = setting(49152, "Tokens in the vocabulary: the SmolLM2 tokenizer's 49,152 (a multiple of 64).",
                              gt=0, le=MAX_VOCAB)
    hidden_size: int = setting(576, "Width of the residual stream.", gt=0, le=65536)
    intermediate_size: int = setting(1536, "SwiGLU width, 8/3 * hidden rounded up.", gt=0, le=262144)
    num_layers: int = setting(30, "Decoder layers.", gt=0, le=1024)
    num_heads: int = setting(9, "Query heads.", gt=0, le=1024)
    num_kv_heads: int = setting(3, "Key/value heads: grouped-query attention, 3 query heads share each one.",
                                gt=0, le=1024)
    head_dim: int | None = setting(None, "Per-head width; null: hidden_size // num_heads.", gt=0, le=1024)
    max_seq_len: int = setting(2048, "max_position_embeddings: the pretraining context.", gt=0, le=MAX_CONTEXT)
    rope_theta: float = setting(100000.0, "RoPE base frequency.", gt=0)
    rms_norm_eps: float = setting(1e-5, "RMSNorm epsilon.", gt=0, lt=1)
    tie_embeddings: bool = setting(True, "lm_head shares the embedding matrix (saves 28M params).")
    bos_token_id: int = setting(0, "<|endoftext|> starts and ends documents in pretraining.", ge=0)
    eos_token_id: int = setting(0, "The token that ends a document.", ge=0)
    init_std: float | None = setting(None, "Init std of the weights; null: 1/sqrt(hidden_size), SmolLM2's 0.0417.",
                                     gt=0, le=1)

    def __post_init__(self) -> None:
        check_fields(self, "model config")
        if self.hidden_size % self.num_heads:
            raise SmolctlError(
                f"invalid model config: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}", hint="Pick sizes where hidden_size % num_heads == 0")
        if self.num_heads % self.num_kv_heads:
            raise SmolctlError(
                f"invalid model config: num_heads {self.num_heads} is not divisible by "
                f"num_kv_heads {self.num_kv_heads}", hint="Pick sizes where num_heads % num_kv_heads == 0")
        for role in ("bos", "eos"):
            if getattr(self, f"{role}_token_id") >= self.vocab_size:
                raise SmolctlError(f"invalid model config: {role}_token_id {getattr(self, f'{role}_token_id')} "
                                   f"is not below vocab_size {self.vocab_size}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.init_std is None:
            self.init_std = 1 / math.sqrt(self.hidden_size)

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
    def from_hf(cls, hf: Any, name: str = "custom", where: str = "") -> ModelConfig:
        """From a LlamaConfig or its dict (config.json). Every field used is checked by the same
        schema as our own config files (types and ranges), named as config.json names it."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        if d.get("model_type", "llama") != "llama":
            raise SmolctlError(f"{where}unsupported model_type {d.get('model_type')!r}: smolctl handles "
                               "Llama-architecture models")
        if d.get("hidden_act", "silu") != "silu" or d.get("attention_bias") or d.get("mlp_bias"):
            raise SmolctlError(f"{where}unsupported Llama variant: smolctl models use SiLU and no biases")
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise SmolctlError(f"{where}rope_parameters must be a mapping of keys to values, got {rope!r}")
        if rope.get("rope_type", "default") != "default" or d.get("rope_scaling"):
            raise SmolctlError(f"{where}unsupported RoPE scaling: smolctl models use plain RoPE")
        missing = [k for k in HF_REQUIRED if d.get(k) is None]
        if missing:
            raise SmolctlError(f"{where}no {', '.join(missing)} in it: not a complete model config",
                               hint="Pass the model's own config.json")
        given = {theirs: d.get(theirs) for theirs in HF_NAMES}
        given["rope_theta"] = rope.get("rope_theta", d.get("rope_theta"))
        for key in ("bos_token_id", "eos_token_id"):  # a list of ids (several EOS tokens): the first
            if isinstance(given[key], list):
                given[key] = given[key][0] if given[key] else None
        fields = specs(cls)
        values = {HF_NAMES[k]: check(fields[HF_NAMES[k]], v, strict=True, label=f"{where}{k}")
                  for k, v in given.items() if v is not None}
        values.setdefault("num_kv_heads", values["num_heads"])
        return cls(name=name, **{"max_seq_len": 2048, "rope_theta": 10000.0, "bos_token_id": 0,
                                 "eos_token_id": 0, **values})

    # -- files -----------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "", strict: bool = False) -> ModelConfig:
        """From our own field names, checked (see schema.validate); a `preset` key starts from that preset."""
        d = validate(cls, d, "model config", where, strict=strict, also=("preset",))
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
            return cls.from_hf(d, name=Path(path).stem, where=f"{path}: ")
        return cls.from_dict(d, where=f"{path}: ")

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


# config.json (transformers' LlamaConfig) names -> ours; the first five have no default.
HF_NAMES = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
            "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
            "num_key_value_heads": "num_kv_heads", "head_dim": "head_dim",
            "max_position_embeddings": "max_seq_len", "rms_norm_eps": "rms_norm_eps",
            "tie_word_embeddings": "tie_embeddings", "bos_token_id": "bos_token_id",
            "eos_token_id": "eos_token_id", "initializer_range": "init_std", "rope_theta": "rope_theta"}
HF_REQUIRED = list(HF_NAMES)[:5]
MAX_CONFIG_BYTES = 16 << 20  # a config file is a few KB; a bigger one is not a config
MAX_YAML_VALUES = 100_000  # values a YAML config may expand to: a config holds dozens


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a JSON, YAML or TOML file into a dict, with one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise SmolctlError(fsutil.no_file("config file", path), hint="Check the path")
    suffix = path.suffix.lower()
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise SmolctlError(f"config file {path} is {path.stat().st_size:,} bytes: too large for a config",
                           hint="Pass a config file of a few KB")
    try:
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            data = _load_yaml(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10: tomli, the same parser (a dependency there)
                import tomli as tomllib

            data = tomllib.loads(text)
        else:
            raise SmolctlError(f"unsupported config file type {path.suffix!r}: {path}",
                               hint="Use .json, .yaml/.yml or .toml")
    except SmolctlError:
        raise
    except Exception as e:  # parse errors of three libraries, one message
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SmolctlError(f"malformed config file {path}: {first}", hint="Fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SmolctlError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing a document that expands (through aliases, *name) to more than
    MAX_YAML_VALUES values: 448 bytes of nested anchors ("billion laughs") are millions of them,
    and an error quoting the value would be a line of 80 MB."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded(node, {}) > MAX_YAML_VALUES:
            raise ValueError(f"it expands to more than {MAX_YAML_VALUES:,} values through YAML aliases (*name)")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded(node, memo: dict) -> int:
    """Values in the YAML node graph `node` once every alias is replaced by what it names."""
    import yaml

    if id(node) not in memo:
        memo[id(node)] = 1  # a node that contains itself counts once
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        memo[id(node)] = 1 + sum(_expanded(child, memo) for child in children)
    return memo[id(node)]


def write_mapping(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        fsutil.write_text(path, yaml.safe_dump(data, sort_keys=False))
    else:
        fsutil.write_text(path, json.dumps(data, indent=2) + "\n")


@dataclass
class TrainConfig:
    """Everything a training run is, each field with its help text and range (see schema.py): the
    `train`/`resume` flags, config files, config.yaml and checkpoints' smolctl.json all go through it."""

    # model: a preset, optionally overridden field by field (a config file's `model:` section)
    preset: str | None = setting(None, "A model preset: smollm2-135m (the seed's 135M; the default without "
                                  "--init-from) or tiny.", flag=("--preset", "-p"))
    model: dict[str, Any] = setting(default_factory=dict, help="ModelConfig fields over the preset's.", cli=False)
    init_from: str | None = setting(None, "Continued pretraining: start from this model's weights, config and "
                                    "tokenizer (a run, checkpoint, HF directory, .gguf, imported name or hub id), "
                                    "with a fresh optimizer and schedule.")
    # data
    data: str = setting("cosmopedia-v2", "'sample' (bundled corpus), 'cosmopedia-v2' (the hub stream), a hub "
                        "dataset id, DIR:config (a local copy of a hub dataset repo), or local "
                        ".jsonl/.json/.parquet/.txt files: a path, directory or glob.")
    text_column: str = setting("text", "The text column.", nonempty=True)
    eval_data: str | None = setting(None, "Held-out data for --eval-every (default: the sample's held-out split "
                                    "with --data sample).", resumable=True)
    tokenizer: str | None = setting(None, "A tokenizer directory or hub id (default: the bundled SmolLM2 one).")
    license: str | None = setting(None, "The license exports declare (GGUF general.license), e.g. apache-2.0.",
                                  resumable=True)
    shuffle_buffer: int = setting(0, "Shuffle blocks through a buffer of N; 0 keeps the stream order.", ge=0,
                                  le=2**20)
    data_streams: int | None = setting(None, "Split the data into N streams, each with its own position, dealt "
                                       "out to the processes: a checkpoint resumes on up to N processes "
                                       "(default: one per process).", gt=0, le=4096)
    num_workers: int | None = setting(None, "Background processes that tokenize the data (0: the training "
                                      "process does); default: one per spare CPU core, 1 to 4. Any number "
                                      "gives the same blocks in the same order.", ge=0, le=64, resumable=True)
    # batch: tokens per optimizer step = batch_size * seq_len * grad_accum * processes
    batch_size: int = setting(8, "Micro-batch per device.", gt=0, le=2**16)
    seq_len: int | None = setting(None, "Tokens per sequence (default: the model's context, 2048 for "
                                  "SmolLM2-135M).", gt=0)
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", gt=0, le=2**16)
    # optimizer and schedule: the SmolLM2-135M recipe (huggingface/smollm config_smollm2_135M.yaml)
    lr: float = setting(3e-3, "Peak learning rate.", gt=0)
    min_lr: float = setting(0.0, "The learning rate the decay ends at.", ge=0)
    schedule: str = setting("wsd", "wsd (warmup-stable-decay) or cosine.", choices=("wsd", "cosine"))
    warmup_steps: int | None = setting(None, "Linear warmup steps (default: 2% of --max-steps, at most 2000).", ge=0)
    decay_frac: float = setting(0.2, "WSD: the fraction of steps, at the end, of linear decay to --min-lr.",
                                ge=0, le=1)
    weight_decay: float = setting(0.01, "AdamW weight decay, on matrices only.", ge=0)
    beta1: float = setting(0.9, "AdamW beta1.", ge=0, lt=1)
    beta2: float = setting(0.95, "AdamW beta2.", ge=0, lt=1)
    eps: float = setting(1e-8, "AdamW epsilon.", gt=0)
    grad_clip: float = setting(1.0, "Clip the gradient norm to this.", gt=0)
    # loop
    max_steps: int = setting(5000, "Optimizer steps to train to.", gt=0, resumable=True)
    mixed_precision: str = setting("auto", "no, bf16, fp16 or auto (accelerate launch's setting, else what runs "
                                   "the model's matmuls fastest here, measured once and cached).",
                                   choices=("auto", "no", "bf16", "fp16"))
    compile: bool | None = setting(None, "torch.compile the decoder layers; default (null): auto, where measured "
                                   "here to repay its compile time within the run (config.yaml keeps what it "
                                   "decided).")
    seed: int = setting(42, "Random seed.", ge=0, le=2**32 - 1)
    device: str | None = setting(None, "cpu, cuda, cuda:N, mps or auto (default: auto, the best available).")
    save_every: int = setting(500, "Checkpoint every N steps.", gt=0, resumable=True)
    keep_last: int | None = setting(None, "Keep only the newest N step checkpoints (default: all).", gt=0,
                                    resumable=True)
    eval_every: int = setting(0, "Held-out loss every N steps; 0: only at the end.", ge=0, resumable=True)
    eval_tokens: int = setting(32768, "Tokens each held-out evaluation scores (all of them when the data is "
                               "shorter).", gt=0, resumable=True)
    sample_every: int = setting(0, "Generate from --sample-prompt every N steps; 0: never.", ge=0,
                                resumable=True)
    sample_prompt: str = setting("Once upon a time", "The prompt of --sample-every.", nonempty=True,
                                 resumable=True)
    sample_tokens: int = setting(32, "Tokens each sample generates.", gt=0, resumable=True)
    log_every: int = setting(10, "Log every N steps.", gt=0, resumable=True)
    report_to: str = setting("none", "Also log to tensorboard or wandb.", choices=("tensorboard", "wandb", "none"),
                             resumable=True)
    max_bad_steps: int = setting(10, "Stop after N non-finite (NaN/inf) steps in a row; each is skipped, with no "
                                 "update.", ge=1, resumable=True)
    peak_tflops: float | None = setting(None, "The device's peak TFLOP/s for MFU (known GPUs are looked up).",
                                        gt=0, resumable=True)

    def __post_init__(self) -> None:
        check_fields(self, "")
        self.model = validate(ModelConfig, self.model, "model config", also=("preset",))

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({"preset": self.preset or DEFAULT_PRESET, **self.model})

    def with_flags(self, flags: dict[str, Any]) -> TrainConfig:
        """These values (by field name, None: not given) over this config; errors name them as flags."""
        given = {k: v for k, v in flags.items() if v is not None}
        return dataclasses.replace(self, **validate(TrainConfig, given, "training config", flags=True))

    def resolved(self) -> TrainConfig:
        """Fill the derived defaults and check what involves several values; raises SmolctlError."""
        cfg = dataclasses.replace(self)
        mcfg = cfg.model_config()
        cfg.seq_len = cfg.seq_len or mcfg.max_seq_len
        if cfg.warmup_steps is None:
            cfg.warmup_steps = min(2000, max(1, round(0.02 * cfg.max_steps)))
        if cfg.seq_len > mcfg.max_seq_len:
            raise SmolctlError(f"--seq-len {cfg.seq_len} exceeds the model's max positions ({mcfg.max_seq_len})")
        if cfg.min_lr > cfg.lr:
            raise SmolctlError(f"--min-lr {cfg.min_lr:g} is above --lr {cfg.lr:g}", hint="Decay to a smaller --min-lr")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "", strict: bool = False) -> TrainConfig:
        d = validate(cls, d, "training config", where, strict=strict)
        if "model" in d:
            d["model"] = validate(ModelConfig, d["model"], "model config", where, strict=strict, also=("preset",))
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """A YAML/TOML/JSON file: training keys at the top level (or under `train:`), the model as
        `preset:` and/or a `model:` mapping of ModelConfig fields (or a preset name)."""
        d = read_mapping(path)
        section = d.pop("train", {})
        if not isinstance(section, dict):
            raise SmolctlError(f"{path}: train must be a mapping of keys to values, got {section!r}")
        d = {**section, **d}
        model = d.get("model")
        if isinstance(model, str):
            d["preset"], d["model"] = model, {}
        elif isinstance(model, dict) and "preset" in model:
            d["model"] = dict(model)
            d["preset"] = d["model"].pop("preset")
        return cls.from_dict(d, where=f"{path}: ")


# The fields `resume` takes as flags and accepts edited in config.yaml: they change bookkeeping,
# not the trajectory (max_steps extends it).
RESUMABLE = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["resumable"])
