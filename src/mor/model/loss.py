"""The language-model loss without the full logits: the head and cross-entropy, a chunk of tokens at a time.

A training batch of 16 x 2048 tokens over a 49,152-token vocabulary has logits of 3.2 GB in bf16 (6.4 GB in the
float32 the loss is taken in), and their gradient as much again. :func:`linear_cross_entropy` computes the head
and the loss for ``chunk_tokens`` tokens at a time and, when a gradient is wanted, the gradients of the hidden
states and of the head's weight in the same pass (the gradient of cross-entropy over its logits is
``softmax - one_hot``), so only one chunk's logits ever exist. Backward then scales the stored gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int = 4096) -> Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)`` (the mean over the labelled tokens, NaN
    when none is) for ``hidden`` [N, d], ``weight`` [V, d] and ``labels`` [N], ``chunk_tokens`` tokens at a time.
    Under autocast the head runs in the autocast dtype, as ``F.linear`` would; the loss is taken in float32."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1] or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"expected hidden [N, d], weight [V, d] and labels [N], got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)} and {tuple(labels.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_tokens, dtype)
    with torch.autocast(device, enabled=False):
        total, _, _ = _chunks(hidden, weight, labels, chunk_tokens, dtype, False, False)
        return total / (labels != IGNORE_INDEX).sum()


def _chunks(hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int, dtype: torch.dtype,
            grad_hidden_wanted: bool, grad_weight_wanted: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The summed loss over the chunks and the gradients of that sum wanted: over ``hidden`` (in ``dtype``) and
    over ``weight`` (float32)."""
    w = weight.to(dtype)
    total = torch.zeros((), device=hidden.device)
    grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if grad_hidden_wanted else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight_wanted \
        else None
    for start in range(0, hidden.shape[0], chunk_tokens):
        h = hidden[start: start + chunk_tokens].to(dtype)
        y = labels[start: start + chunk_tokens]
        logits = F.linear(h, w).float()
        keep = y != IGNORE_INDEX
        target = y.masked_fill(~keep, 0)
        lse = logits.logsumexp(-1)
        total = total + ((lse - logits.gather(1, target[:, None])[:, 0]) * keep).sum()
        if grad_hidden_wanted or grad_weight_wanted:
            # d(sum of losses)/d(logits) = softmax - one_hot, zero for unlabelled tokens
            grad = (logits - lse[:, None]).exp()
            grad.scatter_add_(1, target[:, None], -torch.ones_like(grad[:, :1]))
            grad = (grad * keep[:, None]).to(dtype)
            if grad_hidden is not None:
                grad_hidden[start: start + chunk_tokens] = grad @ w
            if grad_weight is not None:
                grad_weight += (grad.T @ h).float()
    return total, grad_hidden, grad_weight


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_tokens: int,
                dtype: torch.dtype) -> Tensor:
        wanted = ctx.needs_input_grad
        with torch.autocast(hidden.device.type, enabled=False):
            total, grad_hidden, grad_weight = _chunks(hidden, weight, labels, chunk_tokens, dtype, wanted[0],
                                                      wanted[1])
        count = (labels != IGNORE_INDEX).sum()
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.dtypes = hidden.dtype, weight.dtype
        return total / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_output / count
        hidden_dtype, weight_dtype = ctx.dtypes
        return (None if grad_hidden is None else grad_hidden.float().mul(scale).to(hidden_dtype),
                None if grad_weight is None else grad_weight.mul(scale).to(weight_dtype), None, None, None)
