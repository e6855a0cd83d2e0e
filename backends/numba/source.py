"""Generate: IR -> the source text of one module of kernels (pure and deterministic).

:func:`generate` walks the IR once (:func:`_visit`: one case per node, as finch's
``numba_codegen`` does). Every term becomes one loop per grid axis over that term's key
progression, from the first key to the end that :meth:`patterngen.ir.Rel.bounds` gives for the
query's coordinate on that axis. Those bounds are not written into the text: numpy evaluates
the formula once per axis coordinate into a table (:func:`bounds_table`, the same formula the
oracle and the layouts evaluate), a kernel argument, so the text holds only the pattern's
*shape* (the grid's rank, the terms and their steps) and every pattern of one shape shares a
module. No mask is tested inside a term. A union visits its terms in order and skips a key an
earlier term already holds, so every key is visited once. Keys are buffered ``KEY_CHUNK`` at a
time and handed to the helpers of :mod:`~patterngen.backends.numba.runtime`, which the module
imports. Each kernel is a ``cfunc`` body that unpacks its arguments and takes work ranges as
:mod:`~patterngen.backends.numba.launch` describes.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, replace

import numpy as np

from patterngen import ir
from patterngen.errors import PatternError

from . import launch, tiling

#: scores held before an online-softmax rescale; bounds the per-thread scratch
KEY_CHUNK = 128
#: the kernels' accumulator type per input dtype (bfloat16 and float16 run in float32)
DTYPES = {"float32": "np.float32", "float64": "np.float64"}
#: scratch of ``runtime.exp_shifted``: the float's exponent bits
_BITS = {"float32": "np.int32", "float64": "np.int64"}
#: head_dims from this one up get kernels compiled for their head_dim, loops of constant length
#: (a 7x7 window, forward/backward on one thread: 0.87/0.92 of the time at 64, 0.94/0.97 at 48;
#: at 32 such kernels made the backward twice as slow, so smaller head_dims share generic ones)
SPECIALISED_HEAD_DIM = 48
#: what a generated module may import from the runtime (see :func:`_imports`)
_RUNTIME = ("backward_chunk", "cols_softmax_chunk", "finish_lanes", "finish_row", "scratch",
            "softmax_chunk", "tile_backward_chunk", "tile_softmax_chunk", "uniform", "union")


class _Emitter:
    """Lines of source with an indentation level; :meth:`block` opens a nested scope."""

    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, line: str = "") -> None:
        self.lines.append("    " * self.depth + line if line else "")

    @contextlib.contextmanager
    def block(self, header: str):
        self(header)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


@dataclass(frozen=True)
class Context:
    """What the emitters share: the module's options, then where the walk is.

    A step into a kernel, a term or an axis passes on a copy with its fields replaced
    (:func:`dataclasses.replace`), so no emitter sees another's state.

    Attributes:
        lanes: 0, or the queries of a tile (:func:`generate`'s ``lanes``).
        groups: with lanes, the rows a tile spans on each axis but the last (``()``: one).
        columns: a tile's chunk is key-major (``scores[c, u]``, ``mask[c, u]``) and its mask
            is written only when the lanes' keys differ (the forward of tiles spanning rows).
        shared: with lanes, each distinct head's terms' sharing (:func:`generate`'s).
        head_dim: 0, or the one head_dim the kernels take.
        bias, softcap: the kernels add a bias table, cap the scores.
        cross: the keys live on another grid, of extents ``m0, m1, ...`` (arguments after
            the query grid's ``n0, n1, ...``).
        ndim: the grid's rank.
        kernel: the kernel being written; shares: its terms' sharing (lanes).
        runs: runs of keys are buffered in one loop (:func:`_emit_run`; forward only).
        terms: the head's terms; term, axis: the term and axis being written.
        flush: the statement that processes a full key buffer; lane_flush: the same for a term
            run lane by lane.
    """

    lanes: int
    shared: tuple
    head_dim: int
    bias: bool
    softcap: bool
    cross: bool = False
    groups: tuple = ()
    columns: bool = False
    ndim: int = 0
    kernel: int = 0
    shares: tuple = ()
    runs: bool = False
    terms: tuple = ()
    term: int = 0
    axis: int = 0
    flush: str = ""
    lane_flush: str = ""


def _key_extent(ctx: Context, a: int) -> str:
    """The name of the key grid's extent on axis ``a`` (the query grid's without a key grid)."""
    return f"m{a}" if ctx.cross else f"n{a}"


def _unflatten(em: _Emitter, ndim: int) -> None:
    """Query coordinates ``i0..`` from the flat row-major index ``iq``."""
    rest = "iq"
    for a in range(ndim - 1):
        inner = " * ".join(f"n{b}" for b in range(a + 1, ndim))
        em(f"i{a} = {rest} // ({inner})")
        if a < ndim - 2:
            em(f"r{a} = {rest} - i{a} * ({inner})")
            rest = f"r{a}"
        else:
            em(f"i{ndim - 1} = {rest} - i{a} * ({inner})")
    if ndim == 1:
        em("i0 = iq")


def _visit(node, em: _Emitter, ctx: Context) -> None:
    """Emit ``node``: the structural walk of the generator (one case per IR node)."""
    match node:
        case ir.HeadsIR() | ir.IR():
            forward, backward = ((_emit_lane_forward, _emit_lane_backward) if ctx.lanes
                                 else (_emit_forward, _emit_backward))
            reps = kernels(node, ctx.shared if ctx.lanes else None)[0]
            for index, (head, shares) in enumerate(reps):
                kernel = replace(ctx, ndim=node.grid.ndim, kernel=index, shares=shares)
                forward(head, em, replace(kernel, runs=True))  # see _emit_run
                em()
                em()
                backward(head, em, kernel)
                em()
                em()
        case ir.Term():
            _emit_term_loops(node, em, ctx)
        case ir.Rel():
            a, t = ctx.axis, ctx.term
            lane = _lane(ctx, a)
            em(f"lo{t}_{a}{lane} = bounds[r, {t}, {a}, 0, i{a}]")
            em(f"hi{t}_{a}{lane} = bounds[r, {t}, {a}, 1, i{a}]")
        case _:
            raise PatternError(f"Unrecognized node {node!r} of type {type(node).__name__}; "
                               f"the numba generator handles IR, HeadsIR, Term and Rel.")


def steps(head: ir.IR) -> tuple[tuple, ...]:
    """Each term's key step per axis: with the grid's rank, all the text of ``head``'s kernel
    knows of it (the rest is in :func:`bounds_table`)."""
    return tuple(tuple(int(rel.step) for rel in term.rels) for term in head.terms)


def kernels(node, shared=None) -> tuple[list, list[int]]:
    """The kernels of ``node``'s module, one per distinct shape among its distinct head
    patterns (:func:`steps`, and with lanes their terms' sharing, ``shared`` per distinct head),
    as ``(a head of that shape, its sharing)``; and each distinct head's kernel. Heads of one
    shape run one kernel on their own rows of :func:`bounds_table`."""
    heads = tiling.distinct_heads(node)
    keys, reps, of = [], [], []
    for head, shares in zip(heads, shared if shared is not None else [()] * len(heads)):
        key = (steps(head), tuple(shares))
        if key not in keys:
            keys.append(key)
            reps.append((head, tuple(shares)))
        of.append(keys.index(key))
    return reps, of


def bounds_table(node, shape, key_shape=None) -> np.ndarray:
    """The kernels' argument ``bounds``: ``[row, term, axis, 0, i]`` is the first key and
    ``[..., 1, i]`` the end of the keys of query coordinate ``i`` on that axis (empty when the
    end is not above the first), one row per distinct head pattern of ``node`` on the grid
    ``shape`` (a kernel reads the row of each head it runs, ``brows``). Evaluated by numpy
    from :meth:`~patterngen.ir.Rel.bounds`: a term's bounds on one axis depend on the query's
    coordinate on that axis only, so the table holds ``rows x terms x axes x max(shape)``
    pairs, never tokens. With ``key_shape`` (keys on another grid) the bounds are on the key
    grid, those of the key coordinate each query sits over."""
    heads = tiling.distinct_heads(node)
    table = np.zeros((len(heads), max(len(h.terms) for h in heads), len(shape), 2, max(shape)),
                     dtype=np.int64)
    for k, head in enumerate(heads):
        for t, term in enumerate(head.terms):
            for a, (rel, n, nk) in enumerate(zip(term.rels, shape, key_shape or shape)):
                coords = np.arange(int(n), dtype=np.int64)
                for side, value in enumerate(rel.bounds(coords, int(nk), ir.NUMPY_OPS,
                                                        int(n))):
                    table[k, t, a, side, :n] = np.broadcast_to(value, coords.shape)
    return table


def _emit_bounds(head: ir.IR, em: _Emitter, ctx: Context) -> None:
    """Per query, every term's per-axis ``[lo, hi)``: loops and membership tests read them."""
    for t, term in enumerate(head.terms):
        for a, rel in enumerate(term.rels):
            _visit(rel, em, replace(ctx, axis=a, term=t))


def _lane(ctx: Context, a: int) -> str:
    """``[u]`` where axis ``a``'s bounds are held per query lane (the last axis of a tile)."""
    return "[u]" if ctx.lanes and a == ctx.ndim - 1 else ""


def _member(t: int, a: int, rel: ir.Rel, lane: str = "") -> str:
    lo, hi = f"lo{t}_{a}{lane}", f"hi{t}_{a}{lane}"
    test = f"{lo} <= p{a} < {hi}"
    step = rel.step
    return test if step == 1 else f"{test} and (p{a} - {lo}) % {step} == 0"


def _emit_term_loops(term: ir.Term, em: _Emitter, ctx: Context) -> None:
    """One loop per axis over term ``ctx.term``'s keys, each key buffered.

    Keys held by an earlier term are skipped: the earlier term's membership on axis ``a`` is
    known once ``p0..pa`` are, so it is computed at that loop depth and tested at the last.
    """
    t, earlier, last = ctx.term, ctx.terms[:ctx.term], len(term.rels) - 1
    lanes = ctx.lanes
    shared = lanes and ctx.shares[t]
    keys, cnt, flush = ("lkeys", "cnt1", ctx.lane_flush) if lanes else ("keys", "cnt", ctx.flush)
    with contextlib.ExitStack() as scopes:
        if lanes and not shared:  # lane by lane, each on its own keys, flushed on its own
            scopes.enter_context(em.block("for u in range(LANES):"))
            em("cnt1 = np.int64(0)")
            scopes.callback(_emit_lane_flush, em, ctx)
        for a, rel in enumerate(term.rels):
            lane = _lane(ctx, a)
            if shared and a == last:  # every key of the tile's union; a mask per query lane
                header = f"for p{a} in range(ulo{t}, uhi{t}):"
            else:
                step = f", {rel.step}" if rel.step != 1 else ""
                header = f"for p{a} in range(lo{t}_{a}{lane}, hi{t}_{a}{lane}{step}):"
            if a == last and ctx.runs and not shared and not earlier and rel.step == 1:
                _emit_run(em, ctx, a, f"lo{t}_{a}{lane}", f"hi{t}_{a}{lane}", keys, cnt)
                scopes.enter_context(em.block("else:"))
            scopes.enter_context(em.block(header))
            em(f"k{a} = p{a}" if a == 0 else f"k{a} = k{a - 1} * {_key_extent(ctx, a)} + p{a}")
            if ctx.bias:
                em(f"o{a} = p{a} + e{a}" if a == 0 else f"o{a} = o{a - 1} * span{a} + p{a} + e{a}")
            tests = _earlier_tests(em, earlier, a, last, lane)
            if a == last and shared:
                em(f"keys[cnt] = k{last}")
                if ctx.bias:
                    em(f"offs[cnt] = o{last}")
                if ctx.columns:  # lanes with the same keys hold a key together: no mask
                    lane0 = _earlier_tests(None, earlier, a, last, "[0]")
                    with em.block("if same:"), em.block(f"if {_held(t, a, rel, lane0, '[0]')}:"):
                        em("cnt += 1")
                with contextlib.ExitStack() as masked:
                    if ctx.columns:
                        masked.enter_context(em.block("else:"))
                    with em.block("for u in range(LANES):"):
                        em(f"mask[{'cnt, u' if ctx.columns else 'u, cnt'}] = 0.0 if "
                           f"{_held(t, a, rel, tests, '[u]')} else -np.inf")
                    em("cnt += 1")
                with em.block("if cnt == KEY_CHUNK:"):
                    em(ctx.flush)
                    em("cnt = 0")
            elif a == last and tests:
                with em.block("if " + " or ".join(f"({x})" for x in tests) + ":"):
                    em("continue")
        if not shared:
            _emit_collect(em, ctx, last, flush, keys, cnt)


def _earlier_tests(em: _Emitter | None, earlier, a: int, last: int, lane: str) -> list[str]:
    """Per earlier term, whether it holds the key at loop depth ``a``; above the last axis
    each is kept in ``c{u}_{a}`` (written to ``em``) for the loops inside."""
    tests = []
    for u, other in enumerate(earlier):
        prev = f"c{u}_{a - 1} and " if a else ""
        tests.append(f"{prev}{_member(u, a, other.rels[a], lane)}")
        if a < last and em is not None:
            em(f"c{u}_{a} = {tests[-1]}")
    return tests


def _held(t: int, a: int, rel: ir.Rel, tests: list[str], lane: str) -> str:
    """Whether ``lane`` holds the key (axis ``a``) in term ``t`` and in no earlier term
    (``tests``)."""
    held = _member(t, a, rel, lane)
    return f"({held}) and not (" + " or ".join(f"({x})" for x in tests) + ")" if tests else held


def _emit_run(em: _Emitter, ctx: Context, a: int, lo: str, hi: str, keys: str, cnt: str) -> None:
    """A run of consecutive keys on the last axis, buffered in one loop that LLVM vectorises
    when the buffer has room for all of it; else key by key. Forward only: it shortened the
    forward and lengthened the backward (figures in docs/backends-numba.md).

    A run may fill the buffer: the next key processes it before it is buffered
    (:func:`_emit_collect`), or the end of the query does."""
    em(f"run = {hi} - {lo}")
    with em.block(f"if run > 0 and {cnt} + run <= KEY_CHUNK:"):
        start = f"k{a - 1} * {_key_extent(ctx, a)} + {lo}" if a else lo
        em(f"first_key = {start} - {cnt}")
        if ctx.bias:
            outer = f"o{a - 1} * span{a} + " if a else ""
            em(f"first_off = {outer}{lo} + e{a} - {cnt}")
        with em.block(f"for p{a} in range({cnt}, {cnt} + run):"):
            em(f"{keys}[p{a}] = first_key + p{a}")
            if ctx.bias:
                em(f"{_offs(keys)}[p{a}] = first_off + p{a}")
        em(f"{cnt} += run")


def _emit_lane_flush(em: _Emitter, ctx: Context) -> None:
    """After a lane-by-lane term's loops, still inside the loop over lanes."""
    with em.block("if cnt1 > 0:"):
        em(ctx.lane_flush)


def _emit_keys(head: ir.IR, em: _Emitter, ctx: Context) -> None:
    ctx = replace(ctx, terms=head.terms)
    for t, term in enumerate(head.terms):
        alone = " lane by lane," if ctx.lanes and not ctx.shares[t] else ""
        em(f"# term {t}:{alone} steps {steps(head)[t]}"
           + (" (keys of earlier terms skipped)" if t else ""))
        _visit(term, em, replace(ctx, term=t))


def _emit_collect(em: _Emitter, ctx: Context, last: int, flush: str, keys="keys",
                  cnt="cnt") -> None:
    """The innermost statement of every term: process the buffer if it is full (a run may
    have filled it, :func:`_emit_run`), then buffer the key (and its table position).

    Scores are computed in the chunk helpers, four keys at a time, not here: one key per
    pass over ``q`` is a horizontal reduction per pair and was the slowest loop.
    """
    with em.block(f"if {cnt} == KEY_CHUNK:"):
        em(flush)
        em(f"{cnt} = 0")
    em(f"{keys}[{cnt}] = k{last}")
    if ctx.bias:
        em(f"{_offs(keys)}[{cnt}] = o{last}")
    em(f"{cnt} += 1")


def _offs(keys: str) -> str:
    """The buffer of table positions beside the key buffer ``keys`` (``lkeys``: lane by lane)."""
    return keys[:-4] + "offs"


def _score_args(ctx: Context, offs: str, shift: str | None, backward: bool,
                slopes: str = "slopes") -> str:
    """The chunk helpers' trailing arguments for a bias table and a softcap (``table, offs,
    shift, cap`` and, backward, ``slopes, dtable``; tiles pass no ``shift``): ``""`` without
    either, so that those kernels call the helpers exactly as before."""
    bias, cap = ctx.bias, ctx.softcap
    if not (bias or cap):
        return ""
    args = ["bt" if bias else "None", offs if bias else "None",
            *([shift] if shift is not None else []), "softcap" if cap else "None"]
    if backward:
        args += [slopes if cap else "None", "dbt" if bias else "None"]
    return ", " + ", ".join(args)


def _emit_bias_scratch(em: _Emitter, ctx: Context, backward: bool, lanes: bool = False,
                       alone: bool = False) -> None:
    """Table positions beside each key buffer; for the backward with a softcap, its slopes
    (per lane in a tile)."""
    if ctx.bias:
        for offs in ("offs", "loffs")[:1 + alone]:
            em(f"{offs} = scratch(KEY_CHUNK, np.int64)")
    if backward and ctx.softcap:
        em("slopes = scratch((LANES, KEY_CHUNK), ACC)" if lanes
           else "slopes = scratch(KEY_CHUNK, ACC)")
        if alone:
            em("lslopes = scratch(KEY_CHUNK, ACC)")


def _emit_bias_row(em: _Emitter, ctx: Context, backward: bool) -> None:
    """Head ``h``'s table row (row 0 of a table shared by every head) and its gradient copy."""
    if ctx.bias:
        em("bt = table[h % table.shape[0]]")
        if backward:
            em("dbt = dtable[slot, h % table.shape[0]]")


def _emit_item_head(em: _Emitter, per: str) -> None:
    """A work item's batch ``b``, head ``h`` and bounds-table row ``r``; items run over
    batch, then head, then ``per`` items of one head."""
    em(f"b = w // (nh * {per})")
    em(f"h = heads[(w // {per}) % nh]")
    em(f"r = brows[(w // {per}) % nh]")


def _emit_item_rows(em: _Emitter, ctx: Context, backward: bool) -> None:
    """The item's rows of the inputs and outputs (k and v of its key/value head) and of the
    bias table."""
    em("hk = h // group")
    if backward:
        em("qb, kb, vb, ob, dob = q[b, h], k[b, hk], v[b, hk], out[b, h], dout[b, h]")
        em("dqb, dkb, dvb = dq[b, h], dk[split, b, h], dv[split, b, h]")
    else:
        em("qb, kb, vb, ob = q[b, h], k[b, hk], v[b, hk], out[b, h]")
    _emit_bias_row(em, ctx, backward)


def _emit_bias_base(em: _Emitter, ctx: Context, last: str) -> None:
    """``e{a} = reach - query`` per axis (``last``: the query's last coordinate), so that a
    key's flat table position is ``o = (...(p0 + e0) * span1 + p1 + e1)...``; with keys on
    another grid, ``reach - c(query)`` (:func:`patterngen.ir.center`)."""
    if ctx.bias:
        ndim = ctx.ndim
        for a in range(ndim):
            query = last if a == ndim - 1 else f"i{a}"
            if ctx.cross:
                query = f"((2 * {query} + 1) * m{a}) // (2 * n{a})"
            em(f"e{a} = reach{a} - {query}")


def _emit_heads(em: _Emitter) -> None:
    """The item's heads: ``nh`` listed, ``group`` query heads per key/value head."""
    em("nh = heads.shape[0]")
    em("group = q.shape[1] // k.shape[1]  # query heads per key/value head")


def _emit_scratch(em: _Emitter, ctx: Context, rows, chunks, backward: bool) -> None:
    """Per-thread scratch of a one-query kernel: a head_dim row each of ``rows``, a key chunk
    each of ``chunks``, the key buffer and the bias's."""
    for names, shape in ((rows, "dim"), (chunks, "KEY_CHUNK")):
        for name in names:
            em(f"{name} = scratch({shape}, ACC)")
    em("keys = scratch(KEY_CHUNK, np.int64)")
    em("bits = scratch(KEY_CHUNK, BITS)")
    _emit_bias_scratch(em, ctx, backward)


@contextlib.contextmanager
def _backward_kernel(em: _Emitter, ctx: Context, doc: list[str], extents, scratch):
    """A backward kernel up to the rows of its item ``w``: the header, ``splits``, the grid's
    extents (``extents(em)``), the heads, the scratch (``scratch(em)``), then per item its
    batch, head, split and rows; the body goes inside."""
    with _kernel_header(em, ctx, True, doc):
        em("splits = dk.shape[0]")
        extents(em)
        _emit_heads(em)
        scratch(em)
        with launch.emit_ranges(em), em.block("for w in range(start, stop):"):
            _emit_item_head(em, "splits")
            em("split = w % splits")
            _emit_item_rows(em, ctx, True)
            yield


def _emit_forward(head: ir.IR, em: _Emitter, ctx: Context) -> None:
    ndim = ctx.ndim
    tokens = " * ".join(f"n{a}" for a in range(ndim))
    with _kernel_header(em, ctx, False, [
            "Item ``w`` is a tile of QUERY_TILE queries of batch ``w // (nh * tiles)`` and head",
            "``heads[w // tiles % nh]``."]):
        em(f"tokens = {tokens}")
        em("tiles = (tokens + QUERY_TILE - 1) // QUERY_TILE")
        _emit_heads(em)
        _emit_scratch(em, ctx, ("qs", "acc"), ("scores",), False)
        with launch.emit_ranges(em), em.block("for w in range(start, stop):"):
            _emit_item_head(em, "tiles")
            em("first = (w % tiles) * QUERY_TILE")
            _emit_item_rows(em, ctx, False)
            with em.block("for iq in range(first, min(first + QUERY_TILE, tokens)):"):
                _unflatten(em, ndim)
                _emit_bias_base(em, ctx, f"i{ndim - 1}")
                _emit_bounds(head, em, ctx)
                with em.block("for d in range(dim):"):
                    em("qs[d] = qb[iq, d] * scale")
                    em("acc[d] = 0.0")
                em("m = ACC(-np.inf)")
                em("l = ACC(0.0)")
                em("cnt = np.int64(0)")

                flush = ("m, l = softmax_chunk(qs, kb, vb, keys, scores, bits, cnt, m, l, acc, "
                         f"dim{_score_args(ctx, 'offs', '0', False)})")
                _emit_keys(head, em, replace(ctx, flush=flush))
                with em.block("if cnt > 0:"):
                    em(flush)
                em("finish_row(ob, lse, b, h, iq, acc, m, l, dim)")


@contextlib.contextmanager
def _kernel_header(em: _Emitter, ctx: Context, backward: bool, doc: list[str]):
    """A kernel's signature and docstring (its summary, then ``doc``); the body goes inside."""
    ndim, idx = ctx.ndim, ctx.kernel
    if backward:
        name = "backward"
        summary = "dq, and dk, dv per split ``dk[s]`` (zero on entry)."
    else:
        name = "forward"
        summary = "out and the log-sum-exp ``lse``."
    args = launch.kernel_args(ndim, backward, ctx.bias, ctx.softcap, ctx.cross)
    with em.block(f"def {name}_{idx}(a):"):
        em(f'"""Kernel {idx}: {summary}')
        em()
        for line in doc:
            em(line)
        em("A cfunc: ``a`` points to " + ", ".join(arg.name for arg in args) + ", packed")
        em("by ``launch.pack``; each thread takes ranges of items until none is left.")
        em('"""')
        launch.emit_unpack(em, args)
        em("dim = HEAD_DIM" if ctx.head_dim else "dim = q.shape[3]")
        for a in range(ndim * ctx.bias):
            em(f"span{a} = 2 * reach{a} + 1")
        yield


def _backward_doc(unit: str) -> list[str]:
    return [f"Item ``w`` is split ``w % splits`` of the {unit} of batch "
            f"``w // (nh * splits)`` and",
            "head ``heads[w // splits % nh]``: it alone writes its dk and dv copy."]


def _emit_backward(head: ir.IR, em: _Emitter, ctx: Context) -> None:
    ndim = ctx.ndim
    tokens = " * ".join(f"n{a}" for a in range(ndim))
    with _backward_kernel(em, ctx, _backward_doc("queries"),
                          lambda em: em(f"tokens = {tokens}"),
                          lambda em: _emit_scratch(em, ctx, ("dqa", "qs", "dos"),
                                                   ("scores", "dps"), True)):
        with em.block("for iq in range(split * tokens // splits, "
                      "(split + 1) * tokens // splits):"):
            em("lse_q = lse[b, h, iq]")
            with em.block("if lse_q == -np.inf:  # no keys, or every score -inf"):
                em("dqb[iq, :] = 0.0")
                em("continue")
            em("delta = ACC(0.0)")
            with em.block("for d in range(dim):"):
                em("delta += dob[iq, d] * ob[iq, d]")
                em("qs[d] = qb[iq, d] * scale")
                em("dos[d] = dob[iq, d]")
                em("dqa[d] = 0.0")
            _unflatten(em, ndim)
            _emit_bias_base(em, ctx, f"i{ndim - 1}")
            _emit_bounds(head, em, ctx)
            em("cnt = np.int64(0)")
            flush = ("backward_chunk(qs, dos, kb, vb, keys, scores, dps, bits, cnt, lse_q, "
                     f"delta, dqa, dkb, dvb, dim{_score_args(ctx, 'offs', '0', True)})")
            _emit_keys(head, em, replace(ctx, flush=flush))
            em(flush)
            with em.block("for d in range(dim):"):
                em("dqb[iq, d] = dqa[d] * scale")


def _emit_tile_setup(head: ir.IR, em: _Emitter, ctx: Context, per_lane) -> None:
    """A tile's lanes: query coordinates, every term's bounds (the last axis per lane), and
    each term's union ``ulo, uhi`` on the last axis; ``per_lane(em)`` loads lane ``u``.

    Lanes past the row's end repeat its last query with empty bounds: they attend nothing.
    """
    ndim, last = ctx.ndim, ctx.ndim - 1
    if ctx.groups:
        _emit_group_base(em, ctx)
    with em.block("for u in range(LANES):"):
        if ctx.groups:
            _emit_group_query(em, ctx)
        else:
            em(f"iq = row * n{last} + min(first + u, n{last} - 1)")
            _unflatten(em, ndim)
        _emit_bounds(head, em, ctx)
        with em.block(f"if first + {_lane_offset(ctx)} >= n{last}:"):
            for t in range(len(head.terms)):
                em(f"lo{t}_{last}[u] = hi{t}_{last}[u] = 0")
        per_lane(em)
    for t in range(len(head.terms)):
        em(f"ulo{t}, uhi{t} = union(lo{t}_{last}, hi{t}_{last}, {_key_extent(ctx, last)})")
    if ctx.columns:
        em("same = " + " and ".join(f"uniform(lo{t}_{last}, hi{t}_{last})"
                                    for t in range(len(head.terms))))


def _width(ctx: Context) -> str:
    """A tile's queries along the last axis: ``WIDTH`` in a tile spanning rows, else all."""
    return "WIDTH" if ctx.groups else "LANES"


def _lane_offset(ctx: Context) -> str:
    """Lane ``u``'s offset along the last axis from the tile's ``first``."""
    return "u % WIDTH" if ctx.groups else "u"


def _emit_group_base(em: _Emitter, ctx: Context) -> None:
    """The first coordinates ``t0..`` of a tile spanning ``G0, G1, ...`` rows, on every axis
    but the last: ``row`` is the flat index of the tile's run of rows. Once per tile, so that
    the lanes' coordinates need no division by the grid's extents."""
    em("rest = row")
    for a in reversed(range(ctx.ndim - 1)):
        em(f"t{a} = rest % (n{a} // G{a}) * G{a}")
        if a:
            em(f"rest = rest // (n{a} // G{a})")


def _emit_group_query(em: _Emitter, ctx: Context) -> None:
    """Lane ``u``'s coordinates ``i0..`` and flat index ``iq`` (kept in ``iqs[u]``) in a tile
    spanning ``G0, G1, ...`` rows from ``t0..`` (:func:`_emit_group_base`): ``u // WIDTH`` is
    the flat index of the lane's row in the run, ``u % WIDTH`` its place along the last axis.
    The kernel reads q and writes out through ``iqs``, so the queries keep their order in
    memory."""
    last = ctx.ndim - 1
    em("off = u // WIDTH")
    for a in reversed(range(last)):
        em(f"i{a} = t{a} + off % G{a}")
        if a:
            em(f"off = off // G{a}")
    em(f"i{last} = min(first + u % WIDTH, n{last} - 1)")
    flat = "i0"
    for a in range(1, ctx.ndim):
        flat = f"{flat} * n{a} + i{a}" if a == 1 else f"({flat}) * n{a} + i{a}"
    em(f"iq = {flat}")
    em("iqs[u] = iq")


def _emit_lane_finish(em: _Emitter, ctx: Context, write) -> None:
    """For each lane inside the grid, ``write(em, index)``: its row's output at the flat
    query ``index``."""
    last = ctx.ndim - 1
    if not ctx.groups:
        with em.block(f"for u in range(min(LANES, n{last} - first)):"):
            write(em, f"row * n{last} + first + u")
        return
    with em.block("for u in range(LANES):"), em.block(f"if first + u % WIDTH < n{last}:"):
        write(em, "iqs[u]")


def _emit_lane_scratch(head: ir.IR, em: _Emitter, ctx: Context, rows, chunks, scalars,
                       alone, backward: bool) -> None:
    """Per-thread scratch: a head_dim row, a key chunk or a value per lane, one chunk for a
    lane-by-lane term (``alone``, when there is one), and the lanes' last-axis bounds."""
    alone = alone if not all(ctx.shares) else ()
    chunk = "(KEY_CHUNK, LANES)" if ctx.columns else "(LANES, KEY_CHUNK)"
    for names, shape in ((rows, "(LANES, dim)"), (chunks, chunk), (scalars, "LANES"),
                         (alone, "KEY_CHUNK")):
        for name in names:
            em(f"{name} = scratch({shape}, ACC)")
    em("keys = scratch(KEY_CHUNK, np.int64)")
    if ctx.groups:
        em("iqs = scratch(LANES, np.int64)")
    if alone:
        em("lkeys = scratch(KEY_CHUNK, np.int64)")
    em(f"bits = scratch({chunk if ctx.columns else 'KEY_CHUNK'}, BITS)")
    _emit_bias_scratch(em, ctx, backward, lanes=True, alone=bool(alone))
    last = ctx.ndim - 1
    for t in range(len(head.terms)):
        em(f"lo{t}_{last} = scratch(LANES, np.int64)")
        em(f"hi{t}_{last} = scratch(LANES, np.int64)")


def _emit_tile_header(em: _Emitter, ctx: Context) -> None:
    """``rows`` (of the outer coordinates, or of their runs of ``G0, G1, ...`` rows) and
    ``per_row``, tiles along the last axis."""
    ndim = ctx.ndim
    if ctx.groups:
        rows = " * ".join(f"(n{a} // G{a})" for a in range(ndim - 1))
    else:
        rows = " * ".join(f"n{a}" for a in range(ndim - 1)) or "1"
    em(f"rows = {rows}")
    em(f"per_row = (n{ndim - 1} + {_width(ctx)} - 1) // {_width(ctx)}")
    em("tiles = rows * per_row")


def _emit_lane_forward(head: ir.IR, em: _Emitter, ctx: Context) -> None:
    spans = ["A tile spans ``G0, G1, ...`` rows of the other axes, whose keys coincide; lane",
             "``u`` runs query ``iqs[u]``."]
    with _kernel_header(em, ctx, False, [
            f"Item ``w`` is a tile of {_width(ctx)} consecutive queries along the last axis (one",
            "``row`` of the others) of batch ``w // (nh * tiles)`` and head",
            "``heads[w // tiles % nh]``. The lanes share each key of a term's union, masked per",
            "lane, except in terms run lane by lane on each lane's own keys.",
            *spans * bool(ctx.groups)]):
        _emit_tile_header(em, ctx)
        _emit_heads(em)
        ctx = replace(ctx, columns=bool(ctx.groups))
        _emit_lane_scratch(head, em, ctx, ("qt", "acc"), ("scores", "mask"),
                           ("m", "l", "top", "check")[:4 if ctx.columns else 2], ("lscores",),
                           False)
        with launch.emit_ranges(em), em.block("for w in range(start, stop):"):
            _emit_item_head(em, "tiles")
            em("row = (w % tiles) // per_row")
            em(f"first = (w % tiles) % per_row * {_width(ctx)}")
            _emit_item_rows(em, ctx, False)

            def per_lane(em):
                with em.block("for d in range(dim):"):
                    em("qt[u, d] = qb[iq, d] * scale")
                    em("acc[u, d] = 0.0")
                em("m[u] = -np.inf")
                em("l[u] = 0.0")

            _emit_tile_setup(head, em, ctx, per_lane)
            _emit_bias_base(em, ctx, "first")
            em("cnt = np.int64(0)")
            if ctx.columns:  # groups exclude a bias table
                flush = ("cols_softmax_chunk(qt, kb, vb, keys, scores, mask, not same, bits, "
                         "cnt, m, l, acc, top, check, dim"
                         f"{', softcap' if ctx.softcap else ''})")
            else:
                flush = ("tile_softmax_chunk(qt, kb, vb, keys, scores, mask, bits, cnt, m, l, "
                         f"acc, dim{_score_args(ctx, 'offs', None, False)})")
            ctx = replace(
                ctx, flush=flush,
                lane_flush=("m[u], l[u] = softmax_chunk(qt[u], kb, vb, lkeys, lscores, "
                            f"{'bits[0]' if ctx.columns else 'bits'}, cnt1, m[u], l[u], acc[u], "
                            f"dim{_score_args(ctx, 'loffs', 'u', False)})"))
            _emit_keys(head, em, ctx)
            with em.block("if cnt > 0:"):
                em(ctx.flush)
            if ctx.columns:
                em(f"finish_lanes(ob, lse, b, h, iqs, acc, m, l, first, WIDTH, n{ctx.ndim - 1}, "
                   "dim)")
            else:
                _emit_lane_finish(em, ctx, lambda em, iq: em(
                    f"finish_row(ob, lse, b, h, {iq}, acc[u], m[u], l[u], dim)"))


def _emit_lane_backward(head: ir.IR, em: _Emitter, ctx: Context) -> None:
    with _backward_kernel(em, ctx, _backward_doc("tiles") + [
            "A key's dk and dv rows are updated once per chunk for all the lanes that hold it."],
            lambda em: _emit_tile_header(em, ctx),
            lambda em: _emit_lane_scratch(head, em, ctx, ("qt", "dot", "dqa"),
                                          ("scores", "dps", "mask"), ("lse_t", "delta"),
                                          ("lscores", "ldps"), True)):
        with em.block("for tile in range(split * tiles // splits, "
                      "(split + 1) * tiles // splits):"):
            em("row = tile // per_row")
            em(f"first = tile % per_row * {_width(ctx)}")

            def per_lane(em):
                em("lse_t[u] = lse[b, h, iq]")
                em("total = ACC(0.0)")
                with em.block("for d in range(dim):"):
                    em("total += dob[iq, d] * ob[iq, d]")
                    em("qt[u, d] = qb[iq, d] * scale")
                    em("dot[u, d] = dob[iq, d]")
                    em("dqa[u, d] = 0.0")
                em("delta[u] = total")

            _emit_tile_setup(head, em, ctx, per_lane)
            _emit_bias_base(em, ctx, "first")
            em("cnt = np.int64(0)")
            ctx = replace(
                ctx, flush=("tile_backward_chunk(qt, dot, kb, vb, keys, scores, dps, mask, "
                            "bits, cnt, lse_t, delta, dqa, dkb, dvb, dim"
                            f"{_score_args(ctx, 'offs', None, True)})"),
                lane_flush=("backward_chunk(qt[u], dot[u], kb, vb, lkeys, lscores, ldps, "
                            "bits, cnt1, lse_t[u], delta[u], dqa[u], dkb, dvb, dim"
                            f"{_score_args(ctx, 'loffs', 'u', True, 'lslopes')})"))
            _emit_keys(head, em, ctx)
            em(ctx.flush)

            def write(em, iq):
                with em.block("for d in range(dim):"):
                    em(f"dqb[{iq}, d] = dqa[u, d] * scale")

            _emit_lane_finish(em, ctx, write)


def _header(dtype: str, bias: bool, softcap: bool, reps, cross: bool = False) -> str:
    adds = " and ".join(["a relative position bias table"] * bias + ["a softcap"] * softcap
                        + ["keys on another grid (extents m0..)"] * cross)
    adds = f", with {adds}" if adds else ""
    lines = [f'"""patterngen numba kernels ({dtype}{adds}).', ""]
    lines.append("Generated by patterngen.backends.numba.source.generate; do not edit. Each")
    lines.append("query's first key and end per term and axis are read from its head's row of")
    lines.append("the table ``bounds`` (source.bounds_table) and the grid's extents n0.. are")
    lines.append("arguments: every pattern of this shape, on any grid, runs these kernels.")
    for index, (head, _) in enumerate(reps):
        lines.append("")
        lines.append(f"Kernel {index}: {len(head.terms)} term(s), key steps per axis "
                     f"{', '.join(map(str, steps(head)))}")
    lines.append('"""')
    return "\n".join(lines)


def generate(node, dtype: str = "float32", lanes: int = 0, shared=None, head_dim: int = 0,
             bias: bool = False, softcap: bool = False, cross: bool = False,
             groups: tuple = ()) -> str:
    """The source of the module that computes ``node``'s attention in ``dtype``.

    Pure and deterministic: the text depends on the pattern's shape (the grid's rank, the
    distinct head patterns, their number of terms and each term's step per axis), ``dtype``,
    ``lanes``, ``shared``, ``head_dim``, ``bias`` and ``softcap`` only, never on the atoms or
    the grid's extents: the kernels read each query's bounds from :func:`bounds_table` and take
    ``n0, n1, ...`` (and the reach ``reach0, reach1, ...``) as arguments.

    Args:
        node: an :class:`~patterngen.ir.IR` or :class:`~patterngen.ir.HeadsIR`.
        dtype: ``"float32"`` or ``"float64"``; scores, softmax and accumulators use it.
        lanes: 0 for one query at a time; ``L >= 2`` for tiles of ``L`` consecutive queries
            along the last axis (:func:`~.tiling.plan_lanes` picks it from the pattern's waste).
        shared: with lanes, per distinct head pattern a bool per term: the lanes share its
            keys (every key of their union, masked per lane) or run it lane by lane on their
            own keys. ``None``: every term shared.
        head_dim: 0 for kernels that take any head_dim; else the only head_dim the kernels
            accept, a constant in their loops (the caller must pass arrays of that head_dim).
        bias: kernels that add a relative position bias table (:mod:`patterngen.bias`) to
            each score by the key's flat table position, and the backward its gradient.
        softcap: kernels that cap scores as ``softcap * tanh(s / softcap)`` before the bias.
        cross: kernels whose keys live on another grid: they take its extents ``m0, m1,
            ...`` after ``n0, n1, ...`` and flatten key coordinates with them.
        groups: with lanes and ``cross``, ``()`` or the rows ``G0, G1, ...`` a tile spans on
            each axis but the last (:func:`~.tiling.plan_groups`; each must divide the grid's
            extent there and its rows must have the same keys): tiles of ``lanes * G0 * G1
            ...`` queries, which read q and write out through their flat query indices.

    Raises:
        PatternError: for an unsupported dtype or an unrecognised IR node.

    Example:
        >>> import patterngen as pg
        >>> src = generate(pg.lower(pg.window(3), (8,)))
        >>> "for p0 in range(lo0_0, hi0_0):" in src
        True
    """
    if dtype not in DTYPES:
        raise PatternError(f"Unsupported dtype={dtype!r} for the numba backend; supported "
                           f"dtypes are {tuple(DTYPES)}.")
    tiling.check_lanes(lanes)
    if not isinstance(head_dim, int) or head_dim < 0:
        raise PatternError(f"numba: head_dim={head_dim!r}; expected 0 (any head_dim) or a "
                           f"positive int.")
    heads = tiling.distinct_heads(node) if lanes else []
    if shared is None:
        shared = tuple((True,) * len(h.terms) for h in heads)
    if lanes and [len(f) for f in shared] != [len(h.terms) for h in heads]:
        raise PatternError(f"numba: shared={shared!r}; expected a tuple of bools per term for "
                           f"each of the {len(heads)} distinct head patterns, with "
                           f"{[len(h.terms) for h in heads]} terms.")
    groups = tuple(groups)
    if groups and not (lanes and cross and not bias and len(groups) == node.grid.ndim - 1):
        raise PatternError(f"numba: groups={groups!r}; expected () or, with lanes and a key "
                           f"grid and without a bias table, one row count per axis but the "
                           f"last ({node.grid.ndim - 1}).")
    em = _Emitter()
    _visit(node, em, Context(lanes=lanes, shared=shared, head_dim=head_dim, bias=bias,
                             softcap=softcap, cross=cross, groups=groups))
    body = em.text().rstrip()
    constants = [f"ACC = {DTYPES[dtype]}",
                 f"QUERY_TILE = {tiling.QUERY_TILE}" if not lanes
                 else f"LANES = {lanes * math.prod(groups)}",
                 *([f"WIDTH = {lanes}"] if groups else []),
                 *(f"G{a} = {g}" for a, g in enumerate(groups)),
                 f"BITS = {_BITS[dtype]}",
                 f"HEAD_DIM = {head_dim}  # 0: any head_dim, read from the arrays",
                 f"KEY_CHUNK = {KEY_CHUNK}"]
    header = _header(dtype, bias, softcap, kernels(node, shared if lanes else None)[0], cross)
    return "\n".join([header, "", *_imports(body), "", *constants, "", "", body, ""])


def _imports(body: str) -> list[str]:
    used = sorted(name for name in _RUNTIME if re.search(rf"\b{name}\(", body))
    return ["import numba", "import numpy as np", "",
            "from patterngen.backends.numba.launch import fetch_add, view",
            "from patterngen.backends.numba.runtime import " + ", ".join(used)]
