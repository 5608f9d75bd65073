import io
from types import SimpleNamespace

import pytest
from rich.console import Console

import smolctl.dashboard
from smolctl.dashboard import Dashboard, PlainSink, Snapshot, render
from smolctl.metrics import format_event

HEIGHT = 13  # the panel's rows, borders included, whatever it shows


def train_event(step, elapsed=None):
    return {"event": "train", "step": step, "max_steps": 50, "loss": 5.0 - step / 100, "lr": 1e-3, "grad_norm": 1.0,
            "tokens_per_s": 1650.0 + step, "tokens_seen": 1024 * step, "elapsed_s": float(step if elapsed is None else elapsed),
            "mfu": 0.0123, "memory_gb": 1.5, "aside_s": 0.0}


SCRIPT = [  # a run: start, steps, an eval with its progress, a sample of several lines, a save, a skip, the end
    {"event": "start", "step": 0, "max_steps": 50, "run_dir": "runs/x", "text": "Training: " + "a long line " * 20},
    *[train_event(s) for s in range(1, 11)],
    {"event": "phase", "step": 10, "text": "evaluating 0/32,768 tokens…"},
    {"event": "phase", "step": 10, "text": "evaluating 12,288/32,768 tokens…"},
    {"event": "eval", "step": 10, "loss": 4.25, "perplexity": 70.1, "tokens": 32768, "seconds": 12.5},
    {"event": "phase", "step": 10, "text": "sampling 32 tokens…"},
    {"event": "sample", "step": 10, "prompt": "Once upon a time", "seconds": 0.8,
     "text": ", there was\n\n\na [bold]dog[/bold]\tthat ran" + "\n" * 24 + "...." + " and ran" * 30},
    {"event": "phase", "step": 10, "text": "saving checkpoint…"},
    {"event": "checkpoint", "step": 10, "path": "runs/x/checkpoints/step-00000010", "seconds": 2.0},
    *[train_event(s) for s in range(11, 50)],
    {"event": "skip", "step": 50, "bad_steps": 1},
    train_event(50),
    {"event": "end", "step": 50, "text": "Done: step 50", "stopped_by": None},
]


def show(panel, width):
    """The lines of `panel` as a console of `width` x 40 shows it, without styles."""
    console = Console(file=io.StringIO(), width=width, height=40, record=True, color_system=None)
    console.print(panel)
    return console.export_text(styles=False).rstrip("\n").split("\n")


def first(kind, text=""):
    """The index in SCRIPT of the first event of `kind` (whose text starts with `text`)."""
    return next(i for i, e in enumerate(SCRIPT) if e["event"] == kind and e.get("text", "").startswith(text))


STATS = ("loss", "lr"), ("grad norm", "tokens/s"), ("tokens seen", "MFU"), ("memory", "elapsed"), \
    ("skipped", "eval/save")
LINES = "loss history", "checkpoint", "eval", "sample"


