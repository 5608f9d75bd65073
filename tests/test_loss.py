import pytest
import torch
import torch.nn.functional as F

from smolctl.loss import _ChunkedLinearCrossEntropy, linear_cross_entropy


def reference(hidden, weight, labels):
    return F.cross_entropy((hidden @ weight.T).float(), labels)


def grads(fn, hidden, weight, labels, scale=1.0):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(h, w, labels)
    (loss * scale).backward()  # scale: the trainer backpropagates loss / grad_accum
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk_rows", [3, 1000])  # several chunks (the last one short), or one
def test_chunked_cross_entropy_matches_the_plain_loss_and_gradients(monkeypatch, chunk_rows):
    vocab = 97
    monkeypatch.setattr(_ChunkedLinearCrossEntropy, "CHUNK_BYTES", chunk_rows * 4 * vocab)
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(10, 16, generator=g), torch.randn(vocab, 16, generator=g)
    labels = torch.randint(0, vocab, (10,), generator=g)
    for scale in (1.0, 0.25):
        for got, want in zip(grads(linear_cross_entropy, hidden, weight, labels, scale),
                             grads(reference, hidden, weight, labels, scale)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), reference(hidden, weight, labels))


def test_chunked_cross_entropy_under_bf16_autocast_matches_nn_linear():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(64, 32, generator=g), torch.randn(500, 32, generator=g) * 0.1
    labels = torch.randint(0, 500, (64,), generator=g)
    with torch.autocast("cpu", torch.bfloat16):
        got = grads(linear_cross_entropy, hidden, weight, labels)
        want = grads(lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y), hidden, weight, labels)
    assert [t.dtype for t in got[1:]] == [torch.float32, torch.float32]  # gradients in the parameters' dtype
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)
