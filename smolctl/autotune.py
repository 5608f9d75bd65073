"""What `auto` precision means on this machine, decided by measuring, never by CPU flags.

    choice = choose("cpu", "train", rows=1024)   # Choice(name="bf16", figures=..., cached=True)
    train_precision("cuda", 16 * 2048)           # ("bf16", Choice(...)): Accelerate's mixed_precision
    choice.name, choice.why                      # "bf16", "auto: bf16 matmuls ran 4.1x fp32's here"
    describe(choice)                             # the figures, for --verbose

The model's own matmul shapes (SmolLM2-135M: hidden 576, K/V 192, SwiGLU 1536, vocab 49152) are
timed in fp32, bf16 and fp16 on the device, at the rows the work multiplies at once: a training or
eval step's tokens (capped: a GEMM's speed per FLOP settles by a few hundred rows), or one row
for decoding, where the weights are streamed from memory and half-width types can only win by
reading half the bytes. The whole measurement takes <= 0.5 s (a time budget per dtype) and its
figures -- each dtype's matmul time per token over the model, as tokens/s -- are cached as JSON in
~/.cache/smolctl/autotune.json ($XDG_CACHE_HOME respected), one entry per machine (CPU model and
threads, or GPU name) and torch version: a new torch or another machine measures again.

Rules, from the figures: a half-width dtype must beat fp32 by MARGIN (it costs precision, and a
step spends time outside matmuls that casts only add to); fp16 must also beat bf16 by MARGIN,
and trains only on CUDA (it needs loss scaling, which Accelerate's CPU path lacks).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

# A half-width dtype is chosen only when its matmuls run at least this much faster than fp32's.
# On a CPU with AVX512-BF16 and no AMX, bf16 matmuls measured ~1.5x and a bf16-autocast training
# step 1.5x (issue #21: 264 vs 172 tokens/s); on one with AMX ~4x at 256 rows.
MARGIN = 1.15
BUDGET_S = 0.3  # the whole measurement, all dtypes together (plus one pass each, if that overruns)
MAX_ROWS = 256  # rows timed for a training/eval step: GEMM throughput per FLOP settles by then
HEAD_COLS = 8192  # the LM head is timed on this many vocabulary rows and scaled up (at >1 row)
CACHE_VERSION = 1
# Figures measured while torch's threads got less than this share of the CPU (other jobs running)
# are used for the command at hand but not cached: the next command measures again.
BUSY_SHARE = 0.6


@dataclass(frozen=True)
class Shape:
    """The matmuls of one decoder layer (q, k, v, o, gate, up, down) and the LM head."""
    hidden: int = 576
    kv: int = 192  # num_kv_heads x head_dim
    intermediate: int = 1536
    vocab: int = 49152
    layers: int = 30

    @classmethod
    def of(cls, mcfg) -> Shape:
        return cls(mcfg.hidden_size, mcfg.num_kv_heads * mcfg.head_dim, mcfg.intermediate_size, mcfg.vocab_size,
                   mcfg.num_layers)

    def matmuls(self, rows: int) -> list[tuple[int, int, float]]:
        """(in, out, how many per token over the model) for each distinct weight shape; the head
        sliced to HEAD_COLS columns when many rows are timed (and counted vocab/HEAD_COLS times)."""
        h, n = self.hidden, self.layers
        head = self.vocab if rows == 1 else min(self.vocab, HEAD_COLS)
        return [(h, h, 2 * n), (h, self.kv, 2 * n), (h, self.intermediate, 2 * n), (self.intermediate, h, n),
                (h, head, self.vocab / head)]

    def key(self) -> str:
        return f"h{self.hidden}-kv{self.kv}-i{self.intermediate}-v{self.vocab}-l{self.layers}"


@dataclass
class Choice:
    name: str  # "fp32", "bf16" or "fp16"
    why: str  # a few words, for the messages that say which dtype runs
    figures: dict = field(default_factory=dict)  # dtype -> tokens/s of the matmuls, or "skipped: why"
    where: str = ""  # the cache entry: machine and torch
    rows: int = 1
    cached: bool = False
    measure_s: float = 0.0


def choose(device: str, work: str, rows: int = 1, shape: Shape = Shape()) -> Choice:
    """The dtype `auto` means for `work` ("train", "eval" or "decode") on `device`, from the
    cached figures or a fresh measurement (which is then cached)."""
    rows = 1 if work == "decode" else max(1, min(rows, MAX_ROWS))
    figures, where, cached, took = measured(device, rows, shape)
    speeds = {k: v for k, v in figures.items() if isinstance(v, (int, float)) and k != "cpu_share"}
    name = "fp32"
    for candidate in ("bf16", "fp16"):
        if candidate == "fp16" and work == "train" and not device.startswith("cuda"):
            continue
        if speeds.get(candidate, 0) >= MARGIN * speeds.get(name, float("inf")):
            name = candidate
    fp32 = speeds.get("fp32")
    if name == "fp32":
        best = max((k for k in speeds if k != "fp32"), key=speeds.get, default=None)
        why = (f"auto: fp32, as {best} matmuls ran only {speeds[best] / fp32:.2f}x fp32's here" if best and fp32
               else "auto: fp32, no faster dtype runs here")
    else:
        why = f"auto: {name}, its matmuls ran {speeds[name] / fp32:.1f}x fp32's here"
    return Choice(name, why, figures, where, rows, cached, took)


def train_precision(device: str, tokens: int, shape: Shape = Shape()) -> tuple[str, Choice]:
    """Accelerate's mixed_precision ("no", "bf16" or "fp16") that `auto` means for a training
    micro-step of `tokens` tokens on `device`, and the Choice behind it."""
    choice = choose(device, "train", tokens, shape)
    return {"fp32": "no"}.get(choice.name, choice.name), choice


def describe(choice: Choice) -> str:
    """The figures behind a Choice, one line (what --verbose prints)."""
    parts = [f"{k} {v:,.{0 if v >= 100 else 1}f} tok/s" if isinstance(v, (int, float)) else f"{k} {v}"
             for k, v in choice.figures.items() if k != "cpu_share"]
    how = "cached" if choice.cached else f"measured in {choice.measure_s:.2f} s"
    share = choice.figures.get("cpu_share", 1)
    if not choice.cached and share < BUSY_SHARE:
        how += f", with {share:.0%} of the CPU: a busy machine, so not cached"
    return (f"Precision: {choice.why}. Model matmuls at {choice.rows} row(s) on {choice.where}: "
            f"{', '.join(parts)} ({how}; {cache_file()})")


# -- the cache -------------------------------------------------------------------------------------

def cache_file() -> Path:
    from smolctl.fsutil import cache_dir

    return cache_dir() / "autotune.json"


def measured(device: str, rows: int, shape: Shape) -> tuple[dict, str, bool, float]:
    """(figures, machine key, whether they came from the cache, seconds measuring)."""
    return cached(device, entry(rows, shape), lambda: measure(device, rows, shape), keep=_positive("fp32"))


def entry(rows: int, shape: Shape) -> str:
    """The cache entry's name for the matmul figures at `rows` rows of `shape`."""
    return f"matmuls {shape.key()} rows {rows}"


