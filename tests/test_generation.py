import math

import pytest
import torch

from smolctl.config import ModelConfig
from smolctl.errors import SmolctlError
from smolctl.generation import (
    Generation,
    Sampling,
    TextStream,
    complete,
    logits_processors,
    pick,
)
from smolctl.model import build_model
from smolctl.tokenizer import load_tokenizer

TINY = dict(hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=2, intermediate_size=128, vocab_size=49152,
            max_seq_len=64)
NEG = float("-inf")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a larger init spreads the logits, so greedy decoding wanders instead of repeating one token
    return build_model(ModelConfig(**TINY, init_std=0.3)).eval()


def run(model, tok, prompts, **kw):
    stop_ids = kw.pop("stop_ids", set())
    gen = Generation(model, tok, prompts, Sampling(**kw), stop_ids=stop_ids)
    steps = list(gen)
    return gen, steps


# -- the decode loop against transformers' generate --------------------------------------------

def test_greedy_equals_transformers_generate(model, tok):
    prompt = tok("The quick brown fox").input_ids
    gen, steps = run(model, tok, [prompt], max_new_tokens=20)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert gen.results[0].token_ids == ref
    assert [s.tokens[0] for s in steps] == ref  # yielded one by one, as produced
    assert len(set(ref)) > 3  # the test means something only if the tokens vary
    assert gen.results[0].finish_reason == "length"


def test_ragged_batch_greedy_equals_transformers_left_padded(model, tok):
    prompts = [tok("Hello").input_ids, tok("Once upon a time, in a land far away").input_ids]
    gen, _ = run(model, tok, prompts, max_new_tokens=12)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[:, width:].tolist()
    assert [r.token_ids for r in gen.results] == ref
    # and each row decodes as it would alone
    alone, _ = run(model, tok, [prompts[0]], max_new_tokens=12)
    assert alone.results[0].token_ids == ref[0]


def test_stops_on_a_stop_token_like_transformers(model, tok):
    prompt = tok("The quick brown fox").input_ids
    free, _ = run(model, tok, [prompt], max_new_tokens=20)
    eos = free.results[0].token_ids[6]
    first = free.results[0].token_ids.index(eos)
    gen, _ = run(model, tok, [prompt], max_new_tokens=20, stop_ids={eos})
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)[0, len(prompt):].tolist()
    assert gen.results[0].token_ids == ref == free.results[0].token_ids[:first + 1]
    assert gen.results[0].finish_reason == "stop_token"
    assert gen.results[0].text == tok.decode(ref[:-1])


def test_seeded_sampling_is_reproducible(model, tok):
    kw = dict(max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = run(model, tok, ["Hi there"], **kw)[0].results[0].token_ids
    b = run(model, tok, ["Hi there"], **kw)[0].results[0].token_ids
    c = run(model, tok, ["Hi there"], **{**kw, "seed": 8})[0].results[0].token_ids
    assert a == b and a != c
    greedy = run(model, tok, ["Hi there"], max_new_tokens=15)[0].results[0].token_ids
    assert run(model, tok, ["Hi there"], max_new_tokens=15, temperature=1.0, top_k=1, seed=3)[0] \
        .results[0].token_ids == greedy  # top-k 1 samples the argmax


def test_repetition_penalty_matches_transformers(model, tok):
    prompt = tok("the the the the").input_ids
    gen, _ = run(model, tok, [prompt], max_new_tokens=12, repetition_penalty=1.5)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert gen.results[0].token_ids == ref


def test_stops_at_the_context_length(model, tok):
    prompt = list(range(100, 160))  # 60 of the 64 positions
    gen, _ = run(model, tok, [prompt], max_new_tokens=50)
    assert len(gen.results[0].token_ids) == 4 and gen.results[0].finish_reason == "length"


def test_complete_returns_only_the_continuation_and_restores_train_mode(model, tok):
    model.train()
    try:
        text = complete(model, tok, "The quick brown fox", max_new_tokens=5)
        assert model.training
    finally:
        model.eval()
    gen, _ = run(model, tok, ["The quick brown fox"], max_new_tokens=5)
    assert text == gen.results[0].text == tok.decode(gen.results[0].token_ids)


def test_breaking_early_marks_rows_interrupted(model, tok):
    gen = Generation(model, tok, ["Hello"], Sampling(max_new_tokens=30), stop_ids=set())
    for n, _ in enumerate(gen):
        if n == 2:
            break
    assert len(gen.results[0].token_ids) == 3 and gen.results[0].finish_reason == "interrupted"


@pytest.mark.parametrize("kw, words", [
    (dict(temperature=-0.1), "--temperature must be >= 0"),
    (dict(top_p=0.0), "--top-p must be in (0, 1]"),
    (dict(top_p=1.5), "--top-p must be in (0, 1]"),
    (dict(top_k=-1), "--top-k must be >= 0"),
    (dict(min_p=2.0), "--min-p must be in [0, 1]"),
    (dict(repetition_penalty=0.0), "--repetition-penalty must be > 0"),
    (dict(max_new_tokens=0), "--max-new-tokens must be at least 1"),
    (dict(temperature=float("inf")), "--temperature must be >= 0 (0 = greedy) and finite, got inf"),
    (dict(seed=-1), "--seed must be between 0 and 9,223,372,036,854,775,807, got -1"),
])
def test_invalid_sampling_values(kw, words):
    with pytest.raises(SmolctlError) as e:
        Sampling(**kw)
    assert words in str(e.value)


def test_empty_and_too_long_prompts(model, tok):
    with pytest.raises(SmolctlError, match="the prompt is empty"):
        Generation(model, tok, [""])
    with pytest.raises(SmolctlError, match="the prompt is 64 tokens; the model's context is 64"):
        Generation(model, tok, [list(range(64))])


# -- the logit processors on hand-made logits ------------------------------------------------

def probs_of(*p):
    return torch.tensor([[math.log(x) for x in p]])


def kept(logits, **sampling):
    out = logits_processors(Sampling(temperature=1.0, **sampling))(torch.zeros(1, 1, dtype=torch.long), logits)
    return (out[0] != NEG).tolist()


def test_top_k_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 3.0, -2.0]])
    assert kept(logits, top_k=1) == [False, True, False, False, False]
    assert kept(logits, top_k=2) == [False, True, True, True, False]  # a tie with the 2nd stays
    assert kept(logits, top_k=0) == [True] * 5


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = probs_of(0.5, 0.1, 0.3, 0.05, 0.05)
    assert kept(logits, top_p=0.45) == [True, False, False, False, False]
    assert kept(logits, top_p=0.6) == [True, False, True, False, False]  # 0.5 < 0.6: add 0.3
    assert kept(logits, top_p=0.85) == [True, True, True, False, False]
    assert kept(logits, top_p=0.01) == [True, False, False, False, False]  # never empty
    assert kept(logits, top_p=1.0) == [True] * 5


