import pytest
import torch
from helpers import KERNEL_DEVICE, needs_kernels

from mor.infer.paged_attention import gathered_attention, paged_decode_attention

PAGE = 4


def paged_inputs(lengths, heads=6, kv_heads=2, dim=16, dtype=torch.float32, device="cpu", seed=0):
    """Random pools and block tables: row i reads pair i, whose ``lengths[i]`` entries lie on shuffled pages."""
    g = torch.Generator().manual_seed(seed)
    max_pages = max(-(-n // PAGE) for n in lengths) + 1
    num_pages = len(lengths) * max_pages
    keys = torch.randn(num_pages + 1, kv_heads, PAGE, dim, generator=g)
    values = torch.randn(num_pages + 1, kv_heads, PAGE, dim, generator=g)
    tables = torch.randperm(num_pages, generator=g).view(len(lengths), max_pages)
    counts = torch.tensor(lengths)
    q = torch.randn(len(lengths), heads, dim, generator=g)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), keys.to(dtype=dtype, **to), values.to(dtype=dtype, **to), tables.to(**to),
            counts.to(**to), max_pages)


def dense_reference(q, keys, values, tables, counts, extra):
    """Row by row, in float64: the entries of a row's pages in order, softmax attention per query head."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // keys.shape[1]
    for i in range(q.shape[0]):
        n = int(counts[i] + extra[i])
        pages = tables[i, : -(-n // PAGE)]
        k = keys[pages].transpose(0, 1).flatten(1, 2)[:, :n].double()  # [Hkv, n, D]
        v = values[pages].transpose(0, 1).flatten(1, 2)[:, :n].double()
        for h in range(q.shape[1]):
            scores = k[h // group] @ q[i, h].double() / q.shape[-1] ** 0.5
            out[i, h] = scores.softmax(0) @ v[h // group]
    return out


@pytest.mark.parametrize("heads,kv_heads", [(6, 2), (4, 4), (9, 3)])
def test_gathered_attention_reads_each_rows_own_pages(heads, kv_heads):
    # Ragged lengths that end inside a page, on a page boundary, and one entry past it.
    lengths = [1, 3, PAGE, PAGE + 1, 3 * PAGE, 7]
    q, keys, values, tables, counts, width = paged_inputs(lengths, heads, kv_heads)
    extra = torch.tensor([0, 1, 0, 0, 0, 1])  # an entry written this step but not yet counted
    index = torch.arange(len(lengths))
    out = gathered_attention(q, keys, values, tables, counts, index, extra, width)
    torch.testing.assert_close(out, dense_reference(q, keys, values, tables, counts, extra).float())


@needs_kernels
@pytest.mark.parametrize("dtype,tolerance", [
    (torch.float32, 1e-5),
    pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.skipif(
        KERNEL_DEVICE == "cpu", reason="Triton's interpreter computes bfloat16 matrix products wrongly (GPU only)"))])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (15, 5, 64), (4, 4, 16), (6, 2, 32)])
def test_paged_kernel_equals_the_gathered_reference(dtype, tolerance, heads, kv_heads, dim):
    for seed in range(3):  # fresh random inputs each time
        lengths = torch.randint(1, 300, (37,), generator=torch.Generator().manual_seed(seed)).tolist()
        lengths[:3] = [1, PAGE, PAGE * 32]  # page boundaries and a long row (several kernel blocks)
        q, keys, values, tables, counts, width = paged_inputs(lengths, heads, kv_heads, dim, dtype, KERNEL_DEVICE,
                                                               seed)
        extra = (torch.arange(len(lengths), device=KERNEL_DEVICE) % 2) * (counts < width * PAGE)
        # Rows read pairs in another order than their own, as tokens of mixed depths do; the index is a column of
        # a wider tensor (strided), as the engine passes it.
        index = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).to(KERNEL_DEVICE)
        index = torch.stack([index, index.flip(0)], 1)[:, 0]
        extra = torch.stack([extra, extra], 1)[:, 0].bool()
        reference = gathered_attention(q, keys, values, tables, counts, index, extra, width).float()
        out = paged_decode_attention(q, keys, values, tables, counts, index, extra).float()
        assert torch.isfinite(out).all()
        error = (out - reference).norm() / reference.norm()
        assert error < tolerance, f"relative error {error:.2e} (seed {seed})"