def cached(device: str, key: str, measure_fn: Callable[[], dict],
           keep: Callable[[dict], bool] = lambda figures: True) -> tuple[dict, str, bool, float]:
    """The figures stored under `key` for this machine and torch, else `measure_fn()`'s (then
    stored, unless taken on a busy machine). `keep`: whether figures are whole enough to use
    again -- figures that fail it are neither stored nor read back (a damaged entry is measured
    over). Returns (figures, machine key, whether they came from the cache, seconds measuring)."""
    where = machine(device)
    entries = _read_cache()
    found = entries.get(where, {}).get(key)
    if isinstance(found, dict) and found and all(isinstance(v, (int, float, str)) for v in found.values()) \
            and keep(found):
        return found, where, True, 0.0
    t = time.perf_counter()
    figures = measure_fn()
    took = time.perf_counter() - t
    if figures.get("cpu_share", 1) < BUSY_SHARE or not keep(figures):  # e.g. taken while other jobs had the cores
        return figures, where, False, took
    entries = _read_cache()  # another process may have added its own entries meanwhile
    entries.setdefault(where, {})[key] = figures
    _write_cache(entries)
    return figures, where, False, took


def _positive(*names: str) -> Callable[[dict], bool]:
    """A `keep` for `cached`: the figures hold each of `names` as a positive number."""
    return lambda figures: all(isinstance(figures.get(n), (int, float)) and figures[n] > 0 for n in names)


def fastest(device: str, key: str, names: tuple[str, ...], candidates: Callable[[], dict[str, Callable[[], object]]],
            budget_s: float = BUDGET_S) -> tuple[str, dict, bool]:
    """The fastest of `names` on this machine: `candidates()` makes, only when there are no cached
    figures, {name: a call doing the same work with each} (e.g. one decode step per engine); each is
    timed, best of what fits its share of `budget_s` after one warm-up call, once per machine and
    torch (cached under `key`, which should name the shapes). Returns (name, figures: name ->
    calls/s, whether they came from the cache)."""
    def measure_all() -> dict:
        sync = _sync(device)
        out = {}
        calls = candidates()
        for name in names:
            end = time.perf_counter() + budget_s / len(names)
            best = _timed(calls[name], sync)  # warm-up
            while True:
                best = min(best, _timed(calls[name], sync))
                if time.perf_counter() >= end:
                    break
            out[name] = round(1 / best, 3)
        return out

    figures, _, from_cache, _ = cached(device, key, measure_all)
    speeds = {k: v for k, v in figures.items() if k in names and isinstance(v, (int, float))}
    if len(speeds) < len(names):  # a cache entry from other candidates under the same key: measure these
        figures, from_cache = measure_all(), False
        speeds = {k: figures[k] for k in names}
    return max(speeds, key=speeds.get), figures, from_cache


