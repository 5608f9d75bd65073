import io
from types import SimpleNamespace

from rich.console import Console

import smolctl.dashboard
from smolctl.dashboard import Dashboard


def train_event(step):
    return {"event": "train", "step": step, "max_steps": 50, "loss": 5.0 - step / 100, "lr": 1e-3, "grad_norm": 1.0,
            "tokens_per_s": 100.0, "tokens_seen": 10 * step, "elapsed_s": float(step)}


def test_dashboard_redraws_on_events_at_most_4_times_a_second_and_shows_the_last_state(monkeypatch):
    now = [100.0]  # the dashboard's clock, moved by hand: the test never depends on how fast it runs
    monkeypatch.setattr(smolctl.dashboard, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    dash = Dashboard(console)
    dash({"event": "start", "step": 0, "max_steps": 50, "run_dir": "runs/x", "text": "Training"})
    for step in range(1, 41):  # 40 steps within 0.2 s: none is drawn at once
        now[0] += 0.005
        dash(train_event(step))
    drawn = console.file.getvalue()
    assert "step 0/50" in drawn and "step 1/50" not in drawn and "step 40/50" not in drawn
    dash({"event": "checkpoint", "step": 40, "path": "runs/x/checkpoints/step-00000040", "seconds": 0.5})
    assert "step 40/50" in console.file.getvalue()  # any other event draws at once, with the latest numbers
    now[0] += 0.1
    dash(train_event(41))
    assert "step 41/50" not in console.file.getvalue()  # 0.1 s after the last redraw
    now[0] += 0.15
    dash(train_event(42))
    assert "step 42/50" in console.file.getvalue()  # 0.25 s after it: drawn
    dash(train_event(43))
    dash.close()
    assert "step 43/50" in console.file.getvalue()  # and closing draws the final state
