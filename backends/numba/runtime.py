"""The helpers every generated kernel calls: scores, the online softmax, the backward's chunk.

They are ordinary numba functions, compiled once per argument types and cached on disk
(``cache=True``), then linked into each generated kernel that calls them. numba specialises
them itself: on the arrays' dtype (``x.dtype.type`` is the accumulator type, and
:func:`exp_shifted` has one implementation per dtype through ``numba.extending.overload``) and
on ``dim``, the head_dim: a kernel compiled for one head_dim passes its constant, which numba
types as a literal, so the helper is compiled once more with loops of constant length.

numba's cache of a kernel does not notice a change in a function it calls from another file;
:func:`patterngen.backends.numba.module.load` therefore names each generated module by this
file's hash as well as its own text, so a changed helper recompiles every kernel.

Non-finite values follow ``torch.nn.functional.scaled_dot_product_attention`` run on each
query's attended keys alone: a NaN or ``+inf`` score makes the query's row NaN (``lse`` NaN),
a ``-inf`` score gives its key probability 0, and a query whose scores are all ``-inf`` (or
that has no keys) outputs zeros with ``lse = -inf``.
"""

from __future__ import annotations

import math
import os

import numba
import numpy as np
from numba.extending import overload

#: without ``nnan``/``ninf``: the kernels rely on ``-inf`` for "no key yet" and NaN checks
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})
#: ``PATTERNGEN_NUMBA_BOUNDSCHECK=1`` (read at import; for debugging the generator): every
#: helper and kernel checks its array indices, and an index out of bounds stops the kernel
#: with an ``IndexError`` printed to stderr; nothing is cached then, since numba's cache does
#: not tell builds with and without the checks apart
BOUNDSCHECK = os.environ.get("PATTERNGEN_NUMBA_BOUNDSCHECK", "0") == "1"
#: options of every helper and every generated kernel (``module.kernel``)
JIT = dict(fastmath=set(FASTMATH), cache=not BOUNDSCHECK, nogil=True, error_model="numpy",
           boundscheck=BOUNDSCHECK)
#: the same for the dtype-specialised implementations (``overload``)
OVERLOAD_JIT = dict(fastmath=set(FASTMATH), error_model="numpy", boundscheck=BOUNDSCHECK)


def exp_shifted(x, bits, cnt, top):
    """``x[c] = exp(x[c] - top)`` for ``c < cnt``, in place (``bits`` is scratch).

    float32 takes a polynomial that LLVM vectorises (numba has no vector exp without SVML):
    2**n from exponent bits times a degree-6 Taylor series of 2**f on |f| <= 1/2, relative
    error about 1e-7; below 2**-127 the exponent bits are 0, so ``-inf`` gives exactly 0.
    float64 keeps ``math.exp``. Called from Python it runs this reference loop.
    """
    for c in range(cnt):
        x[c] = math.exp(x[c] - top)


@numba.njit(inline="always", **OVERLOAD_JIT)
def _exp32_parts(x):
    """``exp(x)`` of a float32 as ``(p, e)``: ``p`` the polynomial and ``e`` the bits of the
    float32 ``2**n``, so that ``exp(x) = p * e`` once ``e`` is read as a float32."""
    t = max(x * np.float32(1.4426950408889634), np.float32(-127.0))
    n = np.floor(t + np.float32(0.5))
    f = (t - n) * np.float32(0.6931471805599453)
    p = np.float32(1.0) + f * (np.float32(1.0) + f * (np.float32(0.5) + f * (
        np.float32(1.0 / 6) + f * (np.float32(1.0 / 24) + f * (
            np.float32(1.0 / 120) + f * np.float32(1.0 / 720))))))
    return p, (np.int32(n) + np.int32(127)) << np.int32(23)


@numba.njit(inline="always", **OVERLOAD_JIT)
def _exp32(x, bits, scale, cnt, top):
    """:func:`exp_shifted`'s float32 polynomial on a row ``x``; ``scale``: ``bits`` as float32."""
    for c in range(cnt):
        x[c], bits[c] = _exp32_parts(x[c] - top)
    for c in range(cnt):
        x[c] *= scale[c]


