"""The attention kernels: each call's blocks gathered (views where they can be) and attended."""

from __future__ import annotations

import threading

from patterngen.backends import dense
from patterngen.backends.inputs import non_finite
from patterngen.backends.merge import acc_dtype

from . import calls as sdpa_calls
from .calls import spans
from .permute import gather
from .scores import additive_mask

__all__ = ["run_calls"]


def run_calls(calls, out_index, q, k, v, scale, torch, scores=None, extra=None,
              need_lse=False):
    """The pattern's output in row-major token order; ``extra`` ``(keys, values)`` are
    appended to every call's keys (tokens in no call are the caller's to fill). With
    ``need_lse``, ``(out, lse)``: every call by :func:`dense.softmax_attention` in
    :func:`~patterngen.backends.merge.acc_dtype`, differentiable in both, ``lse``
    ``(batch, heads, tokens)`` and ``-inf`` for a query without keys.

    Args:
        calls: the pattern's :class:`~.calls.DeviceCalls`.
        out_index: its output rows to row-major tokens (:func:`~.permute.token_orders`).
        q, k, v: ``(batch, heads or kv heads, tokens, dim)`` in the layout's token order.
        scores: ``None`` or the :class:`~.scores.Scores` that add a softcap or bias.
    """
    b, h, _, d = q.shape
    hk = k.shape[1]  # key/value heads: h // hk query heads read each
    if not calls.calls:  # no pair at all: zeros that still take part in autograd
        return (q * 0.0, q.new_full(q.shape[:3], float("-inf"), dtype=acc_dtype(q.dtype))
                ) if need_lse else q * 0.0
    table = None if scores is None else scores.table
    graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (q, k, v, table))
    bq, bk = calls.bq, calls.bk
    # gathered groups without a graph run in chunks on CPU (CHUNK_BYTES; CUDA's caching
    # allocator keeps its blocks); bands are views
    chunked = [call.k_band is None and not graph and q.device.type == "cpu"
               for call in calls.calls]
    runs = [spans(call.count, b * hk * call.nk * bk * d * k.element_size(), chunk)
            for call, chunk in zip(calls.calls, chunked)]
    single = len(calls.calls) == 1 and calls.zero_row is None and len(runs[0]) == 1
    # half-precision scores would be rounded before the softmax, which the fused kernel avoids
    matmul_ok = q.dtype in (torch.float32, torch.float64) and not graph
    # a non-finite key or value in a partial block must reach only the queries that attend it
    dirty = any(call.mask is not None for call in calls.calls) and non_finite(k, v)
    if not single:
        # each group's output is copied once, straight into its rows (no reshape + cat)
        out = q.new_empty(b, h, calls.rows + (calls.zero_row is not None), d)
        out[:, :, calls.rows:].zero_()
        if need_lse:
            lse = q.new_full((b, h, out.shape[2], 1), float("-inf"), dtype=acc_dtype(q.dtype))
    row = 0
    for call, run, chunk in zip(calls.calls, runs, chunked):
        if extra is not None:
            add = additive_mask(call, q.dtype, torch, extra[0].shape[2])
        elif scores is None:
            add = additive_mask(call, q.dtype, torch)
        else:
            add = scores.additive(call, b, q.dtype, torch)
        softcap = None if scores is None else scores.softcap
        for first, stop in run:
            g = stop - first
            space = _workspace(b * hk * (stop - first) * call.nk * bk * d, k.dtype, torch) \
                if chunk else None
            qg, kg, vg = _blocks(call, first, stop, q, k, v, bq, bk, extra, torch, space)
            part = add if add is None or add.shape[1] == 1 else add[:, first:stop]
            if need_lse:
                acc = acc_dtype(q.dtype)
                res, lse_g = dense.softmax_attention(
                    qg.to(acc), kg.to(acc), vg.to(acc), None if part is None else part.to(acc),
                    scale, True, None if softcap is None else dense.ScoreMod(softcap, None, h))
                res = res.to(q.dtype)
            elif dirty and part is not None:
                res = dense.masked_attention(qg, kg, vg, scale, softcap, part)
            elif softcap is None and extra is None and dense.flash_bias_grad_ok(qg, part):
                res = dense.FlashBias.apply(qg, kg, vg, part, scale)
            elif softcap is None and call.matmul and matmul_ok:
                res = dense.matmul_attention(qg, kg, vg, scale, part)
            else:
                res = dense.attention(qg, kg, vg, scale, softcap, part)
            if call.empty is not None and extra is None:
                # in place where no graph holds the kernel's output for its backward
                fill = res.masked_fill if graph else res.masked_fill_
                res = fill(call.empty[first:stop], 0.0)
            if single:
                out = res.reshape(b, h, g * bq, d)
                if need_lse:
                    lse = lse_g.reshape(b, h, g * bq, 1)
            else:
                rows = slice(row + first * bq, row + stop * bq)
                out[:, :, rows].view(b * h, g, bq, d).copy_(res)
                if need_lse:
                    lse[:, :, rows].view(b * h, g, bq, 1).copy_(lse_g)
        row += call.count * bq
    if not need_lse:
        return _in_token_order(out, out_index)
    return _in_token_order(out, out_index), _in_token_order(lse, out_index).squeeze(-1)


