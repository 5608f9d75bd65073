"""GPU training throughput and MFU: the 135M preset at S=2048, bf16, eager and compiled.

    python benchmarks/gpu.py                    # ~5 min on one H100/H200; prints JSON
    python benchmarks/gpu.py --batch-size 32 --budget-s 240 --out gpu.json
    python benchmarks/gpu.py --device cpu       # a smoke run of the same code: tiny preset, few steps

Prepared for a lent GPU machine (CI never runs it). On a machine without CUDA it prints a JSON
line saying so and exits 0 (unless --device cpu).

What runs, all with smolctl's own pieces (build_model: SDPA attention, i.e. flash attention for
bf16 on CUDA; CausalLMLoss: Liger's fused linear cross-entropy when liger-kernel is installed,
else the chunked one; fused AdamW; bf16 autocast; grad clipping):

    eager       the bare step on synthetic tokens, no host sync inside the timed window
    compiled    the same with compile_layers() (regional torch.compile, persistent cache)
    train       smolctl.train.train(compile=True) on a generated .jsonl corpus: the real data
                pipeline (background worker, pinned memory), metrics every 10 steps; the
                loop reads the device only at those steps (no host sync in between)
    train-dashboard   the same with the Rich dashboard drawing (to an in-memory terminal)

Each variant reports tokens/s, the step time and the MFU.

MFU = flops_per_token(S) x tokens/s / peak, the peak from smolctl.perf.PEAK_TFLOPS (H100/H200
dense bf16: 989 TFLOP/s). Target: >= 45 % (~360k tokens/s at S=2048).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=290, help="stop starting new variants after this")
    p.add_argument("--variants", default="eager,compiled,train,train-dashboard")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a smoke run (defaults become --preset tiny --batch-size 2 --seq-len 64 --steps 3)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import torch

    if args.device == "cpu":
        smoke = {"preset": "tiny", "batch_size": 2, "seq_len": 64, "steps": 3, "warmup": 1}
        for k, v in smoke.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    elif not torch.cuda.is_available():
        result = {"status": "skipped", "reason": "no CUDA device on this machine: benchmarks/gpu.py needs a GPU "
                                                 "(run it on a lent GPU machine); nothing was measured"}
        print(result["reason"], file=sys.stderr)
        print(json.dumps(result))
        return 0

    from smolctl.config import ModelConfig
    from smolctl.perf import device_peak_tflops, flops_per_token

    t_start = time.perf_counter()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    mcfg = ModelConfig.from_preset(args.preset)
    peak = device_peak_tflops(device, None)
    fpt = flops_per_token(mcfg, args.seq_len)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke run)"
    result = {"status": "ok", "device": name, "torch": torch.__version__,
              "peak_tflops": peak, "preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "flops_per_token": fpt, "liger": _has("liger_kernel"), "variants": {}}

    def record(name, tok_s, **extra):
        mfu = fpt * tok_s / (peak * 1e12) if peak else None
        step_ms = 1e3 * args.batch_size * args.seq_len / tok_s
        result["variants"][name] = {"tokens_per_s": tok_s, "step_ms": step_ms, "mfu": mfu, **extra}
        print(f"{name}: {tok_s:,.0f} tokens/s, {step_ms:.1f} ms/step" + (f", MFU {100 * mfu:.1f}%" if mfu else ""),
              file=sys.stderr, flush=True)

    for name in args.variants.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            result["variants"][name] = {"skipped": "time budget spent"}
            continue
        try:
            if name in ("eager", "compiled"):
                tok_s, extra = bare_steps(args, mcfg, device, compiled=name == "compiled")
            elif name in ("train", "train-dashboard"):
                tok_s, extra = through_train(args, dashboard=name == "train-dashboard")
            else:
                raise SystemExit(f"unknown variant {name}")
            record(name, tok_s, **extra)
        except torch.OutOfMemoryError as e:
            result["variants"][name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - t_start
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def bare_steps(args, mcfg, device, compiled: bool) -> tuple[float, dict]:
    """The training step alone: synthetic tokens already on the device, timed over `steps` steps
    with no host sync in between (CUDA events on a GPU)."""
    import torch

    from smolctl.loss import CausalLMLoss
    from smolctl.model import build_model
    from smolctl.perf import compile_layers

    torch.manual_seed(0)
    model = build_model(mcfg, device=device)
    if compiled:
        compile_layers(model)
    loss_module = CausalLMLoss(model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01, fused=True)
    data = torch.randint(0, mcfg.vocab_size, (args.warmup + args.steps, args.batch_size, args.seq_len + 1),
                         device=device)
    cuda = device.type == "cuda"

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_module(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t = time.perf_counter()
    for i in range(args.warmup):
        step(data[i])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warmup_s = time.perf_counter() - t
    t = time.perf_counter()
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for i in range(args.steps):
        loss = step(data[args.warmup + i])
    if cuda:
        end.record()
        torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 if cuda else time.perf_counter() - t
    extra = {"warmup_s": warmup_s, "final_loss": loss.item(),
             "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    return args.steps * args.batch_size * args.seq_len / seconds, extra


def through_train(args, dashboard: bool) -> tuple[float, dict]:
    """smolctl.train.train(compile=True) with the real data pipeline, the dashboard drawing or
    not; tokens/s between metric events `log_every` steps apart (the loop reads the device only
    at those steps)."""
    import io

    from common import corpus
    from rich.console import Console

    from smolctl.config import TrainConfig
    from smolctl.dashboard import Dashboard
    from smolctl.train import train

    class Enough(Exception):
        pass

    stamps: list[tuple[int, float]] = []
    log_every = 10 if args.device == "cuda" else 1

    def sink(e):
        if e["event"] == "train":
            stamps.append((e["step"], time.perf_counter()))
            if len(stamps) >= 1 + max(2, args.steps // log_every):
                raise Enough

    data = corpus(8_000_000 if args.device == "cuda" else 200_000)
    cfg = TrainConfig(preset=args.preset, data=str(data), batch_size=args.batch_size, seq_len=args.seq_len,
                      max_steps=100_000, save_every=10**9, log_every=log_every, device=args.device,
                      mixed_precision="bf16", compile=args.device == "cuda")
    dash = Dashboard(Console(file=io.StringIO(), force_terminal=True, width=120)) if dashboard else None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            train(cfg, Path(tmp) / "run", log_file=Path(tmp) / "run.log", sinks=([dash] if dash else []) + [sink])
        except Enough:
            pass
        finally:
            if dash:
                dash.close()
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]  # from the first log step: compile and warm-up excluded
    return (s1 - s0) * args.batch_size * args.seq_len / (t1 - t0), {"steps_timed": s1 - s0}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
