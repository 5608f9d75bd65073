"""The contract fuzzer: command lines drawn from the CLI's own option space, and damaged artifacts,
each checked against the contract every smolctl command keeps.

What it draws
    Commands and options come from the app itself (`typer.main.get_command`): every registered
    command -- built-in or a plugin's -- and every one of its options and arguments, so a new flag
    is fuzzed without editing this file. Each option gets values of its own type (in range,
    extremes, nan/inf, huge integers), of the wrong type, empty or blank, unicode, non-UTF-8 (an
    undecodable argv byte is a surrogate escape in Python: 'caf\\udce9'), and paths into the
    world below. `chat` also gets stdin lines (messages, /save FILE, /system, multiline blocks).
    A second test damages a copy of an artifact -- truncates it, flips a byte, replaces a JSON
    field with a value of another type, removes a file -- and runs a command that reads it.

The world
    Each example runs in its own copy of a small world: a finished micro training run
    (runs/micro, checkpoints at steps 1 and 2), an HF export (hf/), a GGUF (m.gguf), an imported
    model (models/micro, found as --model micro), a corpus and a config (micro.yaml), the user's
    own files (notes.txt, latin1.txt that is not UTF-8), a symlink, a dangling symlink, a FIFO, a
    read-only directory, and, as root, a 64 KiB tmpfs that is full (full/). $HOME, the cache and
    the temp directory point into the example's own folders.

The contract, after every command
    - the exit code is 0, 1, 2, 130 or 143;
    - a failure prints exactly one `Error:` line on stderr, and no internal error or traceback;
    - every file that existed before and is not the command's declared output keeps its sha256
      (declared outputs: train/resume's run directory and --log-file, export's --out, import's
      destination, the files chat's /save names), and no file appears outside them;
    - no hidden temporary file (a dot-name holding 'partial', 'tmp' or 'old') is left anywhere,
      and no child process;
    - it ends within HANG_S seconds (a FIFO read as a file would block forever).

Cost: commands run in-process (CliRunner), and the values that set how much work a command does
(--max-steps, --batch-size, --tokens, --max-new-tokens, --preset for training...) are drawn small,
so an example takes a fraction of a second.

Budgets
    CI (the default): derandomized -- the same examples every run -- and each test stops drawing
    new examples after its share of a wall-clock budget (27 s, shared out equally among the
    commands, each fuzzed on its own so that every one is, and 20 s; after 15-30 s building the
    world): the file takes about a minute on 2 cores.
    SMOLCTL_FUZZ=long: fresh random examples, 20x as many, an hour and a half's budget, failures
    kept in .hypothesis/examples and replayed first next time:

        SMOLCTL_FUZZ=long python -m pytest -q tests/test_contract_fuzz.py

    SMOLCTL_FUZZ_SURVEY=FILE: every example's command, exit code, error line and contract problems
    are appended to FILE (JSON lines) and the tests pass: a list of the distinct failures, where a
    normal run stops at the first and shrinks it. SMOLCTL_FUZZ_EXAMPLES=N: N examples per test.

A failing example is shrunk and printed ("Falsifying example: ..."); each one found becomes a
regular test in tests/test_fuzz_found.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import MICRO, write_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

LONG = os.environ.get("SMOLCTL_FUZZ", "") == "long"
SURVEY = os.environ.get("SMOLCTL_FUZZ_SURVEY")  # a file: failures are appended there, and the test passes
HANG_S = 20  # one example (a tiny training run included) takes well under 5 s, 10 on a busy machine
# CI: each test's wall-clock budget (the world is built first, in ~20 s); the file stays under 3 minutes.
# The options test's is shared out equally among the commands.
BUDGET_S = {"options": 3600 if LONG else 27, "damage": 1800 if LONG else 20}
EXAMPLES = {"options": 4000 if LONG else 200, "damage": 2000 if LONG else 100}
if os.environ.get("SMOLCTL_FUZZ_EXAMPLES"):  # a quick look: SMOLCTL_FUZZ_EXAMPLES=20
    EXAMPLES = dict.fromkeys(EXAMPLES, int(os.environ["SMOLCTL_FUZZ_EXAMPLES"]))
settings.register_profile("smolctl-ci", deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("smolctl-long", deadline=None, print_blob=True, suppress_health_check=list(HealthCheck),
                          database=DirectoryBasedExampleDatabase(Path(__file__).parents[1] / ".hypothesis/examples"))
PROFILE = settings.get_profile("smolctl-long" if LONG else "smolctl-ci")

EXIT_CODES = {0, 1, 2, 130, 143}
TEMP_WORDS = ("partial", "tmp", "old")
# Where an internal error's traceback goes (reported as such, not as a stray file).
CRASH_LOGS = ("cache/smolctl", "runs/micro/crash-")
# Caches other libraries keep under $XDG_CACHE_HOME (datasets, matplotlib's font list): new files
# there are no output of the command's, and no stray write either.
CACHES = ("cache/", "home/.cache", "home/.config")

# A micro model with a quarter of MICRO's width: its checkpoints (weights + AdamW state) are ~10 MB,
# so copying the world for each example stays cheap.
NANO = {**MICRO, "hidden_size": 16, "intermediate_size": 32}
NANO_YAML = ("model: {preset: tiny, " + ", ".join(f"{k}: {v}" for k, v in NANO.items()) + "}\n"
             "data: corpus.jsonl\nbatch_size: 2\nseq_len: 16\nmax_steps: 2\nsave_every: 1\nlog_every: 1\n"
             "eval_tokens: 32\nmixed_precision: 'no'\ndevice: cpu\nnum_workers: 0\n")


# -- the world ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """The world every example copies; built once (a micro run, its exports, an import)."""
    from smolctl.config import TrainConfig
    from smolctl.export import export
    from smolctl.sources import import_model
    from smolctl.train import train

    root = tmp_path_factory.mktemp("world")
    cwd = os.getcwd()
    os.chdir(root)  # the run's config.yaml names its corpus relative to the world
    try:
        write_corpus(Path("corpus.jsonl"))
        Path("micro.yaml").write_text(NANO_YAML)
        cfg = TrainConfig.from_file("micro.yaml")
        train(cfg, Path("runs/micro"))
        export("runs/micro", "hf", Path("hf"))
        export("runs/micro", "gguf", Path("m.gguf"), dtype="fp16")
        import_model("m.gguf", out=Path("models/micro"))
    finally:
        os.chdir(cwd)
    Path(root / "notes.txt").write_text("the user's own notes\n")
    Path(root / "prompt.txt").write_text("Once upon a time")
    Path(root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1"))
    Path(root / "empty.txt").write_bytes(b"")
    Path(root / "emptydir").mkdir()
    Path(root / "link").symlink_to("corpus.jsonl")
    Path(root / "dangling").symlink_to("nowhere")
    Path(root / "ro").mkdir()
    Path(root / "ro" / "mine.txt").write_text("read-only\n")
    Path(root / "bad.whl").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: a wheel with no .gguf
    for d in ("home", "cache", "full"):
        Path(root / d).mkdir()
    return root


# Paths an option may name, relative to the world (absolute ones are outside it, never written).
WORLD_PATHS = [
    "corpus.jsonl", "micro.yaml", "notes.txt", "prompt.txt", "latin1.txt", "empty.txt", "emptydir", "link",
    "dangling", "fifo", "ro", "ro/mine.txt", "ro/new", "ro/new.gguf", "full", "full/new", "full/new.gguf",
    "bad.whl", "m.gguf", "hf", "hf/config.json", "hf/model.safetensors", "models/micro", "micro", "runs",
    "runs/micro", "runs/micro/config.yaml", "runs/micro/checkpoints", "runs/micro/checkpoints/final",
    "runs/micro/checkpoints/step-00000001", "runs/micro/checkpoints/step-00000001/model.safetensors",
    "runs/micro/checkpoints/final/manifest.json", "runs/new", "new", "new.gguf", "new/deeper/x.gguf", ".",
    "..", "~", "~/x", "nope", "nope.yaml", "nope.gguf", "/dev/null", "/dev/zero", "/proc/self/status",
    "/proc/forbidden/x", "sample", "tiny", "smollm2-135m", "smollm2-instruct", "HuggingFaceTB/SmolLM2-135M",
    "corpus.jsonl/x", "caf\udce9", "caf\udce9.gguf", "ünï code.gguf", "new\nline", "-", "--json",
]


@dataclass
class World:
    root: Path
    tmp: Path
    mounted: bool = False
    hashes: dict = field(default_factory=dict)


def make_world(template: Path, where: Path) -> World:
    root, tmp = where / "w", where / "tmp"
    shutil.copytree(template, root, symlinks=True)
    tmp.mkdir()
    os.mkfifo(root / "fifo")
    (root / "ro").chmod(0o555)
    world = World(root, tmp)
    if os.geteuid() == 0:  # a full disk: a 64 KiB tmpfs, filled up
        world.mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(root / "full")],
                                       capture_output=True).returncode == 0
        if world.mounted:
            try:
                with open(root / "full" / "filler", "wb") as f:
                    f.write(bytes(1 << 20))
            except OSError:
                pass
    return world


def drop_world(world: World) -> None:
    if world.mounted:
        subprocess.run(["umount", "-l", str(world.root / "full")], capture_output=True)
    for dirpath, dirnames, _ in os.walk(world.root.parent):
        for d in dirnames:  # a command may have made a read-only directory; make it removable
            try:
                os.chmod(os.path.join(dirpath, d), 0o755)
            except OSError:
                pass
    shutil.rmtree(world.root.parent, ignore_errors=True)


def snapshot(root: Path, known: dict | None = None) -> dict[str, str]:
    """Every path under `root` (links not followed) -> its sha256, link target, or kind. `known`
    ({path: (size, mtime_ns, sha256)}, the template's) saves hashing the world's fresh copy again:
    copytree keeps sizes and mtimes, and a damaged file has a new mtime."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st_ = os.lstat(p)
            if stat.S_ISLNK(st_.st_mode):
                found[rel] = "link:" + os.readlink(p)
            elif known and known.get(rel, (None, None))[:2] == (st_.st_size, st_.st_mtime_ns):
                found[rel] = known[rel][2]
            elif stat.S_ISREG(st_.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                found[rel] = h.hexdigest()
            elif stat.S_ISDIR(st_.st_mode):
                found[rel] = "dir"
            else:
                found[rel] = "special"
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return found


_template_hashes: dict = {}


def template_hashes(template: Path) -> dict:
    if not _template_hashes:
        for rel, h in snapshot(template).items():
            st_ = os.lstat(template / rel)
            if stat.S_ISREG(st_.st_mode):
                _template_hashes[rel] = (st_.st_size, st_.st_mtime_ns, h)
    return _template_hashes


# -- running one command ------------------------------------------------------------------------

class Hang(BaseException):
    """Raised by the alarm: no `except Exception` in the command can swallow it."""


@dataclass
class Case:
    argv: list[str]
    stdin: str | None = None
    outputs: list[str] = field(default_factory=list)  # declared outputs, relative to the world
    damage: str = ""  # what the damage test did to the world first

    def __str__(self):
        line = "smolctl " + " ".join(repr(a) if (not a or any(c in a for c in " '\"\\")
                                                 or not a.isprintable()) else a for a in self.argv)
        return line + (f"  <<< {self.stdin!r}" if self.stdin else "") + (f"  [{self.damage}]" if self.damage else "")


_failed = {"any": False}  # once an example fails, every later one runs: shrinking must see the same results


def check(case: Case, template: Path, prepare=None) -> None:
    """Run `case` in a fresh world and assert the contract."""
    import psutil

    from smolctl.cli import app

    where = Path(tempfile.mkdtemp(prefix="fuzz-"))
    world = make_world(template, where)
    old_cwd, old_tempdir, old_argv = os.getcwd(), tempfile.tempdir, sys.argv
    before_children = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        if prepare:
            case.damage = prepare(world.root)
        before = snapshot(world.root, template_hashes(template))
        env = {"HOME": str(world.root / "home"), "XDG_CACHE_HOME": str(world.root / "cache"),
               "SMOLCTL_MODELS_DIR": str(world.root / "models"), "TMPDIR": str(world.tmp),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PIP_NO_INDEX": "1", "SMOLCTL_DEBUG": None,
               "COLUMNS": "100"}
        os.chdir(world.root)
        tempfile.tempdir = str(world.tmp)
        sys.argv = ["smolctl", *case.argv]  # as a real process has them (a crash log names the command)
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, HANG_S)
        try:
            stdin = case.stdin.encode("utf-8", "surrogateescape") if case.stdin is not None else None
            result = real_process_runner().invoke(app, case.argv, input=stdin, env=env, catch_exceptions=True)
        except Hang:
            result = None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            os.chdir(old_cwd)
            tempfile.tempdir, sys.argv = old_tempdir, old_argv
        problems = contract(case, world, before, result, before_children)
    finally:
        for p in psutil.Process().children(recursive=True):  # ours alone: started by this example
            if p.pid not in before_children:
                p.kill()
        drop_world(world)
    if SURVEY:  # record every example, and go on drawing: a list of distinct failures, not one shrunk one
        with open(SURVEY, "a", encoding="utf-8") as f:
            f.write(json.dumps({"case": str(case), "problems": problems, "exit": result and result.exit_code,
                                "error": result and next((line for line in result.stderr.splitlines()
                                                          if line.startswith("Error:")), None)},
                               ensure_ascii=True) + "\n")
    elif problems:
        _failed["any"] = True
        raise AssertionError(f"{case}\n  " + "\n  ".join(problems))


def real_process_runner():
    """typer's CliRunner, with the standard streams of a real process: a non-UTF-8 argument (a
    surrogate escape) printed to stdout, or read from stdin, comes out as its byte, as Python does
    on a UTF-8 locale, instead of raising where a real `smolctl` would not."""
    import contextlib

    from typer.testing import CliRunner

    class Runner(CliRunner):
        @contextlib.contextmanager
        def isolation(self, *args, **kwargs):
            with super().isolation(*args, **kwargs) as streams:
                for stream in (sys.stdin, sys.stdout):
                    stream.reconfigure(errors="surrogateescape")
                yield streams

    return Runner()


def _alarm(signum, frame):
    raise Hang()


def contract(case: Case, world: World, before: dict, result, before_children: set) -> list[str]:
    import psutil

    if result is None:
        return [f"hang: still running after {HANG_S} s"]
    problems = []
    out, err = result.stdout, result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        problems.append(f"exception escaped: {type(result.exception).__name__}: {result.exception}")
    if result.exit_code not in EXIT_CODES:
        problems.append(f"exit code {result.exit_code}")
    if "internal error" in err or "Traceback" in out + err:
        problems.append("internal error: " + " | ".join(err.strip().splitlines()[-3:]))
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    if result.exit_code in (1, 2) and len(errors) != 1:
        problems.append(f"exit {result.exit_code} with {len(errors)} 'Error:' lines: {err.strip()[-300:]!r}")
    after = snapshot(world.root)
    declared = [os.path.normpath(os.path.join(world.root, os.path.expanduser(o)) if not o.startswith("~")
                                 else os.path.join(world.root, "home", o[2:])) for o in case.outputs]

    def is_output(rel: str) -> bool:
        p = os.path.join(world.root, rel)
        return any(p == d or p.startswith(d.rstrip("/") + "/") for d in declared)

    def holds_output(rel: str) -> bool:  # a folder made to hold a declared output (export -o new/x.gguf)
        p = os.path.join(world.root, rel)
        return os.path.isdir(p) and any(d.startswith(p.rstrip("/") + "/") and os.path.lexists(d) for d in declared)

    changed = [p for p, h in before.items() if after.get(p) != h and not is_output(p)]
    if changed:
        problems.append(f"changed or removed, not a declared output: {changed[:5]}")
    new = [p for p in after if p not in before and not is_output(p) and not holds_output(p)
           and not p.startswith(CRASH_LOGS + CACHES)]
    if new:
        problems.append(f"new files outside the declared outputs: {new[:5]}")
    hidden = [p for p in list(after) + [os.path.join("$TMPDIR", n) for n in os.listdir(world.tmp)]
              if Path(p).name.startswith(".") and any(w in Path(p).name for w in TEMP_WORDS)]
    if hidden:
        problems.append(f"hidden temporary files left: {hidden[:5]}")
    # what tempfile names by default, or smolctl's own ("torchinductor_root" is torch's cache, on import)
    leftover_tmp = [n for n in os.listdir(world.tmp) if n.startswith(("tmp", "smolctl"))]
    if leftover_tmp:
        problems.append(f"left in $TMPDIR: {leftover_tmp[:5]}")
    children = [p for p in psutil.Process().children(recursive=True) if p.pid not in before_children]
    if children:
        problems.append(f"processes left: {[(p.pid, p.name()) for p in children]}")
    return problems


# -- the option space ---------------------------------------------------------------------------

def commands() -> dict:
    import typer.main

    from smolctl.cli import app

    return dict(typer.main.get_command(app).commands)


# Values that set how much work a command does: drawn small (negative and zero included), never
# large, so that an accepted value costs little. Keyed by the option's name, for every command.
CHEAP_INTS = {"max_steps": 3, "batch_size": 3, "seq_len": 32, "grad_accum": 2, "eval_tokens": 64, "tokens": 64,
              "max_new_tokens": 6, "num_samples": 2, "num_processes": 1, "num_workers": 1, "sample_tokens": 4,
              "shuffle_buffer": 64, "data_streams": 4}
# Options whose other values would make an example slow: what they may be.
CHEAP_VALUES = {"compile": [False], "preset@train": ["tiny"]}
# Used where the draw leaves an option out, so that a command does little work by default
# (a default is left out sometimes, to fuzz the command's own defaults, where those are cheap).
DEFAULTS = {
    "train": {"config": "micro.yaml", "max_steps": "2", "eval_tokens": "32"},
    "resume": {"max_steps": "3", "eval_tokens": "32"},
    "eval": {"model": "runs/micro", "data": "corpus.jsonl", "tokens": "32", "seq_len": "16"},
    "generate": {"model": "runs/micro", "max_new_tokens": "3", "prompt": "Once"},
    "chat": {"model": "runs/micro", "max_new_tokens": "3"},
    "export": {"model": "runs/micro", "out": "new.gguf"},
    "import": {"source": "m.gguf", "out": "new"},
}
# A default left out when the option that stands for it is drawn (generate takes one prompt).
REPLACED_BY = {"prompt": "prompt_file"}
ALWAYS = {"train": {"config", "max_steps", "eval_tokens"}, "resume": {"max_steps", "eval_tokens"},
          "eval": {"tokens"}, "generate": {"max_new_tokens"}, "chat": {"max_new_tokens"}, "import": {"source"}}

JUNK = ["", " ", "abc", "1.5", "-1", "0", "1e309", "nan", "-inf", "--json", "-", "ünïcødé ☃", "caf\udce9",
        "\udcff\udcfe", "a\nb", "x" * 300, "tiny ", "0x10", "１２"]


def text_values():
    surrogate = st.binary(min_size=1, max_size=6).filter(lambda b: b"\0" not in b).map(
        lambda b: b.decode("utf-8", "surrogateescape"))
    plain = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), min_size=1, max_size=10)
    return st.one_of(st.sampled_from(JUNK), surrogate, plain)


