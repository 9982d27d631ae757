"""Llama building blocks: RMSNorm, rotary embedding, grouped-query attention, SwiGLU MLP, decoder layer.

Attention works on token *layouts* rather than on dense sequences: every query and key carries its original
position (for RoPE and causality), a validity flag (padding, unselected slots) and optionally a document id.
That is what lets a recursion step run on a gathered subset of tokens and still attend exactly as the full
sequence would allow (MOR_SPEC 4.4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mor.config import MoRConfig


@dataclass
class TokenLayout:
    """Where the tokens of a (possibly gathered) batch sit in their sequences.

    ``positions`` [B, T] are original positions; ``valid`` [B, T] marks real tokens (None: all are real);
    ``documents`` [B, T] restricts attention to equal ids (None: one document per row).
    """

    positions: Tensor
    valid: Tensor | None = None
    documents: Tensor | None = None

    def gather(self, index: Tensor, valid: Tensor | None) -> "TokenLayout":
        """The layout of the tokens at ``index`` [B, K]; ``valid`` marks the slots that hold a selected token."""
        if self.valid is not None:
            gathered = self.valid.gather(1, index)
            valid = gathered if valid is None else valid & gathered
        documents = None if self.documents is None else self.documents.gather(1, index)
        return TokenLayout(self.positions.gather(1, index), valid, documents)

    @property
    def is_dense(self) -> bool:
        """True when plain causal attention over the slots is exact (no padding, no document boundaries)."""
        return self.valid is None and self.documents is None


def allowed_attention(queries: TokenLayout, keys: TokenLayout) -> Tensor | None:
    """Boolean [B, 1, Tq, Tk] mask of allowed query-key pairs, or None when a plain causal mask is exact.

    A query may see a key iff the key is real, not later in the sequence and in the same document.
    """
    if queries is keys and queries.is_dense:
        return None
    allowed = keys.positions[:, None, :] <= queries.positions[:, :, None]
    if keys.valid is not None:
        allowed = allowed & keys.valid[:, None, :]
    if queries.documents is not None and keys.documents is not None:
        allowed = allowed & (queries.documents[:, :, None] == keys.documents[:, None, :])
    # A query with nothing to attend to (padding, an empty slot) would produce NaN; let it see everything.
    # Its output is never used.
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return allowed[:, None]


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm of ``x`` over its last dimension (statistics in float32), scaled by ``weight``."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (the rotate-half convention of Llama), evaluated at arbitrary positions."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [B, H, T, D] by the angles of ``cos``/``sin`` [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


KV = tuple[Tensor, Tensor]
# Stores a chunk's new keys/values in a cache and returns every cached key/value with the attention mask over
# them (see mor.model.kv_cache).
CacheUpdate = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


class Attention(nn.Module):
    """Multi-head attention with grouped-query K/V heads, no biases."""

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=False)

    def project_kv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> KV:
        """Keys (rotated) and values [B, Hkv, T, D] of ``x``."""
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(k, *rope), v

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        kv: KV | None = None,
        cache: CacheUpdate | None = None,
    ) -> tuple[Tensor, KV]:
        """Attend from ``x``; ``kv`` supplies precomputed keys/values (shared or cached) instead of projecting.

        ``mask`` None means plain causal attention between aligned queries and keys. ``cache`` (decoding)
        stores the projected keys/values and supplies all cached ones and their mask instead.
        Returns the output and the keys/values attended to.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, *rope)
        k, v = self.project_kv(x, rope) if kv is None else kv
        if cache is not None:
            k, v, mask = cache(k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)), (k, v)


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


class DecoderLayer(nn.Module):
    """Pre-norm Llama layer. Its output includes the residual stream (MOR_SPEC 2)."""

    def __init__(self, config: MoRConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | None,
        kv: KV | None = None,
        cache: CacheUpdate | None = None,
    ) -> tuple[Tensor, KV]:
        attended, kv = self.self_attn(self.input_layernorm(x), rope, mask, kv, cache)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), kv
