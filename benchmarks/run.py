"""The benchmark suite: one command, every row a ratio against a baseline measured in the same run.

    python benchmarks/run.py            # the full suite (~16 min on 2 cores; latest.md records each run's)
    python benchmarks/run.py --quick    # tiny model only, fewer repeats
    python benchmarks/run.py --only train,startup

Writes benchmarks/results/latest.json (rows, raw timings, machine) and latest.md (the table), and
puts the table into benchmarks/README.md and README.md (--quick: latest-quick.*, READMEs
untouched). Each section runs in its own process (Accelerate's state is per process; memory is
returned between sections). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PYTHON, RESULTS, ROOT, Row, machine_info, matmul_peak, quiet_env  # noqa: E402

HERE = Path(__file__).resolve().parent
SECTIONS = ("train", "data", "startup", "checkpoint", "decode")

# (preset, precision, batch size, smolctl runs, warmup steps, measured steps)
TRAIN_FULL = [
    ("tiny", "fp32", 8, "off,on", 3, 10),
    ("smollm2-135m", "bf16", 4, "off,on,compile", 2, 8),
    ("smollm2-135m", "bf16", 4, "compile-cold", 1, 2),  # its own process: dynamo's memory cache is per process
    ("smollm2-135m", "fp32", 4, "on", 2, 4),
]
TRAIN_QUICK = [("tiny", "fp32", 8, "on", 2, 6)]


def section(script: str, *args: str) -> dict:
    """Run benchmarks/<script> in a fresh process; return its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, **quiet_env(), "PYTHONPATH": str(ROOT)}
        t = time.perf_counter()
        proc = subprocess.run([PYTHON, str(HERE / script), *args, "--out", str(out)], env=env, cwd=ROOT)
        print(f"  {script} {' '.join(args)}: {time.perf_counter() - t:.0f} s", flush=True)
        if proc.returncode or not out.is_file():
            return {"rows": [], "error": f"{script} exited with {proc.returncode}"}
        return json.loads(out.read_text())


def rows_of(result: dict) -> list[Row]:
    fields = Row.__dataclass_fields__
    return [Row(**{k: v for k, v in r.items() if k in fields}) for r in result.get("rows", [])]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model only, fewer repeats")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = p.parse_args(argv)
    only = args.only.split(",")
    t0 = time.perf_counter()
    info = machine_info()
    print(f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, load {info['load_avg_1m']}")
    peak = matmul_peak(repeats=10)  # best of 10: on a shared machine a single try is often slowed down
    print(f"Matmul peak (4096², {info['torch_threads']} threads): fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s")
    rows: list[Row] = [
        Row("Machine", "matmul peak, 4096² fp32", peak["fp32"], "GFLOP/s", note="MFU denominator for fp32 rows"),
        Row("Machine", "matmul peak, 4096² bf16", peak["bf16"], "GFLOP/s", note="MFU denominator for bf16 rows"),
    ]
    raw: dict = {}

    consumes: dict[str, float] = {}
    if "train" in only:
        for preset, precision, batch, runs, warmup, steps in (TRAIN_QUICK if args.quick else TRAIN_FULL):
            r = section("bench_train.py", "--preset", preset, "--precision", precision, "--batch-size", str(batch),
                        "--runs", runs, "--warmup", str(warmup), "--steps", str(steps),
                        "--peak-gflops", str(peak[precision]))
            raw[f"train {preset} {precision} {runs}"] = r
            got = rows_of(r)
            rows += got
            ours = [x.value for x in got if x.name.startswith("smolctl train(), dashboard on vs plain transformers")]
            if ours:
                consumes[f"{preset} {precision} B{batch}×S256"] = ours[0]
    if "data" in only:
        r = section("bench_data.py", "--tokens", "300000" if args.quick else "1000000",
                    "--repeats", "1" if args.quick else "3")
        raw["data"] = r
        got = rows_of(r)
        rows += got
        worker = next((x.value for x in got if "background" in x.name), None)
        for name, v in consumes.items():
            rows.append(Row("Data pipeline", f"background worker vs what training consumes ({name})", worker,
                            "tok/s", f"smolctl training, {name}", v, target=20.0))
    if "startup" in only:
        r = section("bench_startup.py", "--repeats", "3" if args.quick else "5")
        raw["startup"] = r
        rows += rows_of(r)
    if "checkpoint" in only:
        r = section("bench_checkpoint.py", "--repeats", "1" if args.quick else "2")
        raw["checkpoint"] = r
        rows += rows_of(r)
    if "decode" in only:
        rows += decode(args.quick, raw)

    total = time.perf_counter() - t0
    result = {"machine": info, "quick": args.quick, "seconds": total, "peak_gflops": peak,
              "rows": [r.to_dict() for r in rows], "raw": raw}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "latest-quick" if args.quick else "latest"  # a quick run never replaces the full results
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(rows, info, peak, args.quick, total)
    (args.out / f"{name}.md").write_text(md)
    if args.out == RESULTS and not args.quick and set(only) == set(SECTIONS):
        for readme in (HERE / "README.md", ROOT / "README.md"):
            update_readme(readme, md)
    print(md)


def decode(quick: bool, raw: dict) -> list[Row]:
    r = section("bench_decode.py", *(["--quick"] if quick else []))
    raw["decode"] = r
    return rows_of(r) or [Row("Decode", "bench_decode.py", None, "tok/s", note=r.get("error", "no rows"))]


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    if unit == "s":
        return f"{v:.2f} s"
    return f"{v:,.0f} {unit}" if v >= 100 else f"{v:,.3g} {unit}"


def markdown(rows: list[Row], info: dict, peak: dict, quick: bool, seconds: float) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores ({', '.join(info['isa']) or 'no AVX-512'}), "
        f"torch {info['torch']}, transformers {info['transformers']}, Python {info['python']}; "
        f"{info['date']}; 1-min load average at start {info['load_avg_1m']:.1f}"
        f"{' (shared machine: absolute numbers are noisy, ratios are same-run)' if info['load_avg_1m'] > 1.5 else ''}. "
        f"{'Quick run' if quick else 'Full suite'}: {seconds / 60:.1f} min.",
        "",
        "| Section | Benchmark | smolctl | Baseline (same run) | Ratio | Target | |",
        "|---|---|---:|---|---:|---:|---|",
    ]
    for r in rows:
        base = f"{r.baseline}: {fmt(r.baseline_value, r.unit)}" if r.baseline else ""
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else ""
        target = f"{'≤' if r.lower_is_better else '≥'} {r.target:g}×" if r.target is not None else ""
        met = {True: "✅", False: "❌", None: ""}[r.met]
        value = fmt(r.value, r.unit) + (f" ({r.note})" if r.note else "")
        lines.append(f"| {r.section} | {r.name} | {value} | {base} | {ratio} | {target} | {met} |")
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, md: str) -> None:
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if not readme.is_file():
        return
    text = readme.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(head + start + "\n" + md + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