def int_values(name: str):
    cap = CHEAP_INTS.get(name)
    extremes = [0, -1, 1, 2, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30, -(2**63), -(2**64)]
    if cap is not None:
        return st.one_of(st.integers(-(2**64), cap), st.sampled_from([0, -1, 1, cap])).map(str)
    return st.one_of(st.sampled_from(extremes), st.integers(-10, 10**6)).map(str)


def float_values():
    return st.one_of(st.sampled_from(["nan", "inf", "-inf", "-0.0", "0", "1e-300", "1e308", "1e309", "-1", "0.5",
                                      "1", "2", "1e-5"]),
                     st.floats(allow_nan=True, allow_infinity=True).map(repr))


def value_type(param):
    """The Python type of a parameter's values, from its annotation (int, float, a Literal's choices,
    str for paths and text); the element type of a list."""
    import typing

    t = param.type_descriptor.annotation
    if typing.get_origin(t) in (list, tuple):
        t = typing.get_args(t)[0]
    if typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def param_values(cmd_name: str, param):
    """Values for one parameter, from its type (and its name, for the costly ones)."""
    import typing

    cheap = CHEAP_VALUES.get(f"{param.name}@{cmd_name}", CHEAP_VALUES.get(param.name))
    typ, junk = value_type(param), text_values()
    if cheap is not None:
        return st.one_of(st.sampled_from(cheap), junk)
    if typing.get_origin(typ) is typing.Literal:
        good = st.sampled_from([str(c) for c in typing.get_args(typ)])
    elif typ is int:
        good = int_values(param.name)
    elif typ is float:
        good = float_values()
    else:  # paths and text: the world first
        good = st.sampled_from(WORLD_PATHS)
    return st.one_of(good, good, good, junk)  # mostly the right type


