import contextlib
import json
import os

import pytest

# Tests run fully offline: nothing may reach the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- two workers (pytest-xdist; pyproject's addopts) ------------------------------------------------

# `accelerate launch --multi_gpu` without --main_process_port takes port 29500: it checks that the port
# is free, then binds it a moment later. Tests that run it are marked with this group, so that one
# worker runs them one after another and two launches never race for the port.
FIXED_PORT = pytest.mark.xdist_group("accelerate-port-29500")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the groups into node ids
def pytest_collection_modifyitems(config, items):
    """On an xdist worker: every test without a group of its own joins its file's, so that a module's
    fixtures (a 2-process run, a forkserver, a built wheel) are made once, on one worker. Groups that
    hold a `heavy` test go first (in collection order), so that each long test starts while the
    other worker still has plenty to do, instead of last while it idles."""
    if not hasattr(config, "workerinput"):
        return

    def group(item):
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(item.path.name))
        return tuple(m.args[0] if m.args else m.kwargs.get("name") for m in item.iter_markers("xdist_group"))

    groups = {item: group(item) for item in items}
    heavy = {groups[item] for item in items if item.get_closest_marker("heavy")}
    items.sort(key=lambda item: groups[item] not in heavy)  # stable: collection order otherwise


@pytest.fixture(autouse=True)
def _in_tmp_dir(tmp_path, monkeypatch):
    """Each test runs in its own directory: defaults such as ./runs/<name>/ land
    there, never in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cli():
    """Invoke the smolctl app in-process: cli("count-params", "--json") -> click Result."""
    from typer.testing import CliRunner

    from smolctl.cli import app

    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return invoke


WORDS = ("the a model learns tokens from text every step small language data stream block loss "
         "gravity pulls apples toward earth while students read about plants cells rivers stars "
         "history music numbers and the quick brown fox jumps over lazy dogs in warm summer light").split()


def write_corpus(path, n_docs=24, seed=0, column="text", extra=None):
    """A small deterministic .jsonl corpus of varied-length documents."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n_docs):
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 60))]
            row = {column: f"Doc {seed}-{i}: " + " ".join(words) + ".", **(extra or {})}
            f.write(json.dumps(row) + "\n")
    return path


@contextlib.contextmanager
def tmpfs(path, size: str):
    """A real small filesystem mounted at `path` (made here) for the block, e.g. size "1m": a full
    disk that is not simulated. Needs root to mount; the test is skipped otherwise."""
    import subprocess

    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)])


def train_micro(root, **kw):
    """A finished micro run in root/run (default: step-2, and final at step 4) on a corpus beside it."""
    from smolctl.config import TrainConfig
    from smolctl.train import train

    corpus = write_corpus(root / "corpus.jsonl")
    cfg = TrainConfig(**{**dict(preset="tiny", model=dict(MICRO), data=str(corpus), batch_size=2, seq_len=16,
                                max_steps=4, save_every=2, log_every=1, mixed_precision="no", device="cpu",
                                num_workers=0), **kw})
    train(cfg, root / "run")
    return root / "run"


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus.jsonl")


# A model small enough that a training step takes milliseconds (the vocabulary stays SmolLM2's).
MICRO = {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}


