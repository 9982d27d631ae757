"""Key/value caches for decoding, one stream per unrolled layer position (MOR_SPEC 7).

Every unrolled position that computes its own keys/values has a stream. What a stream holds is exactly what the
full causal forward lets that position attend to, so cached decoding reproduces it:

- recursion-wise caching: the stream of a position at recursion step r holds the tokens that *ran* step r; a
  token that exited earlier never writes there, and a query at step r attends to that stream only (entries at
  positions <= its own);
- recursive KV sharing (``kv_cache="share"``): positions after the first application of a layer have no stream
  and read the stream of that first application (``MoRModel.kv_position``).

Two layouts:

- :class:`StaticKVCache`: ``[B, Hkv, max_len, D]`` per stream, allocated once, entries indexed by token position
  with a written-flag per slot; writes are in place (a fixed shape, as compiled decoding needs). A stream of a
  deep recursion step allocates every slot but fills only the tokens that reached it.
- :class:`KVPages`: the storage of a paged cache, one pool of fixed-size pages shared by every stream. Every
  (stream, request) pair appends only the entries it receives to its own pages, so memory follows the tokens that
  really ran each depth. The block tables and the allocator live with the engine (``mor.infer.page_pool``),
  which also makes a paged cache usable by the model's forward (``PagedCache.view``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from mor.model.layers import KV, CacheUpdate, TokenLayout, allowed_attention


class KVCache(Protocol):
    """What ``MoRModel.forward(..., cache=...)`` needs from a cache."""

    def extend(self, layout: TokenLayout) -> TokenLayout:
        """The layout of a new chunk of tokens that continues each cached row; the cache counts its tokens."""
        ...

    def updater(self, position: int, layout: TokenLayout) -> CacheUpdate:
        """Stores the chunk's keys/values (``layout``: its tokens) at ``position`` and returns all cached ones."""
        ...

    def read(self, position: int) -> tuple[KV, TokenLayout]:
        """Every key/value cached at ``position`` and the layout of their tokens."""
        ...


def continue_rows(layout: TokenLayout, lengths: Tensor, capacity: int) -> tuple[TokenLayout, Tensor]:
    """Shift ``layout`` past ``lengths`` tokens per row; the new lengths, checked against ``capacity``."""
    if layout.documents is not None:
        raise ValueError("document_ids are not supported with a KV cache: decode one document per row")
    count = layout.positions.shape[1] if layout.valid is None else layout.valid.sum(1)
    end = lengths + count
    longest = int(end.max())
    if longest > capacity:
        raise ValueError(f"a row would hold {longest} tokens but the KV cache holds at most {capacity}; "
                         "allocate a longer cache or generate fewer tokens")
    return TokenLayout(layout.positions + lengths[:, None], layout.valid), end