@st.composite
def command_lines(draw, name: str | None = None):
    """A command line of `name` (None: of a command drawn too)."""
    cmds = commands()
    name = name or draw(st.sampled_from(sorted(cmds)))
    cmd = cmds[name]
    argv, chosen = [name], {}
    positional = []
    params = [p for p in cmd.params if p.name != "help"]
    # A few options at a time: with dozens, one of them is nearly always refused, and the command
    # never gets past its checks.
    picked = set(draw(st.lists(st.sampled_from([p.name for p in params if p.name not in ALWAYS.get(name, ())]),
                               unique=True, max_size=4)))
    for param in params:
        given = param.name in picked
        if getattr(param, "is_flag", False):
            cheap = CHEAP_VALUES.get(param.name, [True, False])
            flags = [*(param.opts if True in cheap else []), *(param.secondary_opts if False in cheap else [])]
            if given and flags:
                argv.append(draw(st.sampled_from(flags)))
            continue
        if not given and param.name in DEFAULTS.get(name, {}) and REPLACED_BY.get(param.name) not in picked:
            if param.name in ALWAYS.get(name, ()) or draw(st.integers(0, 9)) != 5:  # not 0: hypothesis favours it
                value = DEFAULTS[name][param.name]
            else:
                continue
        elif not given:
            continue
        else:
            value = draw(param_values(name, param))
        chosen[param.name] = value
        if param.param_type_name == "argument":
            positional.append(value)
        else:
            values = [value] + (draw(st.lists(param_values(name, param), max_size=1)) if param.multiple else [])
            for v in values:
                argv += [draw(st.sampled_from(param.opts)), v]
    if positional:
        if draw(st.booleans()):
            argv += ["--"]  # an argument that looks like an option stays an argument
        argv += positional
    if draw(st.integers(0, 19)) == 7:  # now and then, an option that does not exist, or a stray argument
        argv.insert(draw(st.integers(1, len(argv))), draw(st.sampled_from(["--bogus", "stray", "-x", "--"])))
    stdin = None
    if name == "chat":
        lines = draw(st.lists(st.sampled_from(
            ["hello", "/save chat.json", "/save notes.txt", "/save ro/c.json", "/save full/c.json", "/save fifo",
             "/save emptydir", "/save nope/deeper/c.json", "/save", "/save caf\udce9.json", "/system be brief",
             "/reset", "/help", "/exit", '"""', "more\\", "//reset", "/bogus"]), max_size=5))
        stdin = "".join(line + "\n" for line in lines)
    return Case(argv, stdin, declared_outputs(name, chosen, stdin))


