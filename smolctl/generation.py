"""Text generation: sampling as pure functions on logits, and the one token iterator that
`smolctl generate`, `smolctl chat` and training-time samples all use.

    from smolctl.generation import Generation, Sampling, complete

    gen = Generation(model, tokenizer, ["Once upon a time"], Sampling(temperature=0.8, top_p=0.9, seed=1))
    for step in gen:                          # one Step per decoded position, as it is produced
        print(step.texts[0], end="", flush=True)
    gen.results[0].text, gen.results[0].finish_reason, gen.stats.decode_tokens_per_s

    complete(model, tokenizer, "The capital of France is", max_new_tokens=8)   # -> the continuation

The loop is our own (model forward + transformers' DynamicCache under inference_mode) rather
than `model.generate` + a streamer thread: it streams without a thread, stops on stop strings and
per row without StoppingCriteria subclasses, and fits on a screen. In fp32 it is as fast as
generate within the noise (0.94x-1.04x at batch 1 across benchmark runs: benchmarks/README.md);
the CPU wins are in smolctl/fastpath.py (bf16 through torch.mv, int4 weights), which
loading.py applies after loading.
Greedy output equals `model.generate(do_sample=False)` token for token, and seeded sampling
`model.generate(do_sample=True)`'s (tests/test_generation.py): the logit processors are
transformers' own, in its order.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from smolctl.errors import SmolctlError
from smolctl.sampling import Sampling  # declared there (no torch): the CLI makes its flags from it
from smolctl.tokenizer import stop_ids as default_stop_ids


# -- logit processors: transformers' own, in generate()'s order -----------------------------

def logits_processors(s: Sampling):
    """transformers' processors for `s`, in generate()'s order: repetition penalty, then (when
    sampling) temperature, top-k, top-p, min-p. procs(context_ids, logits) -> processed logits.

    Theirs rather than the hand-written ones smolctl had: generate()'s semantics by construction,
    edge cases included, for a cost that doesn't show in decoding. Per call on 49,152 logits,
    transformers / hand-written, three runs on a busy 2-core CPU at batch 1: temperature + top-p
    1.05-1.10 (~0.3 ms more of ~3.5 ms, against a 25-50 ms decode step: <= 1%), all five knobs
    0.59-1.03. Measured by `PYTHONPATH=$PWD python tools/bench_sampling.py`.
    """
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
    if not s.greedy:  # the warpers never change the argmax
        procs.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            procs.append(TopKLogitsWarper(s.top_k))
        if s.top_p < 1.0:
            procs.append(TopPLogitsWarper(s.top_p))
        if s.min_p:
            procs.append(MinPLogitsWarper(s.min_p))
    return procs


def pick(logits, s: Sampling, generator=None):
    """(batch, vocab) processed logits (a torch tensor) -> (batch,) next token ids."""
    import torch

    if s.greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if not torch.isfinite(probs).all():  # NaN weights, or a temperature so small the scores overflow
        raise SmolctlError(f"the model's next-token probabilities are not finite (NaN or inf) at --temperature "
                           f"{s.temperature:g}", hint="Raise --temperature (or use 0, greedy); if that does not "
                           "help, the model's weights are damaged (NaN)")
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -- incremental detokenization with stop strings --------------------------------------------

class TextStream:
    """Turns one row's token ids into printable text deltas, holding back what could still turn
    out to be the start of a stop string, and an incomplete UTF-8 character (shown as U+FFFD)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # everything decoded so far, cut at a stop string once one is seen
        self.emitted = 0  # how much of self.text has been handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to print."""
        self.ids.append(token_id)
        # Decoding the whole row each step (~µs per token) keeps multi-token characters and
        # byte-level BPE spacing exact; clean-up off, so earlier text never changes.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd"):
            return ""
        self.text = text
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self.flush()
        held = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        return self._emit(len(text) - held)

    def flush(self) -> str:
        """The rest of the text (the row has ended)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return delta


# -- the token iterator ----------------------------------------------------------------------

@dataclass
class Step:
    """One decoded position: per prompt, the new token (None once that row has ended) and the text
    it made printable ('' while text is held back)."""

    tokens: list[int | None]
    texts: list[str]


@dataclass
class Result:
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)  # generated ids, a final stop token included
    text: str = ""  # the continuation, without stop tokens or stop strings
    finish_reason: str | None = None  # "stop_token", "stop_string", "length" or "interrupted"


@dataclass
class Stats:
    rows: int = 1
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # prompt forward pass up to the first new token
    decode_s: float = 0.0  # everything after it

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first (summed over prompts) per second of decoding."""
        decoded = self.new_tokens - self.rows
        return decoded / self.decode_s if self.decode_s > 0 and decoded > 0 else 0.0

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2)}


