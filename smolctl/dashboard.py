"""The live training dashboard: a metrics sink that draws with Rich.

The loop hands events to `Dashboard.__call__`, which folds them into a `Snapshot`; `render` is a
pure function of the snapshot and the time, so that Rich's refresh thread redraws the panel on
its own (2 times a second): elapsed and ETA keep moving through a long eval or save, and the
phase line says what the loop is doing. The panel keeps one height and fixed columns whatever it
shows: every value is one line (a sample's newlines escaped), cut with "…" when too long; the
run's messages are printed above it. Off a terminal, `PlainSink` prints one line per event.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from smolctl.metrics import Event, format_event, format_seconds

SPARK = "▁▂▃▄▅▆▇█"
# The stats grid's columns: label, value, label, value. Fixed, so that nothing moves as values change.
WIDTHS = (12, 26, 9, 12)
BAR_WIDTH = 40


@dataclass
class Snapshot:
    """What the dashboard shows, folded from the events. Times are perf_counter() readings."""
    title: str = "smolctl train"
    step: int = 0
    start_step: int = 0
    max_steps: int = 1
    loss: float | None = None
    smoothed: float | None = None
    history: deque = field(default_factory=lambda: deque(maxlen=60))
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    tokens_seen: int = 0
    memory_gb: float | None = None
    started: float = field(default_factory=time.perf_counter)
    elapsed_s: float | None = None  # the run's training time at the last train row (resumed runs included)
    elapsed_at: float = 0.0  # when that row came
    eta_s: float | None = None  # the time left as estimated at eta_at
    eta_at: float = 0.0
    ended_at: float | None = None  # the clocks stop at the end
    aside_s: float = 0.0  # evals, samples and saves so far
    phase: str | None = None  # what the loop is doing now (None: training)
    checkpoint: str = "-"
    eval: str = "-"
    sample: str = "-"
    skipped: int = 0

    def apply(self, e: Event, now: float) -> str | None:
        """Fold one event in; returns the message to print above the panel, if any."""
        kind = e["event"]
        self.phase = e["text"] if kind == "phase" else None  # a phase lasts until the next event
        if kind == "start":
            self.step = self.start_step = e["step"]
            self.max_steps = e["max_steps"]
            self.title = " · ".join(["smolctl train", e["run_dir"], *how_started(e)])
            self.started = now
        elif kind == "train":
            self.step, self.loss, self.lr, self.grad_norm = e["step"], e["loss"], e["lr"], e["grad_norm"]
            self.tokens_per_s, self.mfu, self.tokens_seen = e["tokens_per_s"], e.get("mfu"), e["tokens_seen"]
            self.memory_gb, self.elapsed_s, self.elapsed_at = e.get("memory_gb"), e["elapsed_s"], now
            self.smoothed = e["loss"] if self.smoothed is None else 0.9 * self.smoothed + 0.1 * e["loss"]
            self.history.append(e["loss"])
            done = self.step - self.start_step
            if done > 0:  # this attempt's pace so far, evals and saves included (they recur)
                self.eta_s, self.eta_at = (now - self.started) / done * (self.max_steps - self.step), now
        elif kind == "eval":
            self.eval = f"step {e['step']}: loss {e['loss']:.4f}, perplexity {e['perplexity']:.2f} ({e['seconds']:.1f}s)"
            self.aside_s += e["seconds"]
        elif kind == "sample":
            self.sample = f"step {e['step']}: {one_line(e['prompt'] + e['text'])} ({e['seconds']:.1f}s)"
            self.aside_s += e["seconds"]
        elif kind == "checkpoint":
            self.checkpoint = f"step {e['step']}: {e['path']} ({e['seconds']:.1f}s)"
            self.aside_s += e["seconds"]
        elif kind == "skip":
            self.skipped += 1
        if kind == "end":
            self.ended_at = now
            self.phase = f"stopped by {e['stopped_by']}" if e.get("stopped_by") else "done"
        return e.get("text") if kind in ("start", "message", "end") else None


def how_started(e: Event) -> list[str]:
    """A start event's world size, and whether the run was resumed (asked, or automatically) or
    restarted by its launcher or scheduler, for the panel's title."""
    world, restarts = e.get("world_size", 1), e.get("restarts", 0)
    out = [f"{world} process{'es' if world > 1 else ''}"]
    if e.get("resumed"):
        out.append(f"resumed {'automatically ' if e['resumed'] == 'auto' else ''}at step {e['step']:,}")
    if restarts:
        out.append(f"restart {restarts}")
    return out


def one_line(text: str) -> str:
    """`text` escaped as Python writes a string (newlines as \\n), without the quotes."""
    return repr(text)[1:-1]


