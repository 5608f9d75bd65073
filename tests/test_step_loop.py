"""The step loop does not stall a GPU: no host sync between log steps. Non-finite steps are skipped
on the device (weights and AdamW's state untouched) and signals are read from a host flag, with the
same events, errors and checkpoints as when the host looked at every step."""

import json
import signal
from contextlib import ExitStack, contextmanager

import pytest
import torch

import smolctl.train
from smolctl import checkpoint as ckpt_io
from smolctl.errors import SmolctlError
from smolctl.loss import CausalLMLoss
from smolctl.run import setup
from smolctl.train import train, train_step

# What makes the host wait for the device: reading a tensor's value (item, tolist, bool(t), float(t),
# int(t), t as an index), copying it to the host (cpu, numpy), or waiting outright (synchronize). On
# a CPU each is free, so they are counted instead of timed.
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@contextmanager
def counting_host_syncs(monkeypatch):
    count = [0]

    def counted(real):
        def wrapper(*args, **kwargs):
            count[0] += 1
            return real(*args, **kwargs)
        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counted(torch.cuda.synchronize))
    yield count
    monkeypatch.undo()


def test_no_host_sync_between_log_steps(micro_cfg, tmp_path, monkeypatch):
    """The host syncs of each step, from the start of its train_step to the start of the next one
    (its look, log row and save included): none except at the log step, 4, after the first step
    (which starts the data pipeline)."""
    at_start = {}  # step about to be taken -> syncs so far

    def step(run, state, lr):
        at_start[state.step + 1] = count[0]
        train_step(run, state, lr)

    monkeypatch.setattr(smolctl.train, "train_step", step)
    cfg = micro_cfg(max_steps=8, log_every=4, save_every=100)
    with counting_host_syncs(monkeypatch) as count:
        train(cfg, tmp_path / "run")
    per_step = {s: at_start[s + 1] - at_start[s] for s in range(1, 8)}
    assert per_step[4] > 0  # the counter sees the log step's reads
    assert {s: n for s, n in per_step.items() if s not in (1, 4)} == dict.fromkeys((2, 3, 5, 6, 7), 0)


def snapshot(run) -> dict[str, torch.Tensor]:
    """The weights and AdamW's state (moments and step count), by parameter name."""
    out = {}
    for name, p in run.model.named_parameters():
        out[name] = p.detach().clone()
        for key, value in run.optimizer.optimizer.state.get(p, {}).items():
            out[f"{name}.{key}"] = value.detach().clone()
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


@pytest.mark.parametrize("bad_first", [False, True], ids=["after-a-good-step", "first-step"])
def test_a_non_finite_step_leaves_weights_and_optimizer_state_unchanged(micro_cfg, tmp_path, monkeypatch,
                                                                         bad_first):
    real = CausalLMLoss.forward
    nan = lambda self, x, y: real(self, x, y) * float("nan")  # noqa: E731
    with ExitStack() as cleanup:
        run, state = setup(micro_cfg(), tmp_path / "run", None, tmp_path / "log", [], False, False, cleanup)
        if not bad_first:
            train_step(run, state, 1e-3)
        before = snapshot(run)
        monkeypatch.setattr(CausalLMLoss, "forward", nan)
        train_step(run, state, 1e-3)
        after = snapshot(run)
        if bad_first:  # AdamW's state exists now, at its initial values: step 0, zero moments
            steps = {k: v for k, v in after.items() if k.endswith(".step")}
            assert steps and all(v.item() == 0 for v in steps.values())
            after = {k: v for k, v in after.items() if k in before}
        assert_same(before, after)
        monkeypatch.setattr(CausalLMLoss, "forward", real)
        train_step(run, state, 1e-3)  # a good step does change them (the comparison can fail)
        changed = snapshot(run)
        assert all(not torch.equal(before[k], changed[k]) for k, _ in run.model.named_parameters())
        assert [bool(f) for f in state.unseen] == ([True] if not bad_first else []) + [False, True]
        assert state.step == 3 - bad_first


def test_skips_and_divergence_do_not_depend_on_how_often_the_host_looks(micro_cfg, tmp_path, monkeypatch):
    """From step 4 on the loss is NaN: the same skip events, and the same error at step 6, whether
    the host looks at every step or only every 4 (at step 4, then at 8)."""
    real, calls = CausalLMLoss.forward, [0]

    def forward(self, x, y):
        calls[0] += 1
        return real(self, x, y) * float("nan") if calls[0] >= 4 else real(self, x, y)

    monkeypatch.setattr(CausalLMLoss, "forward", forward)
    seen = {}
    for log_every in (1, 4):
        calls[0], events = 0, []
        with pytest.raises(SmolctlError) as e:
            train(micro_cfg(max_bad_steps=3, save_every=100, log_every=log_every), tmp_path / "run",
                  sinks=[events.append])  # it fails before its first checkpoint: the directory is undone
        seen[log_every] = (str(e.value), [(r["step"], r["bad_steps"]) for r in events if r["event"] == "skip"])
    assert seen[1] == seen[4]
    assert "training diverged: 3 non-finite steps in a row at step 6" in seen[4][0]
    assert seen[4][1] == [(4, 1), (5, 2), (6, 3)]


def test_a_skipped_step_between_looks_is_left_out_of_the_update_and_the_log(micro_cfg, tmp_path, monkeypatch):
    """Step 2's loss is NaN. Looking every step or every 4 trains the same weights, and the row
    at step 4 averages steps 1, 3 and 4 only."""
    real, calls = CausalLMLoss.forward, [0]

    def forward(self, x, y):
        calls[0] += 1
        return real(self, x, y) * float("nan") if calls[0] == 2 else real(self, x, y)

    monkeypatch.setattr(CausalLMLoss, "forward", forward)
    rows = {}
    for log_every in (1, 4):
        calls[0] = 0
        run = tmp_path / f"run{log_every}"
        train(micro_cfg(max_steps=6, save_every=100, log_every=log_every), run)
        rows[log_every] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    every = {r["step"]: r["loss"] for r in rows[1] if r["event"] == "train"}
    assert sorted(every) == [1, 3, 4, 5, 6]
    sparse = {r["step"]: r["loss"] for r in rows[4] if r["event"] == "train"}
    assert sorted(sparse) == [4, 6]
    assert sparse[4] == pytest.approx((every[1] + every[3] + every[4]) / 3, rel=1e-6)
    assert [r["step"] for r in rows[4] if r["event"] == "skip"] == [2]
    weights = [ckpt_io.load_file(str(tmp_path / f"run{n}" / "checkpoints" / "final" / ckpt_io.WEIGHTS))
               for n in (1, 4)]
    assert_same(*weights)


def test_a_signal_between_log_steps_stops_after_that_step(micro_cfg, tmp_path, monkeypatch):
    """One process reads its signal flag at every step: SIGINT during step 2 of a run that logs
    every 5 steps saves step 2 and stops there, as when the host looked at every step."""
    def step(run, state, lr):
        train_step(run, state, lr)
        if state.step == 2:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(smolctl.train, "train_step", step)
    events = []
    result = train(micro_cfg(max_steps=20, log_every=5, save_every=100), tmp_path / "run", sinks=[events.append])
    assert (result.step, result.stopped_by) == (2, "SIGINT")
    assert result.last_checkpoint == ckpt_io.step_dir(tmp_path / "run", 2)
    ckpt_io.verify(result.last_checkpoint)
    assert [e["event"] for e in events if e["event"] != "start"] == ["phase", "checkpoint", "end"]  # saving, saved
