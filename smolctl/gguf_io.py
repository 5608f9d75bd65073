"""GGUF (llama.cpp's format) <-> our Llama tensors: names and the Q/K row permutation.

llama.cpp applies rotary embeddings to interleaved pairs (x0, x1), (x2, x3), ...; transformers'
Llama rotates halves (x0, x_{d/2}), .... So GGUF files store attn_q / attn_k with the rows of
each head permuted relative to q_proj / k_proj. `to_gguf_rows` is what a writer applies,
`from_gguf_rows` what a reader applies; they are inverses. V, MLP, norms and the embedding are
stored as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smolctl.artifacts import reading
from smolctl.config import ModelConfig
from smolctl.errors import SmolctlError

if TYPE_CHECKING:
    import torch

# transformers name (with {i} for the layer) -> GGUF name
TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def hf_to_gguf_name(name: str) -> str:
    parts = name.split(".")
    if name.startswith("model.layers."):
        i = parts[2]
        return TENSOR_NAMES[".".join(parts[:2] + ["{i}"] + parts[3:])].format(i=i)
    return TENSOR_NAMES[name]


def gguf_to_hf_name(name: str) -> str:
    if name.startswith("blk."):
        i = name.split(".")[1]
        template = name.replace(f"blk.{i}.", "blk.{i}.", 1)
        return _REVERSE[template].format(i=i)
    return _REVERSE[name]


_REVERSE = {v: k for k, v in TENSOR_NAMES.items()}


def to_gguf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """q_proj/k_proj rows (halves layout) -> GGUF attn_q/attn_k rows (interleaved layout)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def from_gguf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF attn_q/attn_k rows -> q_proj/k_proj rows; the inverse of `to_gguf_rows`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- reading ---------------------------------------------------------------------------------

# general.* keys that say where a model comes from (llama.cpp's converter writes them from the HF
# model card); exports carry them over. Not carried: architecture, type, file_type and
# quantization_version (the export's own) and quantized_by (who made the source file).
PROVENANCE = ("name", "basename", "finetune", "size_label", "organization", "author", "version", "description",
              "license", "license.name", "license.link", "url", "repo_url", "source.url", "source.repo_url",
              "languages", "tags")


@dataclass
class GGUFInfo:
    """What a GGUF says besides its tensors: its tokenizer (llama.cpp's `tokenizer.ggml.*` keys) and
    its provenance (`general.*`, PROVENANCE's keys without the prefix)."""

    model: str  # "gpt2" (byte-level BPE) for SmolLM2
    tokens: list[str]
    merges: list[str]
    token_types: list[int]
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    chat_template: str | None
    general: dict[str, Any] = field(default_factory=dict)


def read_gguf(path: str | Path, header=None) -> tuple[ModelConfig, dict[str, torch.Tensor], GGUFInfo]:
    """(config, float32 state dict with transformers' names, tokenizer and provenance) from a llama GGUF.

    Quantized tensors (Q4_1, Q8_0, ...) are dequantized with the `gguf` package (~3.5 s for the
    135M model); attn_q / attn_k rows are permuted back to transformers' layout. `header`: what
    read_gguf_header(path) returned, when the caller has it already.
    """
    path = Path(path)
    reader, cfg, tok = header or read_gguf_header(path)
    with reading(path, "GGUF file", hint="Check that it is a complete .gguf file"):
        return cfg, _tensors(path, reader, cfg), tok


def _tensors(path: Path, reader, cfg: ModelConfig) -> dict:
    import torch
    from gguf.quants import dequantize

    state = {}
    for t in reader.tensors:
        try:
            hf_name = gguf_to_hf_name(t.name)
        except KeyError:
            raise SmolctlError(f"{path.name} holds an unexpected tensor {t.name!r}",
                               hint="smolctl reads plain Llama GGUF files (no biases, no extra tensors)") from None
        # t.data is (rows, bytes) for quantized types; dequantize gives (rows, cols) float32
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        if t.name.endswith("attn_q.weight"):
            w = from_gguf_rows(w, cfg.num_heads)
        elif t.name.endswith("attn_k.weight"):
            w = from_gguf_rows(w, cfg.num_kv_heads)
        if not w.flags.writeable:  # F32 tensors come back as views of the read-only file map
            w = w.copy()
        state[hf_name] = torch.from_numpy(np.ascontiguousarray(w))
    return state


def read_gguf_header(path: str | Path):
    """(reader, config, GGUFInfo) of a llama GGUF: its metadata only, no tensor is read."""
    from gguf import GGUFReader

    path = Path(path)
    with reading(path, "GGUF file", hint="Check that it is a complete .gguf file"):
        return _read_header(path, GGUFReader(str(path)))  # numpy/struct/type errors of many kinds


def _read_header(path: Path, reader):
    """read_gguf_header's work once the file has opened as a GGUF."""

    def get(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = get("general.architecture")
    if arch != "llama":
        raise SmolctlError(f"{path.name} is a {arch!r} model; smolctl reads only llama-architecture GGUF files",
                           hint="Use a Llama-family GGUF such as SmolLM2")
    scaling = get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise SmolctlError(f"{path.name} uses RoPE scaling {scaling!r}; smolctl models use plain RoPE")

    tok = GGUFInfo(
        model=get("tokenizer.ggml.model", "gpt2"), tokens=get("tokenizer.ggml.tokens", []),
        merges=get("tokenizer.ggml.merges", []), token_types=get("tokenizer.ggml.token_type", []),
        bos_token_id=get("tokenizer.ggml.bos_token_id"), eos_token_id=get("tokenizer.ggml.eos_token_id"),
        pad_token_id=get("tokenizer.ggml.padding_token_id"), chat_template=get("tokenizer.chat_template"),
        general={k: get(f"general.{k}") for k in PROVENANCE if f"general.{k}" in reader.fields})
    names = {t.name for t in reader.tensors}
    hidden, n_head = int(get("llama.embedding_length")), int(get("llama.attention.head_count"))
    n_kv = int(get("llama.attention.head_count_kv", n_head))
    cfg = ModelConfig(
        name=get("general.name") or path.stem,
        vocab_size=int(get("llama.vocab_size") or len(tok.tokens)),
        hidden_size=hidden,
        intermediate_size=int(get("llama.feed_forward_length")),
        num_layers=int(get("llama.block_count")),
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=int(get("llama.rope.dimension_count") or hidden // n_head),
        max_seq_len=int(get("llama.context_length", 2048)),
        rope_theta=float(get("llama.rope.freq_base", 10000.0)),
        # stored as float32 (9.99999974e-06): print it back as the 1e-05 it was meant to be
        rms_norm_eps=float(f"{get('llama.attention.layer_norm_rms_epsilon', 1e-5):.6g}"),
        tie_embeddings="output.weight" not in names,
        bos_token_id=int(tok.bos_token_id or 0),
        eos_token_id=int(tok.eos_token_id or 0),
    )
    return reader, cfg, tok
