"""GGUF (llama.cpp's format) <-> our Llama tensors: names and the Q/K row permutation.

llama.cpp applies rotary embeddings to interleaved pairs (x0, x1), (x2, x3), ...; transformers'
Llama rotates halves (x0, x_{d/2}), .... So GGUF files store attn_q / attn_k with the rows of
each head permuted relative to q_proj / k_proj. `to_gguf_rows` is what a writer applies,
`from_gguf_rows` what a reader applies; they are inverses. V, MLP, norms and the embedding are
stored as they are.
"""

from __future__ import annotations

import numpy as np

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
