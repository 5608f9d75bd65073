"""Every figure the README and docs/ report comes from a committed log or results file.

Each page's figures are formatted here from their source (logs/*.log, logs/*.jsonl,
benchmarks/results/latest.*, the bundled sample's parquet) and must appear in the page as written:
a re-run that changes a log, or an edit that types a number by hand, fails here.
"""

import json
import re
import statistics
from datetime import datetime
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
LOGS = ROOT / "logs"
DOC_PAGES = ["training", "resume-and-checkpoints", "distributed", "generate-and-chat", "export-and-import",
             "errors-and-safety", "layout"]

TRAIN_LINE = re.compile(r"step +(\d+)/\d+ \| loss ([\d.]+) \| .* \| tok/s ([\d,]+) \| tokens ([\d,]+) \| "
                        r"elapsed (\d+)m(\d+)s")
EVAL_LINE = re.compile(r"step +(\d+) \| eval loss ([\d.]+) \| ppl ([\d.]+) \| ([\d,]+) tokens")


def _int(s: str) -> int:
    return int(s.replace(",", ""))


@cache
def log(name: str) -> dict:
    """A training log (what `train` prints off a terminal): its header, train and eval lines."""
    lines = (LOGS / name).read_text(encoding="utf-8").splitlines()
    header = lines[0]
    train = {int(m[1]): {"loss": float(m[2]), "tok_s": _int(m[3]), "tokens": _int(m[4]),
                         "elapsed_s": 60 * int(m[5]) + int(m[6])}
             for m in map(TRAIN_LINE.search, lines) if m}
    evals = {int(m[1]): {"loss": float(m[2]), "ppl": float(m[3]), "tokens": _int(m[4])}
             for m in map(EVAL_LINE.search, lines) if m}
    stamp = [datetime.strptime(line[:19], "%Y-%m-%d %H:%M:%S") for line in (lines[0], lines[-1])]
    return {"params": _int(re.search(r"\(([\d,]+) params\)", header)[1]),
            "tokens_per_step": _int(re.search(r"([\d,]+) tokens/step", header)[1]),
            "train": train, "eval": evals, "wall_s": (stamp[1] - stamp[0]).total_seconds()}


@cache
def real_model_evals() -> dict[int, dict]:
    """logs/eval_smollm2_instruct.jsonl: `smolctl eval --json` of SmolLM2-135M-Instruct, by --tokens."""
    rows = [json.loads(line) for line in (LOGS / "eval_smollm2_instruct.jsonl").read_text().splitlines()]
    return {r["tokens_requested"]: r for r in rows}


@cache
def sample_train_tokens() -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_table(ROOT / "smolctl/assets/sample/train.parquet", columns=["token_length"])
               .column("token_length").to_pylist())


@cache
def bench_rows() -> dict[str, dict]:
    rows = json.loads((ROOT / "benchmarks/results/latest.json").read_text())["rows"]
    return {r["name"]: r for r in rows}


@cache
def decode_vs_llama_cpp() -> dict:
    """benchmarks/results/decode_vs_llama_cpp.json: `bench_decode.py --vs-llama-cpp`."""
    return json.loads((ROOT / "benchmarks/results/decode_vs_llama_cpp.json").read_text())


def decode_figures() -> str:
    r = decode_vs_llama_cpp()
    s, ll, meta = r["smolctl"], r["llama.cpp"], r["meta"]
    return (f"{s['best_tokens_per_s']:.1f} tokens/s against llama.cpp's {ll['best_tokens_per_s']:.1f} "
            f"({r['tokens_per_s_ratio']:.2f}x); the whole process took {s['best_process_s']:.1f} s against "
            f"{ll['best_process_s']:.1f} s ({r['process_s_ratio']:.2f}x), {s['best_process_cpu_s']:.1f} against "
            f"{ll['best_process_cpu_s']:.1f} CPU seconds ({r['process_cpu_s_ratio']:.2f}x), with {meta['threads']} "
            f"thread(s) and a load average of {meta['loadavg_before']:.1f}; the medians of the {meta['rounds']} rounds: "
            f"{r['median_tokens_per_s_ratio']:.2f}x and {r['median_process_s_ratio']:.2f}x")


