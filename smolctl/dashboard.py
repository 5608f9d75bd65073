"""The live training dashboard: a metrics sink that draws with Rich.

The loop hands events to `Dashboard.__call__`; `Snapshot` holds the numbers and `render` is a
pure function of it. Off a terminal, `PlainSink` prints one line per event instead.
"""

from __future__ import annotations

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


@dataclass
class Snapshot:
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
    elapsed_s: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    checkpoint: str = "-"
    eval: str = "-"
    sample: str = "-"
    skipped: int = 0
    notes: deque = field(default_factory=lambda: deque(maxlen=3))


def sparkline(values, width: int = 60) -> str:
    values = list(values)[-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * len(SPARK)))] for v in values)


def render(s: Snapshot):
    done = s.step - s.start_step
    spent = time.perf_counter() - s.started
    eta = spent / done * (s.max_steps - s.step) if done else None
    bar = Table.grid(padding=(0, 1))
    bar.add_row(Text(f"step {s.step:,}/{s.max_steps:,}", style="bold"),
                ProgressBar(total=s.max_steps, completed=s.step, width=40),
                Text(f"{100 * s.step / s.max_steps:5.1f}%  ETA {format_seconds(eta) if eta is not None else '-'}"))

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    stats = Table.grid(padding=(0, 2))
    stats.add_column(style="cyan", justify="right")
    stats.add_column()
    stats.add_column(style="cyan", justify="right")
    stats.add_column()
    stats.add_row("loss", f"{num(s.loss, '.4f')} (smoothed {num(s.smoothed, '.4f')})", "lr", num(s.lr, ".2e"))
    stats.add_row("grad norm", num(s.grad_norm, ".3f"), "tokens/s", num(s.tokens_per_s, ",.0f"))
    stats.add_row("tokens seen", f"{s.tokens_seen:,}", "MFU", "-" if s.mfu is None else f"{100 * s.mfu:.1f}%")
    stats.add_row("memory", "-" if s.memory_gb is None else f"{s.memory_gb:.2f} GiB", "elapsed",
                  format_seconds(s.elapsed_s))
    if s.skipped:
        stats.add_row("skipped", f"{s.skipped} non-finite step(s)", "", "")
    stats.add_row("loss history", Text(sparkline(s.history), style="green"), "", "")
    stats.add_row("checkpoint", s.checkpoint, "", "")
    stats.add_row("eval", s.eval, "", "")
    stats.add_row("sample", Text(s.sample, overflow="fold"), "", "")
    parts = [bar, stats] + [Text(n, style="dim") for n in s.notes]
    return Panel(Group(*parts), title=s.title, border_style="blue")


class Dashboard:
    """A sink: updates the snapshot from each event and redraws (4 times a second at most).

    Redraws happen on events, not on a timer: Rich's refresh thread would redraw an unchanged
    panel 4 times a second, taking the GIL and a core from the training step (~2% of a CPU
    step). A "train" event within 0.25 s of the last redraw is drawn with the next event; every
    other event (checkpoint, eval, end...) is drawn at once.
    """

    MIN_INTERVAL_S = 0.25

    def __init__(self, console: Console | None = None):
        self.snap = Snapshot()
        self.console = console or Console()
        self.live = Live(render(self.snap), console=self.console, auto_refresh=False, transient=False)
        self.live.start(refresh=True)
        self.drawn = time.perf_counter()

    def __call__(self, e: Event) -> None:
        s, kind = self.snap, e["event"]
        if kind == "start":
            s.step = s.start_step = e["step"]
            s.max_steps = e["max_steps"]
            s.title = f"smolctl train · {e['run_dir']}"
            s.notes.append(e["text"])
        elif kind == "train":
            s.step, s.loss, s.lr, s.grad_norm = e["step"], e["loss"], e["lr"], e["grad_norm"]
            s.tokens_per_s, s.mfu, s.tokens_seen = e["tokens_per_s"], e.get("mfu"), e["tokens_seen"]
            s.memory_gb, s.elapsed_s = e.get("memory_gb"), e["elapsed_s"]
            s.smoothed = e["loss"] if s.smoothed is None else 0.9 * s.smoothed + 0.1 * e["loss"]
            s.history.append(e["loss"])
        elif kind == "eval":
            s.eval = f"step {e['step']}: loss {e['loss']:.4f}, perplexity {e['perplexity']:.2f}"
        elif kind == "sample":
            s.sample = f"step {e['step']}: {e['prompt']}{e['text']}"
        elif kind == "checkpoint":
            s.checkpoint = f"step {e['step']}: {e['path']} ({e['seconds']:.1f}s)"
        elif kind == "skip":
            s.skipped += 1
        elif kind in ("message", "end"):
            s.notes.append(e["text"])
        now = time.perf_counter()
        if kind != "train" or now - self.drawn >= self.MIN_INTERVAL_S:
            self.live.update(render(s), refresh=True)
            self.drawn = now

    def close(self) -> None:
        self.live.update(render(self.snap), refresh=True)
        self.live.stop()


class PlainSink:
    """Off a terminal: one plain line per event, flushed (for pipes, CI and nohup)."""

    def __call__(self, e: Event) -> None:
        line = format_event(e)
        if line:
            print(line, flush=True)
