"""The GPU benchmark: training MFU against a plain loop, the data pipeline against what training
consumes, and decoding against llama.cpp -- one command, one results table.

    python benchmarks/gpu.py                    # <= 8 min on one H100/H200 -> results/gpu.{json,md}
    python benchmarks/gpu.py --batch-size 32 --budget-s 300 --out /tmp/gpu
    python benchmarks/gpu.py --device cpu       # a smoke run of the same code at tiny sizes (~1 min)

Prepared for a lent GPU machine (CI never runs it; tests/test_benchmarks.py runs the smoke path).
On a machine without CUDA it prints a JSON line saying so and exits 0 (unless --device cpu).

Training, at S=2048 in bf16 (the 135M preset), each variant's tokens/s, step time and MFU:

    plain       a plain transformers loop: LlamaForCausalLM(labels=) with SDPA, bf16 autocast,
                fused AdamW, grad clipping -- the baseline every other row is divided by
    eager       smolctl's step alone on synthetic tokens (build_model, CausalLMLoss: Liger's fused
                linear cross-entropy when installed, else the chunked one), no host sync inside
    compiled    the same with compile_layers() (regional torch.compile, persistent cache)
    train       smolctl.train.train() on its defaults (mixed precision and compile: auto, i.e.
                measured), on a generated .jsonl corpus: the real data pipeline, metrics every 10 steps
    train-dashboard   the same with the Rich dashboard drawing (to an in-memory terminal)

MFU = flops_per_token(S) x tokens/s / peak, the peak from smolctl.perf.PEAK_TFLOPS (H100/H200
dense bf16: 989 TFLOP/s). Target: >= 45 % (~360k tokens/s at S=2048).

Data: BlockStream + batches() with the default workers, tokens/s from the first batch, against
the `train` row's tokens/s (>= 1x: the pipeline is not what limits training).

Decode, batch 1, greedy: smolctl (load_for_generation: --dtype auto on the device) against
llama.cpp (llama-cpp-python, as installed) on the same GGUF -- --gguf, else the preset's weights
(random init: speed does not depend on the values) exported by smolctl to an f16 GGUF.
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

TRAIN = ("plain", "eager", "compiled", "train", "train-dashboard")
SMOKE = {"preset": "tiny", "batch_size": 2, "seq_len": 64, "steps": 3, "warmup": 1, "new_tokens": 8,
         "data_tokens": 50_000}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="timed steps per training variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=128, help="decode: tokens per run (best of 3 runs)")
    p.add_argument("--data-tokens", type=int, default=4_000_000, help="data: tokens the pipeline is timed over")
    p.add_argument("--gguf", type=Path, help="decode: a GGUF of the model (default: the preset, exported)")
    p.add_argument("--budget-s", type=float, default=360, help="start no new part after this (the whole: <= 8 min)")
    p.add_argument("--parts", default=",".join((*TRAIN, "data", "decode")))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"],
                   help="cpu: a smoke run at tiny sizes (--preset tiny --batch-size 2 --seq-len 64 --steps 3 "
                        "--new-tokens 8 unless given); auto: cuda when there is one")
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md (default for cuda: benchmarks/results/gpu)")
    args = p.parse_args(argv)

    import torch

    from smolctl.device import pick_device

    args.device = pick_device(args.device).split(":")[0]
    if args.device == "cpu":
        for k, v in SMOKE.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    elif args.device != "cuda":
        raise SystemExit(f"benchmarks/gpu.py runs on cuda (or --device cpu as a smoke run), not {args.device}")
    elif not torch.cuda.is_available():
        result = {"status": "skipped", "reason": "no CUDA device on this machine: benchmarks/gpu.py needs a GPU "
                                                 "(run it on a lent GPU machine); nothing was measured"}
        print(result["reason"], file=sys.stderr)
        print(json.dumps(result))
        return 0
    out = args.out or (ROOT / "benchmarks" / "results" / "gpu" if args.device == "cuda" else None)

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

    for name in args.parts.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            result["variants"][name] = {"skipped": "time budget spent"}
            continue
        try:
            if name in ("plain", "eager", "compiled"):
                tok_s, extra = bare_steps(args, mcfg, device, kind=name)
                record(name, tok_s, **extra)
            elif name in ("train", "train-dashboard"):
                tok_s, extra = through_train(args, dashboard=name == "train-dashboard")
                record(name, tok_s, **extra)
            elif name == "data":
                result["data"] = data_rate(args)
            elif name == "decode":
                result["decode"] = decode(args)
            else:
                raise SystemExit(f"unknown part {name}")
        except torch.OutOfMemoryError as e:
            result["variants"][name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result["seconds"] = time.perf_counter() - t_start
    result["rows"] = [r.to_dict() for r in rows(result)]
    table = markdown(result)
    print(json.dumps(result, indent=1))
    print(table, file=sys.stderr)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(table)
    return 0


def rows(result: dict) -> list:
    """The ratios, each against its baseline from the same run: training variants against the
    plain loop, the data pipeline against training's consumption, smolctl's decode against llama.cpp's."""
    from common import Row

    v = result["variants"]
    section = f"GPU · {result['device']} · {result['preset']} B{result['batch_size']}×S{result['seq_len']}"
    out = []
    plain = v.get("plain", {}).get("tokens_per_s")
    for name in TRAIN[1:]:
        if "tokens_per_s" in v.get(name, {}):
            mfu = v[name]["mfu"]
            out.append(Row(section, f"training, {name} vs the plain transformers loop", v[name]["tokens_per_s"],
                           "tok/s", "plain loop, bf16 autocast, same run", plain, target=1.0,
                           note=f"MFU {100 * mfu:.1f}%" if mfu is not None else "no MFU (no peak for this device)"))
    train = v.get("train", {}).get("tokens_per_s")
    if "data" in result:
        d = result["data"]
        out.append(Row(section, f"data pipeline ({d['workers']} workers) vs what training consumes",
                       d["tokens_per_s"], "tok/s", "the train row's tokens/s", train, target=1.0))
    if "decode" in result and "tokens_per_s" in result["decode"].get("llama.cpp", {}):
        d = result["decode"]
        out.append(Row(section, f"decode, batch 1, smolctl ({d['smolctl']['dtype']}, {result['device']}) vs llama.cpp",
                       d["smolctl"]["tokens_per_s"], "tok/s", f"llama.cpp ({d['llama.cpp']['where']}), {d['weights']}",
                       d["llama.cpp"]["tokens_per_s"], target=1.0))
    return out


