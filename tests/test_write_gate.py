"""One write gate: only smolctl/fsutil.py opens files for writing, renames or deletes.

Read from the source, every module of the package: a call that writes, truncates, appends,
renames, replaces or deletes a path anywhere but in fsutil fails this test. Library writers that
fill a temporary directory fsutil made (transformers' save_pretrained, gguf's writer, matplotlib)
are not calls of this kind; what they write is published by fsutil.
"""

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import MICRO, train_micro, write_corpus

from smolctl import fsutil

PKG = Path(__file__).resolve().parent.parent / "smolctl"
GATE = PKG / "fsutil.py"
WRITE_MODES = set("wax+")
DELETERS = {"unlink", "rmtree", "remove", "removedirs", "rmdir"}
MOVERS = {"rename", "replace", "renames", "move"}
WRITERS = {"write_text", "write_bytes"}


def _const(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def violations(source: str) -> list[str]:
    """What in `source` writes, renames or deletes a path, as 'line: call'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
        owner = fn.value.id if isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) else None
        method = isinstance(fn, ast.Attribute)
        if owner in ("fsutil", "dataclasses"):  # the gate itself; dataclasses.replace copies an object
            continue
        if name == "open":  # builtin open(path, mode) or Path.open(mode): w/a/x/+ writes
            given = node.args[1:2] if not method else node.args[:1]
            given += [k.value for k in node.keywords if k.arg == "mode"]
            mode = _const(given[0]) if given else None
            unreadable = given and mode is None and not method  # open(p, m): we cannot tell
            if owner == "os" or unreadable or (mode is not None and WRITE_MODES & set(mode)):
                found.append(f"{node.lineno}: {ast.unparse(fn)}(...)")
        elif name in WRITERS or name in DELETERS or name == "truncate":
            if not (name == "remove" and owner not in ("os", "shutil")):  # list.remove, set.remove
                found.append(f"{node.lineno}: {ast.unparse(fn)}(...)")
        elif name in MOVERS:
            # os.rename/os.replace/shutil.move, or Path.rename(target)/Path.replace(target): one
            # positional argument; str.replace takes two, a dataclass's or signature's keywords.
            if owner in ("os", "shutil") or (method and len(node.args) == 1 and not node.keywords):
                found.append(f"{node.lineno}: {ast.unparse(fn)}(...)")
    return found


@pytest.mark.parametrize("snippet", [
    "open(p, 'w')", "open(p, 'ab')", "open(p, mode='x')", "open(p, 'r+')", "p.open('w')", "open(p, m)",
    "os.open(p, flags)", "p.write_text('')", "p.write_bytes(b'')", "os.unlink(p)", "p.unlink()",
    "shutil.rmtree(p)", "os.remove(p)", "p.rmdir()", "os.rename(a, b)", "os.replace(a, b)",
    "p.rename(q)", "p.replace(q)", "shutil.move(a, b)", "os.truncate(p, 0)", "f.truncate()",
])
def test_the_scanner_sees_every_kind_of_write(snippet):
    assert violations(f"import os, shutil\n{snippet}\n"), snippet


@pytest.mark.parametrize("snippet", [
    "open(p)", "open(p, 'rb')", "p.open()", "p.read_text()", "'a-b'.replace('-', '_')",
    "dataclasses.replace(cfg, lr=1)", "dataclasses.replace(cfg)", "sig.replace(parameters=[])",
    "items.remove(x)", "spec.open(rank, world)", "fsutil.write_text(p, '')",
])
def test_the_scanner_lets_reads_and_lookalikes_through(snippet):
    assert not violations(snippet), snippet


def test_only_fsutil_writes_renames_or_deletes():
    offenders = {str(path.relative_to(PKG.parent)): found for path in sorted(PKG.rglob("*.py")) if path != GATE
                 and (found := violations(path.read_text()))}
    assert not offenders, f"write through smolctl.fsutil instead: {offenders}"


# -- the gate at work: the examples of issue 20, each a category --------------------------------
# Every case: one `Error:` line, and every file that was there has the same bytes afterwards.

def snapshot(root: Path) -> dict[str, bytes | str | None]:
    """Every path under `root` (links not followed): a file's bytes, a link's target, None for a directory."""
    out = {}
    for here, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(here) / name
            out[str(p.relative_to(root))] = (f"-> {os.readlink(p)}" if p.is_symlink() else
                                             None if p.is_dir() else p.read_bytes() if p.is_file() else "special")
    return out


def refused(result, *words: str) -> str:
    assert result.exit_code in (1, 2), result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1, result.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished micro run (step-2, final at 4)."""
    return train_micro(tmp_path_factory.mktemp("finished")).parent


@pytest.fixture
def world(finished, tmp_path):
    """A copy of the finished run, its corpus, and a model yaml to train with, in the test's directory."""
    shutil.copytree(finished / "run", tmp_path / "other")
    write_corpus(tmp_path / "corpus.jsonl")
    model = ", ".join(f"{k}: {v}" for k, v in MICRO.items())
    (tmp_path / "micro.yaml").write_text(
        f"model: {{preset: tiny, {model}}}\ndata: corpus.jsonl\nbatch_size: 2\nseq_len: 16\n"
        "mixed_precision: 'no'\ndevice: cpu\nnum_workers: 0\nmax_steps: 2\nsave_every: 2\n")
    return tmp_path


TRAIN = ("train", "--config", "micro.yaml", "--no-dashboard")


@pytest.mark.parametrize("make, words", [
    (lambda d: d / "other" / "checkpoints" / "final" / "model.safetensors", ("lies inside a checkpoint",)),
    (lambda d: d / "other" / "train.log", ("lies inside a training run",)),  # another run's own log
    (lambda d: (d / "notes.txt").write_text("my notes\nline two\n") and d / "notes.txt", ("not a smolctl log",)),
    (lambda d: (d / "link.log").symlink_to(d / "real.log") or d / "link.log", ("symbolic link",)),
    (lambda d: os.mkfifo(d / "fifo") or d / "fifo", ("named pipe",)),
    (lambda d: d / "other", ("is a directory",)),
], ids=["into-a-checkpoint", "another-runs-log", "a-users-file", "a-symlink", "a-fifo", "a-directory"])
def test_a_log_file_smolctl_did_not_make_is_never_written(cli, world, make, words):
    log = make(world)
    before = snapshot(world)
    refused(cli(*TRAIN, "--run-dir", "new-run", "--log-file", log), *words)
    assert snapshot(world) == before


def test_a_log_smolctl_wrote_is_appended_to_and_its_lock_names_the_writer(cli, world):
    r = cli(*TRAIN, "--run-dir", "a", "--log-file", "logs/shared.log")
    assert r.exit_code == 0, r.output
    lines = (world / "logs" / "shared.log").read_text().splitlines()
    r = cli(*TRAIN, "--run-dir", "b", "--log-file", "logs/shared.log")
    assert r.exit_code == 0, r.output
    assert (world / "logs" / "shared.log").read_text().splitlines()[:len(lines)] == lines
    before = snapshot(world)
    with fsutil.hold(world / "logs" / "shared.log"):  # another process writing it
        refused(cli(*TRAIN, "--run-dir", "c", "--log-file", "logs/shared.log"), f"in use by process {os.getpid()}",
                "the log file")
    assert snapshot(world) == before


def test_a_directory_with_a_users_config_is_not_a_run(cli, world):
    (world / "proj").mkdir()
    (world / "proj" / "config.yaml").write_text("my: project\n")
    before = snapshot(world)
    refused(cli(*TRAIN, "--run-dir", "proj"), "not a smolctl run", "config.yaml")
    assert snapshot(world) == before


def test_damaged_checkpoints_count_as_checkpoints(cli, world):
    shutil.rmtree(world / "other" / "checkpoints" / "step-00000002")
    (world / "other" / "checkpoints" / "final" / "smolctl.json").write_text("{damaged")
    before = snapshot(world)
    refused(cli(*TRAIN, "--run-dir", "other"), "already has checkpoints", "--overwrite")
    assert snapshot(world) == before


def test_overwrite_never_deletes_the_weights_it_starts_from(cli, world):
    before = snapshot(world)
    refused(cli(*TRAIN, "--run-dir", "other", "--overwrite", "--init-from", "other/checkpoints/final"),
            "lies inside --run-dir")
    assert snapshot(world) == before


@pytest.fixture(scope="module")
def gguf_export(finished):
    from smolctl.export import export

    return export(finished / "run", "gguf", finished / "exported.gguf").path


def test_force_replaces_only_exports_smolctl_wrote(cli, world, gguf_export):
    (world / "webapp" / "src").mkdir(parents=True)
    (world / "webapp" / "config.json").write_text("{}")
    (world / "webapp" / "src" / "main.py").write_text("print('hi')\n")
    (world / "downloaded.gguf").write_bytes(b"GGUF" + bytes(64))  # a GGUF from elsewhere
    shutil.copy(gguf_export, world / "mine.gguf")
    before = snapshot(world)
    refused(cli("export", "--model", "other", "--format", "hf", "--out", "webapp", "--force"), "not a Hugging Face export")
    refused(cli("export", "--model", "other", "--out", "downloaded.gguf", "--force"), "not a GGUF file written by smolctl")
    assert snapshot(world) == before
    r = cli("export", "--model", "other", "--out", "mine.gguf", "--force")
    assert r.exit_code == 0, r.output
    r = cli("export", "--model", "other", "--format", "hf", "--out", "hf")
    assert r.exit_code == 0, r.output
    r = cli("export", "--model", "other", "--format", "hf", "--out", "hf", "--force")  # its own: replaced
    assert r.exit_code == 0, r.output


def test_a_second_writer_of_an_export_is_refused_naming_the_first(cli, world):
    with fsutil.hold(world / "same.gguf"):
        refused(cli("export", "--model", "other", "--out", "same.gguf"), f"in use by process {os.getpid()}")
    assert not (world / "same.gguf").exists() and not (world / ".same.gguf.lock").exists()


def test_what_a_killed_export_left_is_removed_by_the_next_one(cli, world):
    stale = world / ".model.gguf.partial-4242-k1llme9x"  # fsutil's name for model.gguf's temporary
    stale.write_bytes(b"half a model")
    r = cli("export", "--model", "other", "--out", "model.gguf")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in world.iterdir() if p.name.startswith(".")) == []


