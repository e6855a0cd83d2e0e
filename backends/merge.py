"""The exact merge of partial attention by log-sum-exp, and the accumulator dtype it runs in.

Parts over disjoint key sets of the same queries, each ``(out_t, lse_t)``, merge as
``lse = logsumexp_t lse_t`` and ``out = sum_t exp(lse_t - lse) out_t``
(shared/notes/lse-merge.md). The term-wise planner (``backends/planned/``) and the
distributed global queries (``patterngen/distributed/attention.py``) merge through
:func:`merge`; every part's backward is then run from the *merged* ``out`` and ``lse``
(FlashAttention-2's ``D = rowsum(dO * out)``, ``P = exp(S - lse)``), or, for parts with
autograd, flows through the merge's own torch ops.

Example:
    >>> import torch
    >>> from patterngen.backends.merge import merge
    >>> out, lse = merge([(torch.ones(1, 1, 2, 1), torch.tensor([[[0.0, float("-inf")]]])),
    ...                   (torch.zeros(1, 1, 2, 1), torch.tensor([[[0.0, float("-inf")]]]))])
    >>> out.flatten().tolist(), lse.flatten().tolist()
    ([0.5, 0.0], [0.6931471824645996, 0.0])
"""

from __future__ import annotations

__all__ = ["acc_dtype", "merge", "finite_lse"]


def acc_dtype(dtype):
    """The dtype scores, log-sum-exps and merges accumulate in for inputs of ``dtype``:
    float64 for float64, float32 below (half precision included)."""
    import torch

    return torch.float64 if dtype == torch.float64 else torch.float32


def finite_lse(lse):
    """``lse`` with rows that have no key (``-inf``) at 0: finite, so that a backward's
    ``exp(S - lse)`` never subtracts an infinity."""
    import torch

    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def merge(parts):
    """``(out, lse)`` of the parts ``(out_t, lse_t)`` merged exactly.

    ``out_t`` is ``(..., rows, d)`` in any dtype, ``lse_t`` ``(..., rows)`` with ``-inf`` for
    the rows where the part has no key. The merge runs in :func:`acc_dtype` of the first
    ``out_t`` (the returned ``out`` is in it too: callers cast once); a row with no key in any
    part gets ``out = 0`` and ``lse = 0`` (:func:`finite_lse`). Differentiable by autograd.
    """
    import torch

    acc = acc_dtype(parts[0][0].dtype)
    lses = torch.stack([lse.to(acc) for _, lse in parts])
    lse = finite_lse(torch.logsumexp(lses, dim=0))
    out = sum(torch.exp(l - lse)[..., None] * o.to(acc) for o, l in zip(
        (o for o, _ in parts), lses))
    return out, lse