def _timed(call: Callable[[], object], sync) -> float:
    t = time.perf_counter()
    call()
    if sync:
        sync()
    return time.perf_counter() - t


def _sync(device: str):
    import torch

    kind = device.split(":")[0]
    return torch.cuda.synchronize if kind == "cuda" else getattr(torch.mps, "synchronize", None) if kind == "mps" else None


def machine(device: str) -> str:
    """What the figures depend on: the device's model (and a CPU's thread count) and torch's version.
    For a CPU this is read without importing torch when it is not loaded yet (a natively decoded
    GGUF never loads it): its version from the package metadata, its threads as torch would take them."""
    if device == "cpu" and "torch" not in sys.modules:
        from importlib.metadata import version

        return f"cpu: {_cpu_model()}, {_cpu_threads()} threads; torch {version('torch')}"
    import torch

    if device.startswith("cuda"):
        dev = torch.device(device)
        what = torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    elif device == "cpu":
        what = f"{_cpu_model()}, {torch.get_num_threads()} threads"
    else:
        what = device
    return f"{device.split(':')[0]}: {what}; torch {torch.__version__}"


def _cpu_threads() -> int:
    """torch.get_num_threads()'s default, without torch: OMP_NUM_THREADS, else the usable cores."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _read_cache() -> dict:
    """The cached entries; a file that is missing, damaged or of another version counts as empty
    (it is rewritten whole after the next measurement)."""
    if not cache_file().is_file():  # absent, or not a file of ours: reading a named pipe would wait forever
        return {}
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("machines"), dict):
        return {}
    return {k: v for k, v in data["machines"].items() if isinstance(v, dict)}


def _write_cache(entries: dict) -> None:
    from smolctl import fsutil
    from smolctl.errors import SmolctlError
    from smolctl.precious import check_output

    # A cache that cannot be written (read-only home, full disk) only means measuring again next
    # time; nor is a link, pipe or device put in its place replaced.
    try:
        check_output(cache_file(), "the autotune cache")
        fsutil.write_text(cache_file(), json.dumps({"version": CACHE_VERSION, "machines": entries}, indent=1) + "\n")
    except (OSError, SmolctlError):
        pass


# -- the measurement ------------------------------------------------------------------------------

def measure(device: str, rows: int, shape: Shape, budget_s: float = BUDGET_S) -> dict:
    """dtype -> tokens/s of the model's matmuls at `rows` rows (forward; backward's are the same
    shapes transposed), or why it was skipped. Each distinct shape is timed once per pass, the
    dtypes in turn (round-robin, so that a neighbour's load falls on all of them alike), until the
    budget is spent; the best time of each (dtype, shape) counts, weighted by its count per token."""
    import torch
    import torch.nn.functional as F

    start, cpu_start = time.perf_counter(), time.process_time()
    end = start + budget_s
    sync = _sync(device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    out: dict = {name: f"skipped: {why}" for name, dt in dtypes.items() if (why := _unsupported(device, dt))}
    counts = [count for _, _, count in shape.matmuls(rows)]
    # filled, not random: randn of the head's 28M values would cost more than timing it
    calls = {name: [partial(F.linear, torch.full((rows, k), 0.01, dtype=dt, device=device),
                            torch.full((n, k), 0.01, dtype=dt, device=device)) for k, n, _ in shape.matmuls(rows)]
             for name, dt in dtypes.items() if name not in out}
    best = {name: [_timed(call, sync) for call in fns] for name, fns in calls.items()}  # warm-up: kernels built
    while True:  # at least one timed pass, then as many as fit the budget
        for name, fns in calls.items():
            best[name] = [min(b, _timed(call, sync)) for b, call in zip(best[name], fns)]
        if time.perf_counter() >= end:
            break
    for name, times in best.items():
        out[name] = float(f"{rows / sum(t * c for t, c in zip(times, counts)):.4g}")  # never rounded to 0
    out = {name: out[name] for name in dtypes}
    if device == "cpu":  # the CPU time torch's threads got, of the wall time they ran: low on a busy machine
        out["cpu_share"] = round((time.process_time() - cpu_start) / (time.perf_counter() - start)
                                 / torch.get_num_threads(), 2)
    return out


def _unsupported(device: str, dtype) -> str | None:
    """Why `dtype` is not worth timing here (a reference kernel is orders of magnitude slower
    and would blow the time budget), or None."""
    import torch

    if dtype == torch.float32:
        return None
    if device.startswith("cuda"):
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return "this GPU has no bf16"
        return None
    if device == "cpu":
        mkldnn = torch.ops.mkldnn
        ok = mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else mkldnn._is_mkldnn_fp16_supported()
        return None if ok else "no native CPU kernels"
    return None if device == "mps" else f"not timed on {device}"
