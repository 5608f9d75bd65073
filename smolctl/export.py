"""Export a model for other runtimes: a Hugging Face directory, or a GGUF file for llama.cpp/ollama.

    from smolctl.export import export
    result = export("runs/demo", "hf", "out/demo-hf")                    # fp32 safetensors + tokenizer
    result = export("runs/demo", "gguf", "demo.q8_0.gguf", dtype="q8_0")  # llama.cpp
    result.files                                                         # [(path, bytes), ...]

`progress(what, done, total)` (optional) is called while loading (total None) and as bytes are
written. Nothing here prints.

Every export is written under a hidden temporary name next to `out` and renamed into place at
the end (fsutil.atomic_dir/atomic_file), so an interrupted export never leaves something that
looks complete, nor anything at all. An existing `out` is replaced only with `force=True`, and
only if it is what an export writes (an HF model directory, a GGUF file); an `out` that is,
holds or lies inside the model being exported, a run or a checkpoint is refused.

HF layout: config.json, generation_config.json, model.safetensors (transformers' names; a tied
lm_head is not stored), tokenizer.json, tokenizer_config.json, chat_template.jinja (chat models
only: a model trained from scratch is a base model and gets none). pad_token_id is the
tokenizer's pad, else its EOS (as SmolLM2-Instruct: pretraining packs blocks and never pads).

GGUF layout: llama-architecture metadata, general.* provenance (the source GGUF's when there is
one; else the run's name, the size label from the parameter count and the run's license), the
full byte-level BPE tokenizer, and every tensor under llama.cpp's name, attn_q/attn_k rows
permuted for its RoPE (see gguf_io.py). 1-D tensors (the RMSNorm weights) stay f32 whatever the
dtype, as llama.cpp's own converter does.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from smolctl import fsutil, precious
from smolctl.errors import ENVIRONMENT_ERRORS, SmolctlError

Progress = Callable[[str, int, "int | None"], None]  # (what, bytes done, bytes total or None: unknown)

# format -> the dtypes it takes (smolctl/dtypes.py's names; f32/f16 accepted too); the first is the default.
DTYPES = {
    "hf": ("fp32", "fp16", "bf16"),
    # fp16 by default, as llama.cpp's converter: half of f32's size; on SmolLM2-135M llama.cpp's
    # next-token argmax agreed with ours at 99.8-100% of 500 positions (q8_0: 96%).
    "gguf": ("fp16", "fp32", "bf16", "q8_0"),
}
CHUNK = 16 << 20  # write safetensors in 16 MiB pieces so the progress bar moves


@dataclass
class ExportResult:
    format: str
    dtype: str
    path: Path
    files: list[tuple[Path, int]] = field(default_factory=list)  # (path, size in bytes)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def canonical_dtype(fmt: str, dtype: str | None) -> str:
    if fmt not in DTYPES:
        raise SmolctlError(f"unknown export format {fmt!r}", hint=f"Use one of: {', '.join(DTYPES)}")
    from smolctl.dtypes import canonical

    return DTYPES[fmt][0] if dtype is None else canonical(dtype, DTYPES[fmt], what=f"--format {fmt}")


def check_out(fmt: str, out: Path, force: bool, source: Path | None = None) -> None:
    """Refuse, before any slow work, what the export could not or should not write. Paths are
    compared resolved: `source` is what --model resolved to."""
    out = out.expanduser()
    precious.check_output(out, "--out", kind="directory" if fmt == "hf" else "file")
    dst = out.resolve()
    if source is not None:
        src = source.resolve()
        if dst == src or dst in src.parents or src in dst.parents:
            raise SmolctlError(f"{out} is, holds or lies inside the model being exported ({source})",
                               hint="Choose an --out outside it")
    if fmt == "hf":
        precious.check_replaceable(out, force, is_hf_export, "a Hugging Face export written by smolctl")
    else:
        precious.check_replaceable(out, force, is_gguf_export, "a GGUF file written by smolctl export")
    parent = out.absolute().parent
    while not parent.exists():  # the nearest existing ancestor is where directories will be created
        parent = parent.parent
    try:
        fsutil.check_writable(parent)
    except OSError as e:
        raise SmolctlError(f"cannot write to {parent}: {e.strerror or e}",
                           hint="Choose an --out in a writable directory") from None


# What an HF export holds: a directory of only these files (and config.json among them) is one
# smolctl wrote, and --force may replace it; anything else there (a README, src/) is the user's.
HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"}
GGUF_MARK = "smolctl.export"  # a GGUF key of ours, written first: what marks the file as our export


def is_hf_export(path: Path) -> bool:
    return (path.is_dir() and (path / "config.json").is_file()
            and all(p.name in HF_FILES for p in path.iterdir()))


def is_gguf_export(path: Path) -> bool:
    """A GGUF that smolctl export wrote (its key is in the header's first KB), not any GGUF: a
    model the user downloaded is never replaced."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head[:4] == b"GGUF" and GGUF_MARK.encode() in head


def export(model: str | Path, fmt: str, out: str | Path, dtype: str | None = None, force: bool = False,
           progress: Progress | None = None, loaded=None) -> ExportResult:
    """Load `model` (run, checkpoint or HF directory, ...) and write it to `out` as `fmt`.

    `loaded` (a sources.Loaded) skips loading, for callers that already hold the model.
    """
    from smolctl.sources import load, resolve

    dtype = canonical_dtype(fmt, dtype)
    out = Path(out).expanduser()
    source = loaded.path if loaded is not None else resolve(model)  # verifies a checkpoint's manifest
    check_out(fmt, out, force, source=source)
    progress = progress or (lambda what, done, total: None)
    with fsutil.hold(out, f"--out {out}"):
        check_out(fmt, out, force, source=source)  # again, as the one writer: another may have just finished
        if loaded is None:
            import torch

            progress(f"loading {model}", 0, None)
            loaded = load(model, device="cpu", dtype=torch.float32, resolved=source)  # pinned while it loads
        write = write_hf if fmt == "hf" else write_gguf
        try:
            with (fsutil.atomic_dir if fmt == "hf" else fsutil.atomic_file)(out) as tmp:
                write(loaded, tmp, dtype, progress, label=out.name)
        except OSError as e:  # permissions, a full disk, a vanished directory: the user's to fix
            if e.errno is None and "requested and" in str(e):
                # numpy's tofile (the GGUF writer's) reports a short write without an errno: the disk is full
                e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out))
            if e.errno in ENVIRONMENT_ERRORS:
                raise e from None  # the CLI names it (disk full, read-only, permissions): exit 1
            raise SmolctlError(f"cannot write {out}: {e.strerror or e}", hint="Check the --out location") from None
    files = sorted(p for p in out.iterdir() if p.is_file()) if out.is_dir() else [out]
    return ExportResult(fmt, dtype, out, [(p, p.stat().st_size) for p in files])


