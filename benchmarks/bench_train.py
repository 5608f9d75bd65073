"""Training throughput: smolctl's `train()` against a plain transformers + torch loop, step by step.

    python benchmarks/bench_train.py --preset tiny --precision fp32 --batch-size 8
    python benchmarks/bench_train.py --preset smollm2-135m --precision bf16 --batch-size 4 --steps 5

smolctl runs through `smolctl.train.train()` -- the real data pipeline (a background worker
tokenizing and packing a .jsonl corpus), metrics.jsonl, the log file and, when on, the Rich
dashboard rendering to a terminal-like in-memory console. The baselines are plain loops over the
same token blocks with fused AdamW and gradient clipping:

    hf       LlamaForCausalLM(input_ids, labels=..., shift_labels=...): transformers' own loss
    same     the same loop calling smolctl's CausalLMLoss (the same kernels as smolctl's step)

The machine is shared, so the baselines are not run before or after smolctl but interleaved with
it: after each smolctl step, a sink runs one step of every baseline on the block smolctl just
consumed (the dashboard's refresh thread is paused meanwhile, so that its cost stays smolctl's).
Step times are wall time between consecutive "train" events, so they include everything the
harness does per step. Throughput is tokens per step over the BEST step after warm-up (other jobs
on a shared machine only ever add time; the median is reported alongside, in the JSON and notes).
Speed-ups are against the plain transformers loop's best step over all runs in the process. The
harness overhead is the median of per-step ratios: smolctl's step against the same-kernel step that
runs right after it (both see the machine of that moment; steps drift by 20-40% within a run here).

Prints (or writes with --out) JSON rows: tokens/s, MFU against the measured matmul peak, and
the ratios. Each (preset, precision) runs in its own process: Accelerate's state is per process.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Row, corpus, median, quiet_env, write_rows  # noqa: E402


class Enough(Exception):
    """Raised by the benchmark sink once it has its steps: no need for train() to finish (and
    write a final 1.6 GB checkpoint)."""


class PlainLoop:
    """The baseline: transformers' LlamaForCausalLM, torch AdamW (fused), clip_grad_norm_."""

    def __init__(self, mcfg, bf16: bool, seed: int, lr: float = 3e-3):
        import torch
        from transformers import LlamaForCausalLM

        from smolctl.loss import CausalLMLoss
        from smolctl.model import init_weights

        torch.manual_seed(seed)
        hf = mcfg.to_hf()
        hf._attn_implementation = "sdpa"
        self.model = LlamaForCausalLM(hf)
        init_weights(self.model, mcfg.init_std)
        self.model.train()
        self.same = CausalLMLoss(self.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
        self.bf16 = bf16

    def step(self, batch, loss: str) -> float:
        import torch

        x, y = batch[:, :-1], batch[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            if loss == "hf":
                y = y.contiguous()  # transformers views it flat
                out = self.model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
            else:
                out = self.same(x, y)
        out.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return out.item()


class Interleaved:
    """A metrics sink: times smolctl's steps, and runs one step of each baseline after each."""

    def __init__(self, baselines: dict, blocks, warmup: int, steps: int, dashboard=None):
        self.baselines, self.blocks = baselines, blocks  # name -> (PlainLoop, "hf" or "same")
        self.warmup, self.steps, self.dashboard = warmup, steps, dashboard
        self.smolctl: list[float] = []
        self.base: dict[str, list[float]] = {b: [] for b in baselines}
        self.first_step_s = None
        self.first_losses = None  # (smolctl's, the first baseline's) on the first block: same init, same data
        self.last = None
        self.start_text = None  # train()'s start line: it says which precision `auto` picked
        self.compile_s = None  # what train() reports compiling took, before its first step

    def __call__(self, e: dict) -> None:
        now = time.perf_counter()
        if e["event"] == "start":
            self.last, self.start_text = now, e["text"]
            return
        if e["event"] == "message" and "compile_s" in e:
            self.compile_s, self.last = e["compile_s"], now
            return
        if e["event"] != "train":
            return
        step, took = e["step"], now - self.last
        if step == 1:
            self.first_step_s = took
        if step > self.warmup:
            self.smolctl.append(took)
        pause = self.dashboard is not None and self.dashboard.live.auto_refresh
        if pause:
            self.dashboard.live.stop()  # a refresh thread must not slow the baselines down
        for name, (plain, kind) in self.baselines.items():
            t = time.perf_counter()
            loss = plain.step(self.blocks[step - 1], kind)
            if step > self.warmup:
                self.base[name].append(time.perf_counter() - t)
            if step == 1 and self.first_losses is None:
                self.first_losses = (e["loss"], loss)
        if pause:
            self.dashboard.live.start()
        if step >= self.warmup + self.steps:
            raise Enough
        self.last = time.perf_counter()


def token_blocks(data: str, seq_len: int, batch_size: int, n: int):
    """The first n batches smolctl's stream yields for this data: the baselines train on them too."""
    from smolctl.data import BlockStream, DataSpec, batches

    out = []
    for batch, _ in batches(BlockStream(DataSpec.parse(data), seq_len, batch_size), num_workers=0):
        out.append(batch)
        if len(out) == n:
            return out
    raise SystemExit("corpus too small")


def run_once(args, *, dashboard: bool, compile: bool, baselines: list[str], data: str, blocks,
             precision: str | None = None) -> dict:
    """One smolctl train() run, its baselines interleaved. Returns step-time lists (seconds).

    precision: smolctl's mixed_precision (default: --precision's). Baselines: "same" / "hf" in
    --precision, "hf-bf16" / "hf-fp32" in that precision (each its own model and optimizer)."""
    from rich.console import Console

    from smolctl.config import TrainConfig
    from smolctl.dashboard import Dashboard
    from smolctl.train import train

    mcfg_seed = 42
    cfg = TrainConfig(preset=args.preset, data=data, batch_size=args.batch_size, seq_len=args.seq_len,
                      max_steps=10_000, save_every=10**9, log_every=1, device="cpu", seed=mcfg_seed,
                      mixed_precision=precision or {"bf16": "bf16", "fp32": "no"}[args.precision], compile=compile)
    loops: dict[bool, PlainLoop] = {}

    def loop(bf16: bool) -> PlainLoop:
        if bf16 not in loops:
            loops[bf16] = PlainLoop(cfg.model_config(), bf16, mcfg_seed)
        return loops[bf16]

    steps = {name: (loop(name.endswith("bf16") if name.startswith("hf-") else args.precision == "bf16"),
                    "hf" if name.startswith("hf") else "same") for name in baselines}
    dash = Dashboard(Console(file=io.StringIO(), force_terminal=True, width=120)) if dashboard else None
    bench = Interleaved(steps, blocks, args.warmup, args.steps, dash)
    sinks = ([dash] if dash else []) + [bench]
    with tempfile.TemporaryDirectory(prefix="smolctl-bench-") as tmp:
        try:
            train(cfg, Path(tmp) / "run", log_file=Path(tmp) / "run.log", sinks=sinks)
        except Enough:
            pass
        finally:
            if dash:
                dash.close()
    result = {"smolctl": bench.smolctl, **bench.base, "first_step_s": bench.first_step_s,
              "first_losses": bench.first_losses, "start": bench.start_text, "compile_s": bench.compile_s}
    loops.clear()
    del steps, bench
    gc.collect()
    return result


def default_rows(r: dict, section: str, tps, notes) -> list[Row]:
    """smolctl on its defaults against the faster plain loop, and against each."""
    ours, b16, f32 = tps(r["smolctl"]), tps(r["hf-bf16"]), tps(r["hf-fp32"])
    best_name, best = ("bf16 autocast", b16) if b16 >= f32 else ("fp32", f32)
    # per step: smolctl's step against the faster of the two baseline steps right after it
    paired = median([min(b, f) / a for a, b, f in zip(r["smolctl"], r["hf-bf16"], r["hf-fp32"])])
    chose = r["start"].split("mixed precision ")[1].split(",")[0] if "mixed precision " in r["start"] else "?"
    compiled = (f"compiled (in {r['compile_s']:.0f} s, before step 1)" if r["compile_s"] is not None
                else "not compiled")
    note = f"{notes(r['smolctl'])}; auto chose mixed precision {chose}, {compiled}; paired median {paired:.2f}×"
    return [Row(section, "smolctl train() on its defaults vs the best plain transformers loop", ours, "tok/s",
                f"plain loop, {best_name} (the faster of bf16 autocast and fp32 here), same run", best,
                target=1.3, note=note),
            Row(section, "smolctl train() on its defaults vs plain loop, bf16 autocast", ours, "tok/s",
                "plain transformers loop, bf16 autocast, same run", b16),
            Row(section, "smolctl train() on its defaults vs plain loop, fp32", ours, "tok/s",
                "plain transformers loop, fp32, same run", f32)]


def default_summary(r: dict, tokens: int) -> None:
    """One line on stderr per default run: the ratios, as they come."""
    best = {k: tokens / min(v) for k, v in r.items() if k in ("smolctl", "hf-bf16", "hf-fp32")}
    print(f"defaults: {best['smolctl']:,.0f} tok/s; plain bf16 {best['hf-bf16']:,.0f} "
          f"({best['smolctl'] / best['hf-bf16']:.2f}x), plain fp32 {best['hf-fp32']:,.0f} "
          f"({best['smolctl'] / best['hf-fp32']:.2f}x); best of {len(r['smolctl'])} steps each", file=sys.stderr)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2, help="steps discarded (step 1 includes start-up)")
    p.add_argument("--steps", type=int, default=5, help="steps measured")
    p.add_argument("--runs", default="off,on,compile",
                   help="smolctl runs: default (train() on its defaults -- mixed precision and compile as `auto` "
                        "decides -- against the plain transformers loop in bf16 autocast AND in fp32, all "
                        "interleaved; --precision does not apply), off/on (dashboard), compile (dashboard on, "
                        "--compile, the persistent "
                        "inductor cache), compile-cold (the same with an empty cache: run it in its own process, "
                        "before any other compile, or dynamo's in-memory cache makes it warm)")
    p.add_argument("--peak-gflops", type=float, help="matmul peak for MFU (default: measure it)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    for k, v in quiet_env().items():
        os.environ.setdefault(k, v)
    import torch
    from common import matmul_peak

    from smolctl.config import ModelConfig, TrainConfig
    from smolctl.perf import compile_cache_dir, flops_per_token

    mcfg = ModelConfig.from_preset(args.preset)
    if args.runs == "default":  # the precision the defaults train in: what auto measures (and caches) here
        from smolctl.autotune import Shape, train_precision

        mixed = train_precision("cpu", args.batch_size * args.seq_len, Shape.of(mcfg))[0]
        args.precision = "fp32" if mixed == "no" else mixed
    peak = args.peak_gflops or matmul_peak()[args.precision]
    fpt = flops_per_token(mcfg, args.seq_len)
    tokens = args.batch_size * args.seq_len
    data = str(corpus())
    blocks = token_blocks(data, args.seq_len, args.batch_size, args.warmup + args.steps)
    label = (f"{args.preset} {'defaults' if args.runs == 'default' else args.precision} "
             f"B{args.batch_size}×S{args.seq_len}")
    section = f"Training · {label}"

    def tps(times):  # the best step: interference from other jobs only ever adds time
        return tokens / min(times)

    def notes(times):
        v = tps(times)
        return f"MFU {100 * fpt * v / (peak * 1e9):.1f}%; median step {tokens / median(times):,.0f} tok/s"

    raw: dict = {}
    best: dict[str, float] = {}  # each baseline's best step over all runs
    for run in args.runs.split(","):
        compiled = run.startswith("compile")
        with tempfile.TemporaryDirectory() as empty:
            if run == "compile-cold":
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = empty  # compile_layers honours a directory set here
            cache_warm = compiled and compile_cache_dir().is_dir() and any(compile_cache_dir().iterdir())
            # "same" first: like smolctl's step it then follows another model's step (one that follows
            # its own model finds the weights warm in the L3 cache: "hf" does, which only favours it)
            if run == "default":
                baselines = ["hf-bf16", "hf-fp32"]
                r = run_once(args, dashboard=True, compile=TrainConfig().compile, baselines=baselines, data=data,
                             blocks=blocks, precision="auto")
                default_summary(r, tokens)
            else:
                baselines = ["hf"] if compiled else ["same", "hf"]
                r = run_once(args, dashboard=run != "off", compile=compiled, baselines=baselines, data=data,
                             blocks=blocks)
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        if compiled:
            r["cache_warm"] = cache_warm
        raw[run] = r
        for b in baselines:
            best[b] = max(best.get(b, 0.0), tps(r[b]))

    # Harness overhead: against the same-kernel loop interleaved in the same run. Speed-ups: against
    # the plain transformers loop's best step over ALL runs, the strictest baseline this run has.
    rows = []
    for run, r in raw.items():
        if run == "default":
            rows.extend(default_rows(r, section, tps, notes))
            continue
        what = {"off": "smolctl train(), dashboard off", "on": "smolctl train(), dashboard on",
                "compile": "smolctl train(--compile), dashboard on",
                "compile-cold": "smolctl train(--compile), empty compile cache"}[run]
        ours, note = tps(r["smolctl"]), notes(r["smolctl"])
        if run in ("off", "on"):
            # Each smolctl step and the "same" step right after it share the machine's state of the
            # moment (steps drift by 20-40% within a run here), so the ratio is the median of per-step
            # pairs; the best steps' ratio is in the note.
            paired = median([b / a for a, b in zip(r["smolctl"], r["same"])])
            rows.append(Row(section, f"{what} vs the same loop, plain (harness overhead)", ours, "tok/s",
                            "plain loop calling CausalLMLoss (same kernels), same run", tps(r["same"]),
                            target=0.97 if run == "on" else None, paired=paired,
                            note=f"{note}; ratio: median of {len(r['smolctl'])} paired steps "
                                 f"(best steps: {ours / tps(r['same']):.3f}×)"))
        if r.get("compile_s") is not None:
            note += f"; compile {r['compile_s']:.0f} s ({'warm' if r['cache_warm'] else 'cold'} cache)"
        rows.append(Row(section, f"{what} vs plain transformers loop", ours, "tok/s",
                        "LlamaForCausalLM(labels=), fused AdamW, best of all runs", best["hf"],
                        target=1.3 if run == "compile" and args.precision == "bf16" else None, note=note))
    for b, name in (("hf", "plain transformers loop (labels=)"), ("same", "plain loop calling CausalLMLoss"),
                    ("hf-bf16", "plain transformers loop, bf16 autocast"), ("hf-fp32", "plain transformers loop, fp32")):
        if b in best:
            mfu = 100 * fpt * best[b] / (peak * 1e9)
            rows.append(Row(section, f"baseline: {name}", best[b], "tok/s", note=f"MFU {mfu:.1f}%; best of all runs"))
    extra = {"config": label, "peak_gflops": peak, "flops_per_token": fpt, "tokens_per_step": tokens,
             "torch_threads": torch.get_num_threads(), "raw": raw}
    write_rows(rows, args.out, extra)


if __name__ == "__main__":
    main()
