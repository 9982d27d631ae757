"""Next-token choice: greedy, or sampling with temperature, top-k and nucleus (top-p) filtering."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mor.infer.kernel_support import kernel_available, tl, triton


@dataclass(frozen=True)
class SamplingParams:
    """``do_sample=False`` (or ``temperature=0``) is greedy decoding; otherwise tokens are drawn from the
    softmax of ``logits / temperature``, restricted to the ``top_k`` most likely tokens and to the smallest set
    whose probability reaches ``top_p``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive number of tokens (or None for all), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1] (1 keeps every token), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of ``logits`` [N, V]."""
    if params.greedy:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # Drop a token when the more likely ones already reach top_p (the most likely one always stays).
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------------------------------- per-row sampling
SAMPLING_MODES = ("greedy", "sample", "filter")  # what a batch needs: argmax only, + noise, + top-k/top-p
_M32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash of ``x`` (int64 values in [0, 2**32)); products stay below 2**63, so int64
    arithmetic never overflows."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


@torch.library.custom_op("mor::cumsum", mutates_args=())
def cumsum(x: Tensor) -> Tensor:
    """``x.cumsum(-1)``, opaque to ``torch.compile``: the scan it generates for vocabulary-wide rows failed to
    compile (PyTorch 2.11, CUDA), where the library's own kernel is fast."""
    return x.cumsum(-1)


@cumsum.register_fake
def _(x: Tensor) -> Tensor:
    return torch.empty_like(x)


def _row_keys(seed: Tensor, counter: Tensor) -> Tensor:
    """One 32-bit key per row from its ``seed`` and ``counter`` (the index of the token being drawn)."""
    return _hash32(_hash32(seed & _M32) ^ _hash32(counter & _M32))


def gumbel_noise(seed: Tensor, counter: Tensor, vocab: int) -> Tensor:
    """Standard Gumbel noise [N, vocab] (float32, 23 random bits per entry, always finite) that depends only on
    each row's ``seed`` and ``counter``: a request samples the same tokens whatever else shares its batch, and
    after a preemption. Entry i of a row is ``hash(hash(key ^ i) ^ key)``: the outer round keeps two rows' noises
    from being each other's entries reordered. (The index only ever meets the key: a product of the index with a
    constant would make compiled code compute it in 32 bits.)"""
    key = _row_keys(seed, counter)[:, None]
    return gumbel_of_bits(_hash32(_hash32(key ^ torch.arange(vocab, device=seed.device)) ^ key) >> 9)


def gumbel_of_bits(bits: Tensor) -> Tensor:
    """Gumbel noise from uniform 23-bit integers: ``(bits + 0.5) / 2**23`` is exact in float32, so the uniform
    number lies in (0, 1) and the noise is finite (24 bits would round the largest up to 1, and the noise to
    infinity)."""
    u = (bits.float() + 0.5) / 2**23
    return -torch.log(-torch.log(u))


def argmax_rows(x: Tensor, chunk: int = 1024) -> Tensor:
    """``x.argmax(-1)`` for [N, V] rows in two stages (the largest entry of each chunk, then the best chunk), so
    that a few rows of a wide vocabulary still spread over the whole GPU; ties go to the first index, as
    ``argmax`` does."""
    n, v = x.shape
    if v <= chunk or n == 0:
        return x.argmax(-1)
    pad = -v % chunk
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=float("-inf"))
    best, index = x.reshape(n, (v + pad) // chunk, chunk).max(-1)
    which = best.argmax(-1, keepdim=True)
    return (which * chunk + index.gather(1, which))[:, 0]


def sample_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor, counter: Tensor,
                mode: str, kernel: bool = False, active: Tensor | None = None) -> Tensor:
    """One token per row of ``logits`` [N, V] with per-row settings: ``temperature`` 0 is greedy; ``top_k`` (V for
    none) and ``top_p`` (1 for none) filter when ``mode`` is "filter". A draw is the Gumbel-max trick,
    ``argmax(logits / temperature + noise)`` with :func:`gumbel_noise`: one pass over the vocabulary, no softmax
    and no cumulative sum. ``kernel``: greedy and unfiltered draws by :func:`gumbel_argmax`, one fused pass (CUDA).
    ``active`` (bool, per row): the rows whose token is wanted; the others get token 0 (the kernel skips them)."""
    if kernel and mode != "filter":
        if active is None:
            active = torch.ones_like(temperature, dtype=torch.bool)
        return gumbel_argmax(logits, temperature, seed, counter, active, mode == "sample")
    token = _sample_rows(logits, temperature, top_k, top_p, seed, counter, mode)
    return token if active is None else torch.where(active, token, 0)


def _sample_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor, counter: Tensor,
                 mode: str) -> Tensor:
    """:func:`sample_rows` in PyTorch."""
    greedy = argmax_rows(logits)
    if mode == "greedy":
        return greedy
    x = logits.float() / temperature.clamp(min=1e-6)[:, None]
    if mode == "filter":
        ordered = x.sort(-1, descending=True).values
        probs = ordered.softmax(-1)
        rank = torch.arange(x.shape[-1], device=x.device)
        # Drop a token when the more likely ones already reach top_p, or past the top_k most likely; keep the first.
        drop = ((cumsum(probs) - probs >= top_p[:, None]) & (top_p[:, None] < 1)) | (rank >= top_k[:, None])
        cutoff = ordered.masked_fill(drop & (rank > 0), float("inf")).amin(-1)
        x = x.masked_fill(x < cutoff[:, None], float("-inf"))
    drawn = argmax_rows(x + gumbel_noise(seed, counter, x.shape[-1]))
    return torch.where(temperature > 0, drawn, greedy)