# -- Hugging Face ------------------------------------------------------------------------------


def write_hf(loaded, out: Path, dtype: str, progress: Progress, label: str = "model") -> None:
    from safetensors.torch import save
    from transformers import GenerationConfig

    from smolctl.dtypes import torch_dtype as to_torch
    from smolctl.model_io import WEIGHTS, model_state, write_config
    from smolctl.tokenizer import end_of_turn_id, save_tokenizer, special_ids

    cfg, tok = loaded.cfg, loaded.tokenizer
    torch_dtype = to_torch(dtype)
    ids = special_ids(tok, cfg)

    write_config(cfg, out, dtype=torch_dtype, pad_token_id=ids["pad"])
    eos = [ids["eos"]] + [i for i in [end_of_turn_id(tok)] if i is not None and i != ids["eos"]]
    GenerationConfig(bos_token_id=ids["bos"], eos_token_id=eos[0] if len(eos) == 1 else eos,
                     pad_token_id=ids["pad"]).save_pretrained(str(out))
    save_tokenizer(tok, out, cfg.max_seq_len)

    # safetensors serialises to one bytes object (the model's size again in memory: 538 MB
    # for 135M fp32); writing it in chunks is what lets the progress bar move.
    state = {k: v.to(torch_dtype) for k, v in model_state(loaded.model).items()}
    blob = save(state, metadata={"format": "pt"})
    del state
    with fsutil.open_file(out / WEIGHTS, "wb") as f:
        for start in range(0, len(blob), CHUNK):
            f.write(blob[start:start + CHUNK])
            progress(f"{label}/{WEIGHTS}", min(start + CHUNK, len(blob)), len(blob))


