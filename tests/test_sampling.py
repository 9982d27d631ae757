"""The engine's per-row sampler: draws follow the softmax, filters keep only allowed tokens, and a row's draw
depends on nothing but its seed and counter."""

import pytest
import torch
from helpers import KERNEL_DEVICE, needs_kernels

from mor.infer import sampling
from mor.infer.sampling import argmax_rows, gumbel_of_bits, sample_rows

V, N = 7, 40_000


def draw(logits: torch.Tensor, temperature: float, mode: str = "sample", top_k: int = V, top_p: float = 1.0,
         order: torch.Tensor | None = None) -> torch.Tensor:
    index = torch.arange(N) if order is None else order
    return sample_rows(logits.expand(N, V), torch.full((N,), temperature), torch.full((N,), top_k),
                       torch.full((N,), top_p), index % 97, index // 97, mode)


def assert_follows(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    freq = torch.bincount(tokens, minlength=V).double() / N
    sigma = (probs * (1 - probs) / N).sqrt().clamp(min=1e-4)
    assert ((freq - probs).abs() / sigma).max() < 5, (freq, probs)


def test_draws_follow_the_softmax_at_each_temperature():
    logits = torch.randn(V, generator=torch.Generator().manual_seed(0)) * 1.5
    for temperature in (1.0, 0.7, 2.0):
        assert_follows(draw(logits, temperature), (logits.double() / temperature).softmax(-1))


def test_filters_renormalise_over_the_kept_tokens_only():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0])
    kept = torch.zeros(V, dtype=torch.double)
    kept[:2] = logits[:2].double().softmax(-1)
    assert_follows(draw(logits, 1.0, "filter", top_k=2), kept)
    probs = logits.double().softmax(-1)  # top_p 0.75: the smallest head reaching 0.75 is the first three tokens
    assert probs[:2].sum() < 0.75 <= probs[:3].sum()
    nucleus = torch.zeros(V, dtype=torch.double)
    nucleus[:3] = probs[:3] / probs[:3].sum()
    assert_follows(draw(logits, 1.0, "filter", top_p=0.75), nucleus)


def test_temperature_zero_is_greedy_and_a_draw_depends_only_on_seed_and_counter():
    logits = torch.randn(N, V, generator=torch.Generator().manual_seed(1))
    order = torch.randperm(N, generator=torch.Generator().manual_seed(2))
    temperature = torch.where(torch.arange(N) % 3 == 0, 0.0, 1.0)
    index = torch.arange(N)
    args = (torch.full((N,), V), torch.ones(N), index % 97, index // 97, "sample")
    tokens = sample_rows(logits, temperature, *args)
    shuffled = sample_rows(logits[order], temperature[order], *(a[order] for a in args[:-1]), "sample")
    assert torch.equal(tokens[order], shuffled)
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits[greedy].argmax(-1))
    assert (tokens[~greedy] != logits[~greedy].argmax(-1)).any()


def test_the_two_stage_argmax_equals_argmax_ties_included():
    generator = torch.Generator().manual_seed(3)
    for vocab in (1000, 4096, 5000):
        x = torch.randint(0, 6, (64, vocab), generator=generator).float()  # many ties across chunks
        x[5] = float("-inf")
        assert torch.equal(argmax_rows(x), x.argmax(-1))


def test_the_noise_is_finite_at_the_extremes_of_its_bits():
    noise = gumbel_of_bits(torch.tensor([0, 1, 2**23 - 2, 2**23 - 1]))
    assert noise.isfinite().all() and (noise.diff() > 0).all()


def test_the_largest_noise_a_draw_can_meet_does_not_pick_a_far_lower_token():
    """Seed 0, counter 9462: entry 1737 of the row hashes to the largest 24-bit value. A uniform number made of
    24 bits would round to 1 there and the noise to infinity, picking token 1737 over one 60 logits higher,
    whether or not top_k=1 filters it out; with 23 bits the noise stays finite."""
    vocab, counter, entry = 4096, 9462, 1737
    key = sampling._row_keys(torch.zeros(1, dtype=torch.long), torch.tensor([counter]))
    assert int(sampling._hash32(sampling._hash32(key ^ entry) ^ key)) >> 8 == 2**24 - 1  # the case is still hit
    logits = torch.full((1, vocab), -30.0)
    logits[0, 0] = 30.0
    args = (logits, torch.ones(1), torch.ones(1, dtype=torch.long), torch.ones(1), torch.zeros(1, dtype=torch.long),
            torch.tensor([counter]))
    assert sample_rows(*args, "sample").item() == 0
    assert sample_rows(*args, "filter").item() == 0


@needs_kernels
def test_the_fused_kernel_draws_the_same_tokens_as_the_reference():
    """:func:`sampling.gumbel_argmax` draws :func:`sample_rows`'s PyTorch-path tokens: the same noise, the
    same ties (first index), greedy rows among sampled ones, seeds past 32 bits, strided per-row settings, skipped
    rows and a vocabulary that is no multiple of the chunk."""
    generator = torch.Generator().manual_seed(0)
    n, vocab = 24, 5000
    logits = (torch.randn(n, vocab, generator=generator) * 3).to(torch.bfloat16)
    logits[3, [100, 2100, 4999]] = 40.0  # a tie across chunks: the first index wins
    logits[4, 4999] = 40.0  # the last column
    temperature = torch.rand(n, generator=generator) + 0.3
    temperature[:3] = 0.0
    seed, counter = torch.randint(0, 2**40, (2, n), generator=generator)
    top_k, top_p = torch.full((n,), vocab), torch.ones(n)
    reference = {mode: sample_rows(logits, temperature, top_k, top_p, seed, counter, mode) for mode in ("greedy", "sample")}
    assert reference["greedy"][3] == 100 and reference["greedy"][4] == 4999
    assert (reference["sample"] != reference["greedy"]).sum() >= n // 2  # the noise matters in this test
    # The per-row settings as the engine passes them: columns of its row-state tensors (strided)
    ints = torch.stack([seed, counter, top_k], 1).to(KERNEL_DEVICE)
    floats = torch.stack([temperature, top_p], 1).to(KERNEL_DEVICE)
    active = torch.arange(n) % 5 != 1  # rows whose token is not wanted are skipped and get token 0
    for mode, expected in reference.items():
        got = sample_rows(logits.to(KERNEL_DEVICE), floats[:, 0], ints[:, 2], floats[:, 1], ints[:, 0], ints[:, 1],
                          mode, kernel=True)
        assert torch.equal(got.cpu(), expected), mode
        got = sample_rows(logits.to(KERNEL_DEVICE), floats[:, 0], ints[:, 2], floats[:, 1], ints[:, 0], ints[:, 1],
                          mode, kernel=True, active=active.to(KERNEL_DEVICE))
        assert torch.equal(got.cpu(), torch.where(active, expected, 0)), mode
        assert torch.equal(sample_rows(logits, temperature, top_k, top_p, seed, counter, mode, active=active),
                           torch.where(active, expected, 0))


def test_the_fused_kernel_says_where_it_cannot_run():
    if sampling.kernel_available(torch.device("cpu")):
        pytest.skip("Triton's interpreter runs the kernel on the CPU")
    with pytest.raises(RuntimeError, match=r"needs Triton and a CUDA device .* kernel=False"):
        sampling.gumbel_argmax(torch.zeros(2, 8), torch.ones(2), *torch.zeros(2, 2, dtype=torch.long),
                               torch.ones(2, dtype=torch.bool), True)
