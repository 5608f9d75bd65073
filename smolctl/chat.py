"""Chat on top of the token iterator: history, the chat template, context trimming, input reading.

    conv = Conversation(tokenizer, context_length=8192, reserve=256)
    conv.add_user("What is gravity?")
    gen = conv.reply(model, Sampling(temperature=0.2, top_p=0.9))   # a Generation: iterate it to stream
    for step in gen: print(step.texts[0], end="")
    conv.add_assistant(gen.results[0].text)

A chat model (its tokenizer has a chat template that ends turns with its EOS token, like
SmolLM2-Instruct's ChatML and <|im_end|>) gets the template with the default system prompt, or
`system` when given. Any other model is continued as plain text: each message is appended to the
running transcript. Either way, when the prompt plus `reserve` new tokens would outgrow the
context, the oldest turns are dropped first; the system prompt always stays.

Nothing here prints or imports Typer/Rich: smolctl/cli/chat.py is the terminal side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from smolctl import fsutil, precious
from smolctl.errors import SmolctlError
from smolctl.generation import Generation, Sampling
from smolctl.tokenizer import stop_ids

COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays)",
    "/system TEXT": "set the system prompt (no TEXT: show it)",
    "/save FILE": "save the conversation as JSON",
    "/exit": "leave (so do /bye, /quit and Ctrl-D)",
    "/help": "this list",
}
EXIT = ("/exit", "/bye", "/quit")  # /bye: ollama's; /quit: many a REPL's
MULTILINE_HELP = 'End a line with \\ to continue it, or put a message between lines holding only """.'


def is_chat_model(tokenizer) -> bool:
    """A chat template that closes turns with the EOS token: then generation stops where a reply
    ends. The bundled SmolLM2 tokenizer carries ChatML but its EOS is <|endoftext|> (pretraining),
    so a base model we trained is continued as text instead of being fed a format it never saw."""
    template, eos = getattr(tokenizer, "chat_template", None), tokenizer.eos_token
    return bool(template) and isinstance(template, str) and bool(eos) and eos in template


@dataclass
class Turn:
    user: str
    assistant: str = ""


class Conversation:
    def __init__(self, tokenizer, context_length: int, reserve: int = 256, system: str | None = None):
        self.tokenizer, self.context_length, self.system = tokenizer, context_length, system
        # room kept free for the reply; a tiny context still leaves half of it to the prompt
        self.reserve = min(reserve, context_length // 2)
        self.chat = is_chat_model(tokenizer)
        self.turns: list[Turn] = []
        self.trimmed = 0  # turns dropped to fit the context, over the whole conversation

    @property
    def default_system(self) -> str | None:
        """The system prompt the chat template writes when it is given none (SmolLM2-Instruct's: "You
        are a helpful AI assistant named SmolLM..."); None when it writes none. Found by rendering a
        marked system prompt and reading what stands in the mark's place without one."""
        if not self.chat:
            return None
        mark, user = "SYSTEM-PROMPT-MARK", [{"role": "user", "content": "hi"}]
        try:  # a template may refuse a system message altogether
            pre, found, post = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": mark}, *user], tokenize=False).partition(mark)
            plain = self.tokenizer.apply_chat_template(user, tokenize=False)
        except Exception:
            return None
        if found and plain.startswith(pre) and plain.endswith(post) and len(plain) > len(pre) + len(post):
            return plain[len(pre):len(plain) - len(post)]
        return None

    def reset(self) -> None:
        self.turns.clear()

    def add_user(self, text: str) -> None:
        self.turns.append(Turn(text))

    def add_assistant(self, text: str) -> None:
        self.turns[-1].assistant = text

    def messages(self) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system is not None else []
        for t in self.turns:
            out.append({"role": "user", "content": t.user})
            if t.assistant or t is not self.turns[-1]:
                out.append({"role": "assistant", "content": t.assistant})
        return out

    def render(self) -> str:
        """The prompt text for the next reply."""
        if not self.chat:
            return "".join(t.user + t.assistant for t in self.turns)
        from smolctl.artifacts import reading

        with reading("the model's chat template", "working chat template"):  # one that raises on these messages
            return self.tokenizer.apply_chat_template(self.messages(), tokenize=False, add_generation_prompt=True)

    def prompt_ids(self) -> list[int]:
        """The tokenized prompt, after dropping the oldest turns until it fits beside the reply."""
        budget = self.context_length - self.reserve
        while True:
            ids = self.tokenizer(self.render(), add_special_tokens=False).input_ids
            if len(ids) <= budget:
                return ids
            if len(self.turns) <= 1:
                self.turns.clear()
                raise SmolctlError(f"the message is {len(ids):,} tokens with the system prompt; the model's "
                                   f"context is {self.context_length:,} with {self.reserve:,} kept for the reply",
                                   hint="Send a shorter message, or lower --max-new-tokens")
            self.turns.pop(0)
            self.trimmed += 1

    def reply(self, model, sampling: Sampling) -> Generation:
        """A Generation of the assistant's next reply (iterate it to stream the text)."""
        stop = stop_ids(self.tokenizer, model, chat=self.chat)
        return Generation(model, self.tokenizer, [self.prompt_ids()], sampling, stop_ids=stop,
                          context_length=self.context_length)

    def save(self, path: str | Path, model_name: str = "") -> Path:
        """Write the conversation as JSON to `path`: a new file, or one an earlier /save wrote
        (never a user's other file, nor anything inside a run, checkpoint or model)."""
        path = Path(path).expanduser()
        precious.check_output(path, "/save")
        data = {"model": model_name, "chat_template": self.chat, "messages": self.messages()}
        try:
            with fsutil.hold(path, f"/save {path}"):
                if path.exists() and path.stat().st_size and not is_transcript(path):
                    raise SmolctlError(f"{path} exists and is not a chat saved by /save",
                                       hint="Give a new file name, e.g. /save chat.json")
                fsutil.write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as e:
            raise SmolctlError(f"cannot write {path}: {e.strerror}", hint="Pick a writable path") from None
        return path


def is_transcript(path: Path) -> bool:
    """A file that /save wrote: JSON with the model, the template flag and the messages."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"model", "chat_template", "messages"} <= set(data)


def read_message(next_line: Callable[[bool], str]) -> str:
    """One user message from `next_line(continued)`, which returns a line without its newline and
    raises EOFError at the end of input. Multiline: a trailing backslash continues the line, and a
    line holding only \"\"\" opens a block that the next such line closes."""
    first = next_line(False)
    if first.strip() == '"""':
        lines = []
        while (line := next_line(True)).strip() != '"""':
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(next_line(True))
        except EOFError:
            break
    return "\n".join(lines)


def parse_command(text: str) -> tuple[str, str] | None:
    """'/system Be brief.' -> ('/system', 'Be brief.'); None when `text` is a message: no leading
    slash, or a /word that is not one of COMMANDS ("/usr/bin is a folder, right?")."""
    if not text.startswith("/"):
        return None
    name, _, arg = text.strip().partition(" ")
    if name not in {c.split()[0] for c in COMMANDS} | set(EXIT):
        return None
    return name, arg.strip()


def unescape(text: str) -> str:
    """A message that starts with // is sent with one slash: '//reset' sends '/reset'."""
    return text[1:] if text.startswith("//") else text