def train_defaults_figures(name: str) -> str:
    """What docs/training.md says of a `bench_train.py --runs default` result (benchmarks/results/NAME)."""
    r = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    top = r["rows"][0]
    paired = top["note"].split("paired median ")[1].rstrip("×")
    chose = {"no": "fp32"}.get(*[top["note"].split("auto chose mixed precision ")[1].split(",")[0]] * 2)
    compiled = ", compiled, " in r["raw"]["default"]["start"]
    return (f"{top['value']:.0f} tokens/s against {top['baseline_value']:.0f} ({top['ratio']:.2f}x; paired median "
            f"{paired}x), in {chose}{', compiled' if compiled else ''}")


def page(name: str) -> str:
    return " ".join((ROOT / name).read_text(encoding="utf-8").split())  # line breaks read as spaces


def figures() -> list[tuple[str, str]]:
    """(page, the text it must contain), every figure formatted from its source."""
    base, cont = log("base_run_step_300.log"), log("continued_smollm2_instruct_300.log")
    bt, be = base["train"], base["eval"]
    last = max(bt)
    real = real_model_evals()
    short, whole = real[32768], real[200000]
    ct, ce = cont["train"], cont["eval"]
    late = [ct[s]["loss"] for s in ct if s >= 250]
    evals = " → ".join(f"{be[s]['loss']:.2f}" for s in sorted(be))
    steps = "/".join(str(s) for s in sorted(be))
    return [
        # README: the main job (logs/base_run_step_300.log) and the real model (logs/eval_smollm2_instruct.jsonl)
        ("README.md", f"took {round(base['wall_s'] / 60)} minutes: {last} steps of "
                      f"{base['tokens_per_step']:,} tokens, {bt[last]['tokens']:,} tokens in all"),
        ("README.md", f"falls from {bt[min(bt)]['loss']:.2f} (step {min(bt)}) to {bt[last]['loss']:.2f} (step {last})"),
        ("README.md", f"({be[last]['tokens']:,} tokens of topics the training split never mentions) follows it: "
                      f"{evals} at steps {steps}"),
        ("README.md", f"on the same {short['tokens']:,} held-out tokens at sequence length 256"),
        ("README.md", f"| `runs/tiny-sample` ({base['params'] / 1e6:.1f}M parameters, {last} steps) | "
                      f"{be[last]['loss']:.3f} | {be[last]['ppl']:.1f} |"),
        ("README.md", f"`smolctl eval --model smollm2-instruct --seq-len 256`) | {short['loss']:.3f} | "
                      f"{short['perplexity']:.2f} |"),
        ("README.md", f"Held-out loss {short['loss']:.3f} before, {ce[max(ce)]['loss']:.3f} after {max(ct)} steps"),
        # docs/training.md
        ("docs/training.md", f"`tiny` (same vocabulary and architecture family, {base['params'] / 1e6:.1f}M parameters, "
                             f"trains at > 1,000 tokens/s"),
        ("docs/training.md", f"one background worker made "
                             f"{bench_rows()['stream → tokenize → pack, in a background worker']['value']:,.0f} tokens/s"),
        ("docs/training.md", f"(fp32, ~{round(statistics.median(r['tok_s'] for r in ct.values()))} tokens/s; the run "
                             f"took {round(cont['wall_s'] / 60)} minutes;"),
        ("docs/training.md", f"held-out loss **{short['loss']:.3f} before** (perplexity {short['perplexity']:.2f}) and "
                             f"**{ce[max(ce)]['loss']:.3f} after** (perplexity {ce[max(ce)]['ppl']:.2f}), on the same "
                             f"{ce[max(ce)]['tokens']:,} held-out tokens"),
        ("docs/training.md", f"the whole split ({whole['tokens']:,} predictions) gives {whole['loss']:.3f} before"),
        ("docs/training.md", f"{max(ct)} steps of {cont['tokens_per_step']:,} tokens read {ct[max(ct)]['tokens']:,} "
                             f"training tokens, {100 * ct[max(ct)]['tokens'] / sample_train_tokens():.0f}% of the sample"),
        ("docs/training.md", f"from {ct[min(ct)]['loss']:.2f} (step {min(ct)}) to {min(late):.2f}-{max(late):.2f} "
                             f"(steps 250-{max(ct)})"),
        ("docs/training.md", f"({last} steps; training loss {bt[min(bt)]['loss']:.2f} → {bt[last]['loss']:.2f}"),
        # docs/generate-and-chat.md: what eval scores of the whole held-out split
        ("docs/generate-and-chat.md", f"(the sample's held-out split: all {whole['tokens']:,}, after its first token)"),
        # docs/generate-and-chat.md: decoding against llama.cpp (benchmarks/results/decode_vs_llama_cpp.json)
        ("docs/generate-and-chat.md", decode_figures()),
        # docs/training.md: train() on its defaults against the best plain loop (benchmarks/results/)
        ("docs/training.md", train_defaults_figures("train_defaults_vs_plain.json")),
        ("docs/training.md", train_defaults_figures("train_defaults_vs_plain_no_amx.json")),
    ]


