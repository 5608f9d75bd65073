"""`smolctl chat`: a terminal chat with a model, replies streamed as they are produced.

    smolctl chat --model smollm2-instruct
    smolctl chat --model smollm2-instruct --system "Answer in one sentence." --temperature 0
    echo "What is gravity?" | smolctl chat --model smollm2-instruct     # one user turn per line
    printf 'Hi\n/save chat.json\n' | smolctl chat --model smollm2-instruct --commands

In the REPL: /reset, /system TEXT, /save FILE, /exit (or /bye, /quit), /help; any other line is a message, also
one starting with an unknown /word ("/usr/bin is..."), and // sends a leading slash ("//reset").
Piped input is all messages unless --commands. A trailing backslash continues a message on the
next line; a line holding only \"\"\" opens (and another closes) a multiline block.
Ctrl-C stops the reply being written and keeps the chat going; Ctrl-D leaves.
Replies go to stdout; notices, errors and speed go to stderr.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from smolctl.cli.options import DeviceOpt, DtypeOpt, ModelOpt, QuantizeOpt, VerboseOpt, config_options
from smolctl.cli.registry import command, error_line
from smolctl.errors import SmolctlError, note
from smolctl.sampling import Sampling
from smolctl.schema import from_flags, specs

SAMPLING = tuple(name for name in specs(Sampling) if name != "stop")  # a chat turn ends where the reply does
CHAT_DEFAULTS = {"temperature": 0.2, "top_p": 0.9}  # SmolLM2-Instruct's recommended sampling


def register(app: typer.Typer) -> None:
    @command(app, help="Chat with a model (its chat template, streaming replies; pipe stdin for scripts).")
    @config_options(Sampling, SAMPLING, defaults=CHAT_DEFAULTS, after="system")
    def chat(
        model: ModelOpt = None,
        system: Annotated[Optional[str], typer.Option(
            "--system", "-s", help="System prompt (default: the chat template's own).", show_default=False)] = None,
        dtype: DtypeOpt = "auto",
        quantize: QuantizeOpt = "none",
        device: DeviceOpt = None,
        verbose: VerboseOpt = False,
        commands: Annotated[Optional[bool], typer.Option(
            "--commands/--no-commands", help="Read /commands from the input (default: on a terminal only; "
                                             "piped lines are all messages).", show_default=False)] = None,
        **flags,
    ) -> None:
        from smolctl.chat import Conversation
        from smolctl.loading import load_for_generation

        sampling = from_flags(Sampling, flags)
        loaded, _ = load_for_generation(model, dtype, device, quantize, verbose)
        conv = Conversation(loaded.tokenizer, context_length=loaded.cfg.max_seq_len, reserve=sampling.max_new_tokens,
                            system=system)
        interactive = sys.stdin.isatty()
        Repl(conv, loaded.model, sampling, str(model), interactive,
             commands=interactive if commands is None else commands).run()


class Repl:
    def __init__(self, conv, model, sampling, model_name: str, interactive: bool, commands: bool):
        self.conv, self.model, self.sampling, self.model_name = conv, model, sampling, model_name
        self.interactive, self.commands = interactive, commands

    def run(self) -> None:
        from smolctl.chat import MULTILINE_HELP, read_message

        if not self.conv.chat:
            note(f"Note: {self.model_name} has no chat template: it is a base model, so your text is continued as is.")
        if self.interactive:
            import readline  # noqa: F401  (line editing and history for input())

            note(f"Chatting with {self.model_name}. /help for commands, Ctrl-D to leave. {MULTILINE_HELP}")
        while True:
            try:
                text = read_message(self.next_line)
            except EOFError:
                if self.interactive:
                    print()
                return
            except KeyboardInterrupt:
                note("\n(Ctrl-D or /exit leaves)")
                continue
            if not text.strip():
                continue
            try:
                if self.command(text) == "exit":
                    return
            except SmolctlError as e:
                note(f"Error: {error_line(e)}")

    def next_line(self, continued: bool) -> str:
        from smolctl.artifacts import UTF8_HINT, damaged, read_stdin_line

        if self.interactive:
            try:
                return input("... " if continued else ">>> ")
            except UnicodeDecodeError as e:  # EOFError (Ctrl-D) passes: it ends the chat
                raise damaged("stdin", "UTF-8 text", e, hint=UTF8_HINT) from None
        line = read_stdin_line()  # not UTF-8: one line, exit 2
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def command(self, text: str) -> str | None:
        """A slash command (when commands are read), or a message to answer."""
        from smolctl.chat import COMMANDS, EXIT, parse_command, unescape

        if not self.commands:
            self.answer(text)
            return None
        parsed = parse_command(text)
        if parsed is None:
            if self.interactive and text.startswith("/") and not text.startswith("//"):
                note(f"({text.split()[0]} is not a command: sent as a message. /help lists the commands)")
            self.answer(unescape(text))
            return None
        name, arg = parsed
        if name in EXIT:
            return "exit"
        if name == "/help":
            rows = {**COMMANDS, "//TEXT": "send /TEXT as a message (other /words are sent as they are)"}
            note("\n".join(f"  {c:<14} {what}" for c, what in rows.items()))
        elif name == "/reset":
            self.conv.reset()
            note("(conversation cleared)")
        elif name == "/system":
            if not arg:
                shown = self.conv.system if self.conv.system is not None else self.conv.default_system
                note(f"System prompt: {shown}" if shown is not None else
                     "(no system prompt)" if self.conv.chat else "(a base model has no system prompt)")
            else:
                self.conv.system = arg
                note("(system prompt set)" if self.conv.chat else "(a base model has no system prompt: ignored)")
        elif name == "/save":
            if not arg:
                raise SmolctlError("/save needs a file name", hint="e.g. /save chat.json")
            note(f"(saved to {self.conv.save(arg, self.model_name)})")
        return None

    def answer(self, text: str) -> None:
        trimmed = self.conv.trimmed
        self.conv.add_user(text)
        gen = self.conv.reply(self.model, self.sampling)
        if self.conv.trimmed > trimmed:
            note(f"(dropped the {self.conv.trimmed - trimmed} oldest turn(s) to fit the context)")
        steps = iter(gen)
        try:
            for step in steps:
                sys.stdout.write(step.texts[0])
                sys.stdout.flush()
        except KeyboardInterrupt:
            steps.close()  # ends the decode loop; the reply keeps what was written
            note(" [stopped]")
        if gen.results[0].text:
            self.conv.add_assistant(gen.results[0].text)
        else:  # stopped before its first token: no empty reply in the history, nor its unanswered message
            self.conv.turns.pop()
            note("(no reply: the message is not kept in the conversation)")
        print(flush=True)
        if self.interactive:
            note(gen.stats_line())