def test_an_old_version_set_aside_by_a_killed_publish_is_put_back(tmp_path):
    target = tmp_path / "hf"
    aside = tmp_path / ".hf.old-4242-a1b2c3"  # killed between publish's two renames
    aside.mkdir()
    (aside / "config.json").write_text("{}")
    with fsutil.hold(target):
        pass
    assert (target / "config.json").read_text() == "{}" and not aside.exists()


def test_save_writes_only_new_files_or_its_own_transcripts(world):
    from smolctl.chat import Conversation
    from smolctl.errors import SmolctlError
    from smolctl.tokenizer import load_tokenizer

    conv = Conversation(load_tokenizer(), context_length=256, reserve=16)
    conv.add_user("hi")
    (world / "notes.txt").write_text("mine")
    (world / "link.json").symlink_to(world / "notes.txt")
    before = snapshot(world)
    for target in ("other/checkpoints/final/tokenizer_config.json", "other/config.yaml", "notes.txt", "link.json"):
        with pytest.raises(SmolctlError):
            conv.save(world / target)
    assert snapshot(world) == before
    conv.save(world / "chat.json")
    conv.add_assistant("hello")
    conv.save(world / "chat.json")  # its own: replaced
    assert json.loads((world / "chat.json").read_text())["messages"][-1]["content"] == "hello"