@overload(exp_shifted, jit_options=OVERLOAD_JIT)
def _exp_shifted_by_dtype(x, bits, cnt, top):
    if x.dtype == numba.types.float32:
        def exp32(x, bits, cnt, top):
            _exp32(x, bits, bits.view(np.float32), cnt, top)
        return exp32

    def exp64(x, bits, cnt, top):
        for c in range(cnt):
            x[c] = math.exp(x[c] - top)
    return exp64


def tile_exp_shifted(x, bits, cnt, tops):
    """``x[u, c] = exp(x[u, c] - tops[u])`` for every row ``u`` and ``c < cnt``, in place, a
    row whose top is ``-inf`` shifted by 0 (its scores are all ``-inf``, and become 0).

    :func:`exp_shifted` on every row in one call: a call per row cost more than its
    exponentials (a tile of 16 rows of 25 keys: 1.0 us against 0.4 us in one call).
    """
    for u in range(x.shape[0]):
        top = tops[u] if tops[u] > -np.inf else 0.0
        for c in range(cnt):
            x[u, c] = math.exp(x[u, c] - top)


@overload(tile_exp_shifted, jit_options=OVERLOAD_JIT)
def _tile_exp_shifted_by_dtype(x, bits, cnt, tops):
    if x.dtype == numba.types.float32:
        def tile_exp32(x, bits, cnt, tops):
            scale = bits.view(np.float32)
            for u in range(x.shape[0]):
                top = tops[u] if tops[u] > -np.inf else np.float32(0.0)
                _exp32(x[u], bits, scale, cnt, top)
        return tile_exp32

    def tile_exp64(x, bits, cnt, tops):
        for u in range(x.shape[0]):
            top = tops[u] if tops[u] > -np.inf else 0.0
            for c in range(cnt):
                x[u, c] = math.exp(x[u, c] - top)
    return tile_exp64


@numba.njit(**JIT)
def scratch(shape, dtype):
    """``np.empty`` as a cached function: a kernel's scratch buffers, allocated once per call
    of the kernel; numba's implementation for each shape and dtype is then compiled once into
    the disk cache rather than in every process that compiles a kernel."""
    return np.empty(shape, dtype)


@numba.njit(**JIT)
def dots(x, rows, keys, cnt, out, dim):
    """``out[c] = x . rows[keys[c]]``, four keys per pass: one load of ``x`` serves four."""
    zero = out.dtype.type(0.0)
    c = 0
    while c + 4 <= cnt:
        k0, k1, k2, k3 = keys[c], keys[c + 1], keys[c + 2], keys[c + 3]
        s0 = s1 = s2 = s3 = zero
        for d in range(dim):
            xd = x[d]
            s0 += xd * rows[k0, d]
            s1 += xd * rows[k1, d]
            s2 += xd * rows[k2, d]
            s3 += xd * rows[k3, d]
        out[c], out[c + 1], out[c + 2], out[c + 3] = s0, s1, s2, s3
        c += 4
    while c < cnt:
        k0 = keys[c]
        s0 = zero
        for d in range(dim):
            s0 += x[d] * rows[k0, d]
        out[c] = s0
        c += 1


@numba.njit(**JIT)
def pv(p, rows, keys, cnt, acc, dim):
    """``acc += sum_c p[c] rows[keys[c]]``, four keys per pass: a quarter of acc's traffic."""
    c = 0
    while c + 4 <= cnt:
        p0, p1, p2, p3 = p[c], p[c + 1], p[c + 2], p[c + 3]
        k0, k1, k2, k3 = keys[c], keys[c + 1], keys[c + 2], keys[c + 3]
        for d in range(dim):
            acc[d] += p0 * rows[k0, d] + p1 * rows[k1, d] + p2 * rows[k2, d] + p3 * rows[k3, d]
        c += 4
    while c < cnt:
        p0, k0 = p[c], keys[c]
        for d in range(dim):
            acc[d] += p0 * rows[k0, d]
        c += 1