# -- GGUF --------------------------------------------------------------------------------------


def write_gguf(loaded, out: Path, dtype: str, progress: Progress, label: str = "model.gguf") -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q

    from smolctl.gguf_io import hf_to_gguf_name, to_gguf_rows
    from smolctl.model_io import model_state

    cfg = loaded.cfg
    qtype = {"fp32": Q.F32, "fp16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_string(GGUF_MARK, "smolctl")  # first: is_gguf_export finds it in the header's first KB
    _add_metadata(writer, cfg, dtype)
    for key, value in provenance(loaded).items():
        if isinstance(value, list):
            writer.add_array(f"general.{key}", value)
        else:
            writer.add_string(f"general.{key}", str(value))
    _add_tokenizer(writer, loaded.tokenizer, cfg)

    # GGUF's header lists every tensor's name, type and byte size before any data, so plan them
    # all, then convert and write one at a time: peak extra memory is one tensor, not a model.
    state = model_state(loaded.model)
    plan = []
    for name, tensor in state.items():
        t = qtype if tensor.ndim > 1 else Q.F32  # norms stay f32: tiny, and precision-critical
        if tensor.shape[-1] % gguf.GGML_QUANT_SIZES[t][0]:
            t = Q.F16  # rows that don't fill whole q8_0 blocks (32): f16, llama.cpp's own fallback
        byte_shape = gguf.quant_shape_to_byte_shape(tuple(tensor.shape), t)
        nbytes = int(np.prod(byte_shape))
        writer.add_tensor_info(hf_to_gguf_name(name), byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t)
        plan.append((name, t, nbytes))

    total, done = sum(n for *_, n in plan), 0
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, t, nbytes in plan:
            w = state[name].float().numpy()
            if name.endswith("q_proj.weight"):
                w = to_gguf_rows(w, cfg.num_heads)
            elif name.endswith("k_proj.weight"):
                w = to_gguf_rows(w, cfg.num_kv_heads)
            writer.write_tensor_data(gguf.quants.quantize(w, t))
            done += nbytes
            progress(label, done, total)
    finally:
        writer.close()


def provenance(loaded) -> dict:
    """The general.* keys of the export: the source's (a GGUF, or an import of one), completed with
    a name (a run's own name, recorded by train or read off runs/NAME/checkpoints/..., else the
    model directory's) and a size label counted from the parameters, as llama.cpp's converter
    writes it ("135M")."""
    import gguf

    general = dict(loaded.general)
    path = Path(loaded.path)
    if "name" not in general:
        general["name"] = path.parent.parent.name if path.parent.name == "checkpoints" else path.stem
    if "size_label" not in general:
        n_params = sum(p.numel() for p in loaded.model.parameters())  # a tied lm_head counted once
        general["size_label"] = gguf.size_label(n_params, 0, 0, 0)
    return general


def _add_metadata(writer, cfg, dtype: str) -> None:
    import gguf

    writer.add_type("model")
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:  # llama.cpp assumes hidden/heads otherwise
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type({"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, tok, cfg) -> None:
    """The byte-level BPE tokenizer as llama.cpp reads it: tokens in id order, their types, merges."""
    import gguf

    from smolctl.tokenizer import bpe_merges, check_vocabulary, end_of_turn_id, special_ids

    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise SmolctlError(f"GGUF export needs a byte-level BPE tokenizer (SmolLM2's), not {spec['model']['type']}")
    check_vocabulary(tok, cfg.vocab_size, lambda top: SmolctlError(
        f"the tokenizer has ids up to {top}, beyond the model's vocab_size {cfg.vocab_size}"))
    vocab = tok.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(cfg.vocab_size):  # the embedding may have more rows than the tokenizer has tokens
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = bpe_merges(spec)

    ids = special_ids(tok, cfg)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre("smollm")  # llama.cpp's pre-tokenizer rules for SmolLM's vocabulary (ours)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    writer.add_unk_token_id(ids["unk"])
    writer.add_pad_token_id(ids["pad"])
    eot = end_of_turn_id(tok)
    if eot is not None:
        writer.add_eot_token_id(eot)
    writer.add_add_bos_token(False)  # SmolLM2 never prepends bos: documents are separated by eos
    writer.add_add_space_prefix(False)  # byte-level BPE: a leading space is part of the token
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)