def test_a_pinned_checkpoint_outlives_pruning(world):
    from smolctl import checkpoint

    step2 = world / "other" / "checkpoints" / "step-00000002"
    shutil.copytree(step2, world / "other" / "checkpoints" / "step-00000003")  # a newer one, so step 2 goes
    with fsutil.pinned(step2):  # eval, generate or export reading it
        checkpoint.prune(world / "other", keep_last=1)
        assert step2.is_dir()
    checkpoint.prune(world / "other", keep_last=1)
    assert not step2.exists()


def test_readers_of_a_live_run_never_lose_their_checkpoint_to_pruning(world):
    """A real run saving every step and keeping one checkpoint, read over and over meanwhile:
    every read loads a complete checkpoint (the one it verified is not deleted under it)."""
    import subprocess
    import sys
    import time

    from smolctl import sources

    proc = subprocess.Popen([sys.executable, "-m", "smolctl", *TRAIN, "--run-dir", "live", "--max-steps", "400",
                             "--save-every", "1", "--keep-last", "1", "--eval-every", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list((world / "live" / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        steps = set()
        while proc.poll() is None and len(steps) < 6:
            steps.add(sources.load(str(world / "live")).path.name)
    finally:
        proc.kill()
        err = proc.communicate()[1]
    assert len(steps) >= 5, (steps, err)  # it did read while the run saved and pruned


def test_a_users_file_named_like_a_lock_is_neither_used_nor_removed(tmp_path):
    from smolctl.errors import SmolctlError

    (tmp_path / ".x.gguf.lock").write_text("my notes")
    with pytest.raises(SmolctlError, match="not a lock file smolctl wrote"):
        with fsutil.hold(tmp_path / "x.gguf"):
            pass
    assert (tmp_path / ".x.gguf.lock").read_text() == "my notes"
    (tmp_path / ".y.lock").write_text("4242\n")  # what a killed writer left: its PID
    with fsutil.hold(tmp_path / "y"):
        pass
    assert not (tmp_path / ".y.lock").exists()
