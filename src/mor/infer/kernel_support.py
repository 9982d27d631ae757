"""Whether the engine's Triton kernels (paged attention, fused sampling, the page pool's room) can run.

CUDA builds of PyTorch ship Triton. With ``TRITON_INTERPRET=1`` set before the first import, Triton runs the same
kernels on the CPU, slowly, which is how the test suite checks them on a machine without a GPU."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of PyTorch come without Triton
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def kernel_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``."""
    return triton is not None and (device.type == "cuda" or INTERPRET)
