"""Document masking for packed rows: each token attends only to earlier tokens of its own document.

``document_mask`` is the dense reference (any device, O(T^2) memory); ``document_block_mask`` builds the
FlexAttention ``BlockMask`` from the same rule (``document_mask_mod``) for fast GPU attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def document_ids(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Per-token document number within each row: 0 up to and including the first end-of-document token,
    then 1, and so on. The end-of-document token belongs to the document it ends."""
    is_eos = (input_ids == eos_token_id).long()
    return is_eos.cumsum(dim=-1) - is_eos


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, T, T]`` mask, True where query ``q`` may attend to key ``k``: ``k <= q`` and same document."""
    length = doc_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()
    return causal & (doc_ids[:, :, None] == doc_ids[:, None, :])


MaskMod = Callable[[Any, Any, Any, Any], Any]


def document_mask_mod(doc_ids: torch.Tensor) -> MaskMod:
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for :func:`document_mask`'s rule."""

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


def document_block_mask(doc_ids: torch.Tensor, block_size: int = 128) -> Any:
    """A FlexAttention ``BlockMask`` for ``doc_ids`` ``[B, T]`` (on their device), shared by all heads."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as error:
        raise ImportError(f"FlexAttention needs torch >= 2.5 (found {torch.__version__}); "
                          "use document_mask() with scaled_dot_product_attention instead") from error
    batch, length = doc_ids.shape
    return create_block_mask(document_mask_mod(doc_ids), batch, None, length, length, device=doc_ids.device,
                             BLOCK_SIZE=block_size)
