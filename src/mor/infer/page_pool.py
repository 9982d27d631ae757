"""The page allocator of paged KV caches, on the device.

A :class:`PagePool` holds, for every (stream, request row) pair, a block table (the pages of its entries, in
order), its entry count and its number of pages, plus a stack of free pages. Allocation and release are tensor
operations with fixed shapes and no host synchronisation, so the engine can run many decoding steps from one
CUDA graph without asking the host for pages; the host only makes sure, from counts it reads now and then, that
enough pages are free for the steps it launches (:mod:`mor.infer.scheduler`).

:class:`PagedCache` joins a pool to its storage (:class:`mor.model.kv_cache.KVPages`) and to a model's streams,
:class:`PagedRows` shows some of its rows to the model's forward as a batch (``generate``), and
:class:`PagedPrefill` fills empty rows from one forward over their prompts (the engine's prefill).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mor.infer.kernel_support import kernel_available, tl, triton
from mor.model.kv_cache import KVPages, continue_rows
from mor.model.layers import KV, CacheUpdate, TokenLayout, allowed_attention


class PagePool:
    """Block tables, entry counts and free pages of ``num_streams`` streams x ``num_rows`` request rows.

    Row ``num_rows`` is an idle row whose table points at the trash page: padded slots of a fixed-shape batch use
    it. Tables have one extra column that nothing reads, where masked allocations land; the free stack has one
    extra slot for the same purpose.
    """

    def __init__(self, num_streams: int, num_rows: int, num_pages: int, page_size: int, max_seq_len: int,
                 device: str | torch.device = "cpu") -> None:
        if min(num_streams, num_rows, num_pages, page_size, max_seq_len) < 1:
            raise ValueError(f"a page pool needs positive sizes, got {num_streams} streams, {num_rows} rows, "
                             f"{num_pages} pages of {page_size} entries, max_seq_len {max_seq_len}")
        self.num_streams, self.num_rows = num_streams, num_rows
        self.num_pages, self.page_size, self.max_seq_len = num_pages, page_size, max_seq_len
        self.max_pages = math.ceil(max_seq_len / page_size)
        self.idle = num_rows
        self.trash = num_pages
        rows = num_rows + 1
        self.tables = torch.full((num_streams, rows, self.max_pages + 1), num_pages, dtype=torch.long, device=device)
        self.counts = torch.zeros(num_streams, rows, dtype=torch.long, device=device)
        self.held = torch.zeros(num_streams, rows, dtype=torch.long, device=device)  # pages per pair
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)  # tokens each row has seen
        self.free = torch.arange(num_pages + 1, device=device)  # a stack: free[:top] are the free pages
        self.top = torch.tensor(num_pages, device=device)
        self.peak = torch.zeros((), dtype=torch.long, device=device)  # most pages in use at once
        self.overflow = torch.zeros((), dtype=torch.bool, device=device)  # set if the pool ever ran dry
        self.appended = torch.zeros(num_streams, dtype=torch.long, device=device)  # entries of released rows

    # ------------------------------------------------------------------ flat views for kernels
    @property
    def flat_tables(self) -> Tensor:
        """Block tables as [streams * rows, max_pages + 1]: pair (s, r) is row ``s * (num_rows + 1) + r``."""
        return self.tables.view(-1, self.tables.shape[-1])

    @property
    def flat_counts(self) -> Tensor:
        return self.counts.view(-1)

    def pair_index(self, streams: Tensor, rows: Tensor) -> Tensor:
        return streams * (self.num_rows + 1) + rows

    # ------------------------------------------------------------------ allocation (device)
    def grow(self, streams: Tensor, rows: Tensor, entries: Tensor, max_new_pages: int, check: bool = False) -> None:
        """Take pages so that each (``streams[i]``, ``rows[i]``) pair (distinct pairs) can hold ``entries[i]`` more
        entries; at most ``max_new_pages`` per pair. ``check=True`` raises MemoryError (one host synchronisation)
        when the pool is short, before anything changes; otherwise the caller guarantees enough free pages."""
        held = self.held[streams, rows]
        wanted = -(-(self.counts[streams, rows] + entries) // self.page_size)
        need = (wanted.clamp(max=self.max_pages) - held).clamp(min=0, max=max_new_pages)
        j = torch.arange(max_new_pages, device=need.device)
        take = j < need[:, None]  # [M, max_new_pages]
        total = take.sum()
        if check and int(total) > int(self.top):
            raise MemoryError(f"the KV page pool is exhausted ({int(self.top)} free pages of {self.page_size} "
                              "entries); give the cache more pages or admit fewer requests")
        rank = take.flatten().cumsum(0).view_as(take) - 1
        pages = self.free[(self.top - 1 - rank).clamp(min=0)]
        column = torch.where(take, held[:, None] + j, self.max_pages)  # masked takes land in the spare column
        self.tables[streams[:, None].expand_as(take), rows[:, None].expand_as(take), column] = pages
        self.held[streams, rows] = held + need
        self.overflow |= total > self.top
        self.top -= total
        self.peak.copy_(torch.maximum(self.peak, self.num_pages - self.top))

    def slots(self, stream: int | Tensor, rows: Tensor, index: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """Page and offset in it of entry ``index`` [B, T] of each of ``rows`` in ``stream``; the trash page
        where not ``valid``."""
        page = self.tables[stream, rows[:, None].expand_as(index), (index // self.page_size).clamp(0, self.max_pages)]
        return torch.where(valid, page, self.trash), index % self.page_size

    def ensure_room(self, active: Tensor, entries: int = 1, kernel: bool = False) -> None:
        """Give every stream of every ``active`` row [num_rows + 1] room for ``entries`` more entries: the engine
        calls this before a window of that many iterations, in each of which a row appends at most one entry to
        each stream. ``kernel``: in one Triton kernel (:func:`ensure_room_kernel`, CUDA), the same pages."""
        if kernel:
            ensure_room_kernel(active, self.tables, self.counts, self.held, self.free, self.top, self.peak,
                               self.overflow, entries, self.page_size)
            return
        streams = torch.arange(self.num_streams, device=active.device)[:, None].expand(-1, active.shape[0])
        rows = torch.arange(active.shape[0], device=active.device).expand_as(streams)
        wanted = (active.long() * entries).expand_as(streams)
        self.grow(streams.flatten(), rows.flatten(), wanted.flatten(), -(-entries // self.page_size))

    def count(self, streams: Tensor, rows: Tensor, entries: Tensor) -> None:
        """Count ``entries[i]`` new entries written to (``streams[i]``, ``rows[i]``)."""
        self.flat_counts.scatter_add_(0, self.pair_index(streams, rows), entries)

    def release(self, rows: Tensor) -> None:
        """Return every page of ``rows`` (distinct, not the idle row) to the pool and forget their entries."""
        held = self.held[:, rows]  # [S, M]
        give = torch.arange(self.max_pages, device=rows.device) < held[..., None]  # [S, M, max_pages]
        rank = give.flatten().cumsum(0) - 1
        slot = torch.where(give.flatten(), self.top + rank, self.num_pages)  # masked ones land in the spare slot
        self.free[slot] = self.tables[:, rows, : self.max_pages].flatten()
        self.top += give.sum()
        self.appended += self.counts[:, rows].sum(1)
        self.tables[:, rows] = self.trash
        self.counts[:, rows] = 0
        self.held[:, rows] = 0
        self.lengths[rows] = 0

    def reset(self) -> None:
        """Every page free and every pair empty (the overflow flag cleared)."""
        self.tables.fill_(self.trash)
        self.counts.zero_()
        self.held.zero_()
        self.lengths.zero_()
        self.free.copy_(torch.arange(self.num_pages + 1, device=self.free.device))
        self.top.fill_(self.num_pages)
        self.overflow.zero_()

    def reset_accounting(self) -> None:
        self.peak.copy_(self.num_pages - self.top)
        self.appended.zero_()

    # ------------------------------------------------------------------ host-side views (synchronise)
    def pages_in_use(self) -> int:
        return self.num_pages - int(self.top)

    def free_pages(self) -> int:
        return int(self.top)


if triton is not None:

    @triton.jit
    def _room_kernel(active_ptr, tables_ptr, counts_ptr, held_ptr, free_ptr, top_ptr, peak_ptr, overflow_ptr, pairs,
                     rows, stride_table, entries, page_size, max_pages, num_pages, MAX_NEW: tl.constexpr,
                     BLOCK: tl.constexpr):
        """One program walks every (stream, row) pair in blocks, in :meth:`PagePool.grow`'s order: a pair's new
        pages are the next ones off the free stack after those of the pairs before it."""
        top = tl.load(top_ptr)
        taken = tl.zeros((), tl.int64)
        for start in range(0, pairs, BLOCK):
            pair = start + tl.arange(0, BLOCK)
            valid = pair < pairs
            active = tl.load(active_ptr + pair % rows, mask=valid, other=0) != 0
            count = tl.load(counts_ptr + pair, mask=valid, other=0)
            held = tl.load(held_ptr + pair, mask=valid, other=0)
            wanted = tl.minimum((count + entries + page_size - 1) // page_size, max_pages)
            need = tl.where(active & valid, tl.minimum(tl.maximum(wanted - held, 0), MAX_NEW), 0)
            rank = taken + tl.cumsum(need, 0) - need  # pages taken before this pair's first
            for j in tl.static_range(MAX_NEW):
                take = j < need
                page = tl.load(free_ptr + tl.maximum(top - 1 - rank - j, 0), mask=take, other=0)
                tl.store(tables_ptr + pair * stride_table + held + j, page, mask=take)
            tl.store(held_ptr + pair, held + need, mask=valid)
            taken += tl.sum(need, 0)
        tl.store(overflow_ptr, (tl.load(overflow_ptr) != 0) | (taken > top))
        tl.store(top_ptr, top - taken)
        tl.store(peak_ptr, tl.maximum(tl.load(peak_ptr), num_pages - (top - taken)))


def ensure_room_kernel(active: Tensor, tables: Tensor, counts: Tensor, held: Tensor, free: Tensor, top: Tensor,
                       peak: Tensor, overflow: Tensor, entries: int, page_size: int) -> None:
    """:meth:`PagePool.ensure_room` of a pool's tensors in one Triton kernel (one program: the pairs of a pool
    are a few thousand); the same pages as the PyTorch path. It changes ``tables``, ``held``, ``top``, ``peak``
    and ``overflow`` in place; the engine calls it outside compiled code, once per window."""
    if not kernel_available(active.device):
        raise RuntimeError(f"ensure_room_kernel needs Triton and a CUDA device (the pool is on {active.device}); "
                           "use PagePool.ensure_room(..., kernel=False) elsewhere")
    streams, rows, width = tables.shape
    _room_kernel[(1,)](active, tables, counts, held, free, top, peak, overflow, streams * rows, rows, width, entries,
                       page_size, width - 1, free.shape[0] - 1, MAX_NEW=-(-entries // page_size), BLOCK=1024,
                       num_warps=4)


class PagedCache:
    """The paged KV cache of a model: storage, its page pool, and the stream of every caching position."""

    def __init__(self, positions: Sequence[int], num_rows: int, num_pages: int, page_size: int, max_seq_len: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        self.stream = {p: i for i, p in enumerate(positions)}
        self.pages = KVPages(num_pages, page_size, num_kv_heads, head_dim, dtype, device)
        self.pool = PagePool(len(positions), num_rows, num_pages, page_size, max_seq_len, device)

    @classmethod
    def for_model(cls, model: nn.Module, num_rows: int, max_seq_len: int, page_size: int = 16,
                  num_pages: int | None = None, extra_recursions: int = 0,
                  dtype: torch.dtype | None = None) -> PagedCache:
        """A cache for ``model``'s streams; ``num_pages`` defaults to the worst case (every row at full length in
        every stream), which never runs out."""
        positions = model.model.cache_positions(extra_recursions)
        if num_pages is None:
            num_pages = len(positions) * num_rows * math.ceil(max_seq_len / page_size)
        weight = model.lm_head.weight
        cfg = model.config
        return cls(positions, num_rows, num_pages, page_size, max_seq_len, cfg.num_key_value_heads, cfg.head_dim,
                   dtype or weight.dtype, weight.device)

    def view(self, rows: Sequence[int]) -> PagedRows:
        """The rows as the rows of a batch, for ``model(..., cache=view)``."""
        return PagedRows(self, list(rows))

    def prefill(self, rows: Sequence[int]) -> PagedPrefill:
        """Empty rows as the rows of a prompt batch, for ``model(..., cache=prefill)`` then ``prefill.commit()``."""
        return PagedPrefill(self, list(rows))

    def release(self, row: int) -> None:
        self.pool.release(torch.tensor([row], device=self.pool.counts.device))

    # ------------------------------------------------------------------ accounting (synchronise)
    def entries(self) -> dict[int, int]:
        """Written entries per stream (summed over rows)."""
        counts = self.pool.counts.sum(1).tolist()
        return {p: counts[s] for p, s in self.stream.items()}

    def used_nbytes(self) -> int:
        return sum(self.entries().values()) * self.pages.entry_nbytes()

    def nbytes(self) -> int:
        return self.pages.nbytes()

    def pages_in_use(self) -> int:
        return self.pool.pages_in_use()


class PagedRows:
    """Rows of a :class:`PagedCache` seen as the rows of a batch (the model's ``KVCache`` protocol). Pages are
    taken as the chunk's entries arrive, checked against the free pages (a host synchronisation per layer: this is
    the path of ``generate``, not of the engine)."""

    def __init__(self, cache: PagedCache, rows: list[int]) -> None:
        self.cache = cache
        self.rows = torch.tensor(rows, dtype=torch.long, device=cache.pool.counts.device)
        self.longest = max(cache.pool.lengths[self.rows].tolist(), default=0)  # entries a stream can hold at most

    def extend(self, layout: TokenLayout) -> TokenLayout:
        pool = self.cache.pool
        layout, lengths = continue_rows(layout, pool.lengths[self.rows], pool.max_seq_len)
        pool.lengths[self.rows] = lengths
        self.longest = int(lengths.max())
        return layout

    def updater(self, position: int, layout: TokenLayout) -> CacheUpdate:
        pool, pages, s = self.cache.pool, self.cache.pages, self.cache.stream[position]
        batch, length = layout.positions.shape
        valid = layout.valid if layout.valid is not None else torch.ones_like(layout.positions, dtype=torch.bool)
        streams = torch.full_like(self.rows, s)

        def update(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            added = valid.sum(1)
            pool.grow(streams, self.rows, added, math.ceil(length / pool.page_size) + 1, check=True)
            index = pool.counts[s, self.rows][:, None] + valid.long().cumsum(1) - 1  # [B, T] entry index
            page, offset = pool.slots(s, self.rows, index, valid)
            pages.write(page.flatten(), offset.flatten(), k.transpose(1, 2).flatten(0, 1),
                        v.transpose(1, 2).flatten(0, 1), layout.positions.flatten())
            pool.count(streams, self.rows, added)
            (k, v), cached = self.read(position)
            return k, v, allowed_attention(layout, cached)

        return update

    def read(self, position: int) -> tuple[KV, TokenLayout]:
        pool, s = self.cache.pool, self.cache.stream[position]
        width = max(1, math.ceil(self.longest / pool.page_size))
        k, v, positions = self.cache.pages.gather(pool.tables[s, self.rows, :width])
        valid = torch.arange(positions.shape[1], device=positions.device) < pool.counts[s, self.rows][:, None]
        return (k, v), TokenLayout(positions, valid)


class PagedPrefill:
    """Empty rows of a :class:`PagedCache` filled by one forward over their prompts (the model's ``KVCache``
    protocol). With nothing cached before, attention stays within the prompt batch: each position's keys/values
    are kept as the forward makes them and :meth:`commit` writes them all to the pages at the end, with one
    allocation and one scatter (two reads of device values a batch: the rows are empty, the pool holds them),
    where :class:`PagedRows` allocates, writes, gathers and reads the free pages back at every layer."""

    def __init__(self, cache: PagedCache, rows: list[int]) -> None:
        if len(set(rows)) != len(rows):
            raise ValueError(f"a prefill needs distinct rows, got {rows}")
        self.cache = cache
        self.rows = torch.tensor(rows, dtype=torch.long, device=cache.pool.counts.device)
        if bool(cache.pool.held[:, self.rows].any()):
            raise ValueError(f"a prefill fills empty rows; release rows {rows} first")
        self.kept: dict[int, tuple[Tensor, Tensor, TokenLayout]] = {}  # position -> keys, values, their tokens
        self.lengths: Tensor | None = None
        self._masks: dict[int, tuple[TokenLayout, Tensor | None]] = {}  # one mask per layout (a step's layers)

    def extend(self, layout: TokenLayout) -> TokenLayout:
        pool = self.cache.pool
        if layout.documents is not None:
            raise ValueError("document_ids are not supported with a KV cache: decode one document per row")
        if layout.positions.shape[1] > pool.max_seq_len:
            raise ValueError(f"a prompt of {layout.positions.shape[1]} tokens does not fit a KV cache of at most "
                             f"{pool.max_seq_len}; allocate a longer cache")
        width = layout.positions.shape[1]
        self.lengths = torch.full_like(self.rows, width) if layout.valid is None else layout.valid.sum(1)
        return layout

    def updater(self, position: int, layout: TokenLayout) -> CacheUpdate:
        if position in self.kept:
            raise RuntimeError(f"position {position} stored twice in one prefill")

        def update(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
            self.kept[position] = (k, v, layout)
            return k, v, self._mask(layout)

        return update

    def read(self, position: int) -> tuple[KV, TokenLayout]:
        k, v, layout = self.kept[position]
        return (k, v), layout

    def _mask(self, layout: TokenLayout) -> Tensor | None:
        if id(layout) not in self._masks:  # the memo holds the layout, so its id is not reused meanwhile
            self._masks[id(layout)] = (layout, allowed_attention(layout, layout))
        return self._masks[id(layout)][1]

    def commit(self) -> None:
        """Write every kept key/value to its stream's pages and count the rows' tokens; raises MemoryError before
        taking any page when the pool is short."""
        pool, pages = self.cache.pool, self.cache.pages
        if self.kept:
            batch = self.rows.shape[0]
            device = self.rows.device
            streams = torch.tensor([self.cache.stream[p] for p in self.kept], device=device)
            valid = [torch.ones_like(layout.positions, dtype=torch.bool) if layout.valid is None else layout.valid
                     for _, _, layout in self.kept.values()]
            added = torch.stack([v.sum(1) for v in valid])  # [positions, rows]
            pair_streams = streams[:, None].expand(-1, batch).flatten()
            pair_rows = self.rows[None].expand(len(streams), -1).flatten()
            width = max(v.shape[1] for v in valid)
            pool.grow(pair_streams, pair_rows, added.flatten(), math.ceil(width / pool.page_size), check=True)
            where, offsets, keys, values, positions = [], [], [], [], []
            for s, ok, (k, v, layout) in zip(streams, valid, self.kept.values()):
                page, offset = pool.slots(s, self.rows, ok.long().cumsum(1) - 1, ok)  # the streams start empty
                where.append(page.flatten())
                offsets.append(offset.flatten())
                keys.append(k.transpose(1, 2).flatten(0, 1))
                values.append(v.transpose(1, 2).flatten(0, 1))
                positions.append(layout.positions.flatten())
            pages.write(torch.cat(where), torch.cat(offsets), torch.cat(keys), torch.cat(values),
                        torch.cat(positions))
            pool.count(pair_streams, pair_rows, added.flatten())
            self.kept.clear()
        if self.lengths is not None:
            pool.lengths[self.rows] = self.lengths
