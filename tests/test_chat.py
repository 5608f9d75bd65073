import json

import pytest

from smolctl.chat import Conversation, is_chat_model, parse_command, read_message, unescape
from smolctl.errors import SmolctlError
from smolctl.tokenizer import load_tokenizer

DEFAULT_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def chat_tok():
    """The bundled tokenizer set up as SmolLM2-Instruct's: eos <|im_end|>."""
    from transformers import AutoTokenizer

    from smolctl.tokenizer import BUNDLED

    tok = AutoTokenizer.from_pretrained(str(BUNDLED))
    tok.eos_token = "<|im_end|>"
    return tok


def test_chat_template_renders_history_with_the_generation_prompt(chat_tok):
    conv = Conversation(chat_tok, context_length=8192)
    conv.add_user("What is gravity?")
    conv.add_assistant("A force.")
    conv.add_user("Thanks!")
    assert conv.render() == (DEFAULT_SYSTEM + "<|im_start|>user\nWhat is gravity?<|im_end|>\n"
                             "<|im_start|>assistant\nA force.<|im_end|>\n"
                             "<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n")
    conv.system = "Be brief."
    assert conv.render().startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_trimming_drops_oldest_turns_and_keeps_the_system_prompt(chat_tok):
    conv = Conversation(chat_tok, context_length=120, reserve=20, system="Be brief.")
    for i in range(10):
        conv.add_user(f"Question number {i}: tell me about topic {i}.")
        conv.add_assistant(f"Answer number {i} about topic {i}.")
    conv.add_user("Last question?")
    ids = conv.prompt_ids()
    text = chat_tok.decode(ids)
    assert len(ids) <= 100 and conv.trimmed > 0
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "Question number 0" not in text and "Last question?" in text
    assert text.endswith("<|im_start|>assistant\n")
    kept = [t.user for t in conv.turns]
    assert kept == [f"Question number {i}: tell me about topic {i}." for i in range(10 - len(kept) + 1, 10)] + \
        ["Last question?"]


def test_a_message_longer_than_the_context_is_an_error(chat_tok):
    conv = Conversation(chat_tok, context_length=60, reserve=10)
    conv.add_user("word " * 100)
    with pytest.raises(SmolctlError, match="the message is .* tokens with the system prompt; the model's context"):
        conv.prompt_ids()
    assert conv.turns == []


def test_the_default_system_prompt_is_the_templates_text(chat_tok):
    assert Conversation(chat_tok, context_length=8192).default_system == \
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert Conversation(load_tokenizer(), context_length=1024).default_system is None  # a base model


def test_base_models_are_continued_as_text(chat_tok):
    base = load_tokenizer()  # bundled: ChatML template, but eos <|endoftext|>: a pretraining tokenizer
    assert is_chat_model(chat_tok) and not is_chat_model(base)
    conv = Conversation(base, context_length=1024)
    conv.add_user("Once upon a time")
    conv.add_assistant(" there was a fox.")
    conv.add_user(" The end")
    assert conv.render() == "Once upon a time there was a fox. The end"


def lines(*items):
    it = iter(items)

    def next_line(continued):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return next_line


def test_read_message_multiline():
    assert read_message(lines("hello")) == "hello"
    assert read_message(lines("first \\", "second\\", "third", "next")) == "first \nsecond\nthird"
    assert read_message(lines('"""', "a", "", "  b", '"""', "next")) == "a\n\n  b"
    with pytest.raises(EOFError):
        read_message(lines())


def test_parse_command():
    assert parse_command("/system  Be brief. ") == ("/system", "Be brief.")
    assert parse_command("/exit") == ("/exit", "")
    assert parse_command("/bye") == ("/bye", "") and parse_command("/quit") == ("/quit", "")
    assert parse_command("hello /there") is None
    # an unknown /word is a message, not an error: paths, typos, a URL path
    assert parse_command("/nope") is None and parse_command("/usr/bin is a folder, right?") is None
    assert parse_command("//reset") is None and unescape("//reset") == "/reset" and unescape("/usr") == "/usr"


# -- through the CLI ------------------------------------------------------------------------------