def _entry_bytes(num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one cached token at one position: its key and its value."""
    return 2 * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class StaticKVCache:
    """Pre-allocated streams ``[B, Hkv, max_len, D]``; slot ``t`` of a row holds the token at position ``t``."""

    def __init__(self, positions: Sequence[int], batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"a KV cache needs batch_size >= 1 and max_len >= 1, got {batch_size} and {max_len}")
        self.stream = {p: i for i, p in enumerate(positions)}
        self.max_len = max_len
        shape = (len(positions), batch_size, num_kv_heads, max_len + 1, head_dim)
        # Slot max_len is never read: writes of padding and unselected slots land there, keeping shapes static.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.written = torch.zeros(len(positions), batch_size, max_len + 1, dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._slots = torch.arange(max_len, device=device).expand(batch_size, max_len)
        self._bound = 0  # >= every row's length: reads stop there

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int, extra_recursions: int = 0,
                  dtype: torch.dtype | None = None) -> StaticKVCache:
        """A cache for every stream of ``model`` (a ``MoRForCausalLM``), on its device and in its dtype."""
        weight = model.lm_head.weight
        cfg = model.config
        return cls(model.model.cache_positions(extra_recursions), batch_size, max_len, cfg.num_key_value_heads,
                   cfg.head_dim, dtype or weight.dtype, weight.device)

    def extend(self, layout: TokenLayout) -> TokenLayout:
        layout, self.lengths = continue_rows(layout, self.lengths, self.max_len)
        self._bound = min(self.max_len, self._bound + layout.positions.shape[1])
        return layout

    def updater(self, position: int, layout: TokenLayout) -> CacheUpdate:
        i = self.stream[position]
        slot = layout.positions if layout.valid is None else layout.positions.masked_fill(~layout.valid, self.max_len)

        def update(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            index = slot[:, None, :, None].expand_as(k)
            self.keys[i].scatter_(2, index, k.to(self.keys.dtype))
            self.values[i].scatter_(2, index, v.to(self.values.dtype))
            self.written[i].scatter_(1, slot, True if layout.valid is None else layout.valid)
            (k, v), cached = self.read(position)
            return k, v, allowed_attention(layout, cached)

        return update

    def read(self, position: int) -> tuple[KV, TokenLayout]:
        i, end = self.stream[position], self._bound
        layout = TokenLayout(self._slots[:, :end], self.written[i, :, :end])
        return (self.keys[i, :, :, :end], self.values[i, :, :, :end]), layout

    def entries(self) -> dict[int, int]:
        """Written entries per stream (summed over rows)."""
        counts = self.written[:, :, : self.max_len].sum((1, 2)).tolist()
        return dict(zip(self.stream, counts))

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.written.nbytes

    def used_nbytes(self) -> int:
        _, _, hkv, _, d = self.keys.shape
        return sum(self.entries().values()) * _entry_bytes(hkv, d, self.keys.dtype)


class KVPages:
    """Paged key/value storage: a pool of pages ``[num_pages + 1, kv_heads, page_size, head_dim]`` (one page of
    one head is contiguous, as paged attention kernels read it) and the token position of every entry.

    Which pages belong to which (stream, request) is not decided here: the engine's page pool
    (``mor.infer.page_pool``) keeps the block tables and hands out pages. Page ``num_pages`` is a trash page:
    writes that must land nowhere (padding, masked tokens) go there.
    """

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> None:
        if min(num_pages, page_size) < 1:
            raise ValueError(f"num_pages and page_size must be positive, got {num_pages} and {page_size}")
        self.page_size = page_size
        self.trash = num_pages
        self.keys = torch.zeros(num_pages + 1, num_kv_heads, page_size, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.token_positions = torch.zeros(num_pages + 1, page_size, dtype=torch.long, device=device)

    def write(self, pages: Tensor, offsets: Tensor, k: Tensor, v: Tensor, positions: Tensor | None = None) -> None:
        """Store entry i (``k``/``v`` [N, Hkv, D]) at slot ``offsets[i]`` of page ``pages[i]``."""
        # Every dimension indexed by a tensor: under torch.compile this stays an in-place scatter into the pool,
        # where a write through a view makes the compiled code copy the whole pool.
        where = (pages[:, None], torch.arange(self.keys.shape[1], device=pages.device), offsets[:, None])
        self.keys[where] = k.to(self.keys.dtype)
        self.values[where] = v.to(self.values.dtype)
        if positions is not None:
            self.token_positions[pages, offsets] = positions

    def gather(self, pages: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Keys and values [N, Hkv, W * page_size, D] and token positions [N, W * page_size] of the pages
        [N, W] of each row, in order."""
        n, width = pages.shape
        _, heads, size, dim = self.keys.shape
        k = self.keys[pages].transpose(1, 2).reshape(n, heads, width * size, dim)
        v = self.values[pages].transpose(1, 2).reshape(n, heads, width * size, dim)
        return k, v, self.token_positions[pages].flatten(1)

    def entry_nbytes(self) -> int:
        """Bytes of one cached entry: its key and its value."""
        _, heads, _, dim = self.keys.shape
        return _entry_bytes(heads, dim, self.keys.dtype)

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.token_positions.nbytes

    def page_nbytes(self) -> int:
        """Bytes of one page (keys, values and positions)."""
        return self.nbytes() // self.keys.shape[0]
