"""What the contract fuzzer (tests/test_contract_fuzz.py) found, one regular test per shrunk example.

Each test runs its command line in a fresh copy of the fuzzer's world, with the same damage if any,
and asserts the whole contract (exit code, one `Error:` line and no internal error, every other
file unchanged, no temporary file or process left).
"""

import pytest
from test_contract_fuzz import Case, check, damage, template  # noqa: F401  (template: the world fixture)



def test_generate_hf_dir_with_truncated_tokenizer_config(template):  # noqa: F811
    # was: Error: internal error: JSONDecodeError: Expecting ',' delimiter
    check(Case(["generate", "Once", "--model", "hf", "-n", "3"]), template,
          damage("hf/tokenizer_config.json", "truncate", 188, None))


def test_resume_of_a_run_whose_metrics_jsonl_has_a_damaged_row(template):  # noqa: F811
    # was: Error: internal error: JSONDecodeError: Expecting value (the loss plot, after the run ended)
    check(Case(["resume", "--run-dir", "runs/micro", "--max-steps", "3", "--eval-tokens", "32"],
               outputs=["runs/micro"]), template, damage("runs/micro/metrics.jsonl", "flip", 0, None))


def test_export_import_with_truncated_config_json(template):  # noqa: F811
    # was: Error: internal error: OSError: It looks like the config file at '.../models/micro/config.json'
    # is not a valid JSON file
    check(Case(["export", "--model", "micro", "--out", "new.gguf"], outputs=["new.gguf"]), template,
          damage("models/micro/config.json", "truncate", 586, None))


def test_eval_hf_dir_whose_tokenizer_json_has_a_field_of_another_type(template):  # noqa: F811
    # was: Error: internal error: Exception: data did not match any variant of untagged enum PreTokenizerUntagged
    check(Case(["eval", "--model", "hf", "--data", "corpus.jsonl", "--tokens", "32", "--seq-len", "16"]), template,
          damage("hf/tokenizer.json", "field", 0, [1, "a"], key="pre_tokenizer"))


def test_export_import_whose_tokenizer_json_is_not_utf8(template):  # noqa: F811
    # was: Error: internal error: UnicodeDecodeError: 'utf-8' codec can't decode byte 0x8f in position 47
    check(Case(["export", "--model", "micro", "--out", "new"], outputs=["new"]), template,
          damage("models/micro/tokenizer.json", "flip", 47, None))




def test_train_with_a_fifo_as_the_log_file(template):  # noqa: F811
    # was: a hang (opening the FIFO for writing waits for a reader forever)
    check(Case(["train", "--config", "micro.yaml", "--max-steps", "1", "--eval-tokens", "32", "--log-file", "fifo",
                "--run-dir", "runs/x"], outputs=["runs/x", "fifo"]), template)


def test_train_with_a_non_utf8_run_name(template):  # noqa: F811
    # `smolctl train ... --run-name $'caf\xe9'`; was: UnicodeEncodeError writing the log line that names the
    # run directory (metrics.py), and then again writing the crash log (it starts with the command): a traceback
    check(Case(["train", "--config", "micro.yaml", "--max-steps", "1", "--eval-tokens", "32", "--run-name",
                "caf\udce9"], outputs=["runs/caf\udce9"]), template)


def test_generate_with_a_non_utf8_prompt_file(template):  # noqa: F811
    # was: Error: internal error: UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9 in position 3
    check(Case(["generate", "--prompt-file", "latin1.txt", "--model", "runs/micro", "-n", "2"]), template)


LONG_NAME = "x" * 300  # longer than a file name may be (255 bytes)


@pytest.mark.parametrize("argv", [
    ["resume", "--run-dir", LONG_NAME],
    ["resume", "--run-dir", "runs/micro", "--max-steps", "3", "--eval-tokens", "32", "--log-file", LONG_NAME],
    ["inspect", "--config", LONG_NAME + ".yaml"],
    ["export", "--model", "runs/micro", "--out", LONG_NAME],
], ids=["resume-run-dir", "resume-log-file", "inspect-config", "export-out"])
def test_a_path_too_long_to_be_one_is_bad_input(argv, template):  # noqa: F811
    # was: Error: internal error: OSError: [Errno 36] File name too long (exit 1)
    check(Case(argv, outputs=["runs/micro"] if argv[0] == "resume" else []), template)




def test_chat_with_non_utf8_input(template):  # noqa: F811
    # `printf 'caf\xe9\n' | smolctl chat --model runs/micro`; was: Error: internal error: TypeError:
    # TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]
    check(Case(["chat", "-m", "runs/micro", "--max-new-tokens", "3"], stdin="caf\udce9\n"), template)


def test_import_to_a_non_utf8_directory(template):  # noqa: F811
    # `smolctl import m.gguf -o $'caf\xe9'`; was: the tokenizer's save raises UnicodeEncodeError, and then
    # so does writing the crash log (its first line is the command, with the same name): a traceback
    check(Case(["import", "m.gguf", "-o", "caf\udce9"], outputs=["caf\udce9"]), template)
