import contextlib
import signal
from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(1)  # the tests run tiny models: a second thread only adds overhead

# Seconds that the setup and the call of one test may each take, so that a hang fails that test instead of
# stalling the suite. Tests marked slow (``-m "not slow"`` leaves them out) start processes or train several runs.
TIMEOUT = 60
SLOW_TIMEOUT = 300


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@contextlib.contextmanager
def _time_limit(item: pytest.Item) -> Iterator[None]:
    if not hasattr(signal, "SIGALRM"):  # Windows: no limit
        yield
        return
    seconds = SLOW_TIMEOUT if item.get_closest_marker("slow") else TIMEOUT

    def expire(signum: int, frame: object) -> None:
        pytest.fail(f"timed out after {seconds} s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item):
    with _time_limit(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    with _time_limit(item):
        return (yield)
