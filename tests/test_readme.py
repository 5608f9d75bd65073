"""The commands of the README and of docs/, run as written, so that the pages and the code cannot drift apart.

Commands are read out of the ```bash blocks of README.md and docs/*.md. The only changes made to
them are the ones the pages themselves announce (the main job's step counts divided by 50), and the
program: `smolctl` and `accelerate` run as `python -m ...` of this interpreter. Multi-process
commands that need GPUs and the hub are checked against smolctl's and accelerate's own option
parsers instead, and so is every other `smolctl` command shown (the ones other tests run, such as
continued pretraining's in tests/test_init_from.py, and the ones that need the hub or a GPU).
"""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXED_PORT

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
STEP_FLAGS = ("--max-steps", "--warmup-steps", "--save-every", "--eval-every", "--sample-every", "--from")
PROGRAMS = {"smolctl": [sys.executable, "-m", "smolctl"],
            "accelerate": [sys.executable, "-m", "accelerate.commands.accelerate_cli"],
            "torchrun": [sys.executable, "-m", "torch.distributed.run"]}
# Sections whose multi-process commands tests/test_distributed.py runs, on one machine as two
RUN_IN_TEST_DISTRIBUTED = ("Several machines", "Automatic recovery")


def commands_by_section() -> dict[str, list[list[str]]]:
    """{heading: [argv, ...]}: every command of the ```bash blocks under each heading of the README
    and the docs pages (`a && b` and `a | b` are two commands; comments and line continuations as a
    shell reads them). A heading on two pages must show the same commands (the README repeats one
    of a page's sections)."""
    out: dict[str, list[list[str]]] = {}
    for page in PAGES:
        sections = _page_sections(page)
        for heading, cmds in sections.items():
            assert out.get(heading, cmds) == cmds, f"{page.name}: {heading!r} differs from another page's"
            out[heading] = cmds
    return out


def _page_sections(page: Path) -> dict[str, list[list[str]]]:
    out, heading, block = {}, "", None
    for line in page.read_text(encoding="utf-8").splitlines():
        if block is not None:
            if line.startswith("```"):
                for logical in "\n".join(block).replace("\\\n", " ").splitlines():
                    out.setdefault(heading, []).extend(_split_on(shlex.split(logical, comments=True), ("&&", "|")))
                block = None
            else:
                block.append(line)
        elif line.startswith("```bash"):
            block = []
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return out


def _split_on(words: list[str], seps: tuple[str, ...]) -> list[list[str]]:
    cmds: list[list[str]] = [[]]
    for w in words:
        if w in seps:
            cmds.append([])
        else:
            cmds[-1].append(w)
    return [c for c in cmds if c]