def _blocks(call, first: int, stop: int, q, k, v, bq: int, bk: int, extra, torch,
            space=None):
    """Query blocks ``first:stop`` of ``call`` and their keys and values, ``(batch * heads,
    blocks, rows, dim)``: 4-D inputs reach the fused CPU/GPU kernels. ``space``: ``None`` or
    ``(keys, values)`` buffers (:func:`_workspace`) the gathered keys and values are written
    into."""
    b, h, _, d = q.shape
    hk = k.shape[1]
    g, nk = stop - first, call.nk
    if call.q_slice is not None:
        start = call.q_slice[0] + first * bq
        qg = q[:, :, start:start + g * bq].reshape(b * h, g, bq, d)
    else:
        qg = gather(q, call.q_index[first * bq:stop * bq]).view(b * h, g, bq, d)
    if call.k_band is not None and nk == 1:  # one key block each: a plain slice
        first_key = call.k_band * bk
        kg, vg = (t[:, :, first_key:first_key + g * bk].reshape(b * hk, g, bk, d)
                  for t in (k, v))
    elif call.k_band is not None:
        # overlapping windows of consecutive key blocks: a strided view, no copy; the keys
        # sliced to the group's windows first, for unfold's backward zero-fills and adds up
        # every window it made (all of the keys' for a group of one block)
        first_key, span = call.k_band * bk, nk * bk
        kg, vg = (t[:, :, first_key:first_key + (g - 1) * bk + span]
                  .unfold(2, span, bk).transpose(-1, -2).reshape(b * hk, g, span, d)
                  for t in (k, v))
    else:
        index = call.k_index[first * nk * bk:stop * nk * bk]
        into = space or (None, None)
        kg = gather(k, index, into[0]).view(b * hk, g, nk * bk, d)
        vg = gather(v, index, into[1]).view(b * hk, g, nk * bk, d)
    if extra is not None:
        kg, vg = (torch.cat([t, e.reshape(b * hk, 1, -1, d).expand(-1, g, -1, -1)], 2)
                  for t, e in zip((kg, vg), extra))
    return (qg, *(_per_query_head(t, h // hk) for t in (kg, vg)))


#: per thread, ``{dtype: buffer}`` on CPU: a chunk's gathered keys and values are written
#: into one buffer reused call after call. A new pair of buffers per chunk was mapped afresh
#: whenever the C allocator had returned the last one (which freed memory it keeps depends on
#: what ran before: 0.27-0.45 ns per byte gathered into new pages against 0.06-0.08 into
#: reused ones, one thread; lm-global's and W3-shift's forwards 1.4-1.5x their prediction)
_SPACE = threading.local()


def _workspace(elements: int, dtype, torch):
    """``(keys, values)``: two flat buffers of ``elements`` each, from this thread's reused
    buffer, or ``None`` beyond :data:`~.calls.CHUNK_BYTES` each (a single block that large
    is not kept)."""
    if elements * dtype.itemsize > sdpa_calls.CHUNK_BYTES:
        return None
    spaces = _SPACE.__dict__.setdefault("buffers", {})
    need = 2 * sdpa_calls.CHUNK_BYTES // dtype.itemsize
    buf = spaces.get(dtype)
    if buf is None or buf.numel() < need:
        # a normal tensor, which inference mode may write too (not the reverse)
        with torch.inference_mode(False):
            buf = spaces[dtype] = torch.empty(need, dtype=dtype)
    return buf[:elements], buf[need // 2:need // 2 + elements]


def _in_token_order(x, out_index):
    """The rows of ``x`` ``(batch, heads, rows, e)`` as row-major tokens."""
    if out_index is None:
        return x
    return out_index(x) if callable(out_index) else gather(x, out_index)


def _per_query_head(t, group: int):
    """Gathered key or value blocks ``(batch * kv_heads, ...)`` as ``(batch * heads, ...)``
    (query head ``h`` reads kv head ``h // group``): the blocks are gathered once per kv head,
    then expanded into the per-head batch the fused kernels take."""
    if group == 1:
        return t
    lead, rest = t.shape[0], t.shape[1:]
    return t.unsqueeze(1).expand(lead, group, *rest).reshape(lead * group, *rest)
