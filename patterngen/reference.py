"""The dense oracle: materialised masks and masked softmax attention.

Everything here is O(tokens^2) and meant for tests and debugging; every backend is checked
against :func:`materialize` + :func:`dense_attention`.
"""

from __future__ import annotations

import numpy as np

from . import ir
from .errors import PatternError
from .parse import as_ir

__all__ = ["materialize", "dense_attention", "dense_bias"]

MAX_DENSE_TOKENS = 32768


def _kron_bool(mats):
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :, None] & m[None, :, None, :]).reshape(
            out.shape[0] * m.shape[0], out.shape[1] * m.shape[1])
    return out


def _materialize_one(head: ir.IR) -> np.ndarray:
    shape = head.grid.require_numeric("materialize")
    key_shape = head.keys.require_numeric("materialize")
    tokens, keys = int(np.prod(shape)), int(np.prod(key_shape))
    if max(tokens, keys) > MAX_DENSE_TOKENS:
        raise PatternError(
            f"materialize builds a queries x keys array ({tokens} x {keys}): "
            f"tokens={max(tokens, keys)} exceeds {MAX_DENSE_TOKENS}; use layout() or "
            f"key_counts() for large grids."
        )
    mask = np.zeros((tokens, keys), dtype=bool)
    for term in head.terms:
        per_axis = []
        for rel, n, nk in zip(term.rels, shape, key_shape):
            i, p = np.arange(n, dtype=np.int64), np.arange(nk, dtype=np.int64)
            per_axis.append(np.asarray(rel.contains(i[:, None], p[None, :], nk, ir.NUMPY_OPS,
                                                    n)))
        mask |= _kron_bool(per_axis)
    return mask


def materialize(pattern, grid=None, key_grid=None) -> np.ndarray:
    """Dense boolean mask ``[query, key]`` in row-major token order (for tests and debugging).

    Returns ``(tokens, tokens)``, or ``(len(patterns), tokens, tokens)`` for :func:`heads`;
    with ``key_grid`` (keys on another grid, see :func:`patterngen.lower`) the key side has
    the key grid's tokens.

    Example:
        >>> import patterngen as pg
        >>> pg.materialize(pg.window(3), grid=5).astype(int)
        array([[1, 1, 1, 0, 0],
               [1, 1, 1, 0, 0],
               [0, 1, 1, 1, 0],
               [0, 0, 1, 1, 1],
               [0, 0, 1, 1, 1]])
    """
    lowered = as_ir(pattern, grid, key_grid)
    if isinstance(lowered, ir.HeadsIR):
        return np.stack([_materialize_one(h) for h in lowered.heads])
    return _materialize_one(lowered)


def dense_attention(q, k, v, mask, scale=None, softcap=None, rel_bias=None, grid=None,
                    additional_keys=None, additional_values=None, key_grid=None,
                    return_lse=False):
    """Masked softmax attention on ``(batch, heads, tokens, dim)`` torch tensors.

    ``mask`` is ``(tokens, tokens)`` or ``(patterns, tokens, tokens)`` (head ``h`` uses
    ``mask[h % patterns]``). Queries with no key get zeros, the convention of every backend.
    The score of a pair is ``scale * q.k``, passed through ``softcap * tanh(s / softcap)`` when
    ``softcap`` is given, plus ``rel_bias[h, key - query + reach]`` (see
    :mod:`patterngen.bias`; the reach is read from the table's shape, ``grid`` gives the
    coordinates; with ``key_grid``, ``k`` and ``v`` hold its tokens and the offset is
    ``key - c(query)``, :func:`patterngen.ir.center`). ``k`` and ``v`` may have fewer heads
    than ``q`` (grouped key/value heads):
    query head ``h`` reads head ``h // (q heads // kv heads)``, torch's ``enable_gqa`` rule.
    ``additional_keys``/``additional_values`` (``(batch, kv heads, extra, dim)``) are keys
    every query sees besides its pattern, in the same softmax, softcapped alike, unbiased.
    With ``return_lse``, ``(out, lse)``: ``lse`` the natural log-sum-exp of each query's
    masked scores, ``-inf`` for a query without keys.

    Raises:
        PatternError: when an attended pair's offset lies outside the table, or the kv heads
            do not divide the query heads.
    """
    import torch

    mask = torch.as_tensor(mask, device=q.device)
    if mask.dim() == 3:
        idx = ir.pattern_of_head(torch.arange(q.shape[1], device=q.device), mask.shape[0])
        mask = mask[idx]
    if q.shape[1] % k.shape[1]:
        raise PatternError(f"dense_attention: k has {k.shape[1]} heads, q {q.shape[1]}; "
                           f"expected kv heads that divide the query heads.")
    group = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(group, 1) for t in (k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    bias_ = None if rel_bias is None else dense_bias(rel_bias, grid, mask, key_grid)
    if additional_keys is not None:
        ak, av = (t.repeat_interleave(group, 1) for t in (additional_keys, additional_values))
        extra = ak.shape[2]
        scores = torch.cat([scores, (q @ ak.transpose(-1, -2)) * scale], -1)
        mask = torch.cat([mask.expand(*scores.shape[:-1], mask.shape[-1]),
                          mask.new_ones(*scores.shape[:-1], extra)], -1)
        v = torch.cat([v, av], 2)
        bias_ = None if bias_ is None else torch.nn.functional.pad(bias_, (0, extra))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias_ is not None:
        scores = scores + bias_
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if return_lse:
        return probs @ v, torch.logsumexp(scores, dim=-1)
    return probs @ v


def dense_bias(table, grid, mask, key_grid=None):
    """``(heads or 1, tokens, keys)``: ``table`` gathered by key-minus-query offset, the
    bias :func:`dense_attention` adds (checked to cover every pair ``mask`` attends)."""
    import torch

    from . import bias
    from .grid import as_grid

    shape = [int(n) for n in as_grid(grid).require_numeric("dense_attention")]
    keys = shape if key_grid is None else [
        int(n) for n in as_grid(key_grid).require_numeric("dense_attention")]
    reach = tuple((s - 1) // 2 for s in table.shape[1:])
    if table.dim() != 1 + len(shape) or any(s % 2 == 0 for s in table.shape[1:]):
        raise PatternError(f"rel_bias has shape {tuple(table.shape)}; expected (heads, "
                           f"2 * reach + 1 per axis) for the {len(shape)} axes of grid={grid}.")
    tokens = np.arange(int(np.prod(shape)), dtype=np.int64)
    qc = [ir.center(c, n, nk)[:, None]
          for c, n, nk in zip(bias.coordinates(tokens, shape), shape, keys)]
    kc = [c[None, :] for c in bias.coordinates(np.arange(int(np.prod(keys)), dtype=np.int64),
                                                keys)]
    attended = mask.reshape(-1, *mask.shape[-2:]).any(0).cpu().numpy()
    for a, (qa, ka, r) in enumerate(zip(qc, kc, reach)):
        far = (np.abs(ka - qa) > r) & attended
        if far.any():
            raise PatternError(f"rel_bias covers offsets up to {r} on axis {a}, but an "
                               f"attended pair is {int(np.abs(ka - qa)[far].max())} apart.")
    index = torch.as_tensor(bias.offset_index(qc, kc, reach), device=table.device)
    return table.reshape(table.shape[0], -1)[:, index]
