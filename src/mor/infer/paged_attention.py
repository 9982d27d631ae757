"""Decode attention over paged key/value streams: one query token per row, each reading its own pages.

Every row ``i`` names a block table (``tables[table_index[i]]``: the pages of one (stream, request) pair, in
order) and attends to the first ``counts[table_index[i]] + extra[i]`` entries there (``extra`` adds an entry
written in this step but not yet counted). A token at recursion depth r reads its depth-r stream (recursion-wise
caching) or its depth-1 stream (recursive KV sharing): the caller passes the matching table index, the
attention itself is the same.

Two implementations compute the same function:

- :func:`gathered_attention`: gathers ``width`` pages per row into a padded dense tensor and runs SDPA under a
  validity mask. Plain PyTorch, any device; the reference.
- :func:`paged_decode_attention`: a Triton kernel (CUDA) that walks each row's pages through its block table
  with an online softmax: no padded copy, no mask, and reads only the entries a row has. One program per
  (row, key/value head) computes all query heads of that group (grouped-query attention) with matrix
  instructions, the group padded to 16 heads.

Key/value pools are ``[pages, kv_heads, page_size, head_dim]``: one page of one head is contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mor.infer.kernel_support import kernel_available, tl, triton


def gathered_attention(q: Tensor, keys: Tensor, values: Tensor, tables: Tensor, counts: Tensor,
                       table_index: Tensor, extra: Tensor, width: int) -> Tensor:
    """Attention of ``q`` [N, H, D] to the first ``counts[table_index] + extra`` entries of each row's pages,
    reading ``width`` pages per row (enough for the longest row); returns [N, H, D]."""
    n, heads, dim = q.shape
    kv_heads, page = keys.shape[1], keys.shape[2]
    pages = tables[table_index, :width]
    k = keys[pages].transpose(1, 2).reshape(n, kv_heads, width * page, dim)
    v = values[pages].transpose(1, 2).reshape(n, kv_heads, width * page, dim)
    length = counts[table_index] + extra
    valid = torch.arange(width * page, device=q.device) < length[:, None]
    valid = valid | (length[:, None] == 0)  # an idle row sees everything rather than nothing (NaN); unused
    out = F.scaled_dot_product_attention(q[:, :, None], k.to(q.dtype), v.to(q.dtype), attn_mask=valid[:, None, None],
                                         enable_gqa=kv_heads != heads)
    return out[:, :, 0]


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, counts_ptr, index_ptr, extra_ptr, out_ptr, scale,
                             stride_qn, stride_qh, stride_kp, stride_kh, stride_ks, stride_t, stride_on, stride_oh,
                             stride_index, stride_extra,
                             GROUP: tl.constexpr, BLOCK_G: tl.constexpr, DIM: tl.constexpr, PAGE: tl.constexpr,
                             BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)  # key/value head; its GROUP query heads are computed together
        table = tl.load(index_ptr + row * stride_index)
        length = tl.load(counts_ptr + table) + tl.load(extra_ptr + row * stride_extra).to(tl.int64)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, DIM)
        in_group = g < GROUP
        q_offsets = row * stride_qn + (head * GROUP + g)[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_offsets, mask=in_group[:, None], other=0.0)  # [BLOCK_G, DIM], padded query heads
        best = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, DIM], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for start in range(0, length, BLOCK_N):
            token = start + n
            live = token < length
            page = tl.load(tables_ptr + table * stride_t + token // PAGE, mask=live, other=0)
            offsets = page.to(tl.int64) * stride_kp + head * stride_kh + (token % PAGE) * stride_ks
            k = tl.load(k_ptr + offsets[:, None] + d[None, :], mask=live[:, None], other=0.0)
            v = tl.load(v_ptr + offsets[:, None] + d[None, :], mask=live[:, None], other=0.0)
            if IEEE:  # float32 inputs: exact products (the default would round them to tf32)
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = tl.where(live[None, :], scores * scale, float("-inf"))  # [BLOCK_G, BLOCK_N]
            new_best = tl.maximum(best, tl.max(scores, axis=1))
            p = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            total = total * rescale + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            best = new_best
        out = acc / tl.maximum(total, 1e-30)[:, None]  # an idle row (no entries) gives zeros
        o_offsets = row * stride_on + (head * GROUP + g)[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=in_group[:, None])


@torch.library.custom_op("mor::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: Tensor, keys: Tensor, values: Tensor, tables: Tensor, counts: Tensor,
                           table_index: Tensor, extra: Tensor) -> Tensor:
    """The same as :func:`gathered_attention`, by a Triton kernel that reads each row's pages in place (CUDA).

    ``tables`` [T, max_pages] and ``counts`` [T] are the flattened block tables and entry counts of every
    (stream, request) pair."""
    n, heads, dim = q.shape
    kv_heads, page = keys.shape[1], keys.shape[2]
    if not kernel_available(q.device):  # the same function, the slow way
        return gathered_attention(q, keys, values, tables, counts, table_index, extra, tables.shape[1])
    group = heads // kv_heads
    # Strided indices are read in place: the engine passes one layer's column of its [N, layers] tables, and a
    # copy would be a kernel launch per layer.
    if q.stride(-1) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    if n == 0:
        return out
    _paged_decode_kernel[(n, kv_heads)](
        q, keys, values, tables, counts, table_index, extra, out, dim ** -0.5,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), tables.stride(0),
        out.stride(0), out.stride(1), table_index.stride(0), extra.stride(0),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), DIM=dim, PAGE=page, BLOCK_N=64,
        IEEE=q.dtype == torch.float32, num_warps=4, num_stages=2)
    return out


@paged_decode_attention.register_fake
def _(q: Tensor, keys: Tensor, values: Tensor, tables: Tensor, counts: Tensor, table_index: Tensor,
      extra: Tensor) -> Tensor:
    return torch.empty_like(q)