def test_piped_multi_turn_chat(cli, tiny_chat_gguf, tmp_path):
    path = tiny_chat_gguf[0]
    saved = tmp_path / "chat.json"
    session = "\n".join(["Hello there", "/system Be brief.", "What is \\", "gravity?", f"/save {saved}",
                         "/reset", "Again", "/exit", "never sent"]) + "\n"
    r = cli("chat", "--model", path, "--temperature", "0", "-n", "8", "--dtype", "fp32", "--commands", input=session)
    assert r.exit_code == 0, r.output
    data = json.loads(saved.read_text())
    msgs = data["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[0]["content"] == "Be brief." and msgs[1]["content"] == "Hello there"
    assert msgs[3]["content"] == "What is \ngravity?"
    # each reply was streamed to stdout, one per turn (three turns: two saved, one after /reset)
    replies = r.stdout.split("\n")
    assert replies[0] == msgs[2]["content"] and msgs[4]["content"] in r.stdout
    assert "(conversation cleared)" in r.stderr and "never sent" not in r.output


def test_chat_with_a_base_model_continues_text(cli, tiny_base_dir):
    r = cli("chat", "--model", tiny_base_dir, "--temperature", "0", "-n", "4", input="Once upon a time\n")
    assert r.exit_code == 0, r.output
    assert "has no chat template: it is a base model" in r.stderr


def test_chat_errors_keep_the_session_going(cli, tiny_chat_gguf, tmp_path):
    saved = tmp_path / "chat.json"
    session = f"/usr/bin is a folder, right?\n/save\n//reset\n/save {saved}\n"
    r = cli("chat", "--model", tiny_chat_gguf[0], "-n", "4", "--commands", input=session)
    assert r.exit_code == 0, r.output
    assert "Error: /save needs a file name" in r.stderr and "unknown command" not in r.output
    users = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
    assert users == ["/usr/bin is a folder, right?", "/reset"]  # sent as text; // escaped a slash


def test_piped_input_is_all_messages_unless_commands_is_given(cli, tiny_chat_gguf, monkeypatch):
    from smolctl.cli.chat import Repl

    seen, answer = [], Repl.answer
    monkeypatch.setattr(Repl, "answer", lambda self, text: (seen.append(text), answer(self, text)))  # a spy
    session = "/reset\n/system Be brief.\n/exit\nlast\n"
    r = cli("chat", "--model", tiny_chat_gguf[0], "-n", "4", input=session)
    assert r.exit_code == 0, r.output
    assert seen == ["/reset", "/system Be brief.", "/exit", "last"]
    assert "(conversation cleared)" not in r.stderr


def test_system_with_no_text_shows_the_default_and_bye_leaves(cli, tiny_chat_gguf):
    r = cli("chat", "--model", tiny_chat_gguf[0], "-n", "4", "--commands", input="/system\n/bye\nnever sent\n")
    assert r.exit_code == 0, r.output
    assert "System prompt: You are a helpful AI assistant named SmolLM, trained by Hugging Face" in r.stderr
    assert r.stdout == ""  # /bye left (ollama's word for it): nothing was sent to the model


def test_a_reply_stopped_before_its_first_token_leaves_no_empty_turn(tiny_chat_gguf):
    from smolctl.cli.chat import Repl
    from smolctl.generation import Sampling
    from smolctl.loading import load_for_generation

    loaded, _ = load_for_generation(str(tiny_chat_gguf[0]), "fp32", "cpu")
    conv = Conversation(loaded.tokenizer, context_length=loaded.cfg.max_seq_len, reserve=8)
    repl = Repl(conv, loaded.model, Sampling(max_new_tokens=4, temperature=0), "tiny", False, True)

    def ctrl_c(module, args):  # Ctrl-C while the prompt is being read, before any token
        raise KeyboardInterrupt

    hook = loaded.model.register_forward_pre_hook(ctrl_c)
    repl.answer("Hello there")
    hook.remove()
    assert conv.turns == []
    repl.answer("Again")
    assert [m["role"] for m in conv.messages()] == ["user", "assistant"] and conv.messages()[1]["content"]
