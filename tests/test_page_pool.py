import pytest
import torch
from helpers import KERNEL_DEVICE, needs_kernels

from mor.infer.kernel_support import kernel_available
from mor.infer.page_pool import PagePool


def busy_pool(device: str, seed: int, num_pages: int = 8000) -> tuple[PagePool, torch.Tensor]:
    """A pool part-way through decoding: random entry counts, some pairs holding a page of room ahead, a
    shuffled free stack; and which rows are active."""
    g = torch.Generator().manual_seed(seed)
    pool = PagePool(num_streams=5, num_rows=300, num_pages=num_pages, page_size=4, max_seq_len=40, device=device)
    counts = torch.randint(0, 41, pool.counts.shape, generator=g)
    counts[:, -1] = 0  # the idle row
    held = (-(-counts // 4) + torch.randint(0, 2, counts.shape, generator=g)).clamp(max=pool.max_pages)
    pool.counts.copy_(counts)
    pool.held.copy_(held)
    pool.free.copy_(torch.randperm(num_pages + 1, generator=g))
    pool.top.fill_(num_pages // 2)
    pool.peak.fill_(num_pages // 2)
    active = torch.rand(pool.num_rows + 1, generator=g) < 0.7
    active[-1] = False
    return pool, active.to(device)


def state(pool: PagePool) -> dict[str, torch.Tensor]:
    """What allocation changes; not the tables' spare column, where the PyTorch path parks its masked writes."""
    tensors = {name: getattr(pool, name).cpu() for name in ("tables", "held", "top", "peak", "overflow")}
    return {**tensors, "tables": tensors["tables"][..., :-1]}


def test_room_for_a_window_takes_the_pages_its_entries_may_need():
    pool, active = busy_pool("cpu", 0)
    before = pool.held.clone()
    pool.ensure_room(active, 6)
    wanted = (-(-(pool.counts + 6) // 4)).clamp(max=pool.max_pages)
    expected = torch.where(active, torch.maximum(before, wanted), before)
    assert torch.equal(pool.held, expected)
    assert int(pool.top) == 4000 - int((expected - before).sum()) and not pool.overflow


@needs_kernels
@pytest.mark.parametrize("entries", [1, 4, 8, 9])
def test_the_room_kernel_takes_the_same_pages_as_the_pytorch_path(entries):
    for seed in range(3):
        reference, active = busy_pool("cpu", seed)
        reference.ensure_room(active, entries)
        assert not reference.overflow
        pool, active = busy_pool(KERNEL_DEVICE, seed)
        pool.ensure_room(active, entries, kernel=True)
        for name, expected in state(reference).items():
            assert torch.equal(state(pool)[name], expected), (name, seed)


@needs_kernels
def test_the_room_kernel_flags_a_pool_that_runs_dry_as_the_pytorch_path_does():
    reference, active = busy_pool("cpu", 1, num_pages=40)
    reference.ensure_room(active, 8)
    assert reference.overflow
    pool, active = busy_pool(KERNEL_DEVICE, 1, num_pages=40)
    pool.ensure_room(active, 8, kernel=True)
    for name, expected in state(reference).items():
        assert torch.equal(state(pool)[name], expected), name


def test_the_room_kernel_says_where_it_cannot_run():
    if kernel_available(torch.device("cpu")):
        pytest.skip("Triton's interpreter runs the kernel on the CPU")
    pool, active = busy_pool("cpu", 0)
    with pytest.raises(RuntimeError, match=r"needs Triton and a CUDA device .* kernel=False"):
        pool.ensure_room(active, 1, kernel=True)