@pytest.mark.parametrize("width", [80, 100, 140])
def test_a_scripted_run_keeps_the_panel_shape(width, monkeypatch):
    """One frame per event of a run with an eval and a multi-line sample: each is HEIGHT rows of
    exactly `width` columns inside the border, none blank, and the columns stay where they are."""
    now = [100.0]
    monkeypatch.setattr(smolctl.dashboard, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    dash = Dashboard(Console(file=io.StringIO(), force_terminal=True, width=width, height=40))
    frames = []
    for e in SCRIPT:
        now[0] += 1.0
        dash(e)
        frames.append(show(dash.frame(), width))
    dash.close()
    for lines in frames:
        assert len(lines) == HEIGHT
        assert all(len(line) == width for line in lines)
        assert lines[0][0] == "╭" and lines[-1][0] == "╰"
        body = lines[1:-1]
        assert all(line[0] == "│" and line[-1] == "│" and line[1:-1].strip() for line in body)  # no blank row
        # the columns in place: labels right-aligned in 12 and 9 columns, values at 16 and 55
        for line, labels in zip(body[2:7], STATS):
            assert (line[2:14], line[14:16], line[42:44], line[44:53], line[53:55]) == \
                (labels[0].rjust(12), "  ", "  ", labels[1].rjust(9), "  ")
            assert line[16] != " " and line[55] != " "
        for line, label in zip(body[7:], LINES):
            assert (line[2:14], line[14:16]) == (label.rjust(12), "  ")
    text = ["\n".join(lines) for lines in frames]
    assert "evaluating 12,288/32,768 tokens…" in frames[first("phase", "evaluating 12")][2]  # the phase line
    after = text[first("eval")]
    assert "evaluating" not in after and "eval  step 10: loss 4.2500, perplexity 70.10 (12.5s)" in after
    assert "training" in frames[first("eval")][2]
    sample = next(line for line in frames[-1] if "sample  " in line)
    # one line, its newlines escaped, its brackets shown as they are, cut with "…" at the border
    assert r"step 10: Once upon a time, there was\n\n\na [bold]" in sample and sample.endswith("… │")
    assert "saving checkpoint…" in frames[first("phase", "saving")][2]
    assert "step-00000010 (2.0s)" in text[-1] and "1 non-finite step(s)" in text[-1]
    assert "done" in frames[-1][2] and "step 50/50" in frames[-1][1]
    printed = dash.console.file.getvalue()
    assert "Training: a long line" in printed and "Done: step 50" in printed  # messages above the panel


def test_elapsed_and_eta_keep_moving_between_events():
    """Drawn at a later time with no event in between (an eval that runs for a minute), the panel's
    clocks have moved: elapsed up and ETA down by the time passed; after the end they stop."""
    s = Snapshot()
    s.apply({"event": "start", "step": 0, "max_steps": 50, "run_dir": "runs/x", "text": "Training"}, now=0.0)
    s.apply(train_event(10, elapsed=20.0), now=20.0)  # 2 s a step: 80 s to go
    s.apply({"event": "phase", "step": 10, "text": "evaluating 0/32,768 tokens…"}, now=20.5)

    def shown(now):
        text = "\n".join(show(render(s, now), 100))
        return text.split("ETA ")[1].split()[0], text.split("elapsed  ")[1].split()[0]

    assert shown(20.0) == ("1m20s", "0m20s")
    assert shown(80.0) == ("0m20s", "1m20s")
    assert shown(200.0) == ("0m00s", "3m20s")  # the ETA stays at 0, never negative
    s.apply({"event": "end", "step": 10, "text": "Stopped by SIGINT", "stopped_by": "SIGINT"}, now=30.0)
    assert shown(90.0) == ("0m00s", "0m30s")
    assert "stopped by SIGINT" in show(render(s, 90.0), 100)[2]


def test_the_dashboard_redraws_on_its_own_with_the_current_time(monkeypatch):
    """Rich's refresh thread draws dash.frame(), which reads the clock when drawn: the panel moves
    while the loop is busy (no event comes during an eval or a save)."""
    now = [100.0]
    monkeypatch.setattr(smolctl.dashboard, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    dash = Dashboard(Console(file=io.StringIO(), force_terminal=True, width=100))
    assert dash.live.auto_refresh
    dash({"event": "start", "step": 0, "max_steps": 50, "run_dir": "runs/x", "text": "Training"})
    dash(train_event(1, elapsed=1.0))
    before = "\n".join(show(dash.live.renderable, 100))  # what the thread draws next
    now[0] += 65
    after = "\n".join(show(dash.live.renderable, 100))
    dash.close()
    assert "elapsed  0m01s" in before and "elapsed  1m06s" in after


def test_phases_are_for_live_displays_only(capsys):
    phase = {"event": "phase", "step": 3, "text": "evaluating 0/64 tokens…"}
    assert format_event(phase) is None  # the log file's line: none
    PlainSink()(phase)
    PlainSink()({"event": "eval", "step": 3, "loss": 4.0, "perplexity": 54.6, "tokens": 64, "seconds": 1.5})
    assert capsys.readouterr().out == "step      3 | eval loss 4.0000 | ppl 54.60 | 64 tokens (1.5s)\n"


def test_a_real_run_through_the_dashboard_keeps_its_shape(micro_cfg, tmp_path, corpus):
    """The loop's own events (phases, an eval, a sample whose prompt has newlines) drawn one frame
    each: the same shape as the scripted run's, and the phases shown as they come."""
    from smolctl.train import train

    dash = Dashboard(Console(file=io.StringIO(), force_terminal=True, width=100, height=40))
    frames = []

    def draw(e):
        frames.append((e["event"], show(dash.frame(), 100)))

    train(micro_cfg(max_steps=4, eval_every=2, sample_every=2, eval_data=str(corpus), eval_tokens=64,
                    sample_tokens=4, sample_prompt="Once upon\na time\n"), tmp_path / "r", sinks=[dash, draw])
    dash.close()
    assert {kind for kind, _ in frames} >= {"start", "train", "phase", "eval", "sample", "checkpoint", "end"}
    for _, lines in frames:
        assert len(lines) == HEIGHT and all(len(line) == 100 and line[1:-1].strip() for line in lines)
    phases = [lines[2].strip("│ ") for kind, lines in frames if kind == "phase"]
    assert "evaluating 0/64 tokens…" in phases and "evaluating 32/64 tokens…" in phases
    assert "sampling 4 tokens…" in phases and "saving checkpoint…" in phases
    sample = next(line for line in frames[-1][1] if "sample  " in line)
    assert r"step 4: Once upon\na time\n" in sample


def test_the_title_says_the_world_size_and_how_the_run_started():
    start = {"event": "start", "step": 0, "max_steps": 50, "run_dir": "runs/x", "text": "Training"}
    for fields, title in [({}, "smolctl train · runs/x · 1 process"),
                          ({"world_size": 2, "step": 6, "resumed": "asked"}, "smolctl train · runs/x · 2 processes · "
                                                                             "resumed at step 6"),
                          ({"world_size": 4, "step": 6, "resumed": "auto", "restarts": 1},
                           "smolctl train · runs/x · 4 processes · resumed automatically at step 6 · restart 1")]:
        s = Snapshot()
        s.apply({**start, **fields}, now=0.0)
        assert s.title == title
        assert title in show(render(s, 0.0), 140)[0]