def markdown(result: dict) -> str:
    from common import Row

    lines = [f"{result['device']}, torch {result['torch']}, {result['seconds']:.0f} s in all", "",
             "| what | smolctl | baseline | ratio | target |", "|---|---:|---|---:|---:|"]
    for r in rows(result):
        assert isinstance(r, Row)
        base = f"{r.baseline}: {r.baseline_value:,.0f}" if r.baseline_value else f"{r.baseline}: not measured"
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "–"
        lines.append(f"| {r.name} | {r.value:,.0f} {r.unit} | {base} | {ratio} | ≥ {r.target:g}× |")
    skipped = [f"{k} ({next(iter(x.values()))})" for k, x in result["variants"].items() if "tokens_per_s" not in x]
    skipped += [f"{k} ({result[k]['skipped']})" for k in ("data", "decode") if "skipped" in result.get(k, {})]
    if skipped:
        lines.append(f"\nNot measured: {', '.join(skipped)}")
    return "\n".join(lines) + "\n"


def bare_steps(args, mcfg, device, kind: str) -> tuple[float, dict]:
    """The training step alone: synthetic tokens already on the device, timed over `steps` steps
    with no host sync in between (CUDA events on a GPU). kind: "plain" (transformers'
    LlamaForCausalLM and its own loss), "eager" or "compiled" (smolctl's model and loss)."""
    import torch

    from smolctl.loss import CausalLMLoss
    from smolctl.model import build_model
    from smolctl.perf import compile_layers

    torch.manual_seed(0)
    if kind == "plain":
        from transformers import LlamaForCausalLM

        hf = mcfg.to_hf()
        hf._attn_implementation = "sdpa"
        model = LlamaForCausalLM(hf).to(device)

        def loss_module(x, y):
            y = y.contiguous()  # transformers views it flat
            return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
    else:
        model = build_model(mcfg, device=device)
        if kind == "compiled":
            compile_layers(model)
        loss_module = CausalLMLoss(model).train()
    model.train()
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
    """smolctl.train.train() on its defaults (compile as `auto` decides; off in the CPU smoke run)
    with the real data pipeline, the dashboard drawing or not; tokens/s between metric events
    `log_every` steps apart (the loop reads the device only at those steps)."""
    import io

    from common import corpus
    from rich.console import Console

    from smolctl.config import TrainConfig
    from smolctl.dashboard import Dashboard
    from smolctl.run import mixed_precision
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
                      compile=None if args.device == "cuda" else False)
    # auto, resolved once: Accelerate takes one precision per process (a figure measured on a busy
    # machine is not cached, and the next run could measure otherwise)
    cfg.mixed_precision = args.mixed = getattr(args, "mixed", None) or mixed_precision(cfg.resolved())
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
    return (s1 - s0) * args.batch_size * args.seq_len / (t1 - t0), {"steps_timed": s1 - s0,
                                                                     "mixed_precision": cfg.mixed_precision}


