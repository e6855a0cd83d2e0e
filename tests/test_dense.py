"""The shared dense kernels and the log-sum-exp merge against the dense oracle."""

import math

import torch

import patterngen as pg
from patterngen.backends import dense
from patterngen.backends.merge import acc_dtype, merge


def _parts(q, k, v, masks):
    """``(out_t, lse_t)`` of ``q`` over each mask's keys (disjoint masks)."""
    parts = []
    for mask in masks:
        add = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, -math.inf)
        out, lse = dense.softmax_attention(q, k, v, add, q.shape[-1] ** -0.5, True)
        parts.append((out, lse.squeeze(-1)))
    return parts


def test_merge_of_disjoint_parts_is_attention_over_their_union():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64, generator=gen) for _ in range(3))
    union = torch.rand(6, 6, generator=gen) < 0.5
    union[0] = False  # a query without any key: output 0 and a finite lse 0
    split = torch.rand(6, 6, generator=gen) < 0.5
    out, lse = merge(_parts(q, k, v, [union & split, union & ~split]))
    ref = pg.dense_attention(q, k, v, union)
    torch.testing.assert_close(out, ref)
    assert lse.dtype == torch.float64 and (lse[..., 0] == 0).all()
    assert torch.isfinite(lse).all() and (out[..., 0, :] == 0).all()


def test_merge_accumulates_half_precision_in_float32():
    out = torch.ones(1, 1, 2, 3, dtype=torch.bfloat16)
    lse = torch.zeros(1, 1, 2)
    merged, merged_lse = merge([(out, lse), (out, lse)])
    assert acc_dtype(torch.bfloat16) == torch.float32 == merged.dtype == merged_lse.dtype
    torch.testing.assert_close(merged_lse, torch.full((1, 1, 2), math.log(2)))


def test_a_keyless_row_gives_no_nan_gradient_through_autograd():
    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[1] = False
    (out, lse), = _parts(q, k, v, [mask])
    assert (out[0, 0, 1] == 0).all() and lse[0, 0, 1] == -math.inf
    (out.sum() + lse[..., [0, 2]].sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[0, 0, 1] == 0).all()


def test_the_softcap_and_its_gradient():
    scores = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    capped = dense.cap(scores, 2.0)
    capped.sum().backward()
    inplace = scores.detach().clone()
    tanh = dense.cap_(inplace, 2.0, keep_tanh=True)
    torch.testing.assert_close(inplace, capped.detach())
    torch.testing.assert_close(dense.cap_grad_(torch.ones(4, 5, dtype=torch.float64), tanh),
                               scores.grad)


def test_short_and_long_rows_give_the_oracles_out_and_lse():
    # rows under dense.SHORT_ROWS keys take softmax_attention's own softmax
    gen = torch.Generator().manual_seed(1)
    for keys in (1, 5, dense.SHORT_ROWS - 1, dense.SHORT_ROWS, 20):
        q = torch.randn(2, 3, 7, 4, dtype=torch.float64, generator=gen)
        k, v = (torch.randn(2, 3, keys, 4, dtype=torch.float64, generator=gen)
                for _ in range(2))
        mask = torch.rand(7, keys, generator=gen) < 0.7
        mask[0] = False  # no key: output 0, lse -inf
        add = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, -math.inf)
        out, lse = dense.softmax_attention(q, k, v, add, 0.5, True)
        scores = (q @ k.transpose(-1, -2) * 0.5 + add)
        torch.testing.assert_close(lse.squeeze(-1), torch.logsumexp(scores, -1))
        torch.testing.assert_close(out, pg.dense_attention(q, k, v, mask, scale=0.5))