# ------------------------------------------------------------------------------------- the fused kernel (Triton)
if triton is not None:

    @triton.jit
    def _hash32_kernel(x):
        """:func:`_hash32` in wrapping 32-bit unsigned arithmetic: the same bits."""
        x = ((x >> 16) ^ x) * 0x45D9F3B
        x = ((x >> 16) ^ x) * 0x45D9F3B
        return (x >> 16) ^ x

    @triton.jit
    def _chunk_argmax_kernel(logits_ptr, temperature_ptr, seed_ptr, counter_ptr, active_ptr, best_ptr, index_ptr,
                             vocab, stride, stride_temperature, stride_seed, stride_counter, stride_active, chunks,
                             SAMPLE: tl.constexpr, BLOCK: tl.constexpr):
        """Program (row, chunk) of an active row: the largest score of the chunk and its first column; the score
        is the logit, or with SAMPLE and a positive temperature ``logit / temperature + noise``."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        if tl.load(active_ptr + row * stride_active) != 0:
            columns = chunk * BLOCK + tl.arange(0, BLOCK)
            valid = columns < vocab
            x = tl.load(logits_ptr + row * stride + columns, mask=valid, other=float("-inf")).to(tl.float32)
            if SAMPLE:
                temperature = tl.load(temperature_ptr + row * stride_temperature).to(tl.float32)
                if temperature > 0:
                    # _row_keys, from the low 32 bits of the seed and counter as there
                    seed = _hash32_kernel(tl.load(seed_ptr + row * stride_seed).to(tl.uint32))
                    counter = _hash32_kernel(tl.load(counter_ptr + row * stride_counter).to(tl.uint32))
                    key = _hash32_kernel(seed ^ counter)
                    bits = _hash32_kernel(_hash32_kernel(key ^ columns.to(tl.uint32)) ^ key) >> 9
                    u = (bits.to(tl.float32) + 0.5) / 8388608.0  # exact: a power of two
                    # Rounded division, as PyTorch's: the fast one could turn a near-tie the other way
                    noisy = tl.div_rn(x, tl.maximum(temperature, 1e-6)) - tl.log(-tl.log(u))
                    x = tl.where(valid, noisy, float("-inf"))
            best, index = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            tl.store(best_ptr + row * chunks + chunk, best)
            tl.store(index_ptr + row * chunks + chunk, chunk * BLOCK + index)

    @triton.jit
    def _pick_kernel(best_ptr, index_ptr, active_ptr, token_ptr, chunks, stride_active, BLOCK: tl.constexpr):
        """Program (row): the row's best chunk, first among ties (token 0 for an inactive row)."""
        row = tl.program_id(0)
        active = tl.load(active_ptr + row * stride_active) != 0
        valid = tl.arange(0, BLOCK) < tl.where(active, chunks, 0)
        best = tl.load(best_ptr + row * chunks + tl.arange(0, BLOCK), mask=valid, other=float("-inf"))
        _, chunk = tl.max(best, 0, return_indices=True, return_indices_tie_break_left=True)
        token = tl.load(index_ptr + row * chunks + chunk, mask=active, other=0)
        tl.store(token_ptr + row, token.to(tl.int64))


# Launch shape of the chunk pass (benchmarks/sampler_kernel.py measures others)
CHUNK, CHUNK_WARPS = 2048, 4


@torch.library.custom_op("mor::gumbel_argmax", mutates_args=())
def gumbel_argmax(logits: Tensor, temperature: Tensor, seed: Tensor, counter: Tensor, active: Tensor,
                  sample: bool) -> Tensor:
    """What :func:`sample_rows` returns in mode "sample" (``sample``) or "greedy", in two Triton kernels: each
    (active row, chunk of the vocabulary) finds its best score in one pass (the logit, or for a row with a positive
    temperature the noisy one, its noise keyed as :func:`gumbel_noise` keys it), then each row picks its best
    chunk; an inactive row costs nothing and gets token 0. Ties go to the first index, as in :func:`argmax_rows`.
    ``logits``: 16- or 32-bit floats, without NaN (a row with NaN gets some token, not necessarily the first
    NaN's); the per-row tensors may be strided."""
    if not kernel_available(logits.device):
        raise RuntimeError(f"gumbel_argmax needs Triton and a CUDA device (logits are on {logits.device}); use "
                           "sample_rows(..., kernel=False) elsewhere")
    n, vocab = logits.shape
    token = torch.empty(n, dtype=torch.long, device=logits.device)
    if n == 0:
        return token
    chunks = triton.cdiv(vocab, CHUNK)
    best = torch.empty(n, chunks, dtype=torch.float32, device=logits.device)
    index = torch.empty(n, chunks, dtype=torch.int32, device=logits.device)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    _chunk_argmax_kernel[(n, chunks)](logits, temperature, seed, counter, active, best, index, vocab,
                                      logits.stride(0), temperature.stride(0), seed.stride(0), counter.stride(0),
                                      active.stride(0), chunks, SAMPLE=sample, BLOCK=CHUNK, num_warps=CHUNK_WARPS)
    _pick_kernel[(n,)](best, index, active, token, chunks, active.stride(0),
                       BLOCK=max(16, triton.next_power_of_2(chunks)), num_warps=1)
    return token


@gumbel_argmax.register_fake
def _(logits: Tensor, temperature: Tensor, seed: Tensor, counter: Tensor, active: Tensor, sample: bool) -> Tensor:
    return logits.new_empty(logits.shape[0], dtype=torch.long)
