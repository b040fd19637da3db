"""The chunked log-prob and entropy head equals the plain computation, in values and in gradients."""

from __future__ import annotations

import pytest
import torch
from model_factories import one_torch_thread  # noqa: F401 - an autouse fixture
from torch import nn

from learner.head import chunked_logprob_entropy, plain_logprob_entropy, response_logprobs


def inputs(dtype: torch.dtype, n: int = 37, hidden: int = 16, vocab: int = 101) -> tuple[torch.Tensor, ...]:
    """Hidden states [n, H] and an output weight [V, H] with grad, targets [n], upstream grads for both outputs."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(n, hidden, generator=gen, dtype=dtype).requires_grad_()
    w = (0.5 * torch.randn(vocab, hidden, generator=gen, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    g_logp, g_entropy = torch.randn(n, generator=gen, dtype=dtype), torch.randn(n, generator=gen, dtype=dtype)
    return h, w, targets, g_logp, g_entropy


def plain(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, ...]:
    """log_softmax over materialised logits, entropy with its gradient: the obvious computation."""
    log_p = torch.log_softmax((h @ w.T) / temperature, dim=-1)
    return log_p.gather(1, targets[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [1, 8, 1024])
def test_values_and_gradients_equal_the_plain_computation(
    dtype: torch.dtype, tol: float, temperature: float, chunk: int
) -> None:
    h, w, targets, g_logp, g_entropy = inputs(dtype)
    logp, entropy = chunked_logprob_entropy(h, w, targets, temperature, chunk)
    ref_logp, ref_entropy = plain(h, w, targets, temperature)
    assert logp.dtype == dtype and entropy.dtype == dtype
    torch.testing.assert_close(logp, ref_logp, atol=tol, rtol=tol)
    torch.testing.assert_close(entropy, ref_entropy, atol=tol, rtol=tol)
    got = torch.autograd.grad((logp * g_logp).sum() + (entropy * g_entropy).sum(), (h, w))
    expected = torch.autograd.grad((ref_logp * g_logp).sum() + (ref_entropy * g_entropy).sum(), (h, w))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)


def test_log_prob_gradients_alone_and_gradcheck() -> None:
    h, w, targets, g_logp, _ = inputs(torch.float64, n=9, hidden=4, vocab=7)
    logp, _ = chunked_logprob_entropy(h, w, targets, 0.8, 4)
    got = torch.autograd.grad((logp * g_logp).sum(), (h, w))  # entropy unused: its gradient term is skipped
    ref_logp, _ = plain(h, w, targets, 0.8)
    expected = torch.autograd.grad((ref_logp * g_logp).sum(), (h, w))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(lambda x, y: chunked_logprob_entropy(x, y, targets, 0.8, 4), (h, w))


def test_tied_embeddings_accumulate_into_the_one_matrix() -> None:
    torch.manual_seed(0)
    embedding = nn.Embedding(11, 6).double()
    head = nn.Linear(6, 11, bias=False).double()
    head.weight = embedding.weight
    ids = torch.tensor([1, 4, 2, 7])
    targets = torch.tensor([4, 2, 7, 3])
    grads = []
    for chunk in (0, 2):
        embedding.zero_grad(set_to_none=True)
        logp, _ = response_logprobs(embedding(ids), head, targets, 1.0, chunk)
        logp.sum().backward()
        assert embedding.weight.grad is not None
        grads.append(embedding.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_the_plain_head_is_the_previous_computation_and_covers_biased_layers() -> None:
    h, w, targets, _, _ = inputs(torch.float64)
    head = nn.Linear(16, 101, bias=True).double()
    logp, entropy = response_logprobs(h, head, targets, 1.0, 1024)  # a bias: not chunkable, so the plain head
    ref_logp, ref_entropy = plain_logprob_entropy(h, head, targets, 1.0)
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy)
    assert not entropy.requires_grad


def test_no_rows_and_bad_inputs() -> None:
    h, w, _, _, _ = inputs(torch.float32)
    logp, entropy = chunked_logprob_entropy(h[:0], w, torch.zeros(0, dtype=torch.long))
    assert logp.shape == entropy.shape == (0,)
    logp.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_logprob_entropy(h, w, torch.zeros(37, dtype=torch.long), chunk_tokens=0)
    with pytest.raises(ValueError, match="targets"):
        chunked_logprob_entropy(h, w, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        response_logprobs(h, nn.Linear(16, 101, bias=False), torch.zeros(37, dtype=torch.long), 0.0, 8)


def test_under_autocast_the_product_runs_in_the_autocast_dtype_and_stays_close() -> None:
    h, w, targets, _, _ = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _ = chunked_logprob_entropy(h, w, targets, 1.0, 8)
    logits = (h.detach().bfloat16() @ w.detach().bfloat16().T).float()  # what an nn.Linear under autocast yields
    ref_logp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    logp.sum().backward()
    assert h.grad is not None and w.grad is not None and w.grad.dtype == torch.float32
