"""The benchmark suite's plumbing (not its timings): rows, ratios against targets, the README table."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from common import Row  # noqa: E402


def test_row_ratio_and_target_in_both_directions():
    faster = Row("s", "throughput", 130.0, "tok/s", "plain", 100.0, target=1.3)
    slower = Row("s", "throughput", 129.0, "tok/s", "plain", 100.0, target=1.3)
    time_ok = Row("s", "save", 3.0, "s", "copy", 2.0, lower_is_better=True, target=2.0)
    time_bad = Row("s", "save", 4.5, "s", "copy", 2.0, lower_is_better=True, target=2.0)
    assert faster.ratio == pytest.approx(1.3) and faster.met and not slower.met
    assert time_ok.met and not time_bad.met
    assert Row("s", "no baseline", 1.0, "s").met is None
    paired = Row("s", "overhead", 90.0, "tok/s", "same loop", 100.0, target=0.97, paired=0.98)
    assert paired.ratio == 0.98 and paired.met and paired.to_dict()["ratio"] == 0.98
    assert Row("s", "not measured", None, "s", "copy", 2.0, target=2.0).to_dict()["met"] is None


def test_markdown_table_goes_between_the_readme_markers(tmp_path):
    import run

    rows = [Row("Checkpoint", "save", 3.0, "s", "copy", 2.0, lower_is_better=True, target=2.0)]
    info = {"cpu": "Test CPU", "cores": 2, "isa": [], "torch": "t", "transformers": "x", "python": "3",
            "date": "today", "load_avg_1m": 0.5}
    md = run.markdown(rows, info, {"fp32": 1.0, "bf16": 2.0}, quick=False, seconds=60)
    assert "Test CPU, 2 cores" in md and "| Checkpoint | save | 3.00 s | copy: 2.00 s | 1.50× | ≤ 2× | ✅ |" in md
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold table\n<!-- results:end -->\noutro\n")
    run.update_readme(readme, md)
    text = readme.read_text()
    assert "old table" not in text and md in text and text.startswith("intro\n") and text.endswith("outro\n")


def test_decode_rows_pair_each_smolctl_path_with_the_engine_reading_the_same_weights():
    import bench_decode

    def engine(name, weights, tps):
        return {"engine": name, "weights": weights, "tokens_per_s": tps, "pct_of_bound": 50.0,
                "greedy_tokens_equal_to_fp32": "8/8"}

    table = [engine("smolctl", "fp32", 20.0), engine("smolctl", "bf16, torch.mv", 30.0),
             engine("smolctl", "int4 + bf16 head", 40.0), engine("transformers generate", "fp32", 10.0),
             engine("transformers generate", "bf16", 15.0)]
    rows = bench_decode.comparisons(table, SimpleNamespace(new_tokens=8, threads=1))
    assert [(r.value, r.baseline_value) for r in rows] == [(20.0, 10.0), (30.0, 15.0)]  # no llama.cpp: no int4 row
    rows = bench_decode.comparisons(table + [engine("llama.cpp", "Q4_1 (GGUF)", 80.0)],
                                    SimpleNamespace(new_tokens=8, threads=1))
    assert rows[-1].ratio == pytest.approx(0.5) and "llama.cpp" in rows[-1].name


def test_the_checkpoint_benchmark_saves_and_loads_a_real_checkpoint(tmp_path):
    """The benchmark on the tiny preset: its save must be one that `find_checkpoint` accepts
    (verified manifest, training metadata) and that loads; every writer's save must finish."""
    import json

    import bench_checkpoint

    out = tmp_path / "rows.json"
    bench_checkpoint.main(["--preset", "tiny", "--repeats", "1", "--writers", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["name"].startswith("save, tiny") and rows[1]["name"].startswith("load")
    assert [r["name"] for r in rows[2:]] == [f"save with {name}" for name in bench_checkpoint.WRITERS]
    assert all(r["value"] > 0 and r["baseline_value"] > 0 for r in rows)


def test_safetensors_own_writers_in_the_benchmark_write_what_ours_does(tmp_path):
    """The comparison is fair: the same bytes, and the same file mode (the umask's)."""
    import os

    import bench_checkpoint
    import torch

    from smolctl.safetensors_io import write_tensors

    tensors = {"w": torch.randn(5, 3), "step": torch.tensor(3.0), "ids": torch.arange(4)}
    write_tensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    for i, writer in enumerate(bench_checkpoint.WRITERS.values()):
        writer(tmp_path / f"{i}.safetensors", tensors, {"format": "pt"})
        assert (tmp_path / f"{i}.safetensors").read_bytes() == (tmp_path / "ours.safetensors").read_bytes()
        assert os.stat(tmp_path / f"{i}.safetensors").st_mode == os.stat(tmp_path / "ours.safetensors").st_mode


def test_the_gpu_benchmark_smoke_runs_on_the_cpu(tmp_path):
    """benchmarks/gpu.py --device cpu at tiny sizes: smolctl's training step against the plain
    transformers loop, each measured, the ratio in the results table that is written. (Only these
    parts, for time: `train` sets Accelerate's per-process state, `data` starts a worker and
    `decode` reads a 49k-token GGUF vocabulary twice; all run in `python benchmarks/gpu.py --device cpu`.)"""
    import json

    import gpu
    import torch

    out = tmp_path / "gpu"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # plumbing, not speed: one thread is steady on a shared machine
    try:
        assert gpu.main(["--device", "cpu", "--parts", "plain,eager", "--steps", "1", "--warmup", "1",
                         "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["status"] == "ok" and (result["preset"], result["seq_len"]) == ("tiny", 64)
    plain, eager = (result["variants"][v]["tokens_per_s"] for v in ("plain", "eager"))
    [row] = result["rows"]
    assert row["name"] == "training, eager vs the plain transformers loop"
    assert row["ratio"] == pytest.approx(eager / plain) and plain > 0
    assert f"| {row['name']} | {eager:,.0f} tok/s | plain loop, bf16 autocast, same run: {plain:,.0f} |" in \
        out.with_suffix(".md").read_text()