@numba.njit(inline="always", **OVERLOAD_JIT)
def _row_end(m, l, one):
    """``(one / l, lse)`` of an output row with running max ``m`` and sum ``l`` (in ``one``'s
    type, returned widened to float64): a query without keys (or with every score ``-inf``)
    ``(0, -inf)``, its row zeros; a poisoned one (NaN ``l``) ``(NaN, NaN)``, its row NaN.
    Unless ``l > 0`` the row is filled with the first value."""
    if l > 0.0:
        return one / l, m + math.log(l)
    if l == 0.0:
        return 0.0, -np.inf
    return np.nan, np.nan


@numba.njit(**JIT)
def finish_row(ob, lse, b, h, iq, acc, m, l, dim):
    """Normalise one output row (:func:`_row_end`: zeros for a query without keys, NaN for a
    poisoned one)."""
    inv, lse[b, h, iq] = _row_end(m, l, acc.dtype.type(1.0))
    if l > 0.0:
        scale = acc.dtype.type(inv)
        for d in range(dim):
            ob[iq, d] = acc[d] * scale
    else:
        ob[iq, :] = inv


@numba.njit(**JIT)
def finish_lanes(ob, lse, b, h, iqs, acc, m, l, first, width, n, dim):
    """:func:`finish_row` for the lanes ``u`` of a tile spanning rows that lie inside the
    grid (``first + u % width < n``), query ``iqs[u]``: one call per tile, and no view of a
    lane's row (a view per lane cost more than the row, in atomic reference counts)."""
    for u in range(acc.shape[0]):
        if first + u % width < n:
            iq = iqs[u]
            inv, lse[b, h, iq] = _row_end(m[u], l[u], acc.dtype.type(1.0))
            if l[u] > 0.0:
                scale = acc.dtype.type(inv)
                for d in range(dim):
                    ob[iq, d] = acc[u, d] * scale
            else:
                ob[iq, :] = inv


@numba.njit(**JIT)
def poisoned(scores, cnt):
    """Whether a score is NaN or ``+inf`` (the row's output is then NaN); ``-inf`` is not.

    The chunk helpers call it only when a sum of ``score * 0`` is NaN: one reduction that
    vectorises beside the max finds the rare chunk with a non-finite score (a test inside the
    max loop kept it from vectorising: a 7x7 window's forward took 1.5x the time).
    """
    for c in range(cnt):
        if not scores[c] < np.inf:
            return True
    return False


def tanh(x):
    """``tanh(x)``. float32 takes Eigen's rational approximation (``generic_fast_tanh_float``:
    odd degree-13 over even degree-6 on ``[-7.9, 7.9]``, where float32's tanh reaches +-1; a
    few ulp), which LLVM vectorises: libm's ``tanhf`` per score made a softcapped 7x7 window's
    forward 2.3x the time of the plain one. float64 keeps ``math.tanh``."""
    return math.tanh(x)