def declared_outputs(name: str, chosen: dict, stdin: str | None) -> list[str]:
    """What the command is asked to write: anything else must stay as it was."""
    outs = [chosen[k] for k in ("run_dir", "log_file", "out") if isinstance(chosen.get(k), str)]
    if name == "train" and "run_dir" not in chosen:
        outs.append(f"runs/{chosen['run_name']}" if "run_name" in chosen else "runs")
    if name == "resume" and "run_dir" not in chosen:
        outs.append("runs")  # the newest run
        if "from_" in chosen:
            outs.append(str(Path(chosen["from_"]).parent.parent))
    if name == "import" and "out" not in chosen:
        outs.append("models")
    if name == "chat" and stdin:
        outs += [line[len("/save "):] for line in stdin.splitlines() if line.startswith("/save ")]
    return [o for o in outs if o.strip()]


COMMANDS = sorted(commands())


# One test per command, each with its share of the budget and of the examples: a single draw over
# all of them left two commands of nine unfuzzed within CI's budget (export and resume, measured).
@pytest.mark.parametrize("command", COMMANDS)
@settings(PROFILE, max_examples=-(-EXAMPLES["options"] // len(COMMANDS)))
@given(data=st.data())
def test_every_command_keeps_the_contract(command, data, template, fuzz_clock):
    case = data.draw(command_lines(command), label="case")
    if fuzz_clock(f"options {command}", share=len(COMMANDS)):
        return
    check(case, template)


# -- damaged artifacts --------------------------------------------------------------------------

ARTIFACTS = [
    *(f"runs/micro/checkpoints/final/{name}" for name in (
        "model.safetensors", "config.json", "manifest.json", "smolctl.json", "tokenizer.json", "tokenizer_config.json",
        "optimizer.json", "optimizer.safetensors", "data-rank0.json", "rng-rank0.json", "rng-rank0.safetensors")),
    "runs/micro/checkpoints/step-00000001/model.safetensors", "runs/micro/config.yaml", "runs/micro/metrics.jsonl",
    "hf/model.safetensors", "hf/config.json", "hf/tokenizer.json", "hf/tokenizer_config.json",
    "hf/generation_config.json", "m.gguf", "models/micro/model.safetensors", "models/micro/config.json",
    "models/micro/smolctl.json", "models/micro/tokenizer.json", "micro.yaml", "corpus.jsonl",
]
READERS = {
    "runs/micro": [["inspect", "--model", "{}"], ["count-params", "--model", "{}", "--json"],
                   ["eval", "--model", "{}", "--data", "corpus.jsonl", "--tokens", "32", "--seq-len", "16"],
                   ["generate", "Once", "--model", "{}", "-n", "3"],
                   ["export", "--model", "{}", "--out", "new.gguf"], ["export", "--model", "{}", "--out", "new"],
                   ["resume", "--run-dir", "{}", "--max-steps", "3", "--eval-tokens", "32"],
                   ["train", "--config", "micro.yaml", "--init-from", "{}", "--run-dir", "runs/new", "--max-steps",
                    "1", "--eval-tokens", "32"]],
    "corpus": [["train", "--config", "micro.yaml", "--run-dir", "runs/new", "--max-steps", "1", "--eval-tokens", "32"],
               ["eval", "--model", "runs/micro", "--data", "corpus.jsonl", "--tokens", "32", "--seq-len", "16"]],
    "config": [["inspect", "--config", "micro.yaml"],
               ["train", "--config", "micro.yaml", "--run-dir", "runs/new", "--max-steps", "1", "--eval-tokens", "32"]],
}


def readers_of(artifact: str) -> list[tuple[list[str], str]]:
    """Commands that read `artifact`, each with its model argument."""
    if artifact == "corpus.jsonl":
        return [(r, "") for r in READERS["corpus"]]
    if artifact == "micro.yaml":
        return [(r, "") for r in READERS["config"]]
    if artifact.startswith("runs/"):
        model = "runs/micro/checkpoints/final" if "checkpoints" in artifact else "runs/micro"
        models = [model, "runs/micro"]
    else:
        models = [artifact if artifact.endswith(".gguf") else str(Path(artifact).parent)]
        if artifact.startswith("models/"):
            models.append("micro")
    return [(r, m) for r in READERS["runs/micro"] for m in models if r[0] != "resume" or m == "runs/micro"]


@dataclass
class damage:
    """A `prepare` for check(): damage `artifact` in the world's copy; returns what it did. `n` picks
    the length, byte, JSON key (unless `key` names it) or line. (A dataclass: hypothesis prints it.)"""

    artifact: str
    how: str
    n: int
    replacement: object = None
    key: str | None = None

    def __call__(self, root: Path) -> str:
        artifact, how, n, replacement, key = self.artifact, self.how, self.n, self.replacement, self.key
        p = root / artifact
        data = p.read_bytes()
        if how == "truncate":
            cut = n % max(len(data), 1)
            p.write_bytes(data[:cut])
            return f"{artifact} truncated to {cut} of {len(data)} bytes"
        if how == "flip":
            i = n % max(len(data), 1)
            p.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:] if data else b"\xff")
            return f"{artifact}: byte {i} flipped"
        if how == "remove":
            p.unlink()
            return f"{artifact} removed"
        if how == "field":
            try:
                obj = json.loads(data)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and obj:
                name = key or sorted(obj)[n % len(obj)]
                obj[name] = replacement
                p.write_text(json.dumps(obj))
                return f"{artifact}: field {name!r} = {replacement!r}"
            if artifact.endswith((".yaml", ".jsonl")):  # a YAML/JSONL field: the first line's value
                lines = data.decode().splitlines()
                i = n % len(lines)
                if artifact.endswith(".yaml") and ":" in lines[i]:
                    lines[i] = lines[i].split(":")[0] + ": " + json.dumps(replacement)
                else:
                    lines[i] = json.dumps({"text": replacement})
                p.write_text("\n".join(lines) + "\n")
                return f"{artifact}: line {i} = {lines[i]!r}"
            p.write_bytes(data[: len(data) // 2])
            return f"{artifact}: not JSON, truncated to half"
        raise ValueError(how)


OTHER_TYPES = st.sampled_from([None, True, 0, -1, 1.5, 2**64, "x", "", [], [1, "a"], {}, {"a": None}, "caf\udce9"])


@st.composite
def damaged_cases(draw):
    artifact = draw(st.sampled_from(ARTIFACTS))
    how = draw(st.sampled_from(["truncate", "flip", "remove", "field"]))
    n = draw(st.one_of(st.integers(0, 64), st.integers(0, 2**20)))
    argv, model = draw(st.sampled_from(readers_of(artifact)))
    argv = [a.replace("{}", model) for a in argv]
    outs = {"export": ["new.gguf", "new"], "resume": ["runs/micro"], "train": ["runs/new"]}.get(argv[0], [])
    return Case(argv, outputs=outs), damage(artifact, how, n, draw(OTHER_TYPES))


@settings(PROFILE, max_examples=EXAMPLES["damage"])
@given(drawn=damaged_cases())
def test_damaged_artifacts_keep_the_contract(drawn, template, fuzz_clock):
    if fuzz_clock("damage"):
        return
    case, prepare = drawn
    check(case, template, prepare)


@pytest.fixture(scope="module")
def fuzz_clock():
    """fuzz_clock(test, share) -> True once that test's wall-clock budget (BUDGET_S of its first
    word, divided by `share`) is spent (until an example has failed: then every example runs, so
    that shrinking sees the same results)."""
    started = {}

    def spent(test: str, share: int = 1) -> bool:
        t0 = started.setdefault(test, time.monotonic())
        return not _failed["any"] and time.monotonic() - t0 > BUDGET_S[test.split()[0]] / share

    return spent
