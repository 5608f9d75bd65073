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

GROUP = 32  # weights per block of a GGUF Q4 / Q8 tensor
F32, F16, Q4_0, Q4_1, Q8_0 = 0, 1, 2, 3, 8  # GGML tensor types

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
        reader = GGUFReader(str(path))  # numpy/struct/type errors of many kinds
        fields = reader.fields

        def get(key: str, default: Any = None) -> Any:
            return default if key not in fields else fields[key].contents()

        return (reader, *_config_and_info(path, get, {t.name for t in reader.tensors}))


def scan_gguf(path: str | Path) -> tuple[ModelConfig, GGUFInfo, "GGUFScan"]:
    """read_gguf_header's config and GGUFInfo, and where each tensor's bytes are, by a plain struct
    walk of the header (GGUFReader builds an object per vocabulary entry: 3-10 s for SmolLM2's
    49,152 tokens and merges; this takes ~0.2 s)."""
    path = Path(path)
    with reading(path, "GGUF file", hint="Check that it is a complete .gguf file"):
        scan = GGUFScan(path)
        return (*_config_and_info(path, lambda k, d=None: scan.fields.get(k, d), set(scan.tensors)), scan)


class GGUFScan:
    """A GGUF's key/value fields (as Python values) and tensors: name -> (ggml type, shape with the
    row length last, the tensor's bytes as a uint8 array of one row per weight row)."""

    # GGUF value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array,
    # 10 u64, 11 i64, 12 f64
    SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34), 30: (1, 2)}  # type: (weights, bytes)

    def __init__(self, path: Path):
        import struct

        self.data = np.fromfile(path, dtype=np.uint8)
        self.buf, self.pos, self._struct = memoryview(self.data), 4, struct
        if bytes(self.buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic number at its start")
        version, n_tensors, n_fields = self._read("<I"), self._read("<Q"), self._read("<Q")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported")
        self.fields = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name, n_dims = self._string(), self._read("<I")
            dims = [self._read("<Q") for _ in range(n_dims)]
            infos.append((name, dims, self._read("<I"), self._read("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-self.pos // align) * align
        self.tensors = {}
        for name, dims, kind, offset in infos:
            if kind not in self.BLOCKS:
                from gguf import GGMLQuantizationType, GGML_QUANT_SIZES

                block = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            else:
                block = self.BLOCKS[kind]
            row = dims[0] // block[0] * block[1]
            rows = int(np.prod(dims[1:], dtype=np.int64))
            at = start + offset
            if dims[0] % block[0] or at + rows * row > len(self.data):
                raise ValueError(f"tensor {name} runs past the end of the file")
            self.tensors[name] = (kind, list(reversed(dims)), self.data[at:at + rows * row].reshape(rows, row))

    def _read(self, fmt: str):
        value = self._struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += self._struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        return self._strings(1)[0]

    def _strings(self, count: int) -> list[str]:
        buf, pos, unpack, out = self.buf, self.pos, self._struct.Struct("<Q").unpack_from, []
        for _ in range(count):  # the vocabulary's 49,152 tokens: keep this loop plain
            n = unpack(buf, pos)[0]
            pos += 8 + n
            if pos > len(buf):
                raise ValueError("a string runs past the end of the file")
            out.append(str(buf[pos - n:pos], "utf-8"))
        self.pos = pos
        return out

    def _value(self, kind: int):
        if kind == 8:
            return self._string()
        if kind in self.SCALARS:
            return self._read(self.SCALARS[kind])
        if kind != 9:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, n = self._read("<I"), self._read("<Q")
        if item in self.SCALARS and item != 7:  # numbers: one numpy read
            dtype = np.dtype(self.SCALARS[item])
            values = np.frombuffer(self.buf, dtype, n, self.pos)
            self.pos += n * dtype.itemsize
            return values.tolist()
        return self._strings(n) if item == 8 else [self._value(item) for _ in range(n)]


def _config_and_info(path: Path, get, names: set[str]) -> tuple[ModelConfig, GGUFInfo]:
    """The config and GGUFInfo from a GGUF's fields (`get(key, default)`) and tensor names."""
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
        general={k: v for k in PROVENANCE if (v := get(f"general.{k}")) is not None})
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
    return cfg, tok


def split_blocks(data: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A Q4_0 / Q4_1 / Q8_0 tensor's bytes (rows, row bytes) -> (codes, d, m), each block's parts
    copied out: a block is a fp16 scale d, for Q4_1 a fp16 minimum m, then its 32 codes -- Q8_0's as
    int8 (rows, cols), Q4's two per byte (rows, cols/2: byte j holds code j in its low nibble and
    16 + j in its high one). d and m are (rows, cols/32) fp16; m is None but for Q4_1."""
    rows, size = data.shape[0], {Q4_0: 18, Q4_1: 20, Q8_0: 34}[kind]
    b = data.reshape(rows, -1, size)
    d = np.ascontiguousarray(b[..., :2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0] if kind == Q4_1 else None
    codes = b[..., size - (32 if kind == Q8_0 else 16):].reshape(rows, -1)  # a copy: the blocks' codes side by side
    return (codes.view(np.int8) if kind == Q8_0 else codes), d, m


def dequantize(data: np.ndarray, kind: int) -> np.ndarray:
    """A GGUF tensor's bytes (rows, row bytes) -> fp32 weights (rows, cols). F32, F16 and Q8_0 (a fp16
    scale and 32 int8 codes per block) here; other types through the gguf package."""
    if kind == F32:
        return data.view(np.float32).copy()
    if kind == F16:
        return data.view(np.float16).astype(np.float32)
    if kind == Q8_0:
        codes, d, _ = split_blocks(data, kind)
        rows = data.shape[0]
        return (codes.reshape(rows, -1, 32) * d.astype(np.float32)[..., None]).reshape(rows, -1)
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    return np.array(gguf_dequantize(data, GGMLQuantizationType(kind)), dtype=np.float32)


def gguf_tensor(path, scan, name: str):
    """(GGML type, shape, bytes) of a transformers-named tensor in a scanned GGUF."""
    gguf_name = hf_to_gguf_name(name)
    if gguf_name not in scan.tensors:
        raise SmolctlError(f"{path} has no tensor {gguf_name}", hint="Use a complete llama GGUF")
    return scan.tensors[gguf_name]