@pytest.mark.parametrize("where, text", figures(), ids=[f"{p}:{t[:40]}" for p, t in figures()])
def test_figure_matches_its_source(where, text):
    assert text in page(where), f"{where} should say: {text}"


def test_claims_the_figures_rest_on():
    """The claims in words around those figures, checked against the same files."""
    base = log("base_run_step_300.log")
    last = max(base["train"])
    assert base["train"][last]["tokens"] < sample_train_tokens() / 3  # "less than a third ... read once"
    assert statistics.median(r["tok_s"] for r in base["train"].values()) > 1000  # "trains at > 1,000 tokens/s"
    real = real_model_evals()
    assert real[200000]["tokens"] < 200000  # "the whole split": eval stopped at the data's end
    assert all(r["model"] == "smollm2-instruct" and r["seq_len"] == 256 for r in real.values())


def test_the_resumed_log_repeats_the_first_run():
    """logs/next_run_from_step_200.log: steps 201-300 repeat the first run's losses exactly, as the docs say."""
    base, resumed = log("base_run_step_300.log"), log("next_run_from_step_200.log")
    after = sorted(s for s in resumed["train"] if s > 200)
    assert after == sorted(s for s in base["train"] if s > 200) and after
    assert [resumed["train"][s]["loss"] for s in after] == [base["train"][s]["loss"] for s in after]
    assert {s: e["loss"] for s, e in resumed["eval"].items() if s > 200} == \
           {s: e["loss"] for s, e in base["eval"].items() if s > 200}


def test_an_h200_needs_what_the_docs_say():
    """~0.36M tokens/s: SmolLM2-135M at 45% of an H200's dense bf16 peak, S=2048 (a figure worked out,
    not measured, but worked out here rather than typed)."""
    from smolctl.config import ModelConfig
    from smolctl.perf import PEAK_TFLOPS, flops_per_token

    need = 0.45 * PEAK_TFLOPS["H200"] * 1e12 / flops_per_token(ModelConfig.from_preset("smollm2-135m"), 2048)
    assert f"consumes ~{need / 1e6:.2f}M" in page("docs/training.md")
    bench = page("benchmarks/README.md")
    assert f"consumes ~{round(need, -4) / 1e3:.0f}k" in bench and f"(~{round(need, -4) / 1e3:.0f}k tokens/s)" in bench


def test_benchmark_tables_are_the_committed_results():
    """The results table in benchmarks/README.md is benchmarks/results/latest.md, as run.py pasted it."""
    text = (ROOT / "benchmarks/README.md").read_text(encoding="utf-8")
    block = text.split("<!-- results:start -->\n", 1)[1].split("<!-- results:end -->", 1)[0]
    assert block == (ROOT / "benchmarks/results/latest.md").read_text(encoding="utf-8")


def test_the_readme_links_every_docs_page_and_stays_short():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 120  # the rest is in docs/
    assert {p.stem for p in (ROOT / "docs").glob("*.md")} == set(DOC_PAGES)
    for name in DOC_PAGES:
        assert f"(docs/{name}.md)" in readme, name
    assert "(benchmarks/README.md)" in readme and "(logs/base_run_loss.png)" in readme
    for target in re.findall(r"\]\(((?:docs|logs|benchmarks)/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target


def test_the_model_figures_are_the_presets():
    """The architecture and parameter counts the README and docs/training.md give, counted from the
    presets (the tiny one is also the count the main job's log reports)."""
    from smolctl.config import ModelConfig
    from smolctl.model import param_breakdown, skeleton

    def total(cfg):
        return param_breakdown(skeleton(cfg), cfg.num_layers)["total"]

    c = ModelConfig.from_preset("smollm2-135m")
    assert c.tie_embeddings
    assert (f"({c.num_layers} layers, hidden {c.hidden_size}, {c.num_heads} heads / {c.num_kv_heads} KV heads, "
            f"vocabulary {c.vocab_size:,}, tied embeddings, RoPE θ {c.rope_theta:.0e}: {total(c):,} parameters)"
            .replace("e+0", "e")) in page("README.md")
    assert f"# SmolLM2-135M: {total(c):,} (~135M)" in page("docs/training.md")
    assert total(ModelConfig.from_preset("tiny")) == log("base_run_step_300.log")["params"]