def unwrap(model):
    """The plain model inside DDP / accelerate (.module) and torch.compile (._orig_mod) wrappers: a
    compiled model would recompile for every new sequence length of the decode loop."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


class Generation:
    """Decode a batch of prompts (strings or token id lists) with a KV cache; iterate it for Steps.

    After (or during) the iteration, `results[i]` holds row i's ids, text and finish reason, and
    `stats` the token counts and timings. Stop the iteration early (break, Ctrl-C) and the rows
    still running keep what they have, with finish_reason "interrupted".
    """

    def __init__(self, model, tokenizer, prompts: Sequence[str | Sequence[int]], sampling: Sampling = Sampling(),
                 stop_ids: set[int] | None = None, context_length: int | None = None):
        self.model = unwrap(model)
        self.tokenizer, self.sampling = tokenizer, sampling
        self.stop_ids = default_stop_ids(tokenizer, self.model) if stop_ids is None else set(stop_ids)
        self.context_length = context_length or getattr(self.model.config, "max_position_embeddings", None)
        self.prompt_ids = [self._encode(p) for p in prompts]
        if not self.prompt_ids:
            raise SmolctlError("no prompt given")
        self.results = [Result(prompt_tokens=len(ids)) for ids in self.prompt_ids]
        self.stats = Stats(prompt_tokens=sum(map(len, self.prompt_ids)), rows=len(self.prompt_ids))

    def stats_line(self) -> str:
        """The speed line generate and chat print to stderr (the first prompt's finish reason)."""
        st = self.stats
        return (f"[{st.prompt_tokens} prompt + {st.new_tokens} new tokens, {st.decode_tokens_per_s:.1f} tokens/s, "
                f"first token after {st.prefill_s:.2f} s, {self.results[0].finish_reason}]")

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise SmolctlError("the prompt is empty", hint="Give some text to continue")
        if self.context_length and len(ids) >= self.context_length:
            raise SmolctlError(f"the prompt is {len(ids):,} tokens; the model's context is {self.context_length:,}",
                               hint="Shorten the prompt")
        return ids

    def __iter__(self) -> Iterator[Step]:
        streams = [TextStream(self.tokenizer, self.sampling.stop) for _ in self.results]
        try:
            yield from self._steps(streams)
        finally:
            for r, stream in zip(self.results, streams):
                r.text = stream.text
                r.finish_reason = r.finish_reason or "interrupted"

    def _steps(self, streams: list[TextStream]) -> Iterator[Step]:
        s, results = self.sampling, self.results
        budget = s.max_new_tokens
        if self.context_length:  # positions past the context are untrained: stop there
            budget = min(budget, self.context_length - max(map(len, self.prompt_ids)))
        t0 = time.perf_counter()
        for n, tokens in enumerate(self._decode(budget)):
            if n == 0:
                self.stats.prefill_s = time.perf_counter() - t0
            step = Step([None] * len(results), [""] * len(results))
            for i, (r, stream) in enumerate(zip(results, streams)):
                if r.finish_reason:
                    continue
                token = step.tokens[i] = tokens[i]
                r.token_ids.append(token)
                self.stats.new_tokens += 1
                if token in self.stop_ids:
                    r.finish_reason, step.texts[i] = "stop_token", stream.flush()
                    continue
                step.texts[i] = stream.push(token)
                if stream.stopped:
                    r.finish_reason = "stop_string"
                elif len(r.token_ids) >= budget:
                    r.finish_reason, step.texts[i] = "length", step.texts[i] + stream.flush()
            self.stats.decode_s = time.perf_counter() - t0 - self.stats.prefill_s
            yield step
            if all(r.finish_reason for r in results):
                return

    def _decode(self, budget: int) -> Iterator[list[int]]:
        """The decode loop proper: yields each step's next token for every row (rows that have
        ended keep getting tokens; the caller ignores them). Left-pads a ragged batch."""
        from smolctl.decode import Decoder

        s = self.sampling
        if isinstance(self.model, Decoder) and self.model.engine.name == "native" and s.greedy \
                and s.repetition_penalty == 1.0 and len(self.prompt_ids) == 1:
            yield from self._decode_natively(budget)  # neither torch nor transformers is needed
            return
        import torch

        # as a decorator on a generator, inference mode is on while the generator runs, not between its steps
        yield from torch.inference_mode()(self._decode_with_torch)(budget)

    def _decode_natively(self, budget: int) -> Iterator[list[int]]:
        """Greedy decoding of one prompt on decode.py's native engine: numpy logits, argmax picks
        (the first of equal maxima, as torch's argmax)."""
        prompt = self.prompt_ids[0]
        step = self.model.start(len(prompt) + budget)
        ids, pos = prompt, 0
        for _ in range(budget):
            token = int(step([ids], pos)[0].argmax())
            yield [token]
            pos += len(ids)
            ids = [token]

    def _decode_with_torch(self, budget: int) -> Iterator[list[int]]:
        import torch

        model, s = self.model, self.sampling
        was_training = model.training
        model.eval()
        rows, width = len(self.prompt_ids), max(map(len, self.prompt_ids))
        forward, device = self._forward(model, rows, width + budget)
        ids = torch.zeros(rows, width, dtype=torch.long, device=device)
        mask = torch.zeros(rows, width, dtype=torch.long, device=device)
        for i, p in enumerate(self.prompt_ids):
            ids[i, width - len(p):] = torch.tensor(p, device=device)
            mask[i, width - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from 0
        ragged = bool((mask == 0).any())  # only a ragged batch needs the attention mask
        # The ids the repetition penalty looks at: padding is the row's first token, already in the row
        context = ids.clone()
        for i, p in enumerate(self.prompt_ids):
            context[i, :width - len(p)] = p[0]
        procs = logits_processors(s) if s.repetition_penalty != 1.0 or not s.greedy else None
        generator = None
        if not s.greedy:
            generator = torch.Generator(device)
            if s.seed is None:
                generator.seed()
            else:
                generator.manual_seed(s.seed)
        try:
            for _ in range(budget):
                logits = forward(ids, mask if ragged else None, positions)
                ids = pick(logits if procs is None else procs(context, logits), s, generator)[:, None]  # (rows, 1)
                context = torch.cat([context, ids], dim=1)
                yield ids[:, 0].tolist()  # the one host sync per step: the caller needs the ids
                positions = positions[:, -1:] + 1
                if ragged:
                    mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        finally:
            model.train(was_training)


    @staticmethod
    def _forward(model, rows: int, max_len: int):
        """(forward, device): forward(ids, mask, positions) -> (rows, vocab) fp32 logits of each row's
        last position, keeping its own KV cache (fresh here) for up to `max_len` positions. A
        decode.Decoder (CPU, batch 1) runs its own step; a transformers model gets a DynamicCache."""
        import torch

        from smolctl.decode import Decoder

        if isinstance(model, Decoder):
            if rows != 1:
                raise SmolctlError(f"the 4-bit CPU decoder decodes one prompt at a time, not {rows}")
            step = model.start(max_len)  # numpy or torch logits, by engine
            return (lambda ids, mask, positions: torch.as_tensor(step(ids, int(positions[0, 0])))), torch.device("cpu")
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        # transformers 5.x calls the cache argument `cache` (`past_key_values` is deprecated there)
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

        def forward(ids, mask, positions):
            # logits_to_keep=1: the prompt pass skips the (prompt_len x vocab) logits it never uses
            return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{cache_arg: cache}, logits_to_keep=1).logits[:, -1].float()

        return forward, next(model.parameters()).device


def complete(model, tokenizer, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0, **sampling) -> str:
    """The continuation of `prompt` as text (for training-time samples and scripts)."""
    gen = Generation(model, tokenizer, [prompt], Sampling(max_new_tokens=max_new_tokens, temperature=temperature,
                                                          **sampling))
    for _ in gen:
        pass
    return gen.results[0].text
