"""GPU training throughput and MFU: the 135M preset at S=2048, bf16, eager and compiled.

    python benchmarks/gpu.py                    # ~5 min on one H100/H200; prints JSON
    python benchmarks/gpu.py --batch-size 32 --budget-s 240 --out gpu.json

Prepared for a lent GPU machine (CI never runs it). On a machine without CUDA it prints a JSON
line saying so and exits 0.

What runs, all with smolctl's own pieces (build_model: SDPA attention, i.e. flash attention for
bf16 on CUDA; CausalLMLoss: Liger's fused linear cross-entropy when liger-kernel is installed,
else the chunked one; fused AdamW; bf16 autocast; grad clipping):

    eager       the bare step on synthetic tokens, no host sync inside the timed window
    compiled    the same with compile_layers() (regional torch.compile, persistent cache)
    train()     smolctl.train.train(compile=True) on a generated .jsonl corpus: the real data
                pipeline (background worker, pinned memory), metrics every 10 steps

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
    p.add_argument("--variants", default="eager,compiled,train")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        result = {"status": "skipped", "reason": "no CUDA device on this machine: benchmarks/gpu.py needs a GPU "
                                                 "(run it on a lent GPU machine); nothing was measured"}
        print(result["reason"], file=sys.stderr)
        print(json.dumps(result))
        return 0

    from smolctl.config import ModelConfig
    from smolctl.perf import device_peak_tflops, flops_per_token

    t_start = time.perf_counter()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    mcfg = ModelConfig.from_preset(args.preset)
    peak = device_peak_tflops(device, None)
    fpt = flops_per_token(mcfg, args.seq_len)
    result = {"status": "ok", "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "peak_tflops": peak, "preset": args.preset, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "flops_per_token": fpt, "liger": _has("liger_kernel"), "variants": {}}

    def record(name, tok_s, **extra):
        mfu = fpt * tok_s / (peak * 1e12) if peak else None
        result["variants"][name] = {"tokens_per_s": tok_s, "mfu": mfu, **extra}
        print(f"{name}: {tok_s:,.0f} tokens/s" + (f", MFU {100 * mfu:.1f}%" if mfu else ""), file=sys.stderr, flush=True)

    for name in args.variants.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            result["variants"][name] = {"skipped": "time budget spent"}
            continue
        try:
            if name in ("eager", "compiled"):
                tok_s, extra = bare_steps(args, mcfg, device, compiled=name == "compiled")
            elif name == "train":
                tok_s, extra = through_train(args)
            else:
                raise SystemExit(f"unknown variant {name}")
            record(name, tok_s, **extra)
        except torch.cuda.OutOfMemoryError as e:
            result["variants"][name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - t_start
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


def bare_steps(args, mcfg, device, compiled: bool) -> tuple[float, dict]:
    """The training step alone: synthetic tokens already on the GPU, timed with CUDA events over
    `steps` steps (no host sync in between)."""
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

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_module(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t = time.perf_counter()
    for i in range(args.warmup):
        step(data[i])
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(args.steps):
        loss = step(data[args.warmup + i])
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    extra = {"warmup_s": warmup_s, "step_ms": 1e3 * seconds / args.steps, "final_loss": loss.item(),
             "max_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    del model, loss_module, opt, data
    return args.steps * args.batch_size * args.seq_len / seconds, extra


def through_train(args) -> tuple[float, dict]:
    """smolctl.train.train(compile=True) with the real data pipeline; tokens/s between metric
    events 10 steps apart (the loop's only host syncs are its per-step finiteness check and
    the metrics at each log step)."""
    from common import corpus

    from smolctl.config import TrainConfig
    from smolctl.train import train

    class Enough(Exception):
        pass

    stamps: list[tuple[int, float]] = []

    def sink(e):
        if e["event"] == "train":
            stamps.append((e["step"], time.perf_counter()))
            if len(stamps) >= 1 + max(2, args.steps // 10):
                raise Enough

    data = corpus(8_000_000)
    cfg = TrainConfig(preset=args.preset, data=str(data), batch_size=args.batch_size, seq_len=args.seq_len,
                      max_steps=100_000, save_every=10**9, log_every=10, mixed_precision="bf16", compile=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            train(cfg, Path(tmp) / "run", log_file=Path(tmp) / "run.log", sinks=[sink])
        except Enough:
            pass
    (s0, t0), (s1, t1) = stamps[0], stamps[-1]  # from the first log step: compile and warm-up excluded
    return (s1 - s0) * args.batch_size * args.seq_len / (t1 - t0), {"steps_timed": s1 - s0}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