def test_min_p_scales_with_the_top_probability():
    logits = probs_of(0.5, 0.2, 0.25, 0.04, 0.01)
    assert kept(logits, min_p=0.1) == [True, True, True, False, False]  # threshold 0.05
    assert kept(logits, min_p=0.45) == [True, False, True, False, False]  # threshold 0.225
    assert kept(logits, min_p=1.0) == [True, False, False, False, False]


def test_repetition_penalty_on_hand_made_logits():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    context = torch.tensor([[0, 1, 1]])
    assert logits_processors(Sampling(repetition_penalty=2.0))(context, logits).tolist() == [[1.0, -4.0, 2.0, -2.0]]
    assert len(logits_processors(Sampling())) == 0  # greedy, no penalty: the logits go straight to argmax


def test_seeded_sampling_equals_transformers_generate(model, tok):
    """All five knobs at once: the same tokens as generate(do_sample=True) drawing from the same seed
    (both draw one torch.multinomial per step), so the processors and their order are generate()'s."""
    prompt = tok("the the cat sat on the").input_ids
    knobs = dict(temperature=0.9, top_k=200, top_p=0.95, min_p=0.02, repetition_penalty=1.3)
    gen, _ = run(model, tok, [prompt], max_new_tokens=16, seed=5, **knobs)
    torch.manual_seed(5)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=True, eos_token_id=None, pad_token_id=0,
                         **knobs)[0, len(prompt):].tolist()
    assert gen.results[0].token_ids == ref
    assert run(model, tok, [prompt], max_new_tokens=16, seed=6, **knobs)[0].results[0].token_ids != ref


def test_repetition_penalty_ignores_the_padding_of_a_ragged_batch(model, tok):
    """Left padding must not count as context: each row decodes as it does alone. A penalty below 1
    rewards the context's tokens ~1000x, so a pad id counted as context would be picked (it was)."""
    short, long = tok("the").input_ids, tok("the cat sat on the mat").input_ids
    together, _ = run(model, tok, [short, long], max_new_tokens=8, repetition_penalty=1e-3)
    for i, p in enumerate([short, long]):
        alone, _ = run(model, tok, [p], max_new_tokens=8, repetition_penalty=1e-3)
        assert together.results[i].token_ids == alone.results[0].token_ids


def test_pick_greedy_and_sampled_stay_inside_the_mask():
    logits = torch.randn(4, 50).masked_fill(torch.arange(50) >= 3, NEG)
    assert torch.equal(pick(logits, Sampling()), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = pick(logits, Sampling(temperature=1.0), g)
        assert (logits.gather(1, ids[:, None]) != NEG).all()


# -- text streaming ----------------------------------------------------------------------------

def test_text_stream_holds_back_stop_string_prefixes(tok):
    ids = tok("Hello world. END of story").input_ids
    stream = TextStream(tok, stop=[" END"])
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) == "Hello world." and stream.stopped
    # nothing that later became part of " END" was ever handed out
    assert all("END" not in p for p in pieces)


def test_text_stream_waits_for_whole_characters(tok):
    ids = tok("emoji 🙂 ok").input_ids
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == "emoji 🙂 ok" and all("\ufffd" not in p for p in pieces)


def test_wrapped_models_decode_as_the_plain_one(model, tok):
    class Wrapper(torch.nn.Module):  # shaped like DDP / accelerate's wrappers (.module), or compile's (._orig_mod)
        def __init__(self, inner, attr):
            super().__init__()
            setattr(self, attr, inner)

    gen = Generation(Wrapper(Wrapper(model, "_orig_mod"), "module"), tok, ["Hi"], Sampling(max_new_tokens=3))
    assert gen.model is model
