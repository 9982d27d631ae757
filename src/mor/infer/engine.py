"""Continuous depth-wise batching (MOR_SPEC 12): the serving engine's front.

Every request in flight has one token in the model at a time. The shared recursion block runs on a batch of
tokens at mixed depths (each writing and reading the paged KV stream of its own depth, or its depth-1 stream with
KV sharing); a token that exits is sampled, and its successor enters at depth 1 in the same iteration, so the
block's batch stays full with no bubbles waiting for the deepest token. Vanilla and fixed-depth recursive models
run in the same loop (one block pass per token: continuous sequence-wise batching), so throughput comparisons are
like for like.

The engine is three parts, as serving engines split theirs:

- :mod:`mor.infer.runner`: the device side. Row state, the decoding iteration as fixed-shape tensor operations,
  page allocation on the device, paged attention, and CUDA graphs of whole windows of iterations;
- :mod:`mor.infer.scheduler`: the host policy. Admission, the page budget of each window, preemption;
- this front: requests in, tokens out. :meth:`Engine.generate` serves a list of prompts; :meth:`Engine.add`,
  :meth:`Engine.step` and :meth:`Engine.cancel` drive it incrementally (a server streams from ``step``).

The host and the device meet once per window of up to ``window`` iterations: the host reads the tokens sampled in
it (one copy), admits new requests into rows that finished, and launches the next window before it processes the
last one's tokens, so the device does not wait for the host. A short prompt (``loop_prompt_tokens``) goes through
the decoding loop itself, a token per pass, with the prompt's next token taken in place of a sampled one: no
host work and no pause of the batch. A longer prompt's tokens but the last are prefilled by the model's own
causal forward into the paged streams, in batches; the last prompt token then enters like a generated one.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mor.infer.generate import check_prompts
from mor.infer.runner import DONE, Runner, Window, WindowStatus
from mor.infer.sampling import SamplingParams
from mor.infer.scheduler import Request, Scheduler

PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward at most


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
class RequestOutput:
    """What :meth:`Engine.step` reports of one request: the tokens (and their depths) new since the last report,
    and, once it has ended, why: "stop" (an end token), "length" (``max_new_tokens``) or "cancelled"."""

    request: int
    tokens: list[int]
    depths: list[int]
    finish_reason: str | None = None


@dataclass
class EngineStats:
    requests: int
    tokens: int
    seconds: float
    tokens_per_second: float
    iterations: int
    block_occupancy: float  # mean fraction of the block's slots filled per iteration
    mean_tail_batch: float  # tokens sampled per iteration
    windows: int  # host round trips
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


class Engine:
    """Continuous depth-wise batching for a ``MoRForCausalLM`` (any variant).

    ``max_batch_slots``: tokens per block step (B); ``max_requests``: requests in flight (default B);
    ``tail_slots``: tokens sampled per iteration at most (default: every request); ``max_seq_len``: prompt +
    generated tokens per request (default: the model's context); ``page_size``: entries per KV page;
    ``num_pages``: pool size (default: the worst case, which never preempts); ``max_recursions``: cap the depth at
    inference; ``extra_recursions``: apply the block more times after the last trained step (test-time depth
    scaling, as ``generate``): both are the defaults of every request, and ``extra_recursions`` also the most a
    request may ask for (:meth:`add`); ``window``: iterations the device runs between two host round trips at most;
    ``cuda_graphs``: one CUDA graph per window; ``compile``: fuse the layers and the code between them with
    ``torch.compile`` (default: with CUDA graphs); ``kernel``: paged attention by the Triton kernel rather than a
    padded gather (default: on CUDA when Triton is there); ``lockstep``: switch depth-wise batching off, for
    comparison (the tokens of the batch leave the block together, once the deepest is done);
    ``loop_prompt_tokens``: prompts of up to this many tokens enter through the decoding loop, longer ones are
    prefilled (0: prefill every prompt). The loop costs no host time but a pass per prompt token; a prefill
    costs a forward of the model from the host, tens to hundreds of milliseconds, while the batch waits.

    The engine puts ``model`` in eval mode (inference routing) and leaves it there for as long as it serves: call
    ``model.train()`` to train the model again after serving.
    """

    def __init__(self, model: nn.Module, max_batch_slots: int = 32, max_seq_len: int | None = None,
                 page_size: int = 16, max_requests: int | None = None, num_pages: int | None = None,
                 max_recursions: int | None = None, extra_recursions: int = 0, tail_slots: int | None = None,
                 window: int = 8, cuda_graphs: bool = False, compile: bool | None = None,
                 kernel: bool = True, lockstep: bool = False, loop_prompt_tokens: int = 256) -> None:
        cfg = model.config
        if cfg.random_router:
            raise ValueError("random routers decide by chance; the engine needs a trained (or calibrated) router")
        for name, value in (("max_batch_slots", max_batch_slots), ("window", window),
                            ("max_requests", max_requests or 1), ("tail_slots", tail_slots or 1)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if loop_prompt_tokens < 0:
            raise ValueError(f"loop_prompt_tokens must be at least 0, got {loop_prompt_tokens}")
        model.model.recursion_steps(max_recursions, extra_recursions)  # clear errors for options that cannot apply
        if cuda_graphs and model.lm_head.weight.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        model.eval()
        self.model = model
        self.max_requests = max_requests or max_batch_slots
        self.max_seq_len = min(max_seq_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_recursions, self.extra_recursions = max_recursions, extra_recursions
        self.cuda_graphs = cuda_graphs
        self.compiled = cuda_graphs if compile is None else compile
        sizes = tuple(sorted({2 ** i for i in range(int(math.log2(window)) + 1)} | {window}))
        self.runner = Runner(model, self.max_requests, max_batch_slots, tail_slots or self.max_requests,
                             self.max_seq_len, page_size, num_pages, extra_recursions, sizes,
                             cuda_graphs, self.compiled, kernel, lockstep,
                             feed_slots=max(min(loop_prompt_tokens, self.max_seq_len) - 1, 0))
        self.loop_prompt_tokens = loop_prompt_tokens
        self.cache = self.runner.cache
        pool = self.cache.pool
        self.scheduler = Scheduler(self.max_requests, pool.num_streams, page_size, pool.num_pages, pool.max_pages,
                                   sizes)
        self._requests: dict[int, Request] = {}
        self._next_id = 0
        self._in_flight: Window | None = None
        self._mode = "greedy"
        self._counts = Counter(prefills=0, preemptions=0, windows=0, tokens_in=0)

    # ------------------------------------------------------------------ offline serving
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
        for i, (prompt, count) in enumerate(zip(prompts, counts)):
            self.check(prompt, count, i)
        if self.busy:
            raise RuntimeError("the engine is serving other requests; generate() needs it idle")
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.prepare(eos, (self.mode_of(params),))
        base = random.randrange(2**31) if seed is None else seed
        ids = [self.add(p, n, params, seed=(base * 1_000_003 + i) % 2**32) for i, (p, n) in enumerate(zip(prompts,
                                                                                                            counts))]
        requests = [self._requests[i] for i in ids]
        self.runner.reset_statistics()
        self._counts.clear()
        start = time.perf_counter()
        bar = tqdm(total=sum(counts), unit="tok", desc="generate", disable=not progress)
        try:
            while self.busy:
                bar.update(sum(len(out.tokens) for out in self.step()))
        except BaseException:
            self.cancel_all()  # no pages may leak into the next call
            raise
        finally:
            bar.close()
        end = time.perf_counter()
        for i in ids:  # those asking for no tokens never ran
            self._requests.pop(i, None)
        results = [RequestResult(r.tokens, r.depths, (r.first_token or end) - start,
                                 len(r.tokens) / max(end - r.admitted, 1e-9), r.preemptions) for r in requests]
        return EngineOutput(results, self._stats(results, end - start))

    # ------------------------------------------------------------------ incremental serving
    def check(self, prompt: Sequence[int], max_new_tokens: int, index: int | None = 0,
              max_recursions: int | None = None, extra_recursions: int | None = None) -> None:
        """Raise ValueError for a request this engine can never serve: bad ids, too long, too big for the pool, or
        a test-time depth (``max_recursions``, ``extra_recursions``, as :meth:`add` takes them) that the model
        cannot apply or that passes the engine's ``extra_recursions``. ``index`` numbers the prompt in the
        messages (``generate``'s prompts); ``None`` words them for one request, "the prompt" (a server's, which
        checks the lengths against its context itself first)."""
        self._depth(max_recursions, extra_recursions)
        check_prompts([len(prompt)], max_new_tokens, self.max_seq_len, first=index or 0)
        name = "the prompt" if index is None else f"prompt {index}"
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"{name}: token ids must lie in [0, {vocab})")
        pool = self.cache.pool
        # Refuse up front what can never fit, rather than failing mid-run and losing finished results.
        needed = self._streams_every_token_writes() * math.ceil((len(prompt) + max_new_tokens) / pool.page_size)
        if needed > pool.num_pages:
            raise ValueError(f"{name}: {len(prompt)} prompt + {max_new_tokens} new tokens need at least "
                             f"{needed} KV pages but the pool holds {pool.num_pages}; give the engine more pages")

    def _depth(self, max_recursions: int | None, extra_recursions: int | None) -> tuple[int | None, int, int]:
        """A request's test-time depth as it runs: ``(max_recursions, extra_recursions, steps)``, the engine's own
        when it names neither; ValueError if the model cannot apply it or it asks for more extra recursions than
        the engine was built for. :meth:`check` and :meth:`add` both go through here."""
        if max_recursions is None and extra_recursions is None:
            max_recursions, extra_recursions = self.max_recursions, self.extra_recursions
        extra_recursions = extra_recursions or 0
        if extra_recursions > self.extra_recursions:
            raise ValueError(f"extra_recursions={extra_recursions}: this engine was built for at most "
                             f"{self.extra_recursions}; build it with Engine(..., extra_recursions=N) (a server: "
                             "mor serve --extra-recursions N)")
        steps = len(self.model.model.recursion_steps(max_recursions, extra_recursions))
        return max_recursions, extra_recursions, steps

    @staticmethod
    def mode_of(params: SamplingParams) -> str:
        """The sampling work a request needs: "greedy", "sample", or "filter" (top-k / top-p)."""
        if params.greedy:
            return "greedy"
        return "filter" if params.top_k is not None or (params.top_p or 1.0) < 1 else "sample"

    def prepare(self, eos_token_ids: Sequence[int], modes: tuple[str, ...]) -> None:
        """Set the end tokens and build (compile, capture) what the sampling ``modes`` need; the engine must be
        idle. A server calls it once with every mode."""
        if self.busy:
            raise RuntimeError("prepare() needs an idle engine")
        self.runner.set_eos(list(eos_token_ids))
        self.runner.capture(modes)

    def add(self, prompt: Sequence[int], max_new_tokens: int, params: SamplingParams = SamplingParams(),
            seed: int = 0, max_recursions: int | None = None, extra_recursions: int | None = None) -> int:
        """Queue a request; its id. Validate it first with :meth:`check`. ``max_recursions`` and
        ``extra_recursions`` (default: the engine's) set its test-time depth; it may ask for at most the engine's
        ``extra_recursions``."""
        max_recursions, extra_recursions, steps = self._depth(max_recursions, extra_recursions)
        index = self._next_id
        self._next_id += 1
        request = Request(index, list(prompt), max_new_tokens, params, seed, max_recursions, extra_recursions, steps)
        self._requests[index] = request
        if max_new_tokens > 0:
            self.scheduler.waiting.append(request)
        return index

    def cancel(self, request_id: int) -> bool:
        """Stop a request: it frees its row and pages at the next step and reports "cancelled" (a request still
        waiting for a row is dropped at once and reports nothing; one that has already finished is left as it is).
        True when it was dropped from the waiting queue, i.e. no step will report it."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        request.cancelled = True
        if request in self.scheduler.waiting:
            self.scheduler.waiting.remove(request)
            del self._requests[request_id]  # never admitted, so no step reports (and forgets) it
            return True
        if request.row >= 0:
            self.runner.finish([request.row])
        return False

    def cancel_all(self) -> None:
        """Drop every request, in flight or waiting, and start again from a free pool (whatever state a failure
        left the rows and pages in)."""
        if self._in_flight is not None:
            self.runner.wait(self._in_flight)
            self._in_flight = None
        for row in list(self.scheduler.running):
            self._requests.pop(self.scheduler.remove(row).index, None)
        for request in self.scheduler.waiting:
            self._requests.pop(request.index, None)
        self.scheduler.waiting.clear()
        self.runner.reset()
        self.scheduler.reset()

    @property
    def busy(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._in_flight)

    def step(self) -> list[RequestOutput]:
        """One host round trip: admit waiting requests, launch the next window, and report what the previous
        window produced."""
        outputs: list[RequestOutput] = []
        self._admit()
        window = None
        if self.scheduler.running:
            size = self.scheduler.window()
            if size is None:  # the pool cannot hold one more iteration of every request
                if self._in_flight is None:
                    self._preempt()
                    return outputs
            else:
                window = self.runner.launch(size, self._mode)
                self.scheduler.launched(size)
                self._counts["windows"] += 1
        if self._in_flight is not None:
            outputs = self._collect(self._in_flight)
        self._in_flight = window
        return outputs

    # ------------------------------------------------------------------ internals
    def _admit(self) -> None:
        if self.scheduler.waiting and self.scheduler.free_rows and self.scheduler.stale and self._in_flight is None:
            # Released rows freed pages that no status has counted yet. Read the pool before admitting: a read
            # after an admission would count the admitted rows as empty before their prefill.
            self._refresh()
        admitted = self.scheduler.admit()
        if not admitted:
            return
        modes = {self.mode_of(r.params) for r in self.scheduler.running.values()}
        self._mode = "filter" if "filter" in modes else "sample" if "sample" in modes else "greedy"
        looped = [len(r.sequence) <= self.loop_prompt_tokens for r in admitted]
        self._prefill([r for r, loop in zip(admitted, looped) if len(r.sequence) > 1 and not loop])
        vocab = self.model.config.vocab_size
        columns = []
        for r, loop in zip(admitted, looped):
            # A looped request enters its first token and feeds the rest; a prefilled one enters its last.
            token, position, feed = (r.sequence[0], 0, r.sequence[1:]) if loop else \
                (r.sequence[-1], len(r.sequence) - 1, [])
            columns.append((r.row, token, position, r.max_new - len(r.tokens), len(r.tokens),
                            0.0 if r.params.greedy else r.params.temperature, r.params.top_k or vocab,
                            r.params.top_p or 1.0, r.seed, r.steps, feed))
        self.runner.enter(*map(list, zip(*columns)))

    def _prefill(self, requests: list[Request]) -> None:
        """Prefill the prompts in batches: requests of the same depth options, by length, at most
        ``PREFILL_TOKENS`` padded tokens a batch (the first request of a batch is its longest)."""
        groups: dict[tuple[int | None, int], list[Request]] = {}
        for request in sorted(requests, key=lambda r: -len(r.sequence)):  # longest first
            groups.setdefault((request.max_recursions, request.extra_recursions), []).append(request)
        for (max_recursions, extra_recursions), group in groups.items():
            while group:
                width = len(group[0].sequence) - 1
                take = max(1, min(len(group), PREFILL_TOKENS // max(width, 1)))
                batch, group = group[:take], group[take:]
                self.runner.prefill([r.row for r in batch], [r.sequence[:-1] for r in batch], max_recursions,
                                    extra_recursions)
                self._counts["prefills"] += len(batch)
                self._counts["tokens_in"] += sum(len(r.sequence) - 1 for r in batch)

    def _collect(self, window: Window) -> list[RequestOutput]:
        status: WindowStatus = self.runner.collect(window)
        self.scheduler.report(status.counts, status.held, status.free_pages)
        now = time.perf_counter()
        outputs: dict[int, RequestOutput] = {}
        running = self.scheduler.running
        self._counts["tokens_in"] += len(status.rows)
        # Grouped by row, each in the order sampled; one conversion to Python lists, then slices (a NumPy split
        # per request costs more host time than the whole rest of the loop)
        order = np.argsort(status.rows, kind="stable")
        rows, tokens, depths = (a[order].tolist() for a in (status.rows, status.tokens, status.depths))
        bounds = np.flatnonzero(np.diff(status.rows[order], prepend=-1)).tolist() + [len(rows)]
        for start, end in zip(bounds, bounds[1:]):
            request = running[rows[start]]
            if request.cancelled:
                continue
            out = RequestOutput(request.index, tokens[start:end], depths[start:end])
            request.tokens += out.tokens
            request.depths += out.depths
            if request.first_token is None:
                request.first_token = now
            outputs[request.index] = out
        done = [row for row in np.flatnonzero(status.phase == DONE).tolist()
                if row in running and self.scheduler.describes(running[row])]
        if done:
            self.runner.release(done)
        eos = self.runner.eos_ids
        for row in done:
            request = self.scheduler.remove(row)
            del self._requests[request.index]
            out = outputs.setdefault(request.index, RequestOutput(request.index, [], []))
            out.finish_reason = "cancelled" if request.cancelled else \
                "stop" if request.tokens and request.tokens[-1] in eos else "length"
        return list(outputs.values())

    def _refresh(self) -> None:
        """Read the pool's counts, pages held and free pages directly (a synchronisation; only with no window in
        flight)."""
        pool, rows = self.cache.pool, self.max_requests
        # Copies: on the CPU, .cpu() would hand the scheduler the live tensors, which the next window changes.
        self.scheduler.refresh(pool.counts[:, :rows].cpu().numpy().copy(), pool.held[:, :rows].cpu().numpy().copy(),
                               pool.free_pages())

    def _preempt(self) -> None:
        if self.scheduler.stale:
            self._refresh()
            if self.scheduler.window() is not None:
                return
        if len(self.scheduler.running) <= 1:
            raise MemoryError("the KV page pool cannot hold a single request; give the engine more pages")
        victim = self.scheduler.victim()
        self.runner.release([victim.row])
        self.scheduler.remove(victim.row)
        victim.preemptions += 1
        self._counts["preemptions"] += 1
        self.scheduler.waiting.appendleft(victim)  # recomputed from prompt + generated tokens when readmitted

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

    def _stats(self, results: list[RequestResult], seconds: float) -> EngineStats:
        device = self.runner.statistics()
        tokens = sum(len(r.tokens) for r in results)
        histogram: Counter[int] = Counter()
        for r in results:
            histogram.update(r.depths)
        plan, cache = self.model.model.plan, self.cache
        appended = {p: device["appended"][s] for p, s in cache.stream.items()}
        block = [p for step in self.runner.steps for p in step]
        per_token = max(self._counts["tokens_in"] + device["fed"], 1)  # tokens that entered the model
        iterations = max(device["iterations"], 1)
        return EngineStats(
            requests=len(results), tokens=tokens, seconds=seconds, tokens_per_second=tokens / max(seconds, 1e-9),
            iterations=device["iterations"],
            block_occupancy=device["block_tokens"] / (iterations * self.runner.block_slots),
            mean_tail_batch=device["sampled"] / iterations, windows=self._counts["windows"],
            prefills=self._counts["prefills"], preemptions=self._counts["preemptions"],
            depth_histogram=dict(sorted(histogram.items())),
            kv_peak_bytes=device["peak_pages"] * cache.pages.page_nbytes(), kv_allocated_bytes=cache.nbytes(),
            kv_bytes_per_token=sum(appended.values()) * cache.pages.entry_nbytes() / per_token,
            kv_block_ratio=sum(appended.get(p, 0) for p in block) / (per_token * len(block)),
            kv_model_ratio=sum(appended.values()) / (per_token * plan.num_positions),
        )