def data_rate(args) -> dict:
    """The data pipeline as train() runs it (default workers), tokens/s from the first batch."""
    from bench_data import pipeline
    from common import corpus

    from smolctl.data import auto_workers

    return {**pipeline(corpus(args.data_tokens), auto_workers(), args.data_tokens), "workers": auto_workers()}


def decode(args) -> dict:
    """Batch-1 greedy decoding of the same GGUF: smolctl (its generate path on the device, --dtype
    auto) against llama.cpp, each best of 3 runs of --new-tokens tokens after a short prompt."""
    import torch
    from bench_decode import llama_cpp_engine, ours

    from smolctl.loading import load_for_generation

    with tempfile.TemporaryDirectory() as tmp:
        gguf, weights = args.gguf, f"{args.gguf.name if args.gguf else ''}"
        if gguf is None:
            gguf, weights = Path(tmp) / "model.gguf", f"{args.preset}, random init, f16 GGUF exported by smolctl"
            _export_random(args.preset, gguf)
        loaded, _ = load_for_generation(str(gguf), "auto", args.device)
        prompt = loaded.tokenizer("Gravity is the force that").input_ids
        out = {"weights": weights, "new_tokens": args.new_tokens,
               "smolctl": {"dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch.")}}
        engines = {"smolctl": lambda n: ours(loaded.model, loaded.tokenizer, prompt, n)}
        threads = torch.get_num_threads()
        try:
            llama = llama_cpp_engine(str(gguf), threads)
        except ImportError:
            out["llama.cpp"] = {"skipped": "llama-cpp-python is not installed"}
        else:
            engines["llama.cpp"] = lambda n: llama(None, None, prompt, n)
            out["llama.cpp"] = {"where": f"CPU, {threads} threads"}
        for name, run in engines.items():
            run(4)  # warm-up
            out[name]["tokens_per_s"] = max(run(args.new_tokens)[0] for _ in range(3))
    return out


def _export_random(preset: str, gguf: Path) -> None:
    """The preset's architecture with random weights, as an f16 GGUF (what both engines load)."""
    import torch

    from smolctl.config import ModelConfig
    from smolctl.export import export
    from smolctl.model import build_model
    from smolctl.model_io import save_model

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    (gguf.parent / "hf").mkdir()
    save_model(build_model(cfg), cfg, gguf.parent / "hf")
    export(str(gguf.parent / "hf"), "gguf", gguf, dtype="fp16")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    sys.exit(main())
