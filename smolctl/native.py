"""The native decode step: smolctl/csrc/decode.c, compiled for this machine on first use.

    lib = native.library()                 # the loaded kernel, or None (and native.why_not() says why)
    engine = native.Engine(cfg, weights)   # decode.arrange's weights: Blocks (GGUF's blocks) and fp32
    step = engine.start(max_len)           # step(ids (1, T), pos) -> (1, vocab) fp32 logits (numpy)

Why C: a decode step of the 135M model at batch 1 is ~200 small products; through torch each is an
op with its own dispatch and thread fork (~16 ms a token here, half of it outside the kernels).
The C step runs the whole model in one OpenMP parallel region with integer dot products on
int8-rounded activations (llama.cpp's scheme), reading the weights as the file stores them.

The source is compiled with the system's C compiler (`cc -O3 -march=native -fopenmp`, ~1 s) into
~/.cache/smolctl/native/, one library per source, compiler and CPU, with its sha256 beside it (a
library that no longer matches is built again), and loaded with ctypes. With
no compiler, or one that fails, smolctl decodes with torch (decode.Decoder) instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCE = Path(__file__).parent / "csrc" / "decode.c"
FLAGS = ["-O3", "-shared", "-fPIC"]
PROMPT_CHUNK = 64  # tokens per prefill call (the scratch buffers are sized for this many)
RESCORE = 64  # the highest logits recomputed with fp32 activations (decode.c's rescore)
F32, Q4, Q8 = 0, 4, 8  # decode.c's matrix kinds

_why_not: list[str] = []


class Mat(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("rows", ctypes.c_int32), ("cols", ctypes.c_int32), ("pad", ctypes.c_int32),
                ("q", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p),
                ("qkv", Mat), ("out", Mat), ("gate_up", Mat), ("down", Mat)]


class Model(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int32) for n in ("n_layer", "hidden", "n_head", "n_kv", "head_dim", "inter", "vocab",
                                                 "max_len", "max_t", "pad")]
                + [("eps", ctypes.c_float), ("pad2", ctypes.c_float), ("layers", ctypes.c_void_p),
                   ("embed", Mat), ("head", Mat), ("exact", Mat), ("rescore", ctypes.c_int32), ("pad3", ctypes.c_int32)]
                + [(n, ctypes.c_void_p) for n in ("norm", "rope", "k", "v", "x", "h", "att", "ff", "scores")])


# -- building the library -------------------------------------------------------------------------

def why_not() -> str | None:
    """Why library() returned None (no compiler, a failed build), or None."""
    library()
    return _why_not[0] if _why_not else None


@functools.cache
def library(march: str = "native"):
    """The compiled decode step for this machine (built on first use), or None if it cannot be
    built. `march`: the target (-march=), e.g. "x86-64" for the portable C loops (tests)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not SOURCE.is_file():  # a broken install
        _why_not.append(f"{SOURCE} is missing")
        return None
    if not compiler:
        _why_not.append("no C compiler (cc) on PATH")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        _why_not.append(f"{compiler} --version failed: {e}")
        return None
    flags = [*FLAGS, f"-march={march}"]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *flags, platform.machine(),
                                    _cpu_features()]).encode()).hexdigest()[:16]
    from smolctl.fsutil import cache_dir

    target = cache_dir() / "native" / f"decode-{key}.so"
    if not _intact(target) and not _build(compiler, flags, target):
        return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError as e:
        _why_not.append(f"could not load {target}: {e}")
        return None
    lib.smolctl_step.argtypes = [ctypes.POINTER(Model), ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.smolctl_step.restype = ctypes.c_int
    lib.smolctl_requantize4.argtypes = [ctypes.POINTER(Mat), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.smolctl_requantize4.restype = None
    return lib


def _build(compiler: str, flags: list[str], target: Path) -> bool:
    """Compile SOURCE into `target` (atomically): with OpenMP, else (a compiler without it, such as
    Apple's clang) single-threaded."""
    from smolctl import fsutil

    error = ""
    for threads in (["-fopenmp"], []):
        try:
            with fsutil.atomic_file(target) as tmp:
                done = subprocess.run([compiler, *flags, *threads, "-o", str(tmp), str(SOURCE), "-lm"],
                                      capture_output=True, text=True, timeout=300)
                if done.returncode:
                    lines = done.stderr.strip().splitlines()
                    raise OSError(lines[-1] if lines else f"exit status {done.returncode}")
                digest = fsutil.sha256(tmp)
            fsutil.write_text(_checksum(target), digest + "\n")  # last: it marks the library complete
            return True
        except (OSError, subprocess.SubprocessError) as e:
            error = error or str(e)
    _why_not.append(f"building {SOURCE.name} with {compiler} failed: {error}")
    return False


def _checksum(library: Path) -> Path:
    return library.with_suffix(".sha256")


def _intact(library: Path) -> bool:
    """Whether `library` is a build of ours as it was written: loading a damaged one (a truncated
    file) would kill the process (SIGBUS) instead of raising. Otherwise it is built again."""
    from smolctl import fsutil

    try:  # a regular file only: reading a FIFO put there would wait forever
        return library.is_file() and _checksum(library).read_text().strip() == fsutil.sha256(library)
    except OSError:
        return False


def _cpu_features() -> str:
    """What -march=native depends on: the CPU's model and flags (a cached build is for this CPU only)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


# -- the weights in decode.c's layout --------------------------------------------------------------

@dataclass
class Blocks:
    """A matrix in blocks of 32 along its rows, as decode.c reads it. kind 4: `q` (rows, cols/2) uint8
    packed as GGUF's Q4 blocks are (byte j: weight j in the low nibble, 16 + j in the high one),
    w = code * d + m; kind 8: `q` (rows, cols) int8, w = q * d. d and m (rows, cols/32) fp16."""

    kind: int
    q: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * (2 if self.kind == Q4 else 1)

    @staticmethod
    def of(w) -> Blocks:
        """From decode_torch.Q4 (codes, fp32 scale and min): the scales rounded to fp16, as GGUF stores them."""
        rows, cols = w.codes.shape
        codes = w.codes.numpy().reshape(rows, cols // 32, 2, 16)
        packed = (codes[:, :, 0] | (codes[:, :, 1] << 4)).reshape(rows, cols // 2)
        return Blocks(Q4, packed, w.scale.numpy().astype(np.float16), w.lo.numpy().astype(np.float16))

    @staticmethod
    def from_gguf(data: np.ndarray, kind: int, rows: int, cols: int) -> Blocks:
        """GGUF Q4_0 / Q4_1 / Q8_0 bytes (rows, row bytes) -> Blocks, exactly: the codes copied out of
        the blocks, their fp16 scales (and Q4_1's minimums; Q4_0's are -8 d) beside them."""
        from smolctl.gguf_io import Q4_0, Q8_0, split_blocks

        codes, d, m = split_blocks(data.reshape(rows, -1), kind)
        if kind == Q8_0:
            return Blocks(Q8, codes, d)
        return Blocks(Q4, codes, d, (d.astype(np.float32) * -8).astype(np.float16) if kind == Q4_0 else m)

    def dequantize(self) -> np.ndarray:
        rows, cols = self.shape
        if self.kind == Q8:
            return (self.q.reshape(rows, -1, 32) * self.d.astype(np.float32)[..., None]).reshape(rows, cols)
        q = self.q.reshape(rows, -1, 16)
        codes = np.concatenate([q & 15, q >> 4], -1)
        return (codes * self.d.astype(np.float32)[..., None] + self.m.astype(np.float32)[..., None]).reshape(rows, cols)

    @staticmethod
    def cat(parts: list[Blocks]) -> Blocks:
        """Rows stacked (a fused qkv or gate_up). Mixed kinds are made 4-bit (Q8 parts re-rounded)."""
        if len({p.kind for p in parts}) > 1:
            import torch

            from smolctl.decode_torch import Q4 as Q4Weights

            parts = [p if p.kind == Q4 else Blocks.of(Q4Weights.quantize(torch.from_numpy(p.dequantize())))
                     for p in parts]
        stack = lambda field: None if getattr(parts[0], field) is None else np.concatenate([getattr(p, field) for p in parts])
        return Blocks(parts[0].kind, stack("q"), stack("d"), stack("m"))


def gguf_tensors(path, scan):
    """tensors(name) for decode.arrange, from a scanned GGUF: Q4_0 / Q4_1 / Q8_0 matrices as they are
    stored; other linears dequantized and rounded to Q4; the rest (norms, a float embedding) fp32."""
    from smolctl.gguf_io import Q4_0, Q4_1, Q8_0, dequantize, gguf_tensor

    def tensors(name: str):
        kind, shape, data = gguf_tensor(path, scan, name)
        matrix = name.endswith("proj.weight") or name in ("model.embed_tokens.weight", "lm_head.weight")
        if matrix and kind in (Q4_0, Q4_1, Q8_0):
            return Blocks.from_gguf(data, kind, *shape)
        w = dequantize(data, kind).reshape(shape)
        if name.endswith("proj.weight"):  # neither Q4 nor Q8: rounded to Q4, as the torch engine does
            import torch

            from smolctl.decode_torch import Q4 as Q4Weights

            return Blocks.of(Q4Weights.quantize(torch.from_numpy(w)))
        return w

    return tensors


class Engine:
    """The native decode step over decode.arrange's weights: the layers' linears as Blocks, the
    norms fp32, the embedding and head Blocks or fp32. The head (a quarter of the bytes a step
    reads, as Q8_0) is rounded to 4 bits unless it is, and its RESCORE highest logits recomputed
    from the rows it had (as stored, or fp32) with fp32 activations."""

    name = "native"

    def __init__(self, cfg, weights, lib=None):
        self.lib = lib or library()
        if self.lib is None:
            raise RuntimeError(why_not())
        self.cfg = cfg
        self._keep: list = []  # every array a pointer in the structures refers to
        exact = weights.head  # what the top logits are recomputed from, with fp32 activations
        if not (isinstance(exact, Blocks) and exact.kind == Q4):
            weights.head = self._requantize4(exact)
        self.weights = weights
        self.layers = (Layer * cfg.num_layers)()
        for i, w in enumerate(weights.layers):
            self.layers[i] = Layer(self._floats(w.attn_norm), self._floats(w.mlp_norm), self._mat(w.qkv),
                                   self._mat(w.out), self._mat(w.gate_up), self._mat(w.down))
        self.embed, self.head, self.exact = self._mat(weights.embed), self._mat(weights.head), self._mat(exact)
        self.norm = self._floats(weights.norm)

    def _requantize4(self, w) -> Blocks:
        """Q8_0 or fp32 rows -> 4-bit Blocks (decode.c's smolctl_requantize4)."""
        rows, cols = w.shape
        out = Blocks(Q4, np.empty((rows, cols // 2), np.uint8), np.empty((rows, cols // 32), np.float16),
                     np.empty((rows, cols // 32), np.float16))
        self.lib.smolctl_requantize4(ctypes.byref(self._mat(w)), out.q.ctypes.data, out.d.ctypes.data, out.m.ctypes.data)
        return out

    def _ptr(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a)
        self._keep.append(a)
        return a.ctypes.data

    def _floats(self, a) -> int:
        return self._ptr(np.asarray(a, dtype=np.float32))

    def _mat(self, m) -> Mat:
        if not isinstance(m, Blocks):  # fp32 (an embedding only: the linears and the head are Blocks)
            w = np.asarray(m, dtype=np.float32)
            return Mat(F32, *w.shape, 0, self._ptr(w), None, None)
        return Mat(m.kind, *m.shape, 0, self._ptr(m.q), self._ptr(m.d), None if m.m is None else self._ptr(m.m))

    def nbytes(self) -> int:
        """Bytes one decode step reads: the layers' and the head's weights and scales."""
        mats = [m for w in self.weights.layers for m in (w.qkv, w.out, w.gate_up, w.down)] + [self.weights.head]
        return sum(a.nbytes for m in mats for a in (m.q, m.d, m.m) if a is not None)

    def start(self, max_len: int):
        """step(ids (1, T) ints, pos) -> (1, vocab) fp32 logits (numpy) of the last of the T positions,
        with a KV cache of its own for `max_len` positions."""
        cfg, chunk = self.cfg, PROMPT_CHUNK
        hd, nq, nkv = cfg.head_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        half = hd // 2
        inv_freq = 1.0 / cfg.rope_theta ** (np.arange(half, dtype=np.float64) / half)
        angles = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)
        rope = np.stack([np.cos(angles), np.sin(angles)], -1).astype(np.float32)  # (max_len, half, 2)
        f32 = functools.partial(np.zeros, dtype=np.float32)
        buffers = {"k": f32((cfg.num_layers, cfg.num_kv_heads, max_len, hd)), "rope": rope}
        buffers["v"] = np.zeros_like(buffers["k"])
        buffers.update(x=f32((chunk, cfg.hidden_size)), h=f32((chunk, nq + 2 * nkv)), att=f32((chunk, nq)),
                       ff=f32((chunk, 2 * cfg.intermediate_size)), scores=f32((chunk * cfg.num_heads, max_len)))
        model = Model(cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, hd, cfg.intermediate_size,
                      cfg.vocab_size, max_len, chunk, 0, cfg.rms_norm_eps, 0.0, ctypes.addressof(self.layers),
                      self.embed, self.head, self.exact, RESCORE, 0, self.norm, *(buffers[n].ctypes.data for n in (
                          "rope", "k", "v", "x", "h", "att", "ff", "scores")))
        logits = np.zeros(cfg.vocab_size, np.float32)
        step_fn, ref = self.lib.smolctl_step, ctypes.byref(model)

        def step(ids, pos: int):
            flat = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int32)
            if pos + len(flat) > max_len:
                raise ValueError(f"position {pos + len(flat)} is past the cache's {max_len}")
            if flat.min() < 0 or flat.max() >= cfg.vocab_size:
                raise ValueError(f"token ids must be in 0..{cfg.vocab_size - 1}")
            for at in range(0, len(flat), chunk):
                part = flat[at:at + chunk]
                status = step_fn(ref, part.ctypes.data, len(part), pos + at, logits.ctypes.data)
                if status:
                    raise MemoryError("out of memory in the decode step") if status == -2 else \
                        ValueError(f"decode step out of range: {len(part)} tokens at {pos + at}")
            return logits.copy()[None]

        step.buffers = (model, buffers)  # alive as long as the step
        return step
