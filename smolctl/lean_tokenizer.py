"""The bundled SmolLM2 tokenizer for decoding, without importing transformers.

    tok = LeanTokenizer(BUNDLED / "tokenizer.json", special={"bos": 1, "eos": 2, "pad": 2},
                        chat_template=None, full=lambda: load_the_transformers_tokenizer())
    tok("Hello").input_ids, tok.decode(ids, skip_special_tokens=True), tok.eos_token_id

What a decode loop calls on its tokenizer (encode, decode, special token ids) is the `tokenizers`
library underneath transformers' fast tokenizer anyway; importing transformers to get there costs
more than a second of a `smolctl generate` process (as much as half of torch's own import). Any
other attribute (apply_chat_template, ...) comes from the transformers tokenizer, built by `full()`
on first use, so callers see one tokenizer. tests/test_fastpath.py checks that both encode and
decode alike.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Callable


class LeanTokenizer:
    def __init__(self, tokenizer_json: Path, special: dict[str, int | None], chat_template: str | None,
                 full: Callable[[], object]):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(tokenizer_json))
        self._full_factory, self._full = full, None
        self.bos_token_id, self.eos_token_id = special.get("bos"), special.get("eos")
        self.pad_token_id = special.get("pad")
        self.chat_template = chat_template

    def __call__(self, text, add_special_tokens: bool = True, **kwargs):
        if not isinstance(text, str) or kwargs:  # batches, tensors, padding ...: transformers' own
            return self.full(text, add_special_tokens=add_special_tokens, **kwargs)
        return SimpleNamespace(input_ids=self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None,
               **kwargs) -> str:
        if clean_up_tokenization_spaces is not False or kwargs:  # transformers' post-processing
            return self.full.decode(ids, skip_special_tokens=skip_special_tokens,
                                    clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def convert_ids_to_tokens(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def __len__(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def full(self):
        """The transformers tokenizer (built once, on first use)."""
        if self._full is None:
            self._full = self._full_factory()
        return self._full

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.full, name)
