"""Shared pieces of the benchmark scripts: machine facts, the matmul peak, timing, result rows.

Every benchmark reports rows; a row compares smolctl's number with a baseline measured in the same
run (the machine is shared and noisy: ratios from one run are what count, not absolute numbers).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PYTHON = sys.executable


@dataclass
class Row:
    """One line of the results table: `value` (smolctl's) against `baseline_value`, same unit.

    `ratio` is value / baseline_value, unless `paired` gives it: the median of per-step ratios of
    two interleaved loops, which cancels the drift that both share (see bench_train.py). `target`
    bounds it: a minimum (throughputs: "at least 1.3x the plain loop") or, with `lower_is_better`
    (times), a maximum ("at most 1.5x").
    """

    section: str
    name: str
    value: float | None
    unit: str
    baseline: str = ""
    baseline_value: float | None = None
    lower_is_better: bool = False
    target: float | None = None
    note: str = ""
    paired: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.paired is not None:
            return self.paired
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio <= self.target if self.lower_is_better else self.ratio >= self.target

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "isa": [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags],
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "os": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def matmul_peak(n: int = 4096, repeats: int = 5) -> dict[str, float]:
    """The machine's measured matmul throughput (GFLOP/s, best of `repeats`) for fp32 and bf16:
    the denominator of the CPU MFU figures."""
    import torch

    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm up (thread pool, oneDNN kernels)
        best = min(timed(lambda: a @ b) for _ in range(repeats))
        out[name] = 2 * n**3 / best / 1e9
    return out


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs) -> float:
    return statistics.median(xs)


WORDS = ("the a model learns tokens from text every step small language data stream block loss gravity "
         "pulls apples toward earth while students read about plants cells rivers stars history music "
         "numbers and the quick brown fox jumps over lazy dogs in warm summer light because water flows "
         "down hills into wide seas where fish swim near coral reefs under bright moonlight").split()


def corpus(min_tokens: int = 2_000_000) -> Path:
    """The bundled sample's train split (smolctl/assets/sample/train.parquet) when it holds
    `min_tokens` tokens, else a generated local .jsonl (cached under benchmarks/results/.cache/) of
    roughly `min_tokens` tokens."""
    import pyarrow.parquet as pq

    sample = ROOT / "smolctl" / "assets" / "sample" / "train.parquet"
    if sample.is_file() and sum(pq.read_table(sample, columns=["token_length"])[0].to_pylist()) >= min_tokens:
        return sample
    path = RESULTS / ".cache" / f"corpus-{min_tokens}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = random.Random(0)
        words = 0
        with open(path.with_suffix(".tmp"), "w", encoding="utf-8") as f:
            while words < min_tokens:  # ~1.1 tokens per word with this vocabulary
                n = rng.randint(50, 800)
                f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."}) + "\n")
                words += n
        os.replace(path.with_suffix(".tmp"), path)
    return path


def write_rows(rows: list[Row], out: Path | None, extra: dict | None = None) -> None:
    """A section's result: rows as JSON to `out` (for run.py), or printed when run alone."""
    data = {"rows": [r.to_dict() for r in rows], **(extra or {})}
    if out:
        out.write_text(json.dumps(data, indent=1))
    else:
        print(json.dumps(data, indent=1))


def quiet_env() -> dict[str, str]:
    """Benchmarks run offline and without progress bars."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
