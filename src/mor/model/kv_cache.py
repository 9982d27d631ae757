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
- :class:`PagedKVCache`: one pool of fixed-size pages; every (request, stream) pair has its own block table and
  appends only the entries it receives, so memory follows the tokens that really ran each depth. The serving
  engine keeps its requests here; :meth:`PagedKVCache.view` lets the model's forward prefill into it.

Both report allocated bytes (:meth:`nbytes`) and the bytes of written entries (:meth:`used_nbytes`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
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


def _continue(layout: TokenLayout, lengths: Tensor, capacity: int) -> tuple[TokenLayout, Tensor]:
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
        layout, self.lengths = _continue(layout, self.lengths, self.max_len)
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


class PagedKVCache:
    """Keys/values in pages of ``page_size`` entries drawn from one pool shared by every stream.

    Each (stream, request) pair appends its entries to its own pages (block table ``tables[stream, request]``),
    so a request's deep-recursion streams hold only the tokens that reached them. One pool rather than one per
    stream lets memory follow whatever depth distribution the router produces. Request ``max_requests`` is an
    idle row whose table points at the trash page: padded engine slots use it.

    Page allocation happens on the host (:meth:`reserve`, from counts the host mirrors), the writes and reads
    on the device (:meth:`write`, :meth:`read`), so a step of fixed shape can be captured in a CUDA graph.
    """

    def __init__(self, positions: Sequence[int], num_pages: int, page_size: int, max_requests: int,
                 max_seq_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        if min(num_pages, page_size, max_requests, max_seq_len) < 1:
            raise ValueError(f"num_pages, page_size, max_requests and max_seq_len must be positive, got "
                             f"{num_pages}, {page_size}, {max_requests}, {max_seq_len}")
        self.stream = {p: i for i, p in enumerate(positions)}
        self.page_size = page_size
        self.max_seq_len = max_seq_len
        self.max_pages = math.ceil(max_seq_len / page_size)  # block-table width
        self.idle = max_requests
        self.trash = num_pages  # the extra page: writes that must land nowhere
        self.keys = torch.zeros(num_pages + 1, page_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.token_positions = torch.zeros(num_pages + 1, page_size, dtype=torch.long, device=device)
        streams, requests = len(positions), max_requests + 1
        self.tables = torch.full((streams, requests, self.max_pages), self.trash, dtype=torch.long, device=device)
        self.counts = torch.zeros(streams, requests, dtype=torch.long, device=device)
        self.lengths = torch.zeros(requests, dtype=torch.long, device=device)  # tokens seen per request
        # Host mirrors (numpy, so a step's bookkeeping is a few array operations): entries and block tables of
        # every (stream, request), and the free pages as a stack.
        self._counts = np.zeros((streams, requests), dtype=np.int64)
        self._num_pages = np.zeros((streams, requests), dtype=np.int64)
        self._tables = np.zeros((streams, requests, self.max_pages), dtype=np.int64)
        self._free = np.arange(num_pages - 1, -1, -1, dtype=np.int64)
        self._num_free = num_pages
        self.peak_pages = 0
        self.appended = np.zeros(streams, dtype=np.int64)  # entries ever appended per stream

    @classmethod
    def for_model(cls, model: torch.nn.Module, max_requests: int, max_seq_len: int, page_size: int = 16,
                  num_pages: int | None = None, extra_recursions: int = 0,
                  dtype: torch.dtype | None = None) -> PagedKVCache:
        """A pool for ``model``'s streams; ``num_pages`` defaults to the worst case (every request at full length
        in every stream), which never runs out."""
        positions = model.model.cache_positions(extra_recursions)
        if num_pages is None:
            num_pages = len(positions) * max_requests * math.ceil(max_seq_len / page_size)
        weight = model.lm_head.weight
        cfg = model.config
        return cls(positions, num_pages, page_size, max_requests, max_seq_len, cfg.num_key_value_heads,
                   cfg.head_dim, dtype or weight.dtype, weight.device)

    # ------------------------------------------------------------------ host side: pages
    @property
    def free_pages(self) -> int:
        return self._num_free

    def _new_pages(self, streams: np.ndarray, requests: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, ...]:
        total = self._counts[streams, requests] + counts
        need = np.maximum(-(-total // self.page_size) - self._num_pages[streams, requests], 0)
        return total, need

    def pages_needed(self, streams: Sequence[int], requests: Sequence[int], counts: Sequence[int]) -> int:
        """New pages that :meth:`reserve` would take for these appends."""
        return int(self._new_pages(*map(np.asarray, (streams, requests, counts)))[1].sum())

    def reserve(self, streams: Sequence[int], requests: Sequence[int], counts: Sequence[int]) -> None:
        """Make room for ``counts`` more entries in each (stream, request) (distinct pairs); raises MemoryError
        when the pool is exhausted and ValueError past ``max_seq_len`` (nothing is reserved then)."""
        streams, requests, counts = (np.asarray(x, dtype=np.int64) for x in (streams, requests, counts))
        total, need = self._new_pages(streams, requests, counts)
        if total.size and total.max() > self.max_seq_len:
            raise ValueError(f"a request would hold {total.max()} tokens but the cache holds at most "
                             f"{self.max_seq_len} per request; raise max_seq_len")
        taken = int(need.sum())
        if taken > self._num_free:
            raise MemoryError(f"the KV page pool is exhausted ({self._num_free} free pages of {self.page_size} "
                              "entries); give the cache more pages or admit fewer requests")
        if taken:
            pages = self._free[self._num_free - taken:self._num_free][::-1]
            self._num_free -= taken
            pair = np.repeat(np.arange(len(need)), need)
            first = np.cumsum(need) - need  # where each pair's new pages start in ``pages``
            column = self._num_pages[streams, requests][pair] + np.arange(taken) - first[pair]
            update = np.stack([streams[pair], requests[pair], column, pages])  # one host-to-device copy, not four
            self._tables[update[0], update[1], update[2]] = pages
            s, r, c, page = torch.from_numpy(update).to(self.tables.device, non_blocking=True)  # no GPU drain
            self.tables[s, r, c] = page
            self._num_pages[streams, requests] += need
        self._counts[streams, requests] = total
        self.appended += np.bincount(streams, weights=counts, minlength=len(self.appended)).astype(np.int64)
        self.peak_pages = max(self.peak_pages, self.pages_in_use())

    def release(self, request: int) -> None:
        """Return every page of ``request`` to the pool and forget its tokens."""
        for s in range(len(self.stream)):
            pages = self._tables[s, request, : self._num_pages[s, request]][::-1]
            self._free[self._num_free:self._num_free + len(pages)] = pages
            self._num_free += len(pages)
        self._num_pages[:, request] = 0
        self._counts[:, request] = 0
        self.tables[:, request] = self.trash
        self.counts[:, request] = 0
        self.lengths[request] = 0

    def reset_accounting(self) -> None:
        """Restart the peak-page and appended-entry counters (e.g. for a new benchmark run)."""
        self.peak_pages = self.pages_in_use()
        self.appended[:] = 0

    def host_counts(self, streams: Sequence[int] | np.ndarray, requests: Sequence[int] | np.ndarray) -> np.ndarray:
        """Entries of each (stream, request), as the host knows them."""
        return self._counts[np.asarray(streams), np.asarray(requests)]

    # ------------------------------------------------------------------ device side: entries
    def write(self, streams: Tensor, requests: Tensor, k: Tensor, v: Tensor, positions: Tensor, mask: Tensor,
              rank: Tensor | None = None, count: bool = True) -> None:
        """Append entry i (``k``/``v`` [N, Hkv, D] at token ``positions`` [N]) to (``streams[i]``,
        ``requests[i]``) where ``mask`` is set; ``rank`` [N] orders several entries of one pair in a call (0 for
        the first). Room must have been reserved. ``count=False`` leaves the entries uncounted until
        :meth:`count` (the engine counts a whole step's writes at once; reads see them through ``pending``)."""
        index = self.counts[streams, requests] + (0 if rank is None else rank)
        page = self.tables[streams, requests, (index // self.page_size).clamp(max=self.max_pages - 1)]
        page = torch.where(mask, page, self.trash)
        offset = index % self.page_size
        # Indexed assignment into the pool itself (not a view of it): under torch.compile this stays an in-place
        # scatter, where a write through a view makes the compiled code copy the whole pool.
        self.keys[page, offset] = k.to(self.keys.dtype)
        self.values[page, offset] = v.to(self.values.dtype)
        self.token_positions[page, offset] = positions
        if count:
            self.count(streams, requests, mask)

    def count(self, streams: Tensor, requests: Tensor, mask: Tensor) -> None:
        """Count one entry written (uncounted) to each (``streams[i]``, ``requests[i]``) where ``mask`` is set."""
        self.counts.index_put_((streams, requests), mask.long(), accumulate=True)

    def read(self, streams: Tensor, requests: Tensor, num_pages: int,
             pending: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Keys and values [N, Hkv, S, D], token positions [N, S] and validity [N, S] of (``streams[i]``,
        ``requests[i]``), padded to ``S = num_pages * page_size`` entries; ``pending`` [N] bool adds an entry
        written but not yet counted."""
        pages = self.tables[streams, requests, :num_pages]
        k = self.keys[pages].flatten(1, 2).transpose(1, 2)
        v = self.values[pages].flatten(1, 2).transpose(1, 2)
        positions = self.token_positions[pages].flatten(1)
        length = self.counts[streams, requests] + (0 if pending is None else pending.long())
        valid = torch.arange(positions.shape[1], device=positions.device) < length[:, None]
        return k, v, positions, valid

    def view(self, requests: Sequence[int]) -> PagedView:
        """The requests as the rows of a batch, for ``model(..., cache=view)`` (prefill)."""
        return PagedView(self, list(requests))

    # ------------------------------------------------------------------ accounting
    def pages_in_use(self) -> int:
        return self.keys.shape[0] - 1 - self._num_free

    def entries(self) -> dict[int, int]:
        """Written entries per stream (summed over requests)."""
        return {p: int(self._counts[s].sum()) for p, s in self.stream.items()}

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.token_positions.nbytes

    def used_nbytes(self) -> int:
        _, _, hkv, d = self.keys.shape
        return sum(self.entries().values()) * _entry_bytes(hkv, d, self.keys.dtype)

    def page_nbytes(self) -> int:
        """Bytes of one page (keys, values and positions)."""
        return self.nbytes() // self.keys.shape[0]


class PagedView:
    """Requests of a :class:`PagedKVCache` seen as the rows of a batch (the :class:`KVCache` protocol)."""

    def __init__(self, cache: PagedKVCache, requests: list[int]) -> None:
        self.cache = cache
        self.requests = requests
        self.rows = torch.tensor(requests, dtype=torch.long, device=cache.lengths.device)

    def extend(self, layout: TokenLayout) -> TokenLayout:
        layout, lengths = _continue(layout, self.cache.lengths[self.rows], self.cache.max_seq_len)
        self.cache.lengths[self.rows] = lengths
        return layout

    def updater(self, position: int, layout: TokenLayout) -> CacheUpdate:
        cache, s = self.cache, self.cache.stream[position]
        batch, length = layout.positions.shape
        valid = layout.valid if layout.valid is not None else torch.ones_like(layout.positions, dtype=torch.bool)

        def update(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            cache.reserve([s] * batch, self.requests, valid.sum(1).tolist())
            streams = torch.full_like(layout.positions, s)
            requests = self.rows[:, None].expand(batch, length)
            rank = valid.long().cumsum(1) - 1
            flat = (k.transpose(1, 2).flatten(0, 1), v.transpose(1, 2).flatten(0, 1))
            cache.write(streams.flatten(), requests.flatten(), *flat, layout.positions.flatten(), valid.flatten(),
                        rank.flatten())
            (k, v), cached = self.read(position)
            return k, v, allowed_attention(layout, cached)

        return update

    def read(self, position: int) -> tuple[KV, TokenLayout]:
        cache, s = self.cache, self.cache.stream[position]
        longest = int(cache.host_counts([s] * len(self.requests), self.requests).max())
        num_pages = max(1, math.ceil(longest / cache.page_size))
        k, v, positions, valid = cache.read(torch.full_like(self.rows, s), self.rows, num_pages)
        return (k, v), TokenLayout(positions, valid)
