"""The load boundary: everything smolctl reads from outside comes in through a reader here.

    with reading(path, "tokenizer"):              # any exception in the block -> one line
        tok = AutoTokenizer.from_pretrained(path)
    text = read_text(path, "prompt file")          # UTF-8, strictly
    line = read_stdin_line()                       # the same for stdin
    check_weights(state, source)                   # float tensors only (shapes: load_state_dict)

config.json, tokenizer files and chat templates, safetensors and
GGUF weights, wheels, corpora, prompt files and stdin are parsed by libraries that raise whatever
they raise on a damaged file (KeyError, struct.error, a Rust exception, a jinja syntax error...).
`reading` turns every one of them into the same line: `<path> is damaged or is not a <kind>:
<reason>` (exit 2). Two kinds of exception pass through: a SmolctlError (already one line), and an
OSError of the environment -- a full disk, a read-only file system, permissions -- which the CLI
reports as such (exit 1). Text is read as UTF-8 and nothing else: bytes that are not are refused
in one line naming the file, never guessed at.

No torch here: inspect and count-params read configs too.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from smolctl.errors import ENVIRONMENT_ERRORS, SmolctlError

HINT = "Replace the file with a good copy (re-export, re-download or re-import it)"
UTF8_HINT = "Convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
MAX_REASON = 200  # characters of a library's message kept in the line


def reason(e: BaseException) -> str:
    """What went wrong, in one short line: the exception's message (its type when it has none)."""
    text = " ".join(str(e).split())
    if not text or isinstance(e, (KeyError, IndexError, TypeError, AttributeError)):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= MAX_REASON else text[:MAX_REASON - 3] + "..."


@contextmanager
def reading(path: str | Path, kind: str, hint: str | None = HINT) -> Iterator[None]:
    """Read `path` (a `kind` of artifact) inside this block: any exception in it becomes one
    SmolctlError, `<path> is damaged or is not a <kind>: <reason>`."""
    try:
        yield
    except SmolctlError:
        raise
    except MemoryError:
        raise
    except OSError as e:
        if e.errno in ENVIRONMENT_ERRORS:
            raise  # the machine, not the file: the CLI says so (exit 1)
        raise damaged(path, kind, e, hint) from None
    except UnicodeDecodeError as e:
        raise damaged(path, kind, f"bytes that are not UTF-8 ({e.reason} at byte {e.start})", UTF8_HINT) from None
    except Exception as e:
        raise damaged(path, kind, e, hint) from None


def damaged(path: str | Path, kind: str, why: BaseException | str, hint: str | None = HINT) -> SmolctlError:
    why = reason(why) if isinstance(why, BaseException) else why
    return SmolctlError(f"{path} is damaged or is not a {kind}: {why}", hint=hint)


def read_text(path: str | Path, kind: str, limit: int | None = None) -> str:
    """The text of `path`, strictly UTF-8 (`limit`: at most that many bytes are read)."""
    with reading(path, kind):
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise damaged(path, kind, f"larger than {limit:,} bytes", hint="Pass a smaller file")
        return data.decode("utf-8")


def read_stdin(kind: str = "UTF-8 text") -> str:
    """All of stdin, strictly UTF-8."""
    with reading("stdin", kind, hint=UTF8_HINT):
        return _strict(sys.stdin.read())


def read_stdin_line(kind: str = "UTF-8 text") -> str:
    """One line of stdin ('' at its end), strictly UTF-8."""
    with reading("stdin", kind, hint=UTF8_HINT):
        return _strict(sys.stdin.readline())


def _strict(text: str) -> str:
    """`text`, if it came from UTF-8: Python's UTF-8 mode (and the C locale) reads stdin with
    surrogateescape, which turns bytes that are not UTF-8 into lone surrogates instead of failing."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text.encode("utf-8", "surrogateescape").decode("utf-8")  # the bytes as read: raises, naming the byte
    return text


# -- what a reader checks before use ---------------------------------------------------------------

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


def check_weights(state: dict, source: str | Path) -> None:
    """Weights are floating point: an int32 (or bool, or quantized-as-integers) tensor is not a
    model's weight, whatever its name (the shapes are checked against the config on loading)."""
    for name, t in state.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in FLOAT_DTYPES:
            raise damaged(source, "model's weights file", f"{name} is {dtype}; weights are floating point "
                          f"({', '.join(FLOAT_DTYPES)})")


def check_chat_template(template: str | None, source: str | Path) -> None:
    """A chat template that compiles (jinja syntax, in transformers' sandbox with its extensions),
    checked when the tokenizer is loaded rather than when the first message is rendered."""
    if not template or not isinstance(template, str):
        return
    from transformers.utils.chat_template_utils import _compile_jinja_template

    with reading(source, "chat template"):
        _compile_jinja_template(template)
