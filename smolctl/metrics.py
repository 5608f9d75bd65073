"""The metrics stream: the training loop emits events, sinks consume them.

An event is a flat dict with an "event" key: "start", "train" (step, loss, lr, grad_norm,
tokens_seen, tokens_per_s, elapsed_s, ...), "eval", "sample", "checkpoint", "skip", "message",
"end", and "phase". The loop never knows who listens; these sinks (and the CLI's Rich dashboard) do.

Evals, samples and saves are timed on their own (their events carry `seconds`); a train row's
tokens_per_s and mfu count its steps' time only, and its `aside_s` is the time it left out. A
"phase" event's text says what the loop is doing until the next event of another kind
("evaluating 12,288/32,768 tokens…"): it is for live displays, not for the files.

    sinks = [JsonlSink(run_dir / "metrics.jsonl"), LogFileSink(run_dir / "train.log")]
    for sink in sinks: sink(event)
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

from smolctl import fsutil, precious
from smolctl.errors import SmolctlError
from smolctl.metadata import is_number

Event = dict[str, Any]
Sink = Callable[[Event], None]


def format_event(e: Event) -> str | None:
    """One human-readable line per event (the log file and the plain console share it)."""
    kind = e["event"]
    if kind == "train":
        parts = [f"step {e['step']:>6}/{e['max_steps']}", f"loss {e['loss']:.4f}", f"lr {e['lr']:.2e}",
                 f"grad_norm {e['grad_norm']:.3f}", f"tok/s {e['tokens_per_s']:,.0f}",
                 f"tokens {e['tokens_seen']:,}", f"elapsed {format_seconds(e['elapsed_s'])}"]
        if e.get("mfu") is not None:
            parts.insert(5, f"mfu {100 * e['mfu']:.1f}%")
        return " | ".join(parts)
    if kind == "eval":
        return (f"step {e['step']:>6} | eval loss {e['loss']:.4f} | ppl {e['perplexity']:.2f} | {e['tokens']:,} tokens"
                f" ({e['seconds']:.1f}s)")
    if kind == "sample":
        return f"step {e['step']:>6} | sample: {e['prompt']!r} -> {e['text']!r} ({e['seconds']:.1f}s)"
    if kind == "checkpoint":
        return f"step {e['step']:>6} | saved {e['path']} ({e['seconds']:.1f}s)"
    if kind == "skip":
        return f"step {e['step']:>6} | skipped: non-finite loss or grad norm ({e['bad_steps']} in a row)"
    if kind in ("start", "message", "end"):
        return e.get("text")
    return None


def format_seconds(s: float) -> str:
    s = int(s)
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class JsonlSink:
    """metrics.jsonl: one JSON object per event, flushed as it comes (a crash loses nothing)."""

    def __init__(self, path: Path):
        self.f = fsutil.open_file(path, "a", encoding="utf-8")

    def __call__(self, e: Event) -> None:
        if e["event"] == "phase":
            return
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in e.items()}
        self.f.write(json.dumps({"time": round(time.time(), 3), **row}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class LogFileSink:
    """RUN/train.log (or --log-file): the human-readable line of each event, with a timestamp."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = fsutil.open_file(path, "a", encoding="utf-8")

    def __call__(self, e: Event) -> None:
        line = format_event(e)
        if line:  # one line per event, always: that is what makes the file recognisably ours
            self.f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(line.splitlines())}\n")
            self.f.flush()

    def close(self) -> None:
        self.f.close()


class TrackerSink:
    """TensorBoard / W&B through Accelerate's trackers (numbers only)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def __call__(self, e: Event) -> None:
        if e["event"] in ("train", "eval"):
            values = {f"{e['event']}/{k}": v for k, v in e.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(values, step=e["step"])

    def close(self) -> None:
        self.accelerator.end_training()


_LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")  # LogFileSink's timestamp


def is_log(path: Path) -> bool:
    """Whether `path` is a log smolctl wrote (empty, or every whole line LogFileSink's): the only
    kind of existing file a run appends to, and truncates when it resumes."""
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.endswith(b"\n") and not _LOG_LINE.match(line.decode("utf-8", "replace")):
                    return False
    except OSError:
        return False
    return True


def check_log_file(path: Path, run_dir: Path) -> None:
    """Before anything is created: a log file is a new file, or a log smolctl wrote, outside any
    run, checkpoint or model but this run; never a link, FIFO or device, never a user's file."""
    precious.check_output(path, "--log-file", own=run_dir)
    if path.is_file() and path.stat().st_size and not is_log(path):
        raise SmolctlError(f"--log-file {path} is not a smolctl log (smolctl writes only to a new file or "
                           f"a log of its own)", hint="Pass a new file, or a log an earlier run wrote")


def truncate_after(path: Path, step: int) -> None:
    """Drop what a run logged after `step` (it is about to be redone by a resume), atomically.

    metrics.jsonl rows carry "step"; log lines carry "step N". Lines without a step stay. A last
    line without its newline is the torn write of a killed process: dropped, so that the next
    row doesn't glue onto it (and the file stays one JSON object per line).
    """
    if not path.is_file() or not path.stat().st_size:
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        s = _step_of(line)
        if s is not None and s > step:
            break
        kept.append(line)
    fsutil.write_text(path, "".join(kept))


def _step_of(line: str) -> int | None:
    if line.startswith("{"):
        try:
            return json.loads(line).get("step")
        except json.JSONDecodeError:
            return None
    parts = line.split(" step ", 1)
    if len(parts) == 2:
        token = parts[1].strip().split(" ", 1)[0].split("/", 1)[0]
        return int(token) if is_number(token) else None
    return None


def plot_loss(metrics: Path, out: Path) -> Path | None:
    """A PNG loss curve (train, and eval when present) from metrics.jsonl; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in map(_row, metrics.read_bytes().splitlines()) if r is not None]
    train = [(r["step"], r["loss"]) for r in rows if r["event"] == "train" and isinstance(r.get("loss"), (int, float))]
    evals = [(r["step"], r["loss"]) for r in rows if r["event"] == "eval" and isinstance(r.get("loss"), (int, float))]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with fsutil.atomic_file(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return out


def _row(line: bytes) -> dict | None:
    """One metrics.jsonl row for the plot; None for a line someone damaged (the plot skips it)."""
    try:
        row = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) and "event" in row else None
