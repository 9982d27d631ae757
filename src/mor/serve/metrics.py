"""Server metrics in the Prometheus text format (version 0.0.4), written by the engine worker and read by
``GET /metrics``.

Counters: requests by finish reason, refused requests, prompt and generated tokens, generated tokens by recursion
depth. Gauges: generation tokens/s over the last ``RATE_WINDOW`` seconds, requests waiting and running, KV pages
used and in the pool, mean recursion depth. Histograms: time to first token, time per output token after the
first, request latency.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence

RATE_WINDOW = 10.0  # seconds of history behind the tokens/s gauge
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip([*map(_number, self.buckets), "+Inf"], self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return [*out, f"{name}_sum {_number(self.sum)}", f"{name}_count {cumulative}"]


class Metrics:
    """Thread-safe: the engine worker records, the server renders."""

    def __init__(self, kv_pages_total: int) -> None:
        self.kv_pages_total = kv_pages_total
        self._lock = threading.Lock()
        self.finished: Counter[str] = Counter()  # by finish reason
        self.rejected = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.depths: Counter[int] = Counter()
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last RATE_WINDOW seconds
        self.waiting = self.running = self.kv_pages_used = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)

    def admitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens

    def refused(self) -> None:
        with self._lock:
            self.rejected += 1

    def generated(self, depths: Sequence[int], now: float) -> None:
        with self._lock:
            self.generation_tokens += len(depths)
            self.depths.update(depths)
            self._recent.append((now, len(depths)))

    def finish(self, reason: str, arrival: float, first_token: float | None, tokens: int, now: float) -> None:
        with self._lock:
            self.finished[reason] += 1
            self.latency.observe(now - arrival)
            if first_token is not None:
                self.ttft.observe(first_token - arrival)
                if tokens > 1:
                    self.tpot.observe((now - first_token) / (tokens - 1))

    def load(self, waiting: int, running: int, kv_pages_used: int) -> None:
        with self._lock:
            self.waiting, self.running, self.kv_pages_used = waiting, running, kv_pages_used

    def tokens_per_second(self, now: float) -> float:
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW

    def render(self) -> str:
        rate = self.tokens_per_second(time.perf_counter())
        with self._lock:
            total_depth = sum(d * n for d, n in self.depths.items())
            mean_depth = total_depth / self.generation_tokens if self.generation_tokens else 0.0
            families: list[tuple[str, str, str, list[str]]] = [
                ("mor_requests_total", "counter", "Requests ended, by finish reason",
                 [f'mor_requests_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]),
                ("mor_requests_rejected_total", "counter", "Requests refused because the queue was full",
                 [f"mor_requests_rejected_total {self.rejected}"]),
                ("mor_prompt_tokens_total", "counter", "Prompt tokens of admitted requests",
                 [f"mor_prompt_tokens_total {self.prompt_tokens}"]),
                ("mor_generation_tokens_total", "counter", "Generated tokens",
                 [f"mor_generation_tokens_total {self.generation_tokens}"]),
                ("mor_generation_tokens_by_depth_total", "counter", "Generated tokens by the recursion depth that "
                 "produced them", [f'mor_generation_tokens_by_depth_total{{depth="{d}"}} {n}'
                                   for d, n in sorted(self.depths.items())]),
                ("mor_generation_tokens_per_second", "gauge", f"Generated tokens per second over the last "
                 f"{RATE_WINDOW:g} s", [f"mor_generation_tokens_per_second {_number(rate)}"]),
                ("mor_recursion_depth_mean", "gauge", "Mean recursion depth of the generated tokens",
                 [f"mor_recursion_depth_mean {_number(mean_depth)}"]),
                ("mor_requests_waiting", "gauge", "Requests queued for a batch row",
                 [f"mor_requests_waiting {self.waiting}"]),
                ("mor_requests_running", "gauge", "Requests in the running batch",
                 [f"mor_requests_running {self.running}"]),
                ("mor_kv_pages_used", "gauge", "KV cache pages in use", [f"mor_kv_pages_used {self.kv_pages_used}"]),
                ("mor_kv_pages_total", "gauge", "KV cache pages in the pool",
                 [f"mor_kv_pages_total {self.kv_pages_total}"]),
                ("mor_time_to_first_token_seconds", "histogram", "Time from arrival to the first generated token",
                 self.ttft.lines("mor_time_to_first_token_seconds")),
                ("mor_time_per_output_token_seconds", "histogram", "Time per generated token after the first",
                 self.tpot.lines("mor_time_per_output_token_seconds")),
                ("mor_request_latency_seconds", "histogram", "Time from arrival to the end of a request",
                 self.latency.lines("mor_request_latency_seconds")),
            ]
        lines = []
        for name, kind, help_, samples in families:
            lines += [f"# HELP {name} {help_}.", f"# TYPE {name} {kind}", *samples]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return repr(float(value))


def parse(text: str) -> dict[str, float]:
    """Samples of a rendered page by name (labels included, as written): what a scraper reads."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples
