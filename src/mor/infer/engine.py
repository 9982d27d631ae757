"""Continuous depth-wise batching (MOR_SPEC 12): a serving loop that keeps the shared block's batch full.

Every request has exactly one token in flight. A token goes through three stages:

1. *entry*: embedding and the unique first layer(s) (the prelude), then the first routing decision;
2. *block steps*: each engine step runs the shared recursion block once on up to ``max_batch_slots`` tokens,
   whatever their depth and request; each token writes and reads the paged KV stream of its own depth
   (recursion-wise caching) or reads its depth-1 stream (recursive KV sharing). After the block the router
   decides per token (causal rule: ``sigmoid(logit) >= threshold``, or the auxiliary router's logit >= 0, or
   the token-choice depth): continue at the next depth, or exit;
3. *tail*: exited tokens are gathered, run through the unique last layer(s), norm and head; the next token is
   sampled and enters again (stage 1). A slot freed by an exit is filled at the next step by a token waiting at
   depth 1, so there are no bubbles waiting for the deepest token.

Vanilla and fixed-depth recursive models run in the same loop (one block pass per token, i.e. continuous
sequence-wise batching), so throughput comparisons are like for like.

New requests are admitted as others finish. A prompt's tokens but the last are prefilled by the model's own
causal forward into the paged streams; the last prompt token then enters like a generated one. When the page
pool runs out, the most recently admitted request is preempted (its pages freed) and later recomputed from its
prompt and the tokens it generated so far.

Attention over ragged per-token caches is a padded gather of each token's pages plus a validity mask (generic,
CPU and GPU). With ``cuda_graphs=True`` every stage runs on fixed bucket sizes with full-width block tables and
is captured once per bucket as a CUDA graph; ``static_shapes=True`` runs exactly that computation without
capturing, which is how the CPU tests check it. A decoder layer with its cache update is some seventy small
kernels when run eagerly, so a graph replay would still be bound by kernel count: ``compile=True`` (the default
with CUDA graphs) runs each layer through ``torch.compile``, which fuses them. All layers share one compiled
function (regional compilation), so compiling costs seconds, not minutes per model. Each engine adds a few
compiled variants of that function; a process that builds many engines for different models should call
``torch.compiler.reset()`` between them to stay within dynamo's recompilation limit (past it, layers run
eagerly: correct, but slower).
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mor.infer.generate import check_prompts
from mor.infer.sampling import SamplingParams, sample
from mor.model.kv_cache import PagedKVCache
from mor.model.routing import RoutingResult


@dataclass
class RequestResult:
    """One request: generated ``tokens``, the recursion depth that produced each one, time to first token and
    generation rate (seconds and tokens/s from the request's admission)."""

    tokens: list[int]
    depths: list[int]
    time_to_first_token: float
    tokens_per_second: float
    preemptions: int = 0

    @property
    def depth_histogram(self) -> dict[int, int]:
        return dict(sorted(Counter(self.depths).items()))


@dataclass
class EngineStats:
    requests: int
    tokens: int
    seconds: float
    tokens_per_second: float
    block_steps: int
    block_occupancy: float  # mean fraction of the block's slots filled per step
    tail_steps: int
    mean_tail_batch: float
    prefills: int
    preemptions: int
    depth_histogram: dict[int, int]
    kv_peak_bytes: int  # pages in use at the peak
    kv_allocated_bytes: int  # the whole page pool
    kv_bytes_per_token: float  # key/value bytes written per processed token, all layers
    kv_block_ratio: float  # entries written in the recursion block per token, vs one per block position (vanilla)
    kv_model_ratio: float  # the same over every unrolled position


@dataclass
class EngineOutput:
    results: list[RequestResult]
    stats: EngineStats


@dataclass
class _Request:
    index: int
    prompt: list[int]
    max_new: int
    tokens: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    slot: int = -1
    step: int = 0  # the block step its in-flight token runs next (1-based)
    ran: int = 0  # block steps its in-flight token has run
    order: int = 0  # admission counter: the largest is the youngest
    admitted: float = 0.0
    first_token: float | None = None
    preemptions: int = 0


@dataclass
class _Run:
    """State of one ``Engine.generate`` call."""

    params: SamplingParams
    eos: set[int]
    generator: torch.Generator | None
    waiting: deque[_Request]
    results: list[RequestResult | None]
    start: float
    active: dict[int, _Request] = field(default_factory=dict)
    in_block: deque[int] = field(default_factory=deque)  # slots whose token waits for its next block step
    exited: list[int] = field(default_factory=list)  # slots whose token waits for the tail
    admissions: int = 0
    block_steps: int = 0
    block_tokens: int = 0
    tail_steps: int = 0
    tail_tokens: int = 0
    prefills: int = 0
    preemptions: int = 0
    tokens_in: int = 0  # tokens that went through the model (prefilled or entered)
    progress: tqdm | None = None


class _Graph:
    """A CUDA graph of ``fn`` over a static copy of its input."""

    def __init__(self, fn: Callable[[Tensor], Tensor], inputs: Tensor, pool: object) -> None:
        self.inputs = inputs.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (the inputs point at the idle request)
            fn(self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(self.inputs)

    def __call__(self, inputs: Tensor) -> Tensor:
        self.inputs.copy_(inputs)
        self.graph.replay()
        return self.output


class Engine:
    """Continuous depth-wise batching for a ``MoRForCausalLM`` (any variant).

    ``max_batch_slots``: tokens per block step (B); ``max_requests``: requests in flight (default B);
    ``max_seq_len``: prompt + generated tokens per request (default: the model's context); ``page_size``:
    entries per KV page; ``num_pages``: pool size (default: the worst case, which never preempts);
    ``max_recursions``: cap the depth at inference; ``extra_recursions``: apply the block more times after the
    last trained step (test-time depth scaling, as ``generate``); ``cuda_graphs``: replay every stage from CUDA
    graphs of fixed bucket sizes; ``compile``: fuse each decoder layer with ``torch.compile`` (default: with
    CUDA graphs).
    """

    def __init__(self, model: nn.Module, max_batch_slots: int = 32, max_seq_len: int | None = None,
                 page_size: int = 16, max_requests: int | None = None, num_pages: int | None = None,
                 max_recursions: int | None = None, extra_recursions: int = 0, cuda_graphs: bool = False,
                 static_shapes: bool | None = None, compile: bool | None = None) -> None:
        cfg = model.config
        if cfg.random_router:
            raise ValueError("random routers decide by chance; the engine needs a trained (or calibrated) router")
        if max_batch_slots < 1:
            raise ValueError(f"max_batch_slots must be at least 1, got {max_batch_slots}")
        if max_recursions is not None and max_recursions < 1:
            raise ValueError(f"max_recursions must be at least 1, got {max_recursions}")
        if extra_recursions and (extra_recursions < 0 or max_recursions is not None
                                 or cfg.sharing not in ("cycle", "middle_cycle")):
            raise ValueError(f"extra_recursions={extra_recursions} needs a non-negative count, no max_recursions "
                             f"and 'cycle' or 'middle_cycle' sharing (got {cfg.sharing!r})")
        device = model.lm_head.weight.device
        if cuda_graphs and device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self.model = model.eval()
        inner = model.model
        self.slots = max_batch_slots
        self.max_requests = max_requests or max_batch_slots
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_recursions = max_recursions
        self.extra_recursions = extra_recursions
        self.cuda_graphs = cuda_graphs
        self.static_shapes = cuda_graphs if static_shapes is None else static_shapes
        self.compiled = cuda_graphs if compile is None else compile
        self._layer_step = torch.compile(self._layer) if self.compiled else self._layer

        steps = inner.plan.steps
        if max_recursions is not None and cfg.sharing in ("cycle", "middle_cycle"):
            steps = steps[:max_recursions]
        self.steps = steps + inner.extra_steps(extra_recursions)
        self.prelude, self.coda = inner.plan.prelude, inner.plan.coda
        self.block = [inner.unrolled_layer(p) for p in self.steps[0]]
        # Depth reported per block pass: a sequence-shared block repeats each layer Nr times in one pass.
        self.depth_unit = 1 if cfg.sharing in ("none", "cycle", "middle_cycle") else cfg.num_recursions

        self.cache = PagedKVCache.for_model(model, self.max_requests, self.max_seq_len, page_size, num_pages,
                                            extra_recursions)
        self.idle = self.cache.idle
        stream = self.cache.stream
        # Per (step, block layer): whether the position stores keys/values, the stream it writes, the one it reads.
        self._writes = np.array([[inner.kv_position(p) == p for p in step] for step in self.steps])
        self._write_stream = np.array([[stream.get(p, 0) for p in step] for step in self.steps], dtype=np.int64)
        self._read_stream = np.array([[stream[inner.kv_position(p)] for p in step] for step in self.steps],
                                     dtype=np.int64)
        # Whether the read stream already holds this pass's entry when the layer reads it (written by this layer or
        # an earlier one of the same step, as sequence sharing with shared keys/values does); counted after the step.
        self._pending = np.array([[any(w[i] and ws[i] == rs[j] for i in range(j + 1)) for j in range(len(rs))]
                                  for w, ws, rs in zip(self._writes, self._write_stream, self._read_stream)],
                                 dtype=bool).reshape(self._writes.shape)
        self.writes = torch.from_numpy(self._writes).to(device)
        self.pending = torch.from_numpy(self._pending).to(device)
        self.write_stream = torch.from_numpy(self._write_stream).to(device)
        self.read_stream = torch.from_numpy(self._read_stream).to(device)

        rows, dim, dtype = self.max_requests + 1, cfg.hidden_size, model.lm_head.weight.dtype
        self.hidden = torch.zeros(rows, dim, dtype=dtype, device=device)
        self.first = torch.zeros_like(self.hidden)  # token-choice: H^1, the block's input
        self.gate = torch.zeros(rows, device=device)
        self.target = torch.zeros(rows, dtype=torch.long, device=device)  # token-choice depth
        self.position = torch.zeros(rows, dtype=torch.long, device=device)
        expert = inner.expert
        self.full_capacity = None if expert is None else torch.tensor(
            [expert.capacity(r) >= 1.0 for r in range(cfg.num_recursions)], device=device)
        self._graphs: dict[tuple[str, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self._free_slots = list(range(self.max_requests - 1, -1, -1))
        self._admissions = 0

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int] = 32, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                 seed: int | None = None, progress: bool = False) -> EngineOutput:
        """Serve ``prompts`` (lists of token ids; all queued at once) and return per-request results, in order,
        and aggregate statistics. ``max_new_tokens``: one count or one per prompt."""
        params = SamplingParams(do_sample, temperature, top_k, top_p)
        prompts = [list(p) for p in prompts]
        counts = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(counts) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(counts)} entries for {len(prompts)} prompts")
        vocab = self.model.config.vocab_size
        pool = self.cache.trash  # pages in the pool (the extra trash page is not one of them)
        streams = self._streams_every_token_writes()
        for i, (prompt, count) in enumerate(zip(prompts, counts)):
            check_prompts([len(prompt)], count, self.max_seq_len, first=i)
            if any(not 0 <= t < vocab for t in prompt):
                raise ValueError(f"prompt {i}: token ids must lie in [0, {vocab})")
            # Refuse up front what can never fit, rather than failing mid-run and losing finished results.
            needed = streams * math.ceil((len(prompt) + count) / self.cache.page_size)
            if needed > pool:
                raise ValueError(f"prompt {i}: {len(prompt)} prompt + {count} new tokens need at least {needed} KV "
                                 f"pages but the pool holds {pool}; give the engine more pages")
        eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        device = self.hidden.device
        run = _Run(params, eos, None if seed is None else torch.Generator(device).manual_seed(seed),
                   deque(_Request(i, p, n) for i, (p, n) in enumerate(zip(prompts, counts))),
                   [None] * len(prompts), time.perf_counter())
        for i, request in enumerate(run.waiting):
            if request.max_new == 0:
                run.results[i] = RequestResult([], [], 0.0, 0.0)
        run.waiting = deque(r for r in run.waiting if r.max_new > 0)
        run.progress = tqdm(total=sum(counts), unit="tok", desc="generate", disable=not progress)
        self.cache.reset_accounting()
        try:
            while run.waiting or run.active:
                self._admit(run)
                if run.exited and (len(run.exited) >= self.slots or len(run.in_block) < self.slots):
                    self._tail(run)
                if run.in_block:
                    self._block_step(run)
        finally:
            run.progress.close()
            for slot in list(run.active):  # an error mid-way must not leak pages into the next call
                self._release(run, slot)
        return EngineOutput([r for r in run.results if r is not None], self._stats(run, time.perf_counter()))

    # ------------------------------------------------------------------ scheduling (host)
    def _admit(self, run: _Run) -> None:
        entering: list[tuple[_Request, int, int]] = []
        while run.waiting and self._free_slots:
            request = run.waiting[0]
            sequence = request.prompt + request.tokens
            # Worst case for its prefill: every prompt token in every stream.
            if len(self.cache.stream) * math.ceil(len(sequence) / self.cache.page_size) > self.cache.free_pages:
                if not run.active:
                    raise MemoryError(f"the KV page pool ({self.cache.free_pages} free pages) cannot hold a "
                                      f"prompt of {len(sequence)} tokens; give the engine more pages")
                break
            run.waiting.popleft()
            request.slot = self._free_slots.pop()
            self._admissions += 1
            request.order = self._admissions
            if request.first_token is None:
                request.admitted = time.perf_counter()
            run.active[request.slot] = request
            if len(sequence) > 1:
                prefix = torch.tensor([sequence[:-1]], device=self.hidden.device)
                self.model(prefix, routing="causal", cache=self.cache.view([request.slot]),
                           max_recursions=self.max_recursions, extra_recursions=self.extra_recursions)
                run.prefills += 1
                run.tokens_in += len(sequence) - 1
            entering.append((request, sequence[-1], len(sequence) - 1))
        if entering:
            self._enter(run, entering)

    def _enter(self, run: _Run, entering: list[tuple[_Request, int, int]]) -> None:
        slots = self._make_room(run, [r.slot for r, _, _ in entering], lambda slots: self._pairs(self.prelude, slots))
        entering = [e for e in entering if e[0].slot in slots]
        if not entering:
            return
        inputs = [slots, [t for _, t, _ in entering], [p for _, _, p in entering]]
        cont = self._call("entry", self._entry_fn, inputs, lambda: self._widths(self.prelude, slots)).tolist()
        self._entered(run, [r for r, _, _ in entering], cont)

    def _entered(self, run: _Run, requests: list[_Request], cont: list[bool]) -> None:
        """Queue tokens that have run the entry: for the first block step, or for the tail at depth 0."""
        run.tokens_in += len(requests)
        for request, go in zip(requests, cont):
            request.ran = 0
            if go:
                request.step = 1
                run.in_block.append(request.slot)
            else:  # the first router already says stop: depth 0
                run.exited.append(request.slot)

    def _block_step(self, run: _Run) -> None:
        batch = [run.in_block.popleft() for _ in range(min(self.slots, len(run.in_block)))]

        def needs(slots: list[int]) -> tuple[np.ndarray, np.ndarray]:
            rows = np.array([run.active[s].step - 1 for s in slots], dtype=np.int64)
            writes = self._writes[rows]
            requests = np.broadcast_to(np.asarray(slots, dtype=np.int64)[:, None], writes.shape)
            return self._write_stream[rows][writes], requests[writes]

        batch = self._make_room(run, batch, needs)
        if not batch:
            return
        step_index = [run.active[s].step - 1 for s in batch]
        cont = self._call("block", self._block_fn, [batch, step_index],
                          lambda: self._widths(self._read_stream[step_index], batch)).tolist()
        run.block_steps += 1
        run.block_tokens += len(batch)
        for slot, go in zip(batch, cont):
            request = run.active[slot]
            request.ran += 1
            if go:
                request.step += 1
                run.in_block.append(slot)
            else:
                run.exited.append(slot)

    def _tail(self, run: _Run) -> None:
        """Coda, head and sampling of exited tokens, and the entry of the sampled tokens right behind them on the
        device: one host round trip for both stages. Every sampled token enters; the entry of a request that has
        just finished lands in pages that its release frees."""
        batch, run.exited = run.exited[: self.max_requests], run.exited[self.max_requests:]
        batch = self._make_room(run, batch, lambda slots: self._pairs(self.coda + self.prelude, slots))
        if not batch:
            return
        logits = self._call("tail", self._tail_fn, [batch], lambda: self._widths(self.coda, batch))
        sampled = sample(logits, run.params, run.generator)
        positions = [len(run.active[s].prompt) + len(run.active[s].tokens) for s in batch]
        go = self._call("entry", self._entry_fn, [batch, [0] * len(batch), positions],
                        lambda: self._widths(self.prelude, batch), device_rows={1: sampled})
        tokens, cont = torch.stack([sampled, go.long()]).tolist()
        run.tail_steps += 1
        run.tail_tokens += len(batch)
        now = time.perf_counter()
        entered, entered_cont = [], []
        for slot, token, go_on in zip(batch, tokens, cont):
            request = run.active[slot]
            request.tokens.append(token)
            request.depths.append(request.ran * self.depth_unit)
            if request.first_token is None:
                request.first_token = now
            if len(request.tokens) >= request.max_new or token in run.eos:
                elapsed = now - request.admitted
                run.results[request.index] = RequestResult(
                    request.tokens, request.depths, request.first_token - run.start,
                    len(request.tokens) / max(elapsed, 1e-9), request.preemptions)
                self._release(run, slot)
            else:
                entered.append(request)
                entered_cont.append(bool(go_on))
        assert run.progress is not None
        run.progress.update(len(batch))
        self._entered(run, entered, entered_cont)

    def _make_room(self, run: _Run, slots: list[int],
                   needs: Callable[[list[int]], tuple[np.ndarray, np.ndarray]]) -> list[int]:
        """Reserve one entry per (stream, slot) pair of ``needs(slots)``, preempting the youngest requests while
        the pool is short; returns the slots that are still active."""
        while True:
            streams, requests = needs(slots)
            try:
                self.cache.reserve(streams, requests, np.ones_like(streams))
                return slots
            except MemoryError:  # nothing was reserved
                pass
            if len(run.active) <= 1:
                raise MemoryError("the KV page pool cannot hold a single request; give the engine more pages")
            victim = max(run.active.values(), key=lambda r: r.order)
            slots = [s for s in slots if s != victim.slot]
            self._preempt(run, victim)

    def _preempt(self, run: _Run, request: _Request) -> None:
        slot = request.slot
        if slot in run.in_block:
            run.in_block.remove(slot)
        if slot in run.exited:
            run.exited.remove(slot)
        self._release(run, slot)
        request.preemptions += 1
        run.preemptions += 1
        run.waiting.appendleft(request)  # recomputed from prompt + generated tokens when readmitted

    def _release(self, run: _Run, slot: int) -> None:
        run.active.pop(slot).slot = -1
        self.cache.release(slot)
        self._free_slots.append(slot)

    def _pairs(self, positions: tuple[int, ...], slots: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The (stream, slot) pairs of unique layer ``positions`` for every slot."""
        streams = np.array([self.cache.stream[p] for p in positions], dtype=np.int64)
        return np.tile(streams, len(slots)), np.repeat(np.asarray(slots, dtype=np.int64), len(streams))

    def _widths(self, streams: tuple[int, ...] | np.ndarray, slots: list[int]) -> list[int]:
        """Block-table width per layer covering every slot: ``streams`` holds unique layer positions, or the
        stream each slot reads at each block layer [n, J]."""
        if isinstance(streams, tuple):
            streams = np.array([[self.cache.stream[p] for p in streams]] * len(slots), dtype=np.int64)
        if streams.shape[1] == 0:
            return []
        longest = self.cache.host_counts(streams, np.asarray(slots)[:, None]).max(0)
        return [max(1, -(-int(n) // self.cache.page_size)) for n in longest]

    # ------------------------------------------------------------------ computation (device)
    def _call(self, kind: str, fn: Callable[..., Tensor], inputs: list[list[int]],
              pages: Callable[[], list[int]], device_rows: dict[int, Tensor] | None = None) -> Tensor:
        """Run ``fn`` on the batch (``inputs``: slots first, then per-token integers; ``device_rows`` replaces rows
        by values already on the device): as is, with block tables as wide as ``pages()`` says, or padded to a
        bucket (idle request) with full-width tables, from a CUDA graph when enabled. The host's inputs travel to
        the device in one copy."""
        n = len(inputs[0])
        bucket = self._bucket(n, self.slots if kind == "block" else self.max_requests) if self.static_shapes else n
        padded = torch.tensor([x + [self.idle if i == 0 else 0] * (bucket - n) for i, x in enumerate(inputs)])
        # non_blocking: a blocking host-to-device copy waits for the GPU to drain its queue, a hidden round trip.
        padded = padded.to(self.hidden.device, non_blocking=True)
        for row, values in (device_rows or {}).items():
            padded[row, :n] = values
        if not self.static_shapes:
            return fn(*padded, pages=pages())
        if not self.cuda_graphs:
            return fn(*padded, pages=self._full_pages(kind))[:n]
        return self._graph(kind, fn, bucket, len(inputs))(padded)[:n]

    @torch.no_grad()
    def capture_graphs(self) -> None:
        """Capture the CUDA graph of every stage and bucket now (otherwise each is captured on first use)."""
        stages = (("entry", self._entry_fn, 3), ("block", self._block_fn, 2), ("tail", self._tail_fn, 1))
        for kind, fn, count in stages:
            largest = self.slots if kind == "block" else self.max_requests
            for bucket in sorted({self._bucket(n, largest) for n in range(1, largest + 1)}):
                self._graph(kind, fn, bucket, count)

    def _graph(self, kind: str, fn: Callable[..., Tensor], bucket: int, count: int) -> _Graph:
        key = (kind, bucket)
        if key not in self._graphs:
            idle = torch.zeros(count, bucket, dtype=torch.long, device=self.hidden.device)
            idle[0] = self.idle
            full = self._full_pages(kind)
            self._graphs[key] = _Graph(lambda x: fn(*x, pages=full), idle, self._pool)
        return self._graphs[key]

    def _full_pages(self, kind: str) -> list[int]:
        layers = {"entry": len(self.prelude), "block": len(self.block), "tail": len(self.coda)}[kind]
        return [self.cache.max_pages] * layers

    @staticmethod
    def _bucket(n: int, largest: int) -> int:
        return min(1 << (n - 1).bit_length(), largest)

    def _layer(self, layer: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor], write_stream: Tensor, write: Tensor,
               read_stream: Tensor, pending: Tensor, slots: Tensor, positions: Tensor, pages: int) -> Tensor:
        """One decoder layer on tokens ``x`` [n, 1, d]: each token appends its key/value to its stream (where
        ``write``), then attends to its read stream over ``pages`` pages, including the entry of this step where
        ``pending``. The stage counts its entries once all its layers have run (:meth:`_count`)."""
        cache = self.cache

        def update(k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            cache.write(write_stream, slots, k[:, :, 0], v[:, :, 0], positions, write, count=False)
            keys, values, _, valid = cache.read(read_stream, slots, pages, pending)
            return keys, values, valid[:, None, None, :]

        return layer(x, rope, None, cache=update)[0]

    def _unique_layers(self, positions: tuple[int, ...], x: Tensor, slots: Tensor, pages: list[int]) -> Tensor:
        """Run the prelude or coda positions on tokens ``x`` [n, d] of ``slots``."""
        inner = self.model.model
        t = self.position[slots]
        rope = inner.rotary(t[:, None], x.dtype)
        real = slots != self.idle
        x = x[:, None]
        streams = []
        for p, width in zip(positions, pages):
            stream = torch.full_like(slots, self.cache.stream[p])
            # Read and write streams as two tensors: the compiled layer would be specialised for aliased inputs.
            x = self._layer_step(inner.unrolled_layer(p), x, rope, stream, real, stream.clone(), real.clone(), slots,
                                 t, width)
            streams.append(stream)
        if streams:
            self._count(torch.stack(streams, 1), slots, real[:, None].expand(-1, len(streams)))
        return x[:, 0]

    def _count(self, streams: Tensor, slots: Tensor, writes: Tensor) -> None:
        """Count a stage's writes [n, J] at once (one scatter rather than one per layer)."""
        self.cache.count(streams.flatten(), slots[:, None].expand_as(streams).flatten(), writes.flatten())

    def _entry_fn(self, slots: Tensor, tokens: Tensor, positions: Tensor, pages: list[int]) -> Tensor:
        """Embedding, prelude and first routing decision of new tokens; whether each runs the first step."""
        inner = self.model.model
        self.position[slots] = positions
        h = self._unique_layers(self.prelude, inner.embed_tokens(tokens), slots, pages)
        self.hidden[slots] = h
        go = torch.ones_like(slots, dtype=torch.bool)
        if inner.expert is not None:
            go, self.gate[slots] = self._expert_decision(h, torch.zeros_like(slots))
        elif inner.token is not None:
            self.first[slots] = h
            depth, gate = inner.token.assign(h[None], None, RoutingResult())
            depth = depth[0].clamp(max=len(self.steps))
            if self.extra_recursions:  # the deepest tokens go further, as in the model's forward
                depth = depth.masked_fill(depth == self.model.config.num_recursions, len(self.steps))
            self.target[slots] = depth
            self.gate[slots] = gate[0]
        return go

    def _streams_every_token_writes(self) -> int:
        """KV streams that every token writes whatever the router decides: all of them without a router; the
        unique first and last layers and the first step (taken by every token) with one."""
        cfg, plan = self.model.config, self.model.model.plan
        if cfg.router == "none":
            return len(self.cache.stream)
        always = set(plan.prelude) | set(plan.coda)
        if cfg.router == "token" or cfg.step_capacities[0] >= 1.0:
            always |= set(plan.steps[0])
        return sum(1 for position in self.cache.stream if position in always)

    def _expert_decision(self, h: Tensor, router: Tensor) -> tuple[Tensor, Tensor]:
        """Causal decision of router index ``router`` [n] per token (MOR_SPEC 4.10) and the gate it gives."""
        expert = self.model.model.expert
        cfg = self.model.config
        pick = router[:, None]
        steps = range(cfg.num_recursions)
        logits = torch.stack([expert.logits(r, h) for r in steps], -1).gather(1, pick)[:, 0]
        aux = None
        if expert.aux_routers:
            aux = torch.stack([expert.aux_logits(r, h) for r in steps], -1).gather(1, pick)[:, 0]
        go = self.full_capacity[router] | expert.continues(logits, aux)
        return go, expert.gate(logits)

    def _block_fn(self, slots: Tensor, step_index: Tensor, pages: list[int]) -> Tensor:
        """One application of the shared block to tokens at mixed depths; whether each continues."""
        inner = self.model.model
        h = self.hidden[slots]
        t = self.position[slots]
        rope = inner.rotary(t[:, None], h.dtype)
        real = slots != self.idle
        x = h[:, None]
        # Gathered once per step, so each layer takes column views rather than indexing again.
        write_stream, read_stream = self.write_stream[step_index], self.read_stream[step_index]
        writes = self.writes[step_index] & real[:, None]
        pending = self.pending[step_index] & real[:, None]
        for j, (layer, width) in enumerate(zip(self.block, pages)):
            x = self._layer_step(layer, x, rope, write_stream[:, j], writes[:, j], read_stream[:, j], pending[:, j],
                                 slots, t, width)
        self._count(write_stream, slots, writes)
        out = x[:, 0]
        more = step_index + 1 < len(self.steps)
        if inner.expert is not None:
            self.hidden[slots] = h + (self.gate[slots][:, None] * out).to(h.dtype)
            router = (step_index + 1).clamp(max=self.model.config.num_recursions - 1)
            go, gate = self._expert_decision(self.hidden[slots], router)
            self.gate[slots] = gate
            return more & go
        if inner.token is not None:
            target = self.target[slots]
            gated = self.gate[slots][:, None].to(out.dtype) * out
            exits = (step_index + 1 == target)[:, None]
            keep = out if self.model.config.token_gating == "exit" else gated
            self.hidden[slots] = torch.where(exits, self.first[slots] + gated, keep)
            return step_index + 1 < target
        self.hidden[slots] = out
        return more

    def _tail_fn(self, slots: Tensor, pages: list[int]) -> Tensor:
        """Coda, norm and head of exited tokens: next-token logits [n, V]."""
        h = self._unique_layers(self.coda, self.hidden[slots], slots, pages)
        return self.model.lm_head(self.model.model.norm(h))

    # ------------------------------------------------------------------ statistics
    def _stats(self, run: _Run, end: float) -> EngineStats:
        results = [r for r in run.results if r is not None]
        tokens = sum(len(r.tokens) for r in results)
        seconds = end - run.start
        histogram: Counter[int] = Counter()
        for r in results:
            histogram.update(r.depths)
        plan, cache = self.model.model.plan, self.cache
        appended = {p: int(cache.appended[s]) for p, s in cache.stream.items()}
        block = [p for step in self.steps for p in step]
        per_token = max(run.tokens_in, 1)
        entry_bytes = cache.keys[0, 0].nbytes * 2
        return EngineStats(
            requests=len(results), tokens=tokens, seconds=seconds, tokens_per_second=tokens / max(seconds, 1e-9),
            block_steps=run.block_steps, block_occupancy=run.block_tokens / max(run.block_steps * self.slots, 1),
            tail_steps=run.tail_steps, mean_tail_batch=run.tail_tokens / max(run.tail_steps, 1),
            prefills=run.prefills, preemptions=run.preemptions, depth_histogram=dict(sorted(histogram.items())),
            kv_peak_bytes=cache.peak_pages * cache.page_nbytes(), kv_allocated_bytes=cache.nbytes(),
            kv_bytes_per_token=sum(appended.values()) * entry_bytes / per_token,
            kv_block_ratio=sum(appended.get(p, 0) for p in block) / (per_token * len(block)),
            kv_model_ratio=sum(appended.values()) / (per_token * plan.num_positions),
        )
