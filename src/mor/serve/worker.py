"""The engine's one owner: a background thread that feeds requests in and streams outputs back to the event loop.

The engine is not thread-safe, so only this thread touches it. The event loop hands requests and cancellations in
through a command queue under a condition variable; the thread applies them between two engine steps, steps while
anything is queued or in flight, and sleeps on the condition otherwise. Each step's outputs go back to their
request's :class:`Stream` (an ``asyncio.Queue``) through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from mor.infer.engine import Engine, RequestOutput
from mor.infer.sampling import SAMPLING_MODES, SamplingParams
from mor.serve.metrics import Metrics


@dataclass(frozen=True)
class Job:
    """One request for the engine, validated (:meth:`Engine.check` and the depth options)."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    seed: int
    max_recursions: int | None = None
    extra_recursions: int = 0


class QueueFull(Exception):
    """The server holds as many requests as it may; the client should retry later."""


class Stream:
    """The outputs of one request, read on the event loop with ``async for``; the last one has a
    ``finish_reason``. :meth:`cancel` ends the request early (its client went away, or a stop string matched)."""

    def __init__(self, worker: EngineWorker, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.arrival = time.perf_counter()
        self.first_token: float | None = None  # worker thread's
        self.tokens = 0  # generated so far, worker thread's
        self.request_id: int | None = None  # the engine's, once the worker has added it
        self._worker = worker
        self._loop = loop
        self._outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._ended = False  # read to the end, or cancelled
        self.cancel_reason = "cancelled"  # what the metrics count a cancelled request as; set before the command

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while True:
            output = await self._outputs.get()
            if isinstance(output, BaseException):
                raise output
            if output.finish_reason is not None:
                self._ended = True
            yield output
            if self._ended:
                return

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop the request and free its row and pages; nothing happens once it has finished. ``reason``: the
        finish reason the metrics record, "stop" when a stop string ended it (the client was told "stop")."""
        if not self._ended:
            self._ended = True
            self.cancel_reason = reason
            self._worker.cancel(self)

    def deliver(self, output: RequestOutput | BaseException) -> None:
        """From the worker thread: pass ``output`` to the reader (dropped once the event loop has closed)."""
        try:
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, output)
        except RuntimeError:
            pass


class EngineWorker:
    """Owns ``engine`` from one thread. ``max_queue``: requests that may wait for a row beyond the engine's rows;
    past that, :meth:`submit` raises :class:`QueueFull`."""

    def __init__(self, engine: Engine, end_token_ids: Sequence[int], max_queue: int, metrics: Metrics) -> None:
        self.engine = engine
        self.end_token_ids = list(end_token_ids)
        self.capacity = engine.max_requests + max_queue
        self.metrics = metrics
        self._condition = threading.Condition()
        self._commands: deque[tuple[str, Stream]] = deque()
        self._outstanding = 0  # submitted and not yet ended
        self._stopping = False
        self._streams: dict[int, Stream] = {}  # by engine request id; the worker thread's
        self._thread = threading.Thread(target=self._run, name="mor-engine", daemon=True)
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # ------------------------------------------------------------------ the event loop's side
    def start(self) -> None:
        """Start the thread and wait until the engine is prepared (compiled and captured on CUDA)."""
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    def submit(self, job: Job, loop: asyncio.AbstractEventLoop) -> Stream:
        stream = Stream(self, job, loop)
        with self._condition:
            if self._outstanding >= self.capacity:
                self.metrics.refused()
                raise QueueFull(f"the server holds {self._outstanding} requests, as many as it may")
            self._outstanding += 1
            self._commands.append(("add", stream))
            self._condition.notify()
        return stream

    def cancel(self, stream: Stream) -> None:
        with self._condition:
            self._commands.append(("cancel", stream))
            self._condition.notify()

    def stop(self) -> None:
        """End every request still held (they report "cancelled") and the thread."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._thread.join()

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        try:
            with torch.no_grad():
                self.engine.prepare(self.end_token_ids, SAMPLING_MODES)
        except BaseException as error:  # reported by start()
            self._failure = error
            return
        finally:
            self._ready.set()
        with torch.no_grad():
            while self._serve_once():
                pass

    def _serve_once(self) -> bool:
        """Apply the commands handed in, step the engine once if it has work; False once stopped."""
        with self._condition:
            while not (self._commands or self.engine.busy or self._stopping):
                self._condition.wait()
            commands, self._commands = self._commands, deque()
            stopping = self._stopping
        for kind, stream in commands:
            self._add(stream) if kind == "add" else self._cancel(stream)
        if stopping:
            self.engine.cancel_all()
            for request in list(self._streams):
                self._end(RequestOutput(request, [], [], "cancelled"))
            return False
        if self.engine.busy:
            try:
                outputs = self.engine.step()
            except Exception as error:  # a failure of the engine, not of one request: fail every request held
                self.engine.cancel_all()
                for stream in self._streams.values():
                    stream.deliver(error)
                self._forget(list(self._streams))
                return True
            now = time.perf_counter()
            for output in outputs:
                self._report(output, now)
        self._update_load()
        return True

    def _add(self, stream: Stream) -> None:
        job = stream.job
        stream.request_id = self.engine.add(job.prompt, job.max_new_tokens, job.params, job.seed,
                                            job.max_recursions, job.extra_recursions)
        self._streams[stream.request_id] = stream
        self.metrics.admitted(len(job.prompt))

    def _cancel(self, stream: Stream) -> None:
        request = stream.request_id
        if request not in self._streams:  # already ended
            return
        if self.engine.cancel(request):  # dropped while it waited for a row: the engine will not report it
            self._end(RequestOutput(request, [], [], "cancelled"))

    def _report(self, output: RequestOutput, now: float) -> None:
        stream = self._streams[output.request]
        if output.tokens:
            stream.first_token = stream.first_token or now
            stream.tokens += len(output.tokens)
            self.metrics.generated(output.depths, now)
        if output.finish_reason is None:
            stream.deliver(output)
        else:
            self._end(output, now)

    def _end(self, output: RequestOutput, now: float | None = None) -> None:
        stream = self._streams[output.request]
        assert output.finish_reason is not None
        # A request the server cancelled ends as the server said: "stop" for a stop string.
        reason = stream.cancel_reason if output.finish_reason == "cancelled" else output.finish_reason
        self.metrics.finish(reason, stream.arrival, stream.first_token, stream.tokens, now or time.perf_counter())
        stream.deliver(output)
        self._forget([output.request])

    def _forget(self, requests: list[int]) -> None:
        for request in requests:
            del self._streams[request]
        with self._condition:
            self._outstanding -= len(requests)

    def _update_load(self) -> None:
        scheduler, pool = self.engine.scheduler, self.engine.cache.pool
        # While busy, the free pages of the last window read back (exact reading would synchronise the device
        # and stall the window in flight); when idle, the pool itself.
        pages = pool.num_pages - scheduler.free_pages if self.engine.busy else pool.pages_in_use()
        self.metrics.load(len(scheduler.waiting), len(scheduler.running), pages)
