"""The engine's host policy: which requests hold rows, how many iterations the device runs alone, whom to preempt.

The device allocates KV pages by itself (:class:`mor.infer.page_pool.PagePool`), so the scheduler's job is to
keep that safe: before it lets the device run a window of K iterations it checks, from the entry counts, pages
held and free pages of the last status it read, that the pool holds enough pages for everything that may happen
until then. A row appends at most one entry per stream per iteration, and a window of K iterations starts by giving
it room for K more entries, so a row with ``c`` entries and ``h`` pages in a stream takes at most
``max(min(ceil((c + k + 1) / P), M) - h, 0)`` new pages there in ``k`` iterations (``M``: the pages a stream of one
request holds at most, as the pool never gives it more; ``h`` can exceed ``ceil(c / P)`` by the room taken ahead). Rows
admitted since that status are bounded by their prefilled length instead. When even one iteration does not fit,
the youngest request is preempted: its pages are freed and it is recomputed later from its prompt and the
tokens it generated so far.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from mor.infer.sampling import SamplingParams


@dataclass
class Request:
    """One request and what it has produced so far."""

    index: int
    prompt: list[int]
    max_new: int
    params: SamplingParams
    seed: int
    max_recursions: int | None = None
    extra_recursions: int = 0
    steps: int = 1  # recursion steps its tokens may run
    tokens: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    row: int = -1
    epoch: int = 0  # when it entered: statuses of later epochs describe it
    order: int = 0  # admission counter: the largest is the youngest
    admitted: float = 0.0
    first_token: float | None = None
    preemptions: int = 0
    cancelled: bool = False

    @property
    def sequence(self) -> list[int]:
        return self.prompt + self.tokens


class Scheduler:
    """Rows, admission and the page budget of an engine with ``rows`` request rows and ``num_streams`` KV streams
    of ``page_size`` entries, at most ``max_pages`` pages per stream of a row."""

    def __init__(self, rows: int, num_streams: int, page_size: int, num_pages: int, max_pages: int,
                 window_sizes: tuple[int, ...]) -> None:
        self.num_streams, self.page_size, self.num_pages = num_streams, page_size, num_pages
        self.max_pages = max_pages
        self.window_sizes = tuple(sorted(window_sizes))
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.free_rows = list(range(rows - 1, -1, -1))
        self.counts = np.zeros((num_streams, rows), dtype=np.int64)  # entries per (stream, row), last status
        self.held = np.zeros_like(self.counts)  # pages per (stream, row), last status
        self.free_pages = num_pages  # free pages at the last status
        # Epochs order what the device has seen: each window launched, and each direct read of the pool, starts
        # a new one; a status describes the requests that entered before its epoch.
        self.epoch = 0
        self.described = 0  # requests of earlier epochs are described by the last status
        self.in_flight: deque[tuple[int, int]] = deque()  # (size, epoch) of the windows not yet reported
        self.released = -1  # epoch of the last release: statuses of earlier epochs miss the pages it freed
        self.admissions = 0

    # ------------------------------------------------------------------ page budget
    def _growth(self, steps: int) -> int:
        """Pages the running rows may take in ``steps`` more iterations, counted from the last status."""
        known = [r.row for r in self.running.values() if self.describes(r)]
        pages = np.maximum(self._pages_for(self.counts[:, known] + steps + 1) - self.held[:, known], 0).sum()
        fresh = [len(r.sequence) - 1 for r in self.running.values() if not self.describes(r)]
        pages += sum(self.num_streams * self._pages_for(n + steps + 1) for n in fresh)
        return int(pages)

    def _pages_for(self, entries: int | np.ndarray) -> np.ndarray:
        """Pages a stream of one row holds for ``entries`` entries (elementwise)."""
        return np.minimum(-(-entries // self.page_size), self.max_pages)

    def _launched_steps(self) -> int:
        return sum(size for size, _ in self.in_flight)

    def admit(self) -> list[Request]:
        """Give waiting requests rows while the pool can hold them for one more iteration; the admitted ones."""
        admitted: list[Request] = []
        steps = self._launched_steps() + 1
        pages = self._growth(steps)
        while self.waiting and self.free_rows:
            request = self.waiting[0]
            prefix = len(request.sequence) - 1
            more = self.num_streams * int(self._pages_for(prefix + steps + 1))
            if pages + more > self.free_pages:
                if not self.running and not self.stale:
                    raise MemoryError(f"the KV page pool ({self.free_pages} free pages) cannot hold a prompt of "
                                      f"{prefix + 1} tokens; give the engine more pages")
                break
            pages += more
            self.waiting.popleft()
            request.row = self.free_rows.pop()
            request.epoch = self.epoch
            self.admissions += 1
            request.order = self.admissions
            if request.first_token is None:
                request.admitted = time.perf_counter()
            self.running[request.row] = request
            admitted.append(request)
        return admitted

    def window(self) -> int | None:
        """The most iterations the device may run next without running out of pages (None: not even one)."""
        launched = self._launched_steps()
        for size in reversed(self.window_sizes):
            if self._growth(launched + size) <= self.free_pages:
                return size
        return None

    # ------------------------------------------------------------------ bookkeeping
    def launched(self, size: int) -> None:
        self.in_flight.append((size, self.epoch))
        self.epoch += 1

    def report(self, counts: np.ndarray, held: np.ndarray, free_pages: int) -> None:
        """The status of the oldest window in flight has been read."""
        _, epoch = self.in_flight.popleft()
        self._update(counts, held, free_pages, epoch)

    def refresh(self, counts: np.ndarray, held: np.ndarray, free_pages: int) -> None:
        """Counts, pages held and free pages read from the pool itself, with no window in flight."""
        assert not self.in_flight
        self._update(counts, held, free_pages, self.epoch)
        self.epoch += 1

    def reset(self) -> None:
        """Nothing in flight and an empty pool (after the engine dropped every request and reset the pool)."""
        assert not self.running and not self.waiting
        self.in_flight.clear()
        self.refresh(np.zeros_like(self.counts), np.zeros_like(self.held), self.num_pages)

    def _update(self, counts: np.ndarray, held: np.ndarray, free_pages: int, epoch: int) -> None:
        self.counts, self.held, self.free_pages = counts, held, free_pages
        self.described = epoch + 1

    @property
    def stale(self) -> bool:
        """Whether rows were released since the last status was taken: more pages are free than it says."""
        return self.released >= self.described

    def describes(self, request: Request) -> bool:
        """Whether the last status covers ``request`` (it entered before that status's epoch)."""
        return request.epoch < self.described

    def remove(self, row: int) -> Request:
        self.released = self.epoch
        self.free_rows.append(row)
        request = self.running.pop(row)
        request.row = -1
        return request

    def victim(self) -> Request:
        """The request to preempt: the youngest."""
        return max(self.running.values(), key=lambda r: r.order)
