"""Process groups and model wrapping for ``torchrun``: DDP or FSDP2 (``fully_shard``).

FSDP2 shards the model as one unit. Per-layer units would save more memory, but the shared recursion block runs
several times per forward pass and its weights are tied across recursions; one root unit gathers them once per
forward and backward, which is simple and correct for every sharing strategy (and ample for the paper's sizes).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mor.model import MoROutput
from mor.train.config import ConfigError, RunConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(config: RunConfig) -> DistEnv:
    """Join the process group that ``torchrun`` describes in the environment (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and config.strategy == "none":
        raise ConfigError(f"run.strategy: {world_size} processes were launched but the strategy is 'none'; "
                          "set run.strategy=ddp or run.strategy=fsdp")
    if config.device == "auto":
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"run.device: this process wants {device} but the machine has "
                              f"{torch.cuda.device_count()} GPU(s); launch at most that many processes per node "
                              "(torchrun --nproc-per-node) or set run.device=cpu")
        torch.cuda.set_device(device)
    # Under torchrun (RANK is set) ddp/fsdp wrap the model even for one process, so that path can be checked.
    launched = "RANK" in os.environ and config.strategy != "none"
    if launched and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return DistEnv(rank, local_rank, world_size, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, strategy: str, env: DistEnv) -> nn.Module:
    if strategy == "none" or not dist.is_initialized():
        return model
    if strategy == "ddp":
        # The trainer keeps the buffers (balancing bias) identical across ranks, updating them from loads summed
        # over every rank: no broadcast per forward.
        no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                          inspect.signature(DistributedDataParallel).parameters else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                       **no_buffer_sync)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _expose_output_tensors()
    # The mesh on the training device: FSDP's default mesh is CUDA whenever a GPU exists, even for a CPU run.
    fully_shard(model, mesh=init_device_mesh(env.device.type, (env.world_size,)))
    return model


@functools.cache
def _expose_output_tensors() -> None:
    """Make MoROutput a pytree node. FSDP2 finds the output tensors to hook its backward (re-gather, then
    reduce-scatter) with ``tree_flatten`` in some torch versions (2.11), which skips plain dataclasses: the
    gradients would silently never reach the sharded parameters."""
    torch.export.register_dataclass(MoROutput)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation window."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
