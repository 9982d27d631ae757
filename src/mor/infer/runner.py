"""The engine's device side: request rows, their state, and decoding steps as fixed-shape tensor operations.

Every request in flight owns a *row*. A row holds one token at a time and moves through phases:

    ENTER -> (entry) -> BLOCK -> (block steps at depth 1, 2, ...) -> EXIT -> (tail, sampling) -> entry again ...
                                                                                  \\-> DONE (end token, length)

One *iteration* runs, in order and all on the device:

1. the *block stage*: the shared recursion block once on up to ``block_slots`` rows in phase BLOCK, whatever
   their depth (depth-wise batching); each token writes and reads the paged stream of its own depth
   (recursion-wise caching) or reads its depth-1 stream (KV sharing); then the causal routing rule of
   :mod:`mor.model.routing` decides per token: the next depth, or EXIT;
2. the *tail stage*: up to ``tail_slots`` rows in phase EXIT (or ENTER, newly admitted) run the unique last
   layer(s), the norm and the head, sample their next token (:func:`mor.infer.sampling.sample_rows`), log it,
   and unless the request is done run the *entry* right behind: embedding, unique first layer(s) and the first
   routing decision. A row still *feeding* its prompt takes the prompt's next token instead of the sampled one,
   and nothing is logged: a short prompt goes through the same loop as generated tokens, with no prefill.

Rows are picked by age (oldest first) when there are more candidates than slots; idle slots point at an idle row
whose writes land in a trash page. A *window* of K iterations runs without the host. It starts by giving every
stream of every active row room for K more entries (:meth:`PagePool.ensure_room`; rows only become active between
windows), once rather than every iteration, which saves a scan of the pool per iteration. At its end the state the
host needs (the token log, row phases, entry counts, free pages) is published into one status buffer that comes
back in one copy. With CUDA graphs, each window size is one captured graph: a window costs one launch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mor.infer.page_pool import PagedCache
from mor.infer.kernel_support import kernel_available
from mor.infer.paged_attention import gathered_attention, paged_decode_attention
from mor.infer.sampling import SAMPLING_MODES, sample_rows
from mor.model.layers import DecoderLayer, apply_rotary, rms_norm, swiglu
from mor.model.routing import RoutingResult

FREE, BLOCK, EXIT, ENTER, DONE = range(5)  # row phases
# Columns of the integer row state (one tensor, so a stage updates a row's state in one write)
POSITION, STEP, PHASE, AGE, REMAINING, TOKEN, SAMPLED, TARGET, TOP_K, SEED, CAP, FEED = range(12)
# Columns of the float row state
GATE, TEMPERATURE, TOP_P = range(3)
# Device counters
CLOCK, BLOCK_TOKENS, SAMPLED_TOKENS, FED_TOKENS = range(4)
MAX_EOS = 16  # end-token ids a run can have
# Attention kernels a prefill may use. Not cuDNN's: it builds a plan for every new shape, and prompt shapes rarely
# repeat (on an H200 that cost up to 0.8 s per prefill; benchmarks/prefill_shapes.py).
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class FusedLayer:
    """A decoder layer's weights for decoding, with the q/k/v and the gate/up projections concatenated (one
    matrix product each). A snapshot taken when the engine is built: later changes to the model do not reach
    it."""

    input_norm: Tensor
    qkv: Tensor
    out: Tensor
    post_norm: Tensor
    gate_up: Tensor
    down: Tensor

    @classmethod
    def of(cls, layer: DecoderLayer) -> FusedLayer:
        a, m = layer.self_attn, layer.mlp
        with torch.no_grad():
            return cls(layer.input_layernorm.weight.detach(),
                       torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                       a.o_proj.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                       torch.cat([m.gate_proj.weight, m.up_proj.weight]), m.down_proj.weight.detach())

    def tensors(self) -> tuple[Tensor, ...]:
        return self.input_norm, self.qkv, self.out, self.post_norm, self.gate_up, self.down


def decode_layer(x: Tensor, weights: tuple[Tensor, ...], cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor,
                 tables: Tensor, counts: Tensor, write_at: Tensor, write: Tensor, read_at: Tensor, extra: Tensor,
                 eps: float, heads: int, kv_heads: int, kernel: bool, width: int) -> Tensor:
    """One decoder layer (the computation of :class:`mor.model.layers.DecoderLayer`) on one token per row of ``x``
    [N, d]: the token's key/value is appended to pair ``write_at`` of the flat block ``tables`` where ``write``,
    then it attends to pair ``read_at`` (``extra``: plus that entry, written but not yet counted)."""
    norm1, qkv, out, norm2, gate_up, down = weights
    n = x.shape[0]
    dim = qkv.shape[0] // (heads + 2 * kv_heads)
    q, k, v = (rms_norm(x, norm1, eps) @ qkv.T).split([heads * dim, kv_heads * dim, kv_heads * dim], -1)
    q = apply_rotary(q.reshape(n, heads, dim), cos, sin)
    k = apply_rotary(k.reshape(n, kv_heads, dim), cos, sin)
    page_size, trash, spare = keys.shape[2], keys.shape[0] - 1, tables.shape[1] - 1
    index = counts[write_at]
    page = torch.where(write, tables[write_at, (index // page_size).clamp(max=spare)], trash)
    # Every dimension indexed by a tensor: a plain in-place scatter into the pool (a slice among the indices can
    # make compiled code write through a view, which copies the whole pool).
    where = (page[:, None], torch.arange(kv_heads, device=x.device), (index % page_size)[:, None])
    keys[where] = k.to(keys.dtype)
    values[where] = v.reshape(n, kv_heads, dim).to(values.dtype)
    if kernel:
        attended = paged_decode_attention(q, keys, values, tables, counts, read_at, extra)
    else:
        attended = gathered_attention(q, keys, values, tables, counts, read_at, extra, width)
    x = x + attended.reshape(n, heads * dim) @ out.T
    gate, up = (rms_norm(x, norm2, eps) @ gate_up.T).chunk(2, -1)
    return x + swiglu(gate, up) @ down.T


@dataclass
class Window:
    """A window of iterations launched on the device; its status arrives in ``host`` once ``done`` fires."""

    size: int
    host: Tensor
    done: torch.cuda.Event | None


@dataclass
class WindowStatus:
    """What the host learns after a window: every sampled token in order (row, token, depth), each row's phase,
    the entry counts and the pages held [streams, rows], and the free pages."""

    rows: np.ndarray
    tokens: np.ndarray
    depths: np.ndarray
    phase: np.ndarray
    counts: np.ndarray
    held: np.ndarray
    free_pages: int


class Runner:
    """Device state and decoding iterations for a ``MoRForCausalLM`` (any variant); driven by the engine."""

    def __init__(self, model: nn.Module, rows: int, block_slots: int, tail_slots: int, max_seq_len: int,
                 page_size: int, num_pages: int | None, extra_recursions: int,
                 window_sizes: tuple[int, ...], cuda_graphs: bool, compile: bool, kernel: bool,
                 lockstep: bool = False, feed_slots: int = 0) -> None:
        cfg, inner = model.config, model.model
        self.model, self.config = model, cfg
        weight = model.lm_head.weight
        device, dtype = weight.device, weight.dtype
        self.device = device
        self.rows, self.idle = rows, rows
        self.block_slots, self.tail_slots = min(block_slots, rows), min(tail_slots, rows)
        self.window_sizes = tuple(sorted(window_sizes))
        # The Triton kernels on CUDA only: Triton's interpreter (TRITON_INTERPRET=1) would run them on the CPU, slowly
        self.cuda_graphs = cuda_graphs
        self.kernel = kernel and device.type == "cuda" and kernel_available(device)
        self.lockstep = lockstep

        # Every step a row may run; each row has its own cap (CAP: max_recursions, extra_recursions per request).
        self.steps = inner.recursion_steps(None, extra_recursions)
        # Depth reported per block pass: a sequence-shared block repeats each layer Nr times in one pass.
        self.depth_unit = cfg.depth_per_step
        self.cache = PagedCache.for_model(model, rows, max_seq_len, page_size, num_pages, extra_recursions)
        self.pool, self.pages = self.cache.pool, self.cache.pages
        stream = self.cache.stream

        # Per (step, block layer): whether the position stores keys/values, the stream it writes and the one it
        # reads, and whether that read stream already holds this pass's entry uncounted (written by this layer or
        # an earlier one of the same step, as sequence sharing with shared keys/values does).
        writes = [[inner.kv_position(p) == p for p in step] for step in self.steps]
        write_stream = [[stream.get(p, 0) for p in step] for step in self.steps]
        read_stream = [[stream[inner.kv_position(p)] for p in step] for step in self.steps]
        pending = [[any(w[i] and ws[i] == rs[j] for i in range(j + 1)) for j in range(len(rs))]
                   for w, ws, rs in zip(writes, write_stream, read_stream)]
        # Whether the positions of a block step name distinct streams (with shared keys/values, those that write
        # nothing name stream 0 too)
        self.distinct_writes = all(len(set(ws)) == len(ws) for ws in write_stream)
        self.writes = torch.tensor(writes, dtype=torch.bool, device=device)
        self.write_stream = torch.tensor(write_stream, dtype=torch.long, device=device)
        self.read_stream = torch.tensor(read_stream, dtype=torch.long, device=device)
        self.pending = torch.tensor(pending, dtype=torch.bool, device=device)

        fused: dict[int, FusedLayer] = {}

        def weights_of(position: int) -> tuple[Tensor, ...]:
            layer = inner.unrolled_layer(position)
            return fused.setdefault(id(layer), FusedLayer.of(layer)).tensors()

        self.block = [weights_of(p) for p in self.steps[0]]
        self.prelude = [weights_of(p) for p in inner.plan.prelude]
        self.coda = [weights_of(p) for p in inner.plan.coda]
        self.layer_args = dict(eps=cfg.rms_norm_eps, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
                               kernel=self.kernel, width=self.pool.max_pages)

        n = rows + 1
        self.hidden = torch.zeros(n, cfg.hidden_size, dtype=dtype, device=device)
        self.first = torch.zeros_like(self.hidden)  # token-choice: H^1, the block's input
        # Per row: the position, depth (block steps run) and phase of its token, the iteration it entered that
        # phase (AGE), tokens still to sample, the token to enter (ENTER), tokens sampled so far (the noise
        # counter), the token-choice depth, the request's sampling settings, the recursion steps it may run and the
        # prompt tokens it has still to feed (the last FEED of its row of ``feed``).
        self.ints = torch.zeros(n, 12, dtype=torch.long, device=device)
        self.feed_slots = feed_slots
        self.feed = torch.zeros(n, max(feed_slots, 1), dtype=torch.long, device=device)
        self.floats = torch.zeros(n, 3, device=device)
        self.floats[:, TOP_P] = 1.0
        self.eos = torch.full((MAX_EOS,), -1, dtype=torch.long, device=device)
        self.eos_ids: frozenset[int] = frozenset()
        self.counters = torch.zeros(4, dtype=torch.long, device=device)
        self.every_row = torch.arange(rows, device=device)  # a stage's rows when it has a slot for each

        # The status buffer: the token log of a window, then phases, entry counts, pages held and pool scalars.
        streams = self.pool.num_streams
        kmax, t = self.window_sizes[-1], self.tail_slots
        sizes = [kmax * 3 * t, rows, 2 * streams * rows, 2]
        self.status = torch.zeros(sum(sizes), dtype=torch.long, device=device)
        log, phase, pairs, scalars = self.status.split(sizes)
        self._log, self._status_phase = log.view(kmax, 3, t), phase
        self._status_pairs, self._status_scalars = pairs.view(2, streams, rows), scalars

        expert = inner.expert
        self.full_capacity = None if expert is None else torch.tensor(expert.full_capacity(), device=device)
        self.prelude_streams = torch.tensor([stream[p] for p in inner.plan.prelude], dtype=torch.long, device=device)
        self.coda_streams = torch.tensor([stream[p] for p in inner.plan.coda], dtype=torch.long, device=device)

        # An iteration is two compiled functions around the block layers, which share one: the start (the block's
        # inputs) and the tail (routing, the unique last and first layers, the head, sampling and entry: one graph,
        # so the state it updates is written back once). A window begins with the room in the pool.
        compiled = (lambda fn: torch.compile(fn, fullgraph=True, dynamic=False)) if compile else (lambda fn: fn)
        self._layer = compiled(decode_layer)
        # Not compiled: one kernel (CUDA) or a few once per window, and each window size would be a recompilation
        self._room = self._room_eager
        self._start = compiled(self._start_eager)
        self._tail = compiled(self._tail_eager)
        self._graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self._pinned: list[Tensor] = []

    # ------------------------------------------------------------------ host API
    def set_eos(self, ids: list[int]) -> None:
        if len(ids) > MAX_EOS:
            raise ValueError(f"at most {MAX_EOS} end-token ids, got {len(ids)}")
        self.eos.fill_(-1)
        self.eos[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        self.eos_ids = frozenset(int(i) for i in ids)  # the host's copy: reading the device's would wait for it

    @torch.no_grad()
    def prefill(self, rows: list[int], prompts: list[list[int]], max_recursions: int | None = None,
                extra_recursions: int = 0) -> None:
        """Run each row's prompt (a request's tokens but its last) through the model's causal forward into the
        row's streams: one left-padded batch, no head."""
        width = max(map(len, prompts))
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        ragged = len(set(map(len, prompts))) > 1  # a mask only then (the model reads a mask back to check it)
        cache = self.cache.prefill(rows)
        with sdpa_kernel(PREFILL_ATTENTION):
            self.model.model(ids.to(self.device), attention_mask=mask.to(self.device) if ragged else None,
                             routing="causal", cache=cache, max_recursions=max_recursions,
                             extra_recursions=extra_recursions)
        cache.commit()

    def enter(self, rows: list[int], tokens: list[int], positions: list[int], remaining: list[int],
              sampled: list[int], temperature: list[float], top_k: list[int], top_p: list[float],
              seeds: list[int], caps: list[int], feeds: list[list[int]]) -> None:
        """Queue each row's ``tokens`` (at ``positions``) for the entry at the next tail stage; ``caps``: the
        recursion steps each may run; ``feeds``: the prompt tokens each feeds after its token (at most
        ``feed_slots``), before it samples."""
        n = len(rows)
        ints = torch.zeros(n, self.ints.shape[1], dtype=torch.long)
        for column, values in ((POSITION, positions), (REMAINING, remaining), (TOKEN, tokens), (SAMPLED, sampled),
                               (TOP_K, top_k), (SEED, seeds), (CAP, caps), (FEED, list(map(len, feeds)))):
            ints[:, column] = torch.tensor(values, dtype=torch.long)
        ints[:, PHASE] = ENTER
        feed = torch.zeros(n, self.feed.shape[1], dtype=torch.long)
        for i, tokens_to_feed in enumerate(feeds):
            if len(tokens_to_feed) > self.feed_slots:
                raise ValueError(f"{len(tokens_to_feed)} prompt tokens to feed; this runner holds {self.feed_slots}")
            if tokens_to_feed:  # right-aligned: a row with FEED = f takes feed[row, -f] next
                feed[i, feed.shape[1] - len(tokens_to_feed):] = torch.tensor(tokens_to_feed, dtype=torch.long)
        floats = torch.zeros(n, self.floats.shape[1])
        floats[:, TEMPERATURE], floats[:, TOP_P] = torch.tensor(temperature), torch.tensor(top_p)
        index = self._upload(torch.tensor(rows))
        ints = self._upload(ints)
        ints[:, AGE] = self.counters[CLOCK]
        self.ints[index] = ints
        self.floats[index] = self._upload(floats)
        self.feed[index] = self._upload(feed)

    def finish(self, rows: list[int]) -> None:
        """Stop the rows' requests (cancelled from the host): they go idle until released."""
        self.ints[self._upload(torch.tensor(rows)), PHASE] = DONE

    def release(self, rows: list[int]) -> None:
        """Free the rows and their pages for new requests."""
        index = self._upload(torch.tensor(rows))
        self.pool.release(index)
        self.ints[index, PHASE] = FREE

    def _upload(self, host: Tensor) -> Tensor:
        """``host`` on the device, without making the host wait: copied from pinned memory (a copy from pageable
        memory can wait for the work queued before it, here the window in flight)."""
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def launch(self, size: int, mode: str) -> Window:
        """Run a window of ``size`` iterations (a CUDA graph replay when enabled) and start copying its status to
        the host."""
        if size not in self.window_sizes or mode not in SAMPLING_MODES:
            raise ValueError(f"no window of {size} iterations in mode {mode!r}")
        if self.cuda_graphs:
            self._graphs[(size, mode)].replay()
        else:
            self._window(size, mode)
        if self.device.type != "cuda":
            return Window(size, self.status.clone(), None)
        if not self._pinned:
            self._pinned = [torch.empty_like(self.status, device="cpu").pin_memory() for _ in range(2)]
        host = self._pinned.pop()
        host.copy_(self.status, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return Window(size, host, done)

    def wait(self, window: Window) -> np.ndarray:
        """Wait for a window; its raw status."""
        if window.done is not None:
            window.done.synchronize()
        status = window.host.numpy().copy()
        if window.done is not None:
            self._pinned.append(window.host)
        return status

    def reset(self) -> None:
        """Every row free and every page back in the pool, whatever state a failure left them in."""
        self.pool.reset()
        self.ints[:, PHASE] = FREE

    def collect(self, window: Window) -> WindowStatus:
        """Wait for a window and read its status."""
        status = self.wait(window)
        rows, streams, t = self.rows, self.pool.num_streams, self.tail_slots
        kmax = self.window_sizes[-1]
        log = status[: kmax * 3 * t].reshape(kmax, 3, t)[: window.size]
        rest = status[kmax * 3 * t:]
        top, overflow = rest[-2:]
        if overflow:
            raise RuntimeError("the KV page pool ran dry inside a decoding window; this is a bug in the engine's "
                               "page budget")
        order = log[:, 0].flatten() >= 0
        counts, held = rest[rows: rows + 2 * streams * rows].reshape(2, streams, rows)
        return WindowStatus(log[:, 0].flatten()[order], log[:, 1].flatten()[order], log[:, 2].flatten()[order],
                            rest[:rows], counts, held, int(top))

    def capture(self, modes: tuple[str, ...]) -> None:
        """Compile and capture the CUDA graph of every window size in ``modes`` (the engine calls this while no
        request is in flight: warming up runs windows on idle rows, which changes nothing)."""
        if not self.cuda_graphs:
            return
        for mode in modes:
            missing = [k for k in self.window_sizes if (k, mode) not in self._graphs]
            if not missing:
                continue
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile, then run once more as compiled (and the room's kernel per size)
                    self._window(1, mode)
                    for size in missing:
                        self._room(size)
            torch.cuda.current_stream().wait_stream(stream)
            for size in missing:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._graph_pool):
                    self._window(size, mode)
                self._graphs[(size, mode)] = graph
        self.counters.zero_()

    def statistics(self) -> dict[str, int]:
        """Device counters (one synchronisation)."""
        iterations, block_tokens, sampled, fed = self.counters.tolist()
        return dict(block_tokens=block_tokens, sampled=sampled, fed=fed, iterations=iterations,
                    peak_pages=int(self.pool.peak), appended=self.pool.appended.tolist())

    def reset_statistics(self) -> None:
        self.counters.zero_()
        self.pool.reset_accounting()

    # ------------------------------------------------------------------ one window (device)
    def _window(self, size: int, mode: str) -> None:
        self._room(size)
        for i in range(size):
            self._log[i].copy_(self._iteration(mode))
        self._status_phase.copy_(self.ints[: self.rows, PHASE])
        self._status_pairs.copy_(torch.stack([self.pool.counts[:, : self.rows], self.pool.held[:, : self.rows]]))
        self._status_scalars.copy_(torch.stack([self.pool.top, self.pool.overflow.long()]))

    def _iteration(self, mode: str) -> Tensor:
        """One iteration: the block stage, then the tail stage; returns its log record (rows, tokens, depths)."""
        rows, real, h, cos, sin, step, write_stream, writes, write_at, read_at, pending = self._start()
        out = self._run_layers(h, self.block, cos, sin, write_at, writes, read_at, pending, self._layer)
        return self._tail(rows, real, step, h, out, write_stream, writes, mode)

    def _rows(self, candidates: Tensor, slots: int) -> tuple[Tensor, Tensor]:
        """Rows for a stage of ``slots`` slots: every row when there are as many slots, else the oldest
        candidates (idle-padded); and which slots hold a candidate."""
        if slots >= self.rows:
            return self.every_row, candidates[: self.rows]
        key = torch.where(candidates, -self.ints[:, AGE].double(), -math.inf)
        best = key.topk(slots).indices
        real = candidates[best]
        return torch.where(real, best, self.idle), real

    def _run_layers(self, x: Tensor, weights: list[tuple[Tensor, ...]], cos: Tensor, sin: Tensor, write_at: Tensor,
                    writes: Tensor, read_at: Tensor, extra: Tensor,
                    layer: Callable[..., Tensor] = decode_layer) -> Tensor:
        pool, pages = self.pool, self.pages
        for j, w in enumerate(weights):
            x = layer(x, w, cos, sin, pages.keys, pages.values, pool.flat_tables, pool.flat_counts,
                      write_at[:, j], writes[:, j], read_at[:, j], extra[:, j], **self.layer_args)
        return x

    def _run_unique(self, x: Tensor, weights: list[tuple[Tensor, ...]], cos: Tensor, sin: Tensor, at: Tensor,
                    writes: Tensor) -> Tensor:
        """The prelude or coda positions, inside the tail; each writes its own stream and reads it, this entry
        included."""
        mask = writes[:, None].expand_as(at)
        return self._run_layers(x, weights, cos, sin, at, mask, at, mask)

    def _count(self, at: Tensor, writes: Tensor, distinct: bool = True) -> None:
        """Count a stage's writes (``at`` [n, J] flat pair indices where ``writes``). When the pairs that count are
        ``distinct`` (the idle row's slots count nothing), a plain indexed write does: compiled, it fuses with its
        neighbours, where an accumulating scatter is a kernel of its own."""
        at, writes, counts = at.flatten(), writes.flatten().long(), self.pool.flat_counts
        if distinct:
            counts[at] = counts[at] + writes
        else:
            counts.scatter_add_(0, at, writes)

    def _room_eager(self, size: int) -> None:
        """Room in every active row's streams for a window of ``size`` iterations."""
        phase = self.ints[:, PHASE]
        self.pool.ensure_room((phase == BLOCK) | (phase == EXIT) | (phase == ENTER), size, self.kernel)

    # The two compiled pieces around the block layers: the start, and the tail made of the four stages below.
    def _start_eager(self) -> tuple[Tensor, ...]:
        """The block stage's rows and their inputs."""
        phase = self.ints[:, PHASE]
        rows, real = self._rows(phase == BLOCK, self.block_slots)
        state = self.ints[rows]
        step = state[:, STEP].clamp(max=len(self.steps) - 1)
        h = self.hidden[rows]
        cos, sin = self.model.model.rotary(state[:, POSITION], h.dtype)
        write_stream = self.write_stream[step]
        writes = self.writes[step] & real[:, None]
        pending = self.pending[step] & real[:, None]
        write_at = self.pool.pair_index(write_stream, rows[:, None])
        read_at = self.pool.pair_index(self.read_stream[step], rows[:, None])
        # The clock and the block-token count in one update (one kernel rather than two)
        one = torch.ones((), dtype=torch.long, device=real.device)
        self.counters[CLOCK: BLOCK_TOKENS + 1] += torch.stack([one, real.sum()])
        return rows, real, h, cos, sin, step, write_stream, writes, write_at, read_at, pending

    def _tail_eager(self, rows: Tensor, real: Tensor, step: Tensor, h: Tensor, out: Tensor, write_stream: Tensor,
                    writes: Tensor, mode: str) -> Tensor:
        """Routing, the unique last layers, the head and sampling, then the unique first layers and entry; the
        iteration's log record."""
        rows, real, exiting, h, cos, sin, at = self._route(rows, real, step, h, out, write_stream, writes)
        h = self._run_unique(h, self.coda, cos, sin, at, exiting)
        x, cos, sin, at, position, entering, finished, record = self._sample(rows, real, exiting, h, at, mode)
        h = self._run_unique(x, self.prelude, cos, sin, at, entering)
        self._enter(rows, real, entering, finished, h, position, at)
        return record

    def _route(self, rows: Tensor, real: Tensor, step: Tensor, h: Tensor, out: Tensor, write_stream: Tensor,
                     writes: Tensor) -> tuple[Tensor, ...]:
        """After a block step: count its entries, then each token's new hidden state and decision (next depth or
        exit) by the rules of :mod:`mor.model.routing`; the tail stage's rows and their inputs."""
        self._count(self.pool.pair_index(write_stream, rows[:, None]), writes, self.distinct_writes)
        inner = self.model.model
        step = step + 1
        gate = self.floats[rows, GATE]
        if inner.expert is not None:
            new = h + inner.expert.gated_update(gate, out).to(h.dtype)
            router = step.clamp(max=self.config.num_recursions - 1)  # extra recursions reuse the last router
            go, gate = inner.expert.causal_decision(router, new, self.full_capacity)
            go = go & (step < self.ints[rows, CAP])
        elif inner.token is not None:
            target = self.ints[rows, TARGET]
            new = inner.token.step_output(self.first[rows], out, gate, step == target)
            go = step < target
        else:
            new, go = out, step < self.ints[rows, CAP]
        self.hidden[rows] = torch.where(real[:, None], new, h)
        state = self.ints[rows]
        state[:, STEP] = step
        state[:, PHASE] = torch.where(go, BLOCK, EXIT)
        state[:, AGE] = torch.where(go, state[:, AGE], self.counters[CLOCK])
        self.ints[rows] = torch.where(real[:, None], state, self.ints[rows])
        floats = self.floats[rows]
        floats[:, GATE] = gate
        self.floats[rows] = torch.where(real[:, None], floats, self.floats[rows])

        phase = self.ints[:, PHASE]
        exits = phase == EXIT
        if self.lockstep:  # no depth-wise batching: tokens leave the block together, once the deepest is done
            exits = exits & ~(phase == BLOCK).any()
        rows, real = self._rows(exits | (phase == ENTER), self.tail_slots)
        exiting = real & (self.ints[rows, PHASE] == EXIT)
        cos, sin = inner.rotary(self.ints[rows, POSITION], self.hidden.dtype)
        at = self.pool.pair_index(self.coda_streams[None, :], rows[:, None])
        return rows, real, exiting, self.hidden[rows], cos, sin, at

    def _sample(self, rows: Tensor, real: Tensor, exiting: Tensor, h: Tensor, coda_at: Tensor,
                      mode: str) -> tuple[Tensor, ...]:
        """Count the coda's entries; sample the tokens (or take the prompt's next one) and decide which requests
        are done; the embedded tokens to enter, with their rotary angles and prelude pairs, and the log record
        (rows, tokens, depths) of the sampled ones."""
        self._count(coda_at, exiting[:, None].expand_as(coda_at))
        state, floats = self.ints[rows], self.floats[rows]
        feed = state[:, FEED]
        feeding = exiting & (feed > 0)
        sampled = exiting & ~feeding
        logits = self.model.lm_head(self.model.model.norm(h))
        token = sample_rows(logits, floats[:, TEMPERATURE], state[:, TOP_K], floats[:, TOP_P], state[:, SEED],
                            state[:, SAMPLED], mode, self.kernel, active=sampled)
        width = self.feed.shape[1]
        token = torch.where(feeding, self.feed[rows, (width - feed).clamp(0, width - 1)], token)
        token = torch.where(exiting, token, state[:, TOKEN])
        record = torch.stack([torch.where(sampled, rows, -1), token, state[:, STEP] * self.depth_unit])
        remaining = state[:, REMAINING] - sampled.long()
        finished = sampled & ((remaining <= 0) | (token[:, None] == self.eos).any(1))
        position = state[:, POSITION] + exiting.long()
        state[:, REMAINING] = remaining
        state[:, SAMPLED] = state[:, SAMPLED] + sampled.long()
        state[:, FEED] = feed - feeding.long()
        self.ints[rows] = torch.where(real[:, None], state, self.ints[rows])
        self.counters[SAMPLED_TOKENS: FED_TOKENS + 1] += torch.stack([sampled.sum(), feeding.sum()])
        x = self.model.model.embed_tokens(token)
        cos, sin = self.model.model.rotary(position, x.dtype)
        at = self.pool.pair_index(self.prelude_streams[None, :], rows[:, None])
        return x, cos, sin, at, position, real & ~finished, finished, record

    def _enter(self, rows: Tensor, real: Tensor, entering: Tensor, finished: Tensor, h: Tensor,
                     position: Tensor, prelude_at: Tensor) -> None:
        """Count the prelude's entries; the first routing decision of each entered token (depth 0 exits at
        once) and its new state."""
        self._count(prelude_at, entering[:, None].expand_as(prelude_at))
        inner = self.model.model
        state, floats = self.ints[rows], self.floats[rows]
        go = torch.ones_like(entering)
        gate = floats[:, GATE]
        if inner.expert is not None:
            go, gate = inner.expert.causal_decision(torch.zeros_like(rows), h, self.full_capacity)
        elif inner.token is not None:
            depth, gate = inner.token.assign(h[None], None, RoutingResult())
            state[:, TARGET] = inner.token.widen(depth[0], state[:, CAP])
            self.first[rows] = torch.where(entering[:, None], h, self.first[rows])
            gate = gate[0]
        self.hidden[rows] = torch.where(entering[:, None], h, self.hidden[rows])
        state[:, POSITION] = position
        state[:, STEP] = 0
        state[:, AGE] = self.counters[CLOCK]
        state[:, PHASE] = torch.where(go, BLOCK, EXIT)
        floats[:, GATE] = gate
        # Entered rows take their whole new state; a finished one only its phase.
        state = torch.where(entering[:, None], state, self.ints[rows])
        state[:, PHASE] = torch.where(finished, DONE, state[:, PHASE])
        self.ints[rows] = state
        self.floats[rows] = torch.where(entering[:, None], floats, self.floats[rows])
