"""transformers' logit processors (what smolctl.generation uses) vs the hand-written ones smolctl
had before (kept below: the same order and semantics), on SmolLM2's 49,152 logits. Microseconds
per call, the best of 5 rounds of 200 calls, the two alternating round by round (so that load on
the machine hits both alike), on one thread (a ratio as robust to a busy machine as it gets).

    PYTHONPATH=$PWD python tools/bench_sampling.py
"""

import time

import torch

from smolctl.generation import Sampling, logits_processors

V, CONTEXT = 49152, 300


# -- the hand-written processors (smolctl before transformers' took their place) --------------

def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as transformers applies it: for tokens already in the context (`seen`, a
    (batch, vocab) bool mask) positive logits are divided by `penalty`, negative ones multiplied."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """-inf everywhere below the k-th largest logit (ties with it are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the top token has mass_before 0 < p: never dropped
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top token's (the top token stays)."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = min_p * probs.amax(-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' order: repetition penalty, then temperature, top-k, top-p, min-p."""
    if seen is not None:
        logits = repetition_penalty(logits, seen, s.repetition_penalty)
    if s.greedy:
        return logits  # the filters never change the argmax
    logits = logits / s.temperature
    return min_p_filter(top_p_filter(top_k_filter(logits, s.top_k), s.top_p), s.min_p)



def per_call_us(*fs) -> list[float]:
    for f in fs:
        for _ in range(20):
            f()
    best = [float("inf")] * len(fs)
    for _ in range(5):
        for i, f in enumerate(fs):
            t = time.perf_counter()
            for _ in range(200):
                f()
            best[i] = min(best[i], (time.perf_counter() - t) / 200 * 1e6)
    return best


def compare(rows: int, s: Sampling) -> tuple[float, float]:
    logits = torch.randn(rows, V) * 3
    context = torch.randint(0, V, (rows, CONTEXT))
    seen = torch.zeros(rows, V, dtype=torch.bool).scatter(1, context, True) if s.repetition_penalty != 1 else None
    procs = logits_processors(s)
    return per_call_us(lambda: process_logits(logits, s, seen), lambda: procs(context, logits))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for rows in (1, 4):
        for name, kw in [("temperature + top-p", dict(temperature=0.8, top_p=0.9)),
                         ("all five", dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1))]:
            ours_us, theirs_us = compare(rows, Sampling(**kw))
            print(f"batch {rows}, {name}: ours {ours_us:,.0f} us, transformers {theirs_us:,.0f} us "
                  f"(transformers / ours = {theirs_us / ours_us:.2f})")


if __name__ == "__main__":
    main()