def sparkline(values, width: int = 60) -> str:
    values = list(values)[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in values)


def cell(text: str, style: str = "") -> Text:
    """A value: plain text (never Rich markup), one line, cut with "…" when it does not fit."""
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def render(s: Snapshot, now: float | None = None) -> Panel:
    """The panel for snapshot `s` at time `now` (default: now). Always the same height."""
    now = time.perf_counter() if now is None else now
    if s.ended_at is not None:
        now = min(now, s.ended_at)
    elapsed = now - s.started if s.elapsed_s is None else s.elapsed_s + now - s.elapsed_at
    eta = None if s.eta_s is None else max(0.0, s.eta_s - (now - s.eta_at))
    if s.ended_at is not None:
        eta = 0.0

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    bar = Table.grid(padding=(0, 1))
    bar.add_column(width=len(f"step {s.max_steps:,}/{s.max_steps:,}"), no_wrap=True)
    bar.add_column(width=BAR_WIDTH)
    bar.add_column(no_wrap=True)
    bar.add_row(cell(f"step {s.step:,}/{s.max_steps:,}", "bold"),
                ProgressBar(total=s.max_steps, completed=s.step, width=BAR_WIDTH),
                cell(f"{100 * s.step / s.max_steps:5.1f}%  ETA {'-' if eta is None else format_seconds(eta)}"))
    phase = s.phase or ("training" if s.step < s.max_steps else "finishing…")

    stats = Table.grid(padding=(0, 2))
    for i, width in enumerate(WIDTHS):
        stats.add_column(width=width, no_wrap=True, justify="right" if i % 2 == 0 else "left",
                         style="cyan" if i % 2 == 0 else "")
    stats.add_row("loss", cell(f"{num(s.loss, '.4f')} (smoothed {num(s.smoothed, '.4f')})"),
                  "lr", cell(num(s.lr, ".2e")))
    stats.add_row("grad norm", cell(num(s.grad_norm, ".3f")), "tokens/s", cell(num(s.tokens_per_s, ",.0f")))
    stats.add_row("tokens seen", cell(f"{s.tokens_seen:,}"), "MFU",
                  cell("-" if s.mfu is None else f"{100 * s.mfu:.1f}%"))
    stats.add_row("memory", cell("-" if s.memory_gb is None else f"{s.memory_gb:.2f} GiB"),
                  "elapsed", cell(format_seconds(elapsed)))
    stats.add_row("skipped", cell(f"{s.skipped} non-finite step(s)" if s.skipped else "none"),
                  "eval/save", cell(format_seconds(s.aside_s)))

    lines = Table.grid(padding=(0, 2), expand=True)  # values as wide as the panel lets them be
    lines.add_column(width=WIDTHS[0], no_wrap=True, justify="right", style="cyan")
    lines.add_column(ratio=1, no_wrap=True)
    lines.add_row("loss history", cell(sparkline(s.history), "green"))
    lines.add_row("checkpoint", cell(s.checkpoint))
    lines.add_row("eval", cell(s.eval))
    lines.add_row("sample", cell(s.sample))
    return Panel(Group(bar, cell(phase, "yellow"), stats, lines), title=Text(s.title), border_style="blue")


class Dashboard:
    """A sink: folds each event into the snapshot; Rich's refresh thread draws it.

    The thread redraws 2 times a second, whether or not events come, so that the clocks move
    through an eval or a save: a redraw takes a few milliseconds (7 on a busy 2-core CPU), about
    1% of a core. The lock keeps the thread from reading the snapshot while an event changes it;
    nothing that takes Rich's own lock runs under it (a deadlock).
    """

    REFRESH_PER_SECOND = 2

    def __init__(self, console: Console | None = None):
        self.snap = Snapshot()
        self.lock = threading.Lock()
        self.console = console or Console()
        self.live = Live(console=self.console, get_renderable=self.frame, auto_refresh=True,
                         refresh_per_second=self.REFRESH_PER_SECOND, transient=False)
        self.live.start(refresh=True)

    def frame(self) -> Panel:
        with self.lock:
            return render(self.snap)

    def __call__(self, e: Event) -> None:
        with self.lock:
            message = self.snap.apply(e, time.perf_counter())
        if message:
            self.console.print(Text(message, style="dim"))  # above the panel

    def close(self) -> None:
        self.live.stop()  # draws the last frame


class PlainSink:
    """Off a terminal: one plain line per event, flushed (for pipes, CI and nohup); phases, which
    only a live display needs, print nothing."""

    def __call__(self, e: Event) -> None:
        line = format_event(e)
        if line:
            print(line, flush=True)