@pytest.fixture
def micro_cfg(corpus):
    from smolctl.config import TrainConfig

    def make(**kw):
        base = dict(preset="tiny", model=dict(MICRO), data=str(corpus), batch_size=2, seq_len=16,
                    max_steps=12, save_every=4, log_every=1, mixed_precision="no", compile=False, device="cpu",
                    num_workers=0, lr=3e-3)
        return TrainConfig(**{**base, **kw})

    return make


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it, children first: a machine losing power.

    torchrun starts its workers in sessions of their own, so killing the launcher's process
    group would leave them running; this walks the tree instead."""
    import psutil

    try:
        parent = psutil.Process(pid)
        procs = parent.children(recursive=True)[::-1] + [parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


# -- tiny models on disk (generation, chat, GGUF) ----------------------------------------------

TINY_GEN = dict(hidden_size=64, num_heads=4, num_kv_heads=2, num_layers=2, intermediate_size=128,
                vocab_size=49152, max_seq_len=256, init_std=0.3)


def write_gguf(path, model, cfg, arch="llama", tokenizer=None, bos=1, eos=2, chat_template=None, linears=None):
    """A GGUF as llama.cpp's converter writes one: f32 tensors, attn_q/attn_k rows in GGUF order, and
    (with `tokenizer`) its vocabulary and merges. `linears`: a GGMLQuantizationType for the layers'
    linear weights (as in a Q4_1 file), else f32."""
    import json

    import gguf
    import numpy as np

    from smolctl.gguf_io import hf_to_gguf_name, to_gguf_rows
    from smolctl.model_io import model_state

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer is not None:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        vocab = {**spec["model"]["vocab"], **{t["content"]: t["id"] for t in spec["added_tokens"]}}
        w.add_tokenizer_model("gpt2")
        w.add_token_list(sorted(vocab, key=vocab.get))
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
        w.add_bos_token_id(bos)
        w.add_eos_token_id(eos)
        w.add_pad_token_id(eos)
        if chat_template:
            w.add_chat_template(chat_template)
    for name, t in model_state(model).items():
        a = t.float().numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            a = to_gguf_rows(a, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        if linears is not None and name.endswith("proj.weight"):
            w.add_tensor(hf_to_gguf_name(name), gguf.quants.quantize(a, linears), raw_dtype=linears)
        else:
            w.add_tensor(hf_to_gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="session")
def tiny_chat_gguf(tmp_path_factory):
    """(path, model, cfg): a tiny random Llama as a GGUF with SmolLM2-Instruct's tokenizer settings."""
    import torch

    from smolctl.config import ModelConfig
    from smolctl.model import build_model
    from smolctl.tokenizer import load_tokenizer

    torch.manual_seed(0)
    cfg = ModelConfig(**TINY_GEN)
    model = build_model(cfg).eval()
    tok = load_tokenizer()
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "Tiny-Chat.Q8_0.gguf", model, cfg, tokenizer=tok,
                      chat_template=tok.chat_template)
    return path, model, cfg


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """A tiny random checkpoint directory with no tokenizer files (the bundled one: a base model)."""
    import torch

    from smolctl.config import ModelConfig
    from smolctl.model import build_model
    from smolctl.model_io import save_model

    torch.manual_seed(1)
    cfg = ModelConfig(**{**TINY_GEN, "max_seq_len": 64})
    out = tmp_path_factory.mktemp("base")
    save_model(build_model(cfg), cfg, out)
    return out


@pytest.fixture
def llama(monkeypatch):
    """llama(path) -> llama_cpp.Llama with every position's logits and an f32 KV cache."""
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    # On CPUs with AMX, llama.cpp repacks quantized weights for AMX kernels, and those segfault
    # (ggml-org/llama.cpp#20824; upstream's own SmolLM2 Q4_1 file crashes the same way). Load
    # without the extra buffer types, as llama.cpp's --no-repack does; other CPUs are unaffected.
    default = lib.llama_model_default_params

    def no_repack():
        params = default()
        params.use_extra_bufts = False
        return params

    monkeypatch.setattr(lib, "llama_model_default_params", no_repack)
    opened = []

    def open_model(path):
        llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=512, n_threads=2,
                              type_k=lib.GGML_TYPE_F32, type_v=lib.GGML_TYPE_F32)
        opened.append(llm)
        return llm

    yield open_model
    for llm in opened:
        llm.close()


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLCTL_MODELS_DIR", str(tmp_path / "models"))
    return tmp_path / "models"


# -- autotune figures, planted in the cache as measurements would leave them --------------------------

def inject(path, shape, figures, rows=(1, 8)):
    """Figures for this machine at each of `rows`, written into the cache as a measurement would leave them."""
    from smolctl.autotune import CACHE_VERSION, entry, machine

    path.parent.mkdir(parents=True, exist_ok=True)
    entries = {entry(r, shape): figures for r in rows}
    path.write_text(json.dumps({"version": CACHE_VERSION, "machines": {machine("cpu"): entries}}))


def plant_compile(path, mcfg, timed: dict | None, batch=2, seq_len=16, matmul_speed=100.0):
    """The figures compile_choice reads, as measurements would leave them in the cache: the
    matmuls' speed at the run's rows (tokens/s, fp32), and `timed` (measure_compile's) if given."""
    from smolctl.autotune import Shape
    from smolctl.perf import compile_entry

    inject(path, Shape.of(mcfg), {"fp32": matmul_speed}, rows=(min(batch * seq_len, 256),))
    if timed is not None:
        stored = json.loads(path.read_text())
        for entries in stored["machines"].values():
            entries[compile_entry(Shape.of(mcfg), batch, seq_len, "fp32", eager_attention=True)] = timed
        path.write_text(json.dumps(stored))