@overload(tanh, jit_options=OVERLOAD_JIT)
def _tanh_by_type(x):
    if x == numba.types.float32:
        def tanh32(x):
            x = min(max(x, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
            x2 = x * x
            p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
            p = p * x2 + np.float32(-8.60467152213735e-11)
            p = p * x2 + np.float32(5.12229709037114e-08)
            p = p * x2 + np.float32(1.48572235717979e-05)
            p = p * x2 + np.float32(6.37261928875436e-04)
            p = p * x2 + np.float32(4.89352455891786e-03)
            q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
            q = q * x2 + np.float32(2.26843463243900e-03)
            q = q * x2 + np.float32(4.89352518554385e-03)
            return x * p / q
        return tanh32
    return lambda x: math.tanh(x)


@numba.njit(**JIT)
def soft_cap(scores, cnt, cap, slopes):
    """``scores[c] = cap * tanh(scores[c] / cap)``; ``slopes[c]`` (unless ``None``) gets its
    derivative ``1 - tanh^2``, the factor the backward applies to a capped score's gradient.
    A NaN score stays NaN; ``+-inf`` becomes ``+-cap``."""
    one = scores.dtype.type(1.0)
    for c in range(cnt):
        t = tanh(scores[c] / cap)
        scores[c] = cap * t
        if slopes is not None:
            slopes[c] = one - t * t


@numba.njit(**JIT)
def add_bias(scores, cnt, table, offs, shift, mask):
    """``scores[c] += table[offs[c] - shift]``; with a tile lane's ``mask``, the score of a
    key the lane does not hold (mask not 0) becomes ``-inf`` instead, as ``_mask_scores``
    does, in the same pass: its position may lie beyond the table."""
    for c in range(cnt):
        if mask is None:
            scores[c] += table[offs[c] - shift]
        elif mask[c] == 0.0:
            scores[c] += table[offs[c] - shift]
        else:
            scores[c] = -np.inf


@numba.njit(**JIT)
def add_table_grad(dtable, ds, cnt, offs, shift, mask):
    """``dtable[offs[c] - shift] += ds[c]`` for the keys a tile lane holds (mask 0)."""
    for c in range(cnt):
        if mask[c] == 0.0:
            dtable[offs[c] - shift] += ds[c]


@numba.njit(**JIT)
def softmax_chunk(qs, kb, vb, keys, scores, bits, cnt, m, l, acc, dim, table=None, offs=None,
                  shift=0, cap=None):
    """Fold ``cnt`` keys into the running max ``m``, sum ``l`` and output ``acc``; returns
    the new ``(m, l)``. A NaN or ``+inf`` score poisons the row (``l`` and ``acc`` NaN).

    With ``cap``, scores are soft-capped (:func:`soft_cap`); with a ``table`` (one head's
    flat bias table), key ``c`` gains ``table[offs[c] - shift]``. numba prunes the branches of
    the arguments left ``None`` at compile time: kernels without them run the plain loop.
    """
    dots(qs, kb, keys, cnt, scores, dim)
    if cap is not None:
        soft_cap(scores, cnt, cap, None)
    if table is not None:
        add_bias(scores, cnt, table, offs, shift, None)
    top, check = m, acc.dtype.type(0.0)
    for c in range(cnt):
        top = max(top, scores[c])
        check += scores[c] * 0.0  # NaN when a score is not finite
    if check != check and poisoned(scores, cnt):
        acc[:] = np.nan
        return m, l + acc[0]  # NaN of l's own type
    shift = top if top > -np.inf else acc.dtype.type(0.0)  # all -inf so far: weights 0
    alpha = math.exp(m - shift)
    l *= alpha
    for d in range(dim):
        acc[d] *= alpha
    exp_shifted(scores, bits, cnt, shift)
    for c in range(cnt):
        l += scores[c]
    pv(scores, vb, keys, cnt, acc, dim)
    return top, l


@numba.njit(**JIT)
def backward_chunk(qs, dos, kb, vb, keys, scores, dps, bits, cnt, lse_q, delta, dqa, dkb, dvb,
                   dim, table=None, offs=None, shift=0, cap=None, slopes=None, dtable=None):
    """Gradients of ``cnt`` keys of one query: ``P = exp(S - lse)``, ``dS = P (dP - D)``.

    ``qs`` is the query already scaled, so ``dk += dS q scale``; the caller scales ``dqa``.
    A NaN ``lse`` (a poisoned row) gives NaN probabilities. Scores are rebuilt as
    :func:`softmax_chunk` builds them; with a table, ``dtable[offs[c] - shift] += dS``; with
    ``cap``, ``dS`` reaches q and k times the cap's slope (``slopes`` is scratch).
    """
    dots(qs, kb, keys, cnt, scores, dim)
    dots(dos, vb, keys, cnt, dps, dim)
    if cap is not None:
        soft_cap(scores, cnt, cap, slopes)
    if table is not None:
        add_bias(scores, cnt, table, offs, shift, None)
    exp_shifted(scores, bits, cnt, lse_q)
    if lse_q != lse_q:
        scores[:cnt] = np.nan
    for c in range(cnt):
        p, key = scores[c], keys[c]
        ds = p * (dps[c] - delta)
        if dtable is not None:
            dtable[offs[c] - shift] += ds
        if cap is not None:
            ds *= slopes[c]
        for d in range(dim):
            dqa[d] += ds * kb[key, d]
        for d in range(dim):
            dkb[key, d] += ds * qs[d]
        for d in range(dim):
            dvb[key, d] += p * dos[d]


@numba.njit(**JIT)
def uniform(lo, hi):
    """Whether every lane has the same ``[lo, hi)``."""
    for u in range(1, lo.shape[0]):
        if lo[u] != lo[0] or hi[u] != hi[0]:
            return False
    return True


@numba.njit(**JIT)
def union(lo, hi, n):
    """The smallest range holding every lane's non-empty ``[lo, hi)``; ``(0, 0)`` if none."""
    start, stop = n, 0
    for u in range(lo.shape[0]):
        if lo[u] < hi[u]:
            start = min(start, lo[u])
            stop = max(stop, hi[u])
    return min(start, stop), stop


@numba.njit(**JIT)
def tile_dots(x, rows, keys, cnt, out, dim):
    """``out[u, c] = x[u] . rows[keys[c]]`` in blocks of 2 lanes x 4 keys held in registers."""
    zero = out.dtype.type(0.0)
    lanes = x.shape[0]
    u = 0
    while u + 2 <= lanes:
        c = 0
        while c + 4 <= cnt:
            k0, k1, k2, k3 = keys[c], keys[c + 1], keys[c + 2], keys[c + 3]
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = zero
            for d in range(dim):
                x0, x1 = x[u, d], x[u + 1, d]
                r0, r1, r2, r3 = rows[k0, d], rows[k1, d], rows[k2, d], rows[k3, d]
                a0 += x0 * r0
                a1 += x0 * r1
                a2 += x0 * r2
                a3 += x0 * r3
                b0 += x1 * r0
                b1 += x1 * r1
                b2 += x1 * r2
                b3 += x1 * r3
            out[u, c], out[u, c + 1], out[u, c + 2], out[u, c + 3] = a0, a1, a2, a3
            out[u + 1, c], out[u + 1, c + 1], out[u + 1, c + 2], out[u + 1, c + 3] = (
                b0, b1, b2, b3)
            c += 4
        while c < cnt:
            k0 = keys[c]
            a0 = b0 = zero
            for d in range(dim):
                a0 += x[u, d] * rows[k0, d]
                b0 += x[u + 1, d] * rows[k0, d]
            out[u, c], out[u + 1, c] = a0, b0
            c += 1
        u += 2
    if u < lanes:
        dots(x[u], rows, keys, cnt, out[u], dim)


@numba.njit(**JIT)
def tile_pv(p, rows, keys, cnt, acc, dim):
    """``acc[u] += sum_c p[u, c] rows[keys[c]]``, 2 lanes x 4 keys per pass."""
    lanes = acc.shape[0]
    u = 0
    while u + 2 <= lanes:
        c = 0
        while c + 4 <= cnt:
            k0, k1, k2, k3 = keys[c], keys[c + 1], keys[c + 2], keys[c + 3]
            p0, p1, p2, p3 = p[u, c], p[u, c + 1], p[u, c + 2], p[u, c + 3]
            s0, s1, s2, s3 = p[u + 1, c], p[u + 1, c + 1], p[u + 1, c + 2], p[u + 1, c + 3]
            for d in range(dim):
                r0, r1, r2, r3 = rows[k0, d], rows[k1, d], rows[k2, d], rows[k3, d]
                acc[u, d] += p0 * r0 + p1 * r1 + p2 * r2 + p3 * r3
                acc[u + 1, d] += s0 * r0 + s1 * r1 + s2 * r2 + s3 * r3
            c += 4
        while c < cnt:
            k0, p0, s0 = keys[c], p[u, c], p[u + 1, c]
            for d in range(dim):
                acc[u, d] += p0 * rows[k0, d]
                acc[u + 1, d] += s0 * rows[k0, d]
            c += 1
        u += 2
    if u < lanes:
        pv(p[u], rows, keys, cnt, acc[u], dim)


@numba.njit(**JIT)
def tile_scatter(p, x, keys, cnt, dst, dim):
    """``dst[keys[c]] += sum_u p[u, c] x[u]``: each key's row is updated once for all lanes."""
    lanes = x.shape[0]
    for c in range(cnt):
        key = keys[c]
        u = 0
        while u + 4 <= lanes:
            p0, p1, p2, p3 = p[u, c], p[u + 1, c], p[u + 2, c], p[u + 3, c]
            for d in range(dim):
                dst[key, d] += (p0 * x[u, d] + p1 * x[u + 1, d] + p2 * x[u + 2, d]
                                + p3 * x[u + 3, d])
            u += 4
        while u < lanes:
            p0 = p[u, c]
            for d in range(dim):
                dst[key, d] += p0 * x[u, d]
            u += 1


@numba.njit(**JIT)
def _mask_scores(scores, mask, u, cnt):
    """Scores of keys lane ``u`` does not hold become ``-inf`` (not ``+ -inf``: a NaN or
    ``+inf`` score of a key the lane does not attend must not poison it)."""
    for c in range(cnt):
        if mask[u, c] != 0.0:
            scores[u, c] = -np.inf


@numba.njit(**JIT)
def tile_softmax_chunk(qt, kb, vb, keys, scores, mask, bits, cnt, m, l, acc, dim, table=None,
                       offs=None, cap=None):
    """Fold ``cnt`` keys into every lane's running max, sum and output; ``mask`` is 0 where
    the lane holds the key, ``-inf`` where not (its probability is then exactly 0).

    ``cap`` and ``table`` as in :func:`softmax_chunk`; ``offs`` holds lane 0's table
    positions, lane ``u``'s query is ``u`` further along the last axis, so it reads ``offs - u``.
    """
    tile_dots(qt, kb, keys, cnt, scores, dim)
    for u in range(acc.shape[0]):  # each lane's new running max, and its old terms rescaled
        if cap is not None:
            soft_cap(scores[u], cnt, cap, None)
        if table is not None:
            add_bias(scores[u], cnt, table, offs, u, mask[u])
        else:
            _mask_scores(scores, mask, u, cnt)
        top, check = m[u], acc.dtype.type(0.0)
        for c in range(cnt):
            top = max(top, scores[u, c])
            check += scores[u, c] * 0.0
        if check != check and poisoned(scores[u], cnt):
            l[u] = np.nan
            acc[u, :] = np.nan
            continue
        alpha = math.exp(m[u] - (top if top > -np.inf else acc.dtype.type(0.0)))
        m[u] = top
        l[u] *= alpha
        for d in range(dim):
            acc[u, d] *= alpha
    tile_exp_shifted(scores, bits, cnt, m)
    for u in range(acc.shape[0]):
        if l[u] != l[u]:  # poisoned: its row of acc is NaN already, its scores add nothing
            scores[u, :cnt] = 0.0
            continue
        total = l[u]
        for c in range(cnt):
            total += scores[u, c]
        l[u] = total
    tile_pv(scores, vb, keys, cnt, acc, dim)


def cols_exp_shifted(x, bits, cnt, tops):
    """``x[c, u] = exp(x[c, u] - tops[u])`` for ``c < cnt`` and every lane ``u``, in place:
    :func:`tile_exp_shifted` on a key-major chunk, each pass over the lanes vectorised
    (``bits`` is scratch of ``x``'s shape)."""
    for c in range(cnt):
        for u in range(x.shape[1]):
            x[c, u] = math.exp(x[c, u] - tops[u])


@overload(cols_exp_shifted, jit_options=OVERLOAD_JIT)
def _cols_exp_shifted_by_dtype(x, bits, cnt, tops):
    if x.dtype == numba.types.float32:
        def cols_exp32(x, bits, cnt, tops):
            scale = bits.view(np.float32)
            for c in range(cnt):
                for u in range(x.shape[1]):
                    x[c, u], bits[c, u] = _exp32_parts(x[c, u] - tops[u])
            for c in range(cnt):
                for u in range(x.shape[1]):
                    x[c, u] *= scale[c, u]
        return cols_exp32

    def cols_exp64(x, bits, cnt, tops):
        for c in range(cnt):
            for u in range(x.shape[1]):
                x[c, u] = math.exp(x[c, u] - tops[u])
    return cols_exp64


@numba.njit(**JIT)
def cols_softmax_chunk(qt, kb, vb, keys, scores, mask, masked, bits, cnt, m, l, acc, top, check,
                       dim, cap=None):
    """:func:`tile_softmax_chunk` with the chunk key-major: ``scores[c, u]`` and, when
    ``masked``, ``mask[c, u]`` (0 where lane ``u`` holds key ``c``, else ``-inf``; not
    ``masked``: every lane holds every key), so that the masking, the max, the exponentials
    and the sums run over the lanes, in vectors, instead of a short row per lane (loops of
    the lanes' count as a constant measured slower). ``top`` and ``check`` are scratch of a
    value per lane.

    A lane whose running max does not grow keeps its sums unscaled: on a tile's first chunk
    (every chunk when its keys fit one) no lane is rescaled.
    """
    lanes = acc.shape[0]
    tile_dots(qt, kb, keys, cnt, scores.T, dim)
    if cap is not None:
        soft_cap(scores.reshape(scores.size), cnt * lanes, cap, None)
    zero, ninf = acc.dtype.type(0.0), acc.dtype.type(-np.inf)
    for u in range(lanes):
        top[u] = m[u]
        check[u] = zero
    if masked:  # a key the lane does not hold scores -inf (not + -inf: no NaN poisons it)
        for c in range(cnt):
            for u in range(lanes):
                scores[c, u] = scores[c, u] if mask[c, u] == zero else ninf
    for c in range(cnt):
        for u in range(lanes):
            x = scores[c, u]
            top[u] = x if x > top[u] else top[u]
            check[u] += x * zero  # NaN when a score is not finite
    for u in range(lanes):
        if check[u] != check[u] and poisoned(scores[:, u], cnt):
            l[u] = np.nan
            acc[u, :] = np.nan
        elif top[u] > m[u] > ninf:  # a larger max: rescale what the lane has summed
            alpha = math.exp(m[u] - top[u])
            l[u] *= alpha
            for d in range(dim):
                acc[u, d] *= alpha
        m[u] = top[u]
        top[u] = top[u] if top[u] > ninf else zero  # all -inf so far: weights 0
    cols_exp_shifted(scores, bits, cnt, top)
    for u in range(lanes):
        if l[u] != l[u]:  # poisoned: its row of acc is NaN already, its scores add nothing
            scores[:cnt, u] = zero
    for c in range(cnt):
        for u in range(lanes):
            l[u] += scores[c, u]
    tile_pv(scores.T, vb, keys, cnt, acc, dim)


@numba.njit(**JIT)
def tile_backward_chunk(qt, dot, kb, vb, keys, scores, dps, mask, bits, cnt, lse_t, delta, dqa,
                        dkb, dvb, dim, table=None, offs=None, cap=None, slopes=None,
                        dtable=None):
    """Gradients of ``cnt`` keys for every lane: ``P = exp(S - lse)``, ``dS = P (dP - D)``;
    bias and cap as in :func:`backward_chunk` and :func:`tile_softmax_chunk` (``slopes``
    per lane)."""
    tile_dots(qt, kb, keys, cnt, scores, dim)
    tile_dots(dot, vb, keys, cnt, dps, dim)
    for u in range(qt.shape[0]):
        if cap is not None:
            soft_cap(scores[u], cnt, cap, slopes[u])
        if table is not None:
            add_bias(scores[u], cnt, table, offs, u, mask[u])
        else:
            _mask_scores(scores, mask, u, cnt)
    tile_exp_shifted(scores, bits, cnt, lse_t)
    for u in range(qt.shape[0]):
        if lse_t[u] != lse_t[u]:
            scores[u, :cnt] = np.nan
        for c in range(cnt):
            dps[u, c] = scores[u, c] * (dps[u, c] - delta[u])
        if dtable is not None:  # its own loop: the one above stays vectorised
            add_table_grad(dtable, dps[u], cnt, offs, u, mask[u])
        if cap is not None:
            for c in range(cnt):
                dps[u, c] *= slopes[u, c]
    tile_pv(dps, kb, keys, cnt, dqa, dim)
    tile_scatter(dps, qt, keys, cnt, dkb, dim)
    tile_scatter(scores, dot, keys, cnt, dvb, dim)