def is_multi_process(argv: list[str]) -> bool:
    return argv[:2] == ["accelerate", "launch"] or argv[0] == "torchrun" or "--num-processes" in argv


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # A private HF_HOME: no user-wide accelerate default_config.yaml may change the launch; no GPU,
    # so that the default device is the CPU on any machine.
    env = {**os.environ, "HF_HOME": str(cwd / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([*PROGRAMS[argv[0]], *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def final_weights(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    assert all((wa[k] == wb[k]).all() for k in wa), f"{a} and {b} differ"


@pytest.mark.heavy
def test_main_job_and_its_resume_as_written(tmp_path):
    """The Quick start's main job, step counts divided by 50 as the README says: it trains, the
    held-out loss falls, and the resume from the (scaled) step-200 checkpoint repeats the rest
    exactly (the same final weights)."""
    quick = commands_by_section()["Quick start"]
    job = [c for c in quick if c[0] == "smolctl"][:2]
    assert [c[:2] for c in job] == [["smolctl", "train"], ["smolctl", "resume"]], quick
    scaled = [[str(math.ceil(int(w) / 50)) if i and c[i - 1] in STEP_FLAGS and w.isdigit() else w
               for i, w in enumerate(c)] for c in job]
    train, resume = scaled
    assert "--device" not in train
    run(train, tmp_path)
    run_dir = tmp_path / "runs" / train[train.index("--run-name") + 1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["loss"] for r in rows if r["event"] == "eval"]  # every 2 steps, on the held-out split
    assert len(evals) == 3 and evals[-1] < evals[0], evals
    assert {"train", "sample", "checkpoint"} <= {r["event"] for r in rows}
    first_final = run_dir / "checkpoints" / "first-final"
    (run_dir / "checkpoints" / "final").rename(first_final)  # what the resume must reproduce
    run(resume, tmp_path)
    assert_same_weights(first_final, run_dir / "checkpoints" / "final")


@FIXED_PORT  # its resume is an accelerate launch
def test_multi_process_commands_on_cpu_as_written(tmp_path):
    """The "On CPUs" commands, exactly as written and without --device: both launchers form one
    job of 2 CPU processes (not two jobs of one), and the resume through accelerate launch ends
    with the same weights as the uninterrupted run."""
    cpu = commands_by_section()["On CPUs (tests, CI)"]
    assert {c[0] for c in cpu} == {"smolctl", "accelerate"} and all(is_multi_process(c) for c in cpu)
    assert not any("--device" in c for c in cpu)  # what a user on a CPU machine types
    train, resume = cpu
    out = run(train, tmp_path).stdout
    assert "2 x cpu process(es)" in out and "512 tokens/step" in out and out.count("Done: step") == 1, out
    run_dir = tmp_path / resume[resume.index("--run-dir") + 1]
    first_final = run_dir / "checkpoints" / "first-final"
    (run_dir / "checkpoints" / "final").rename(first_final)
    out = run(resume, tmp_path).stdout
    assert "Resuming from" in out and "2 x cpu process(es)" in out, out
    assert_same_weights(first_final, run_dir / "checkpoints" / "final")


def smolctl_parses(args: list[str]) -> None:
    """Parse a smolctl command line with the real CLI's options, without running it."""
    from typer.main import get_command

    from smolctl.cli import app

    group = get_command(app)
    name, rest = args[0], args[1:]
    command = group.get_command(group.make_context("smolctl", [name]), name)
    assert command is not None, f"no command {name!r}"
    command.make_context(name, list(rest))  # raises on an unknown option or a bad value


GPU_COMMANDS = [shlex.join(c) for s, cmds in commands_by_section().items()
                if s not in ("On CPUs (tests, CI)", *RUN_IN_TEST_DISTRIBUTED) for c in cmds if is_multi_process(c)]


@pytest.mark.parametrize("line", GPU_COMMANDS)
def test_gpu_multi_process_commands_parse(line):
    """Every other multi-process command of the README (they need GPUs and the hub): its
    launcher options, its config file and its smolctl options are real."""
    argv = shlex.split(line.replace("$NODE_RANK", "0"))  # as the shell would on machine 0
    if argv[0] == "accelerate":
        from accelerate.commands.launch import launch_command_parser

        args = launch_command_parser().parse_args(argv[2:])
        assert args.module and args.training_script == "smolctl"
        assert args.config_file is None or (ROOT / args.config_file).is_file(), args.config_file
        smolctl_parses(args.training_script_args)
    else:
        smolctl_parses(argv[1:])


def test_every_multi_process_command_is_covered():
    """Each multi-process command is either run (the CPU section) or parsed (the others)."""
    sections = commands_by_section()
    cmds = [c for cmds in sections.values() for c in cmds if is_multi_process(c)]
    elsewhere = [c for s in RUN_IN_TEST_DISTRIBUTED for c in sections[s]]
    assert [c[0] for c in elsewhere] == ["torchrun", "accelerate", "torchrun"]
    assert len(cmds) == len(GPU_COMMANDS) + 2 + len(elsewhere) and len(GPU_COMMANDS) >= 5


def test_the_layout_section_lists_every_module():
    page = (ROOT / "docs" / "layout.md").read_text()
    layout = page[page.index("## Layout"):]
    start = layout.index("```\nsmolctl/\n") + 4
    block = layout[start:layout.index("```", start)]
    listed = set(re.findall(r"^  (\S+\.py)\s", block, re.MULTILINE))
    modules = {p.name for p in (ROOT / "smolctl").glob("*.py")} - {"__init__.py", "__main__.py"}
    assert listed == modules


SINGLE_PROCESS = [shlex.join(c) for cmds in commands_by_section().values() for c in cmds
                  if c[0] == "smolctl" and not is_multi_process(c)]


@pytest.mark.parametrize("line", SINGLE_PROCESS)
def test_every_single_process_command_parses(line):
    """Every `smolctl` command the pages show (the Quick start's and the CPU section's are also
    run above): the command and each of its options exist, and its values parse."""
    smolctl_parses(shlex.split(line)[1:])


def test_every_command_shown_is_checked():
    """Each command of a page's bash blocks is smolctl's (parsed or run), accelerate's (parsed or
    run), pip's and pytest's (the two set-up commands; .ci/run runs the test one), or feeds one."""
    cmds = [c for cmds in commands_by_section().values() for c in cmds]
    assert {c[0] for c in cmds} <= {"smolctl", "accelerate", "torchrun", "pip", "python", "echo"}, {c[0] for c in cmds}
    assert [c for c in cmds if c[0] == "python"] == [["python", "-m", "pytest", "-q"]]
    assert [c for c in cmds if c[0] == "pip"] == [["pip", "install", "torch==2.13.0", "-e", "."],
                                                  ["pip", "install", "torch==2.13.0", "-e", ".[test]"]]
    assert len(SINGLE_PROCESS) >= 20
