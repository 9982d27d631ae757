"""The chunked head + cross-entropy equals the plain one, in value and in gradients."""

import pytest
import torch
import torch.nn.functional as F

from mor.model.loss import linear_cross_entropy


def reference(hidden, weight, labels):
    return F.cross_entropy(F.linear(hidden, weight).float(), labels, ignore_index=-100)


def inputs(n=37, d=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, requires_grad=True)
    weight = (torch.randn(v, d, generator=g) * 0.3).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 8, 37, 100])
def test_loss_and_gradients_equal_the_plain_cross_entropy(chunk):
    hidden, weight, labels = inputs()
    expected = reference(hidden, weight, labels)
    grads = torch.autograd.grad(expected * 3, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, labels, chunk_tokens=chunk)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(torch.autograd.grad(loss * 3, (hidden, weight)), grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_without_gradients_it_is_the_same_loss():
    hidden, weight, labels = inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels, 8), reference(hidden, weight, labels))


def test_under_autocast_the_head_runs_in_the_autocast_dtype():
    hidden, weight, labels = inputs(n=64, d=32, v=70)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(hidden, weight, labels)
        loss = linear_cross_entropy(hidden, weight, labels, 16)
    torch.testing.assert_close(loss, expected, rtol=1e-3, atol=1e-3)
    loss.backward()
    assert hidden.grad.dtype == hidden.dtype and weight.grad.dtype == weight.dtype
    plain = [g.clone() for g in (hidden.grad, weight.grad)]
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference(hidden, weight, labels).backward()
    for got, want in zip(plain, (hidden.grad, weight.grad)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_bad_shapes_are_refused_clearly():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="expected hidden"):
        linear_cross_entropy(hidden[None], weight, labels)
    with pytest.raises(ValueError, match="chunk_tokens"):
        linear_cross_entropy(hidden, weight, labels, 0)


def test_a_frozen_head_gets_no_gradient_and_nothing_labelled_is_nan_as_in_the_plain_loss():
    hidden, weight, labels = inputs()
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, labels, 8)
    loss.backward()
    torch.testing.assert_close(hidden.grad, torch.autograd.grad(reference(hidden, weight, labels), hidden)[0])
    assert weight.grad is None
    unlabelled = torch.full_like(labels, -100)
    assert linear_cross_entropy(hidden, weight, unlabelled).isnan() and reference(hidden, weight, unlabelled).isnan()
