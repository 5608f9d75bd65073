"""The training loss: the model and its loss as one module, a chunked linear cross-entropy that never
materialises the full (N, V) logits, and the held-out evaluation that uses the same loss."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from smolctl.data import DataSpec, token_stream
from smolctl.errors import SmolctlError


class CausalLMLoss(nn.Module):
    """The model plus its loss, as one module: the one place the loss is computed.

    Wrapping (rather than calling model.model directly) keeps DDP's hooks on the forward pass.
    Blocks are already shifted (inputs = block[:-1], labels = block[1:]), so we don't use
    transformers' labels= path, which would shift them again.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self._masks: dict[tuple, torch.Tensor] = {}  # eager attention's causal mask, by shape

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_states(input_ids)  # (B, T, C)
        return linear_cross_entropy(hidden.flatten(0, 1), self.model.lm_head.weight, labels.flatten())

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """LlamaModel's forward for whole blocks (no padding, no cache), minus its host sync: on
        every call transformers checks the positions for packed sequences with an `.all()`, which
        makes the CPU wait for the GPU once per micro-batch. A block's positions are always 0..T-1:
        SDPA needs no mask (its is_causal kernel, as transformers picks), eager attention (the
        compiled CPU path) the additive causal mask transformers would make, made once per shape."""
        llama = self.model.model
        impl = llama.config._attn_implementation
        if impl not in ("sdpa", "eager"):  # flash/flex attention: transformers' own forward
            return llama(input_ids=input_ids, use_cache=False).last_hidden_state
        hidden = llama.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        mask = self._eager_mask(input_ids.shape[1], hidden.dtype, hidden.device) if impl == "eager" else None
        rope = llama.rotary_emb(hidden, position_ids=positions)
        for layer in llama.layers[: llama.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=positions)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # transformers 4.x layers return tuples
        return llama.norm(hidden)

    def _eager_mask(self, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(1, 1, T, T): 0 where a position may attend, the dtype's minimum above the diagonal."""
        key = (length, dtype, device)
        if key not in self._masks:
            future = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
            self._masks[key] = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(
                future, torch.finfo(dtype).min)[None, None]
        return self._masks[key]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean(cross_entropy(hidden @ weight.T, labels)) without the full (N, V) logits.

    hidden (N, C), weight (V, C), labels (N,) of token ids (no ignore_index: blocks are packed).
    The logits are the step's largest activation: 4 x 256 tokens x 49,152 x 4 bytes = 200 MB in fp32,
    and a plain `F.cross_entropy(logits.float())` writes and rereads them ~8 times over forward and
    backward. Liger's fused Triton kernel takes over on CUDA when installed; otherwise
    `_ChunkedLinearCrossEntropy` computes each chunk's loss and gradients at once.
    """
    dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else weight.dtype
    if not torch.is_grad_enabled():  # evaluation: detached, so that no gradient is computed
        return _ChunkedLinearCrossEntropy.apply(hidden.detach(), weight.detach(), labels, dtype)
    if hidden.is_cuda and _liger_flce() is not None:  # Liger computes the gradients in forward too
        return _liger_flce()(hidden.to(dtype), weight.to(dtype), labels)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, dtype)


def _liger_flce():
    """Liger's fused linear cross-entropy function, or None when liger-kernel is not installed."""
    global _LIGER
    if _LIGER is False:
        try:
            from liger_kernel.transformers.functional import (
                liger_fused_linear_cross_entropy,
            )
            _LIGER = liger_fused_linear_cross_entropy
        except ImportError:
            _LIGER = None
    return _LIGER


_LIGER = False  # not looked up yet


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and both gradients in the forward pass, the fp32 logits a chunk of rows at a time.

    Per chunk: logits = h @ W.T in `dtype` (bf16 under autocast, as nn.Linear computes them),
    then in fp32 (as `logits.float()`), in place: p = exp(logits - max), loss = max + log(sum p)
    - logit[label], and dlogits = (p / sum p - onehot) / N, stored in `dtype` into one (N, V)
    buffer. Then, as nn.Linear's backward would: dh = dlogits @ W and dW = dlogits.T @ h, one
    matmul each. Backward only scales the saved gradients (by 1 / grad_accum, say).

    Same FLOPs as the plain path; what it saves is memory traffic, which on a CPU costs about as
    much as the lm_head's matmuls: the plain path allocates and walks (N, V) fp32 tensors some
    eight times (the cast, log_softmax and its backward, nll's zero-filled gradient, the cast back).
    Here one fp32 pass makes the loss and the gradient, and only the `dtype` gradient is (N, V).
    Chunks bound the fp32 memory (on a GPU without Liger: 24 chunks for 16 x 2048 tokens) but
    are kept large, since every op costs a synchronisation of the CPU's threads.
    """

    CHUNK_BYTES = 256 * 2**20  # fp32 logits per chunk: 1,365 rows at V = 49,152 (all of B4 x S256)

    @staticmethod
    def forward(ctx, hidden, weight, labels, dtype):
        n, vocab = hidden.shape[0], weight.shape[0]
        rows = max(1, _ChunkedLinearCrossEntropy.CHUNK_BYTES // (4 * vocab))
        need_h, need_w = ctx.needs_input_grad[:2]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)
            grad = torch.empty(n, vocab, dtype=dtype, device=hidden.device) if need_h or need_w else None
            for start in range(0, n, rows):
                h, y = h_all[start:start + rows], labels[start:start + rows, None]
                logits = F.linear(h, w).float()  # (rows, V) fp32, a fresh tensor: modified in place below
                target = logits.gather(1, y)
                top = logits.amax(1, keepdim=True)
                probs = logits.sub_(top).exp_()  # unnormalised softmax
                norm = probs.sum(1, keepdim=True)
                total += (top + norm.log() - target).sum()  # logsumexp - logit[label]
                if grad is not None:
                    probs.mul_((norm * n).reciprocal_())  # softmax / N
                    probs.scatter_add_(1, y, torch.full_like(target, -1.0 / n))  # - onehot / N
                    grad[start:start + rows] = probs
            grad_h = (grad @ w).to(hidden.dtype) if need_h else None
            grad_w = (grad.T @ h_all).to(weight.dtype) if need_w else None
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors  # ours alone, used once: scaled in place (no 113 MB copy)
        return (None if grad_h is None else grad_h.mul_(grad_out),
                None if grad_w is None else grad_w.mul_(grad_out), None, None)



@torch.no_grad()
def evaluate(loss_module: nn.Module, spec: DataSpec, *, seq_len: int, batch_size: int, tokens: int, device,
             tokenizer=None, autocast=nullcontext, progress=None) -> tuple[float, int]:
    """Mean loss over the first `tokens` next-token predictions of `spec`'s token stream (documents
    tokenized with `tokenizer`, the model's own or None for the bundled one, and joined by its
    document separator; read once, in order), or over all of them when the data is shorter.

    Returns (loss, tokens scored): exactly min(tokens, the stream's length - 1). Windows of up to
    seq_len + 1 tokens overlap by one (a window's last token is the next one's first input), so
    every token after the first is predicted once, with no padding; the last window and the last
    batch may be short. `progress`, when given, is called with the tokens scored so far after each
    batch.
    """
    was_training = loss_module.training
    loss_module.eval()
    total, n = torch.zeros((), dtype=torch.float64), 0
    for rows in _batches_of_equal_length(_windows(token_stream(spec, tokenizer), seq_len, tokens), batch_size):
        batch = torch.tensor(rows, device=device)
        with autocast():
            loss = loss_module(batch[:, :-1], batch[:, 1:])  # the mean over the batch's predictions
        total += loss.double().cpu() * batch[:, 1:].numel()
        n += batch[:, 1:].numel()
        if progress is not None:
            progress(n)
    loss_module.train(was_training)
    if n == 0:
        raise SmolctlError(f"the eval data ({spec.describe()}) has fewer than 2 tokens: nothing to predict",
                           hint="Use more eval text")
    return total.item() / n, n


def _windows(docs: Iterator[list[int]], seq_len: int, tokens: int) -> Iterator[list[int]]:
    """The first tokens + 1 tokens of the stream as windows of seq_len + 1, each overlapping the
    last by one token; the final one shorter when the tokens run out."""
    window, left = [], tokens + 1
    for ids in docs:
        window.extend(ids[:left])
        left -= min(left, len(ids))
        while len(window) > seq_len:
            yield window[:seq_len + 1]
            window = window[seq_len:]
        if not left:
            break
    if len(window) > 1:
        yield window


def _batches_of_equal_length(windows: Iterator[list[int]], batch_size: int) -> Iterator[list[list[int]]]:
    """Up to batch_size windows at a time, a shorter window in a batch of its own."""
    rows: list[list[int]] = []
    for w in windows:
        if rows and (len(rows) == batch_size or len(w) != len(rows[0])):
            yield rows
            rows = []
        rows.append(w)
    if rows:
        yield rows
