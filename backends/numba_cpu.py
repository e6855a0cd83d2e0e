"""Numba CPU backend: attention kernels generated as Python source from the IR, then compiled.

Two stages, kept apart as in finch's ``numba_codegen``:

- :func:`generate` turns an IR into the source text of one module (pure and deterministic: the
  same IR structure and dtype always give the same text). Every term becomes one loop per grid
  axis over that term's key progression, written by :meth:`patterngen.ir.Rel.bounds` on
  :class:`~patterngen.ir.Src` names, so the atoms' constants are folded and no mask is tested
  inside a term. A union visits its terms in order and skips a key when an earlier term
  already holds it, so every key is visited once.
- :func:`load` writes that text to a cache directory, imports it with ``importlib`` (a fresh
  module namespace, with only the imports the text declares) and returns the module, whose
  functions are ``numba.njit(nogil=True, cache=True)``: numba's on-disk cache then survives
  the process. Grid extents are runtime arguments, so a new grid with the same structure reuses
  the compiled kernels. :func:`_run` spreads a kernel's work items over threads.

:class:`NumbaBackend` wraps the kernels in a ``torch.autograd.Function``: forward is an online
softmax over chunks of keys that saves the log-sum-exp; backward recomputes the probabilities
from it (FlashAttention-2: ``D = rowsum(dO * O)``, ``dS = P * (dP - D)``). No tokens x tokens
buffer is ever built. A query without keys outputs zeros and gets zero gradients.

Example:
    >>> import torch, patterngen as pg
    >>> attn = pg.compile(pg.window(3), grid=(8,), backend="numba")
    >>> q = k = v = torch.randn(1, 2, 8, 4)
    >>> attn(q, k, v).shape
    torch.Size([1, 2, 8, 4])
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from patterngen import ir
from patterngen.backends import Backend, register_backend
from patterngen.errors import PatternError
from patterngen.grid import is_number

__all__ = ["NumbaBackend", "generate", "load", "cache_dir"]

log = logging.getLogger(__name__)

#: queries per parallel work item in the forward kernel
QUERY_TILE = 32
#: scores held before an online-softmax rescale; bounds the per-thread scratch
KEY_CHUNK = 128
#: work ranges per thread and kernel call: a thread slowed by another tenant leaves its later
#: ranges to the others (1 to 8 measured the same within 1% on W2/W3 forward)
RANGES_PER_THREAD = 4
#: without ``nnan``/``ninf``: the kernels rely on ``-inf`` for "no key yet"
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})
DTYPES = {"float32": "np.float32", "float64": "np.float64"}
#: head_dims from this one up get kernels compiled for their head_dim, loops of constant length
#: (W2 forward/backward, one thread: 0.87/0.92 of the time at 64, 0.94/0.97 at 48; at 32 a
#: prototype made the backward twice as slow, so smaller head_dims share generic kernels)
SPECIALISED_HEAD_DIM = 48


# --------------------------------------------------------------------------------------------
# generate: IR -> source text


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


def _visit(node, em: _Emitter, ctx: dict) -> None:
    """Emit ``node``: the structural walk of the generator (one case per IR node)."""
    match node:
        case ir.HeadsIR() | ir.IR():
            ctx["ndim"] = node.grid.ndim
            forward, backward = ((_emit_lane_forward, _emit_lane_backward) if ctx["lanes"]
                                 else (_emit_forward, _emit_backward))
            for index, head in enumerate(_distinct_heads(node)):
                ctx["kernel"] = index
                ctx["shares"] = ctx["shared"][index] if ctx["lanes"] else ()
                ctx["runs"] = True  # see _emit_run
                forward(head, em, ctx)
                em()
                em()
                ctx["runs"] = False
                backward(head, em, ctx)
                em()
                em()
                for direction in ("forward", "backward"):
                    args = _kernel_args(node.grid.ndim, direction == "backward")
                    em.lines.append(_openmp_source(f"{direction}_{index}", args))
                    em()
                    em()
        case ir.Term():
            _emit_term_loops(node, em, ctx)
        case ir.Rel():
            a, t = ctx["axis"], ctx["term"]
            start, stop = node.bounds(ir.Src(f"i{a}"), ir.Src(f"n{a}"), ir.SOURCE_OPS)
            lane = _lane(ctx, a)
            em(f"lo{t}_{a}{lane} = {start}")
            em(f"hi{t}_{a}{lane} = {stop}")
        case _:
            raise PatternError(f"Unrecognized node {node!r} of type {type(node).__name__}; "
                               f"the numba generator handles IR, HeadsIR, Term and Rel.")


def _distinct_heads(node) -> list:
    out = []
    for head in node.per_head:
        if head.terms not in [h.terms for h in out]:
            out.append(head)
    return out


def _emit_bounds(head: ir.IR, em: _Emitter, ctx: dict) -> None:
    """Per query, every term's per-axis ``[lo, hi)``: loops and membership tests read them."""
    for t, term in enumerate(head.terms):
        for a, rel in enumerate(term.rels):
            ctx["axis"], ctx["term"] = a, t
            _visit(rel, em, ctx)


def _lane(ctx: dict, a: int) -> str:
    """``[u]`` where axis ``a``'s bounds are held per query lane (the last axis of a tile)."""
    return "[u]" if ctx.get("lanes") and a == ctx["ndim"] - 1 else ""


def _member(t: int, a: int, rel: ir.Rel, lane: str = "") -> str:
    lo, hi = f"lo{t}_{a}{lane}", f"hi{t}_{a}{lane}"
    test = f"{lo} <= p{a} < {hi}"
    step = rel.step
    return test if step == 1 else f"{test} and (p{a} - {lo}) % {step} == 0"


def _emit_term_loops(term: ir.Term, em: _Emitter, ctx: dict) -> None:
    """One loop per axis over term ``ctx['term']``'s keys, each key buffered.

    Keys held by an earlier term are skipped: the earlier term's membership on axis ``a`` is
    known once ``p0..pa`` are, so it is computed at that loop depth and tested at the last.
    """
    t, earlier, last = ctx["term"], ctx["terms"][:ctx["term"]], len(term.rels) - 1
    lanes = ctx.get("lanes")
    shared = lanes and ctx["shares"][t]
    keys, cnt, flush = ("lkeys", "cnt1", ctx["lane_flush"]) if lanes else ("keys", "cnt",
                                                                           ctx["flush"])
    with contextlib.ExitStack() as scopes:
        if lanes and not shared:  # lane by lane, each on its own keys, flushed on its own
            scopes.enter_context(em.block("for u in range(LANES):"))
            em("cnt1 = 0")
            scopes.callback(_emit_lane_flush, em, ctx)
        for a, rel in enumerate(term.rels):
            lane = _lane(ctx, a)
            if shared and a == last:  # every key of the tile's union; a mask per query lane
                header = f"for p{a} in range(ulo{t}, uhi{t}):"
            else:
                step = f", {rel.step}" if rel.step != 1 else ""
                header = f"for p{a} in range(lo{t}_{a}{lane}, hi{t}_{a}{lane}{step}):"
            if a == last and ctx["runs"] and not shared and not earlier and rel.step == 1:
                _emit_run(em, a, f"lo{t}_{a}{lane}", f"hi{t}_{a}{lane}", keys, cnt)
                scopes.enter_context(em.block("else:"))
            scopes.enter_context(em.block(header))
            em(f"k{a} = p{a}" if a == 0 else f"k{a} = k{a - 1} * n{a} + p{a}")
            tests = []
            for u, other in enumerate(earlier):
                prev = f"c{u}_{a - 1} and " if a else ""
                tests.append(f"{prev}{_member(u, a, other.rels[a], lane)}")
                if a < last:
                    em(f"c{u}_{a} = {tests[-1]}")
            if a == last and shared:
                em(f"keys[cnt] = k{last}")
                with em.block("for u in range(LANES):"):
                    held = _member(t, a, rel, "[u]")
                    if tests:
                        held = f"({held}) and not (" + " or ".join(f"({x})" for x in tests) + ")"
                    em(f"mask[u, cnt] = 0.0 if {held} else -np.inf")
                em("cnt += 1")
                with em.block("if cnt == KEY_CHUNK:"):
                    em(ctx["flush"])
                    em("cnt = 0")
            elif a == last and tests:
                with em.block("if " + " or ".join(f"({x})" for x in tests) + ":"):
                    em("continue")
        if not shared:
            _emit_collect(em, f"k{last}", flush, keys, cnt)


def _emit_run(em: _Emitter, a: int, lo: str, hi: str, keys: str, cnt: str) -> None:
    """A run of consecutive keys on the last axis, buffered in one loop that LLVM vectorises
    when the buffer has room for all of it; else key by key. Forward only: interleaved, medians
    of 12, forward W2 0.96x, W4 0.88x, W5 0.96x the time, backward W2 1.05x."""
    em(f"run = {hi} - {lo}")
    with em.block(f"if run > 0 and {cnt} + run <= KEY_CHUNK:"):
        start = f"k{a - 1} * n{a} + {lo}" if a else lo
        em(f"first_key = {start} - {cnt}")
        with em.block(f"for p{a} in range({cnt}, {cnt} + run):"):
            em(f"{keys}[p{a}] = first_key + p{a}")
        em(f"{cnt} += run")


def _emit_lane_flush(em: _Emitter, ctx: dict) -> None:
    """After a lane-by-lane term's loops, still inside the loop over lanes."""
    with em.block("if cnt1 > 0:"):
        em(ctx["lane_flush"])


def _emit_keys(head: ir.IR, em: _Emitter, ctx: dict) -> None:
    ctx["terms"] = head.terms
    for t, term in enumerate(head.terms):
        ctx["term"] = t
        alone = " lane by lane," if ctx.get("lanes") and not ctx["shares"][t] else ""
        em(f"# term {t}:{alone} {term!r}" + (" (keys of earlier terms skipped)" if t else ""))
        _visit(term, em, ctx)


def _emit_collect(em: _Emitter, key: str, flush: str, keys="keys", cnt="cnt") -> None:
    """The innermost statement of every term: buffer the key; a full buffer is processed.

    Scores are computed in the chunk helpers, four keys at a time, not here: one key per
    pass over ``q`` is a horizontal reduction per pair and was the slowest loop.
    """
    em(f"{keys}[{cnt}] = {key}")
    em(f"{cnt} += 1")
    with em.block(f"if {cnt} == KEY_CHUNK:"):
        em(flush)
        em(f"{cnt} = 0")


def _emit_forward(head: ir.IR, em: _Emitter, ctx: dict) -> None:
    ndim = ctx["ndim"]
    tokens = " * ".join(f"n{a}" for a in range(ndim))
    with _kernel_header(em, ctx, False, [
            "Item ``w`` is a tile of QUERY_TILE queries of batch ``w // (nh * tiles)`` and head",
            "``heads[w // tiles % nh]``; the caller runs disjoint ranges on several threads."]):
        em("dim = HEAD_DIM or q.shape[3]")
        em(f"tokens = {tokens}")
        em("tiles = (tokens + QUERY_TILE - 1) // QUERY_TILE")
        em("nh = heads.shape[0]")
        with em.block("for w in range(start, stop):"):
            em("b = w // (nh * tiles)")
            em("h = heads[(w // tiles) % nh]")
            em("first = (w % tiles) * QUERY_TILE")
            em("qb, kb, vb, ob = q[b, h], k[b, h], v[b, h], out[b, h]")
            em("qs = np.empty(dim, ACC)")
            em("acc = np.empty(dim, ACC)")
            em("scores = np.empty(KEY_CHUNK, ACC)")
            em("keys = np.empty(KEY_CHUNK, np.int64)")
            em("bits = np.empty(KEY_CHUNK, BITS)")
            with em.block("for iq in range(first, min(first + QUERY_TILE, tokens)):"):
                _unflatten(em, ndim)
                _emit_bounds(head, em, ctx)
                with em.block("for d in range(dim):"):
                    em("qs[d] = qb[iq, d] * scale")
                    em("acc[d] = 0.0")
                em("m = ACC(-np.inf)")
                em("l = ACC(0.0)")
                em("cnt = 0")

                flush = "m, l = _softmax_chunk(qs, kb, vb, keys, scores, bits, cnt, m, l, acc)"
                ctx["flush"] = flush
                _emit_keys(head, em, ctx)
                with em.block("if cnt > 0:"):
                    em(flush)
                em("_finish_row(ob, lse, b, h, iq, acc, m, l)")


def _kernel_args(ndim: int, backward: bool) -> list[tuple[str, object]]:
    """A kernel's arguments before ``start, stop``: ``(name, rank)`` for an array, ``(name,
    "int")`` or ``(name, "real")`` for a scalar (the trampolines of ``_openmp`` unpack them)."""
    inputs = ["q", "k", "v", "out", "dout"] if backward else ["q", "k", "v"]
    return ([(x, 4) for x in inputs] + [("lse", 3)] * backward + [("scale", "real")]
            + [(f"n{a}", "int") for a in range(ndim)] + [("heads", 1)]
            + ([("dq", 4), ("dk", 5), ("dv", 5)] if backward else [("out", 4), ("lse", 3)]))


def _openmp_source(name: str, args: list[tuple[str, object]]) -> str:
    """Source of ``{name}_team(a)``: unpack the arguments ``_openmp.launch`` packed for kernel
    ``name`` and run its work ranges until the shared counter passes the last one.

    ``args`` is the kernel's argument list without ``start, stop``: ``(name, rank)`` for a
    C-contiguous array (``heads`` is int64, the others of type ``ACC``), ``(name, "int")`` or
    ``(name, "real")`` for a scalar, in the kernel's order.
    """
    body, slot, pointer, real = [], 3, 2, 0
    for arg, kind in args:
        if kind == "int":
            body.append(f"    {arg} = ints[{slot}]")
            slot += 1
        elif kind == "real":
            body.append(f"    {arg} = reals[{real}]")
            real += 1
        else:
            shape = ", ".join(f"ints[{slot + i}]" for i in range(kind))
            dtype = "np.int64" if arg == "heads" else "ACC"
            body.append(f"    {arg} = numba.carray(a[{pointer}], ({shape},), {dtype})")
            slot, pointer = slot + kind, pointer + 1
    names = ", ".join(arg for arg, _ in args)
    return "\n".join([
        f"def {name}_team(a):",
        f'    """Work ranges of {name} on every thread of an OpenMP team (a ``cfunc``)."""',
        f"    ints = numba.carray(a[0], {slot}, np.int64)",
        f"    reals = numba.carray(a[1], {max(real, 1)}, ACC)",
        *body,
        "    parts, items = ints[1], ints[2]",
        "    j = fetch_add(a[0], 1)",
        "    while j < parts:",
        f"        {name}({names}, items * j // parts, items * (j + 1) // parts)",
        "        j = fetch_add(a[0], 1)"])


@contextlib.contextmanager
def _kernel_header(em: _Emitter, ctx: dict, backward: bool, doc: list[str]):
    """A kernel's signature and docstring (its summary, then ``doc``); the body goes inside."""
    ndim, idx = ctx["ndim"], ctx["kernel"]
    if backward:
        name = "backward"
        summary = ("dq, and dk, dv per split ``dk[s]`` (zero on entry), of items "
                   "``start..stop``.")
    else:
        name = "forward"
        summary = "out and log-sum-exp of work items ``start..stop``."
    args = ", ".join(arg for arg, _ in _kernel_args(ndim, backward))
    em("@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)")
    with em.block(f"def {name}_{idx}({args}, start, stop):"):
        em(f'"""Pattern {idx}: {summary}')
        em()
        for line in doc:
            em(line)
        em('"""')
        yield


def _backward_doc(unit: str) -> list[str]:
    return [f"Item ``w`` is split ``w % splits`` of the {unit} of batch ``w // (nh * splits)`` and",
            "head ``heads[w // splits % nh]``: it alone writes its dk and dv copy."]


def _emit_backward(head: ir.IR, em: _Emitter, ctx: dict) -> None:
    ndim = ctx["ndim"]
    tokens = " * ".join(f"n{a}" for a in range(ndim))
    with _kernel_header(em, ctx, True, _backward_doc("queries")):
        em("dim, splits = HEAD_DIM or q.shape[3], dk.shape[0]")
        em(f"tokens = {tokens}")
        em("nh = heads.shape[0]")
        with em.block("for w in range(start, stop):"):
            em("b = w // (nh * splits)")
            em("h = heads[(w // splits) % nh]")
            em("split = w % splits")
            em("qb, kb, vb, ob, dob = q[b, h], k[b, h], v[b, h], out[b, h], dout[b, h]")
            em("dqb, dkb, dvb = dq[b, h], dk[split, b, h], dv[split, b, h]")
            em("dqa = np.empty(dim, ACC)")
            em("qs = np.empty(dim, ACC)")
            em("dos = np.empty(dim, ACC)")
            em("scores = np.empty(KEY_CHUNK, ACC)")
            em("dps = np.empty(KEY_CHUNK, ACC)")
            em("keys = np.empty(KEY_CHUNK, np.int64)")
            em("bits = np.empty(KEY_CHUNK, BITS)")
            with em.block("for iq in range(split * tokens // splits, "
                          "(split + 1) * tokens // splits):"):
                em("lse_q = lse[b, h, iq]")
                with em.block("if lse_q == np.inf:"):
                    em("dqb[iq, :] = 0.0")
                    em("continue")
                em("delta = ACC(0.0)")
                with em.block("for d in range(dim):"):
                    em("delta += dob[iq, d] * ob[iq, d]")
                    em("qs[d] = qb[iq, d] * scale")
                    em("dos[d] = dob[iq, d]")
                    em("dqa[d] = 0.0")
                _unflatten(em, ndim)
                _emit_bounds(head, em, ctx)
                em("cnt = 0")
                flush = ("_backward_chunk(qs, dos, kb, vb, keys, scores, dps, bits, cnt, lse_q, "
                         "delta, dqa, dkb, dvb)")
                ctx["flush"] = flush
                _emit_keys(head, em, ctx)
                em(flush)
                with em.block("for d in range(dim):"):
                    em("dqb[iq, d] = dqa[d] * scale")


def _emit_tile_setup(head: ir.IR, em: _Emitter, ctx: dict, per_lane) -> None:
    """A tile's lanes: query coordinates, every term's bounds (the last axis per lane), and
    each term's union ``ulo, uhi`` on the last axis; ``per_lane(em)`` loads lane ``u``.

    Lanes past the row's end repeat its last query with empty bounds: they attend nothing.
    """
    ndim, last = ctx["ndim"], ctx["ndim"] - 1
    with em.block("for u in range(LANES):"):
        em(f"iq = row * n{last} + min(first + u, n{last} - 1)")
        _unflatten(em, ndim)
        _emit_bounds(head, em, ctx)
        with em.block(f"if first + u >= n{last}:"):
            for t in range(len(head.terms)):
                em(f"lo{t}_{last}[u] = hi{t}_{last}[u] = 0")
        per_lane(em)
    for t in range(len(head.terms)):
        em(f"ulo{t}, uhi{t} = _union(lo{t}_{last}, hi{t}_{last}, n{last})")


def _emit_lane_scratch(head: ir.IR, em: _Emitter, ctx: dict, rows, chunks, scalars,
                       alone) -> None:
    """Per-thread scratch: a head_dim row, a key chunk or a value per lane, one chunk for a
    lane-by-lane term (``alone``, when there is one), and the lanes' last-axis bounds."""
    alone = alone if not all(ctx["shares"]) else ()
    for names, shape in ((rows, "(LANES, dim)"), (chunks, "(LANES, KEY_CHUNK)"),
                         (scalars, "LANES"), (alone, "KEY_CHUNK")):
        for name in names:
            em(f"{name} = np.empty({shape}, ACC)")
    em("keys = np.empty(KEY_CHUNK, np.int64)")
    if alone:
        em("lkeys = np.empty(KEY_CHUNK, np.int64)")
    em("bits = np.empty(KEY_CHUNK, BITS)")
    last = ctx["ndim"] - 1
    for t in range(len(head.terms)):
        em(f"lo{t}_{last} = np.empty(LANES, np.int64)")
        em(f"hi{t}_{last} = np.empty(LANES, np.int64)")


def _emit_tile_header(em: _Emitter, ctx: dict) -> None:
    """``row`` (flat index of the outer coordinates) and ``first`` (last-axis start)."""
    ndim = ctx["ndim"]
    rows = " * ".join(f"n{a}" for a in range(ndim - 1)) or "1"
    em(f"rows = {rows}")
    em(f"per_row = (n{ndim - 1} + LANES - 1) // LANES")
    em("tiles = rows * per_row")


def _emit_lane_forward(head: ir.IR, em: _Emitter, ctx: dict) -> None:
    last = ctx["ndim"] - 1
    with _kernel_header(em, ctx, False, [
            "Item ``w`` is a tile of LANES consecutive queries along the last axis (one",
            "``row`` of the others) of batch ``w // (nh * tiles)`` and head",
            "``heads[w // tiles % nh]``. The lanes share each key of a term's union, masked per",
            "lane, except in terms run lane by lane on each lane's own keys."]):
        em("dim = HEAD_DIM or q.shape[3]")
        _emit_tile_header(em, ctx)
        em("nh = heads.shape[0]")
        _emit_lane_scratch(head, em, ctx, ("qt", "acc"), ("scores", "mask"), ("m", "l"),
                           ("lscores",))
        with em.block("for w in range(start, stop):"):
            em("b = w // (nh * tiles)")
            em("h = heads[(w // tiles) % nh]")
            em("row = (w % tiles) // per_row")
            em("first = (w % tiles) % per_row * LANES")
            em("qb, kb, vb, ob = q[b, h], k[b, h], v[b, h], out[b, h]")

            def per_lane(em):
                with em.block("for d in range(dim):"):
                    em("qt[u, d] = qb[iq, d] * scale")
                    em("acc[u, d] = 0.0")
                em("m[u] = -np.inf")
                em("l[u] = 0.0")

            _emit_tile_setup(head, em, ctx, per_lane)
            em("cnt = 0")
            ctx["flush"] = "_tile_softmax_chunk(qt, kb, vb, keys, scores, mask, bits, cnt, m, l, acc)"
            ctx["lane_flush"] = ("m[u], l[u] = _softmax_chunk(qt[u], kb, vb, lkeys, lscores, bits, "
                                 "cnt1, m[u], l[u], acc[u])")
            _emit_keys(head, em, ctx)
            with em.block("if cnt > 0:"):
                em(ctx["flush"])
            with em.block(f"for u in range(min(LANES, n{last} - first)):"):
                em(f"_finish_row(ob, lse, b, h, row * n{last} + first + u, acc[u], m[u], l[u])")


def _emit_lane_backward(head: ir.IR, em: _Emitter, ctx: dict) -> None:
    last = ctx["ndim"] - 1
    with _kernel_header(em, ctx, True, _backward_doc("tiles") + [
            "A key's dk and dv rows are updated once per chunk for all the lanes that hold it."]):
        em("dim, splits = HEAD_DIM or q.shape[3], dk.shape[0]")
        _emit_tile_header(em, ctx)
        em("nh = heads.shape[0]")
        _emit_lane_scratch(head, em, ctx, ("qt", "dot", "dqa"), ("scores", "dps", "mask"),
                           ("lse_t", "delta"), ("lscores", "ldps"))
        with em.block("for w in range(start, stop):"):
            em("b = w // (nh * splits)")
            em("h = heads[(w // splits) % nh]")
            em("split = w % splits")
            em("qb, kb, vb, ob, dob = q[b, h], k[b, h], v[b, h], out[b, h], dout[b, h]")
            em("dqb, dkb, dvb = dq[b, h], dk[split, b, h], dv[split, b, h]")
            with em.block("for tile in range(split * tiles // splits, "
                          "(split + 1) * tiles // splits):"):
                em("row = tile // per_row")
                em("first = tile % per_row * LANES")

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
                em("cnt = 0")
                ctx["flush"] = ("_tile_backward_chunk(qt, dot, kb, vb, keys, scores, dps, mask, "
                                "bits, cnt, lse_t, delta, dqa, dkb, dvb)")
                ctx["lane_flush"] = ("_backward_chunk(qt[u], dot[u], kb, vb, lkeys, lscores, ldps, "
                                     "bits, cnt1, lse_t[u], delta[u], dqa[u], dkb, dvb)")
                _emit_keys(head, em, ctx)
                em(ctx["flush"])
                with em.block(f"for u in range(min(LANES, n{last} - first)):"):
                    with em.block("for d in range(dim):"):
                        em(f"dqb[row * n{last} + first + u, d] = dqa[u, d] * scale")


# helpers of every generated module, as text: the module stays self-contained
_HELPERS = '''\
@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _dots(x, rows, keys, cnt, out):
    \"\"\"``out[c] = x . rows[keys[c]]``, four keys per pass: one load of ``x`` serves four.\"\"\"
    dim = HEAD_DIM or x.shape[0]
    c = 0
    while c + 4 <= cnt:
        k0, k1, k2, k3 = keys[c], keys[c + 1], keys[c + 2], keys[c + 3]
        s0 = s1 = s2 = s3 = ACC(0.0)
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
        s0 = ACC(0.0)
        for d in range(dim):
            s0 += x[d] * rows[k0, d]
        out[c] = s0
        c += 1


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _pv(p, rows, keys, cnt, acc):
    \"\"\"``acc += sum_c p[c] rows[keys[c]]``, four keys per pass: a quarter of acc's traffic.\"\"\"
    dim = HEAD_DIM or acc.shape[0]
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


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _finish_row(ob, lse, b, h, iq, acc, m, l):
    \"\"\"Normalise one output row; a query without keys gets zeros and ``lse = +inf``.\"\"\"
    if l > 0.0:
        inv = ACC(1.0) / l
        for d in range(HEAD_DIM or acc.shape[0]):
            ob[iq, d] = acc[d] * inv
        lse[b, h, iq] = m + math.log(l)
    else:
        ob[iq, :] = 0.0
        lse[b, h, iq] = np.inf
'''

# one query at a time
_QUERY_HELPERS = '''\
@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _softmax_chunk(qs, kb, vb, keys, scores, bits, cnt, m, l, acc):
    \"\"\"Fold ``cnt`` keys into the running max ``m``, sum ``l`` and output ``acc``.\"\"\"
    _dots(qs, kb, keys, cnt, scores)
    top = m
    for c in range(cnt):
        top = max(top, scores[c])
    alpha = math.exp(m - top)
    l *= alpha
    dim = HEAD_DIM or acc.shape[0]
    for d in range(dim):
        acc[d] *= alpha
    _exp_shifted(scores, bits, cnt, top)
    for c in range(cnt):
        l += scores[c]
    _pv(scores, vb, keys, cnt, acc)
    return top, l


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _backward_chunk(qs, dos, kb, vb, keys, scores, dps, bits, cnt, lse_q, delta, dqa, dkb, dvb):
    \"\"\"Gradients of ``cnt`` keys of one query: ``P = exp(S - lse)``, ``dS = P (dP - D)``.

    ``qs`` is the query already scaled, so ``dk += dS q scale``; the caller scales ``dqa``.
    \"\"\"
    _dots(qs, kb, keys, cnt, scores)
    _dots(dos, vb, keys, cnt, dps)
    _exp_shifted(scores, bits, cnt, lse_q)
    dim = HEAD_DIM or dqa.shape[0]
    for c in range(cnt):
        p, key = scores[c], keys[c]
        ds = p * (dps[c] - delta)
        for d in range(dim):
            dqa[d] += ds * kb[key, d]
        for d in range(dim):
            dkb[key, d] += ds * qs[d]
        for d in range(dim):
            dvb[key, d] += p * dos[d]
'''

# tiles of LANES queries that share keys
_LANE_HELPERS = '''\
@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _union(lo, hi, n):
    \"\"\"The smallest range holding every lane's non-empty ``[lo, hi)``; ``(0, 0)`` if none.\"\"\"
    start, stop = n, 0
    for u in range(lo.shape[0]):
        if lo[u] < hi[u]:
            start = min(start, lo[u])
            stop = max(stop, hi[u])
    return min(start, stop), stop


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _tile_dots(x, rows, keys, cnt, out):
    \"\"\"``out[u, c] = x[u] . rows[keys[c]]`` in blocks of 2 lanes x 4 keys held in registers.\"\"\"
    lanes, dim = x.shape[0], HEAD_DIM or x.shape[1]
    u = 0
    while u + 2 <= lanes:
        c = 0
        while c + 4 <= cnt:
            k0, k1, k2, k3 = keys[c], keys[c + 1], keys[c + 2], keys[c + 3]
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = ACC(0.0)
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
            out[u + 1, c], out[u + 1, c + 1], out[u + 1, c + 2], out[u + 1, c + 3] = b0, b1, b2, b3
            c += 4
        while c < cnt:
            k0 = keys[c]
            a0 = b0 = ACC(0.0)
            for d in range(dim):
                a0 += x[u, d] * rows[k0, d]
                b0 += x[u + 1, d] * rows[k0, d]
            out[u, c], out[u + 1, c] = a0, b0
            c += 1
        u += 2
    if u < lanes:
        _dots(x[u], rows, keys, cnt, out[u])


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _tile_pv(p, rows, keys, cnt, acc):
    \"\"\"``acc[u] += sum_c p[u, c] rows[keys[c]]``, 2 lanes x 4 keys per pass.\"\"\"
    lanes, dim = acc.shape[0], HEAD_DIM or acc.shape[1]
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
        _pv(p[u], rows, keys, cnt, acc[u])


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _tile_scatter(p, x, keys, cnt, dst):
    \"\"\"``dst[keys[c]] += sum_u p[u, c] x[u]``: each key's row is updated once for all lanes.\"\"\"
    lanes, dim = x.shape[0], HEAD_DIM or x.shape[1]
    for c in range(cnt):
        key = keys[c]
        u = 0
        while u + 4 <= lanes:
            p0, p1, p2, p3 = p[u, c], p[u + 1, c], p[u + 2, c], p[u + 3, c]
            for d in range(dim):
                dst[key, d] += p0 * x[u, d] + p1 * x[u + 1, d] + p2 * x[u + 2, d] + p3 * x[u + 3, d]
            u += 4
        while u < lanes:
            p0 = p[u, c]
            for d in range(dim):
                dst[key, d] += p0 * x[u, d]
            u += 1


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _tile_softmax_chunk(qt, kb, vb, keys, scores, mask, bits, cnt, m, l, acc):
    \"\"\"Fold ``cnt`` keys into every lane's running max, sum and output; ``mask`` is 0 where
    the lane holds the key, ``-inf`` where not (its probability is then exactly 0).\"\"\"
    _tile_dots(qt, kb, keys, cnt, scores)
    lanes, dim = acc.shape[0], HEAD_DIM or acc.shape[1]
    for u in range(lanes):
        top = m[u]
        for c in range(cnt):
            scores[u, c] += mask[u, c]
        for c in range(cnt):
            top = max(top, scores[u, c])
        shift = top if top > -np.inf else ACC(0.0)
        alpha = math.exp(m[u] - shift)
        m[u] = top
        _exp_shifted(scores[u], bits, cnt, shift)
        total = l[u] * alpha
        for c in range(cnt):
            total += scores[u, c]
        l[u] = total
        for d in range(dim):
            acc[u, d] *= alpha
    _tile_pv(scores, vb, keys, cnt, acc)


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _tile_backward_chunk(qt, dot, kb, vb, keys, scores, dps, mask, bits, cnt, lse_t, delta, dqa,
                         dkb, dvb):
    \"\"\"Gradients of ``cnt`` keys for every lane: ``P = exp(S - lse)``, ``dS = P (dP - D)``.\"\"\"
    _tile_dots(qt, kb, keys, cnt, scores)
    _tile_dots(dot, vb, keys, cnt, dps)
    for u in range(qt.shape[0]):
        for c in range(cnt):
            scores[u, c] += mask[u, c]
        _exp_shifted(scores[u], bits, cnt, lse_t[u])
        for c in range(cnt):
            dps[u, c] = scores[u, c] * (dps[u, c] - delta[u])
    _tile_pv(dps, kb, keys, cnt, dqa)
    _tile_scatter(dps, qt, keys, cnt, dkb)
    _tile_scatter(scores, dot, keys, cnt, dvb)
'''

# exp(x - top) in place over a chunk, by dtype: float32 takes a polynomial that vectorises
# (numba has no vector exp without SVML); float64 keeps math.exp for full precision
_EXP = {
    "float32": '''\
@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _exp_shifted(x, bits, cnt, top):
    \"\"\"``x[c] = exp(x[c] - top)``: 2**n from exponent bits, 2**f by Taylor on |f| <= 1/2.

    Below 2**-127 the exponent bits are 0, so ``-inf`` (a masked key) gives exactly 0.
    \"\"\"
    scale = bits.view(np.float32)
    for c in range(cnt):
        t = max((x[c] - top) * np.float32(1.4426950408889634), np.float32(-127.0))
        n = np.floor(t + np.float32(0.5))
        f = (t - n) * np.float32(0.6931471805599453)
        x[c] = np.float32(1.0) + f * (np.float32(1.0) + f * (np.float32(0.5) + f * (
            np.float32(1.0 / 6) + f * (np.float32(1.0 / 24) + f * (
                np.float32(1.0 / 120) + f * np.float32(1.0 / 720))))))
        bits[c] = (np.int32(n) + np.int32(127)) << np.int32(23)
    for c in range(cnt):
        x[c] *= scale[c]
''',
    "float64": '''\
@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _exp_shifted(x, bits, cnt, top):
    \"\"\"``x[c] = exp(x[c] - top)``.\"\"\"
    for c in range(cnt):
        x[c] = math.exp(x[c] - top)
''',
}
_BITS = {"float32": "np.int32", "float64": "np.int64"}


def _header(node, dtype: str) -> str:
    lines = [f'"""patterngen numba kernels for {node.label or "?"} ({dtype}).', ""]
    lines.append("Generated by patterngen.backends.numba_cpu.generate; do not edit. Grid extents")
    lines.append("n0.. are runtime arguments: any grid with this structure reuses these kernels.")
    for index, head in enumerate(_distinct_heads(node)):
        lines.append("")
        lines.append(f"Pattern {index}: {head.label or '?'}")
        for t, term in enumerate(head.terms):
            lines.append(f"    term {t}: {term!r}")
    if isinstance(node, ir.HeadsIR):
        lines.append("")
        lines.append(f"Head h uses pattern {_head_map(node)}[h % {len(node.heads)}].")
    lines.append('"""')
    return "\n".join(lines) + "\n"


def _head_map(node) -> list[int]:
    """Index of each listed head's kernel in :func:`_distinct_heads`."""
    distinct = [h.terms for h in _distinct_heads(node)]
    return [distinct.index(h.terms) for h in node.per_head]


def _check_lanes(lanes, allow_none: bool = False) -> None:
    if lanes is None and allow_none:
        return
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 0 or lanes == 1:
        raise PatternError(f"numba: lanes={lanes!r}; expected 0 (one query at a time) or an "
                           f"int >= 2 (queries per tile).")


def generate(node, dtype: str = "float32", lanes: int = 0, shared=None, head_dim: int = 0) -> str:
    """The source of the module that computes ``node``'s attention in ``dtype``.

    Pure and deterministic: the text depends on the IR's terms, ``dtype``, ``lanes``,
    ``shared`` and ``head_dim`` only, never on the grid's extents, which the kernels take as
    arguments ``n0, n1, ...``.

    Args:
        node: an :class:`~patterngen.ir.IR` or :class:`~patterngen.ir.HeadsIR`.
        dtype: ``"float32"`` or ``"float64"``; scores, softmax and accumulators use it.
        lanes: 0 for one query at a time; ``L >= 2`` for tiles of ``L`` consecutive queries
            along the last axis (:func:`plan_lanes` picks it from the pattern's waste).
        shared: with lanes, per distinct head pattern a bool per term: the lanes share its
            keys (every key of their union, masked per lane) or run it lane by lane on their
            own keys. ``None``: every term shared.
        head_dim: 0 for kernels that take any head_dim; else the only head_dim the kernels
            accept, a constant in their loops (the caller must pass arrays of that head_dim).

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
    _check_lanes(lanes)
    if not isinstance(head_dim, int) or head_dim < 0:
        raise PatternError(f"numba: head_dim={head_dim!r}; expected 0 (any head_dim) or a "
                           f"positive int.")
    heads = _distinct_heads(node) if lanes else []
    if shared is None:
        shared = tuple((True,) * len(h.terms) for h in heads)
    if lanes and [len(f) for f in shared] != [len(h.terms) for h in heads]:
        raise PatternError(f"numba: shared={shared!r}; expected a tuple of bools per term for "
                           f"each of the {len(heads)} distinct head patterns, with "
                           f"{[len(h.terms) for h in heads]} terms.")
    em = _Emitter()
    em("import math")
    em()
    em("import numba")
    em("import numpy as np")
    em()
    em("from patterngen.backends._openmp import fetch_add")
    em()
    em(f"ACC = {DTYPES[dtype]}")
    em(f"QUERY_TILE = {QUERY_TILE}" if not lanes else f"LANES = {lanes}")
    em(f"BITS = {_BITS[dtype]}")
    em(f"HEAD_DIM = {head_dim}  # 0: any head_dim, read from the arrays")
    em(f"KEY_CHUNK = {KEY_CHUNK}")
    em("FASTMATH = {" + ", ".join(repr(f) for f in sorted(FASTMATH)) + "}")
    em()
    em()
    alone = not lanes or not all(map(all, shared))
    em.lines.append("\n\n".join([_HELPERS] + [_QUERY_HELPERS] * alone + [_LANE_HELPERS] * bool(lanes)))
    em()
    em()
    em.lines.append(_EXP[dtype])
    em()
    _visit(node, em, {"lanes": lanes, "shared": shared})
    return _header(node, dtype) + "\n" + em.text().rstrip() + "\n"


#: tile widths tried by :func:`plan_lanes`, beside the last axis's block sizes up to 16
LANE_CHOICES = (8, 4)
#: a term is shared by a tile's lanes when at least this share of the pairs it computes is
#: attended; else each lane runs it on its own keys
LANE_MIN_EFFICIENCY = 0.8
#: cost of a pair computed for a tile, relative to a pair of the one-query kernel (measured,
#: forward: W1 at 8 lanes 0.82, W3 at 7 lanes 0.83, W2 forced to 8 lanes 0.64)
LANE_PAIR_COST = 0.8


def _shared_pairs(term: ir.Term, shape, lanes: int) -> int:
    """Pairs that tiles of ``lanes`` queries compute for ``term`` when the lanes share it.

    Separable, never tokens x tokens: a tile shares its other coordinates, so for each of
    its lanes it computes every key of the lanes' union on the last axis.
    """
    import numpy as np

    n = int(shape[-1])
    coords = np.arange(-(-n // lanes) * lanes, dtype=np.int64)
    outer = math.prod(int(rel.counts(int(m)).sum()) for rel, m in zip(term.rels[:-1], shape[:-1]))
    lo, hi = term.rels[-1].bounds(np.minimum(coords, n - 1), n, ir.NUMPY_OPS)
    lo, hi = np.broadcast_to(lo, coords.shape), np.broadcast_to(hi, coords.shape)
    held = (lo < hi) & (coords < n)
    lo = np.where(held, lo, n).reshape(-1, lanes).min(axis=1)
    hi = np.where(held, hi, 0).reshape(-1, lanes).max(axis=1)
    return outer * lanes * int(np.maximum(hi - lo, 0).sum())


def _term_pairs(term: ir.Term, shape) -> int:
    return math.prod(int(c.sum()) for c in term.counts(shape))


def _new_pairs(head: ir.IR, t: int) -> int:
    """Pairs of term ``t`` that no earlier term holds (what the kernels visit for it)."""
    def union(terms):
        return ir.IR(head.grid, tuple(terms)).pairs() if terms else 0
    return union(head.terms[:t + 1]) - union(head.terms[:t])


def _lane_terms(head: ir.IR, shape, lanes: int, shared=None) -> list[tuple[bool, int]]:
    """Per term of a kernel with ``lanes``: whether the lanes share it, and the pairs computed
    for it (the tile unions of :func:`_shared_pairs`, or its own new pairs lane by lane).

    Without ``shared``, a term is shared when at least ``LANE_MIN_EFFICIENCY`` of the pairs
    the tile would compute for it are attended.
    """
    out = []
    for t, term in enumerate(head.terms):
        tile = _shared_pairs(term, shape, lanes)
        share = (_term_pairs(term, shape) >= LANE_MIN_EFFICIENCY * tile if shared is None
                 else shared[t])
        out.append((share, tile if share else _new_pairs(head, t)))
    return out


def lane_pairs(head: ir.IR, shape, lanes: int, shared=None) -> int:
    """Pairs a kernel with ``lanes`` computes for one head pattern on ``shape``: a shared
    term's tile unions (:func:`_shared_pairs`), a lane-by-lane term's own new pairs."""
    return sum(pairs for _, pairs in _lane_terms(head, shape, lanes, shared))


def plan_lanes(node, shape, lanes=None) -> tuple[int, tuple | None]:
    """``(lanes, shared)``: queries per tile, and per distinct head pattern which terms the
    lanes share (the others run lane by lane on their own keys); ``(0, None)`` for one query
    at a time.

    A term is shared when at least ``LANE_MIN_EFFICIENCY`` of the pairs the tile computes for
    it are attended: windows much wider than the tile, aligned blocks, axes and global tokens,
    not a 7-wide neighbourhood (half of an 8-lane tile's keys wasted) nor criss-cross's column
    (one key per lane). Without ``lanes``, the widest width whose estimated cost
    (``LANE_PAIR_COST`` per shared pair, 1 per lane-by-lane pair) is at most 0.85 of the
    one-query kernel's is chosen; wider tiles share each loaded key among more queries
    (measured on W1: 8 lanes beat 4).
    """
    heads = _distinct_heads(node)
    if lanes == 0:
        return 0, None
    widths = [lanes] if lanes is not None else sorted(set(LANE_CHOICES) | {
        int(a.size) for head in heads for term in head.terms for a in term.rels[-1].atoms
        if isinstance(a, ir.Block) and is_number(a.size) and 2 <= a.size <= 16}, reverse=True)
    alone = sum(head.pairs() for head in node.per_head)
    for width in widths:
        terms = {h.terms: _lane_terms(h, shape, width) for h in heads}
        shared = tuple(tuple(share for share, _ in terms[h.terms]) for h in heads)
        cost = sum(LANE_PAIR_COST * pairs if share else pairs
                   for head in node.per_head for share, pairs in terms[head.terms])
        if lanes is not None or (any(map(any, shared)) and cost <= 0.85 * alone):
            return width, shared
    return 0, None


# --------------------------------------------------------------------------------------------
# compile: source text -> module of numba kernels


def cache_dir() -> Path:
    """Where generated modules (and numba's caches, in their ``__pycache__``) are kept.

    ``$PATTERNGEN_CACHE`` when set, else ``~/.cache/patterngen/numba``, else a temporary
    directory when the home directory is not writable.
    """
    root = os.environ.get("PATTERNGEN_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "patterngen" / "numba"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "patterngen-numba"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


@functools.cache
def load(source: str):
    """Import the module that ``source`` defines, compiling nothing yet (numba is lazy).

    The file is named by the hash of its text and written once (atomically), so numba's
    ``cache=True`` finds the kernels it compiled in an earlier process.

    Raises:
        SyntaxError, ImportError: with the generated source attached as a note.
    """
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    name = f"patterngen_numba_{digest}"
    path = cache_dir() / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    log.debug("numba kernel module %s:\n%s", path, source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: numba's cache finds functions by module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        _attach_source(e, f"while importing generated module {path}:\n{source}")
        raise
    return module


def _attach_source(error: Exception, text: str) -> None:
    """Add the generated source to ``error`` (a note from Python 3.11, else the log)."""
    if hasattr(error, "add_note"):
        error.add_note(text)
    else:
        log.error("%s", text)


@functools.cache
def _pool(workers: int):
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="patterngen")


def _run(kernel, source: str, items: int, *args) -> None:
    """Run work items ``0..items`` of ``kernel``, in ranges, on several threads.

    When torch runs its ops on a GNU OpenMP team (:func:`_openmp.team`), the kernel's
    generated ``*_team`` trampoline runs the ranges on that team's threads, which would
    otherwise spin beside the kernel for milliseconds after each torch op. Otherwise the
    calling thread and ``threads - 1`` pool threads take ranges until none is left (the
    kernels are ``nogil``; ``parallel=True`` would double their compile time). The first call
    compiles the kernel; a numba compile failure carries the generated source.
    """
    import numba

    from patterngen.backends import _openmp

    team = _openmp.team()
    trampoline = _trampoline(kernel, source) if team is not None else None
    if trampoline is not None and items > 0:
        threads = _torch_threads()
        if _openmp.launch(team, trampoline, threads, min(items, RANGES_PER_THREAD * threads),
                          items, args):
            return
    if not kernel.signatures:
        with _compile_errors(kernel, source):
            kernel(*args, 0, 0)
    threads = numba.get_num_threads()
    parts = min(items, RANGES_PER_THREAD * threads)
    if parts <= 1 or threads == 1:
        kernel(*args, 0, items)
        return
    bounds = [items * j // parts for j in range(parts + 1)]
    ranges = iter(range(parts))  # next() on it is atomic under the GIL

    def work():
        for j in ranges:
            kernel(*args, bounds[j], bounds[j + 1])

    helpers = [_pool(threads - 1).submit(work) for _ in range(threads - 1)]
    work()
    for helper in helpers:
        if not helper.cancel():  # a helper that never started has nothing left to do
            helper.result()


def _torch_threads() -> int:
    return sys.modules["torch"].get_num_threads()


@contextlib.contextmanager
def _compile_errors(kernel, source: str):
    import numba

    try:
        yield
    except numba.core.errors.NumbaError as e:
        log.error("numba failed to compile generated kernel %s", kernel.__name__)
        _attach_source(e, f"generated source:\n{source}")
        raise


@functools.cache
def _trampoline(kernel, source: str):
    """The compiled ``cfunc`` of ``kernel``'s ``*_team`` trampoline; ``None`` without one."""
    import numba

    from patterngen.backends import _openmp

    py_func = getattr(sys.modules[kernel.py_func.__module__], f"{kernel.__name__}_team", None)
    if py_func is None:
        return None
    with _compile_errors(kernel, source):
        return numba.cfunc(_openmp.SIGNATURE, nopython=True, cache=True)(py_func)


# --------------------------------------------------------------------------------------------
# the backend


def _attention_function():
    import torch

    class NumbaAttention(torch.autograd.Function):
        """``out = softmax(q k^T * scale, masked) v`` by the generated kernels."""

        @staticmethod
        def forward(ctx, q, k, v, backend, shape, scale):
            out, lse = backend.forward_numpy(*(t.detach().numpy() for t in (q, k, v)), shape,
                                             scale)
            out, lse = torch.from_numpy(out), torch.from_numpy(lse)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.backend, ctx.shape, ctx.scale = backend, shape, scale
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            arrays = (t.detach().numpy() for t in (q, k, v, out, dout.contiguous(), lse))
            grads = ctx.backend.backward_numpy(*arrays, ctx.shape, ctx.scale)
            return (*(torch.from_numpy(g) for g in grads), None, None, None)

    return NumbaAttention


_function = functools.cache(_attention_function)


class NumbaBackend(Backend):
    """Generated Numba CPU kernels, forward and backward, for any IR.

    Call with ``(batch, heads, *grid, head_dim)`` or ``(batch, heads, tokens, head_dim)``
    float32 or float64 CPU tensors. Non-contiguous inputs are copied to contiguous ones first.
    Grid extents are kernel arguments: compiling the same pattern on another grid of the same
    structure reuses the compiled kernels.

    Args:
        ir: the lowered pattern (numeric grid).
        scale: default score scale; ``None`` means ``head_dim ** -0.5``.
        lanes: queries per tile along the last axis (0: one query at a time); ``None`` lets
            :func:`plan_lanes` pick from the pattern's waste on this grid.

    Attributes:
        source: the generated float32 module for any head_dim (``source_for(dtype, head_dim)``
            for the others: head_dims from ``SPECIALISED_HEAD_DIM`` up get their own kernels).
    """

    name = "numba"
    SUPPORTED_DEVICES = ("cpu",)
    SUPPORTED_DTYPES = tuple(DTYPES)
    BACKWARD_DEVICES = ("cpu",)

    def __init__(self, ir_, scale=None, lanes=None):
        self.ir = ir_ = _runs_first(ir_)
        self.shape = ir_.grid.require_numeric("the numba backend")
        self.scale = scale
        _check_lanes(lanes, allow_none=True)
        self.lanes, self.shared = plan_lanes(ir_, self.shape, lanes)
        self._head_map = _head_map(ir_) if isinstance(ir_, ir.HeadsIR) else [0]

    @property
    def source(self) -> str:
        return self.source_for("float32")

    @property
    def executed_pairs(self) -> tuple[int, ...]:
        """Pairs computed per listed pattern: exactly the attended ones (unions deduplicated)
        one query at a time; with lanes, each tile's union (:func:`lane_pairs`)."""
        if self.lanes:
            shared = dict(zip((h.terms for h in _distinct_heads(self.ir)), self.shared))
            return tuple(lane_pairs(head, self.shape, self.lanes, shared[head.terms])
                         for head in self.ir.per_head)
        return tuple(head.pairs() for head in self.ir.per_head)

    def source_for(self, dtype: str, head_dim: int = 0) -> str:
        """The module text that runs ``dtype`` (``"float32"`` or ``"float64"``) inputs of
        ``head_dim``: compiled for that head_dim from ``SPECIALISED_HEAD_DIM`` up, else for any
        (``head_dim=0``)."""
        head_dim = head_dim if head_dim >= SPECIALISED_HEAD_DIM else 0
        return _generate_cached(self.ir, dtype, self.lanes, self.shared, head_dim)

    def __repr__(self):
        return f"NumbaBackend({self.ir.label} on grid {self.ir.grid}, lanes={self.lanes})"

    def __call__(self, q, k, v, scale=None):
        """Attention of ``q`` over ``k, v`` under the compiled pattern.

        Args:
            q, k, v: ``(batch, heads, *grid, head_dim)`` or ``(batch, heads, tokens,
                head_dim)`` CPU tensors of one dtype, float32 or float64.
            scale: score scale; default the constructor's, else ``head_dim ** -0.5``.

        Raises:
            PatternError: for a wrong type, shape, grid, device or dtype, naming the values.
        """
        qf, kf, vf, restore = self.flatten_inputs(q, k, v)
        if qf.shape[-1] < 1 or qf.shape[0] * qf.shape[1] == 0:
            raise PatternError(f"numba: q has shape {tuple(q.shape)}; expected batch, heads "
                               f"and head_dim of at least 1.")
        scale = scale if scale is not None else self.scale
        scale = float(qf.shape[-1] ** -0.5 if scale is None else scale)
        qf, kf, vf = (t.contiguous() for t in (qf, kf, vf))
        return restore(_function().apply(qf, kf, vf, self, self.shape, scale))

    def _kernels(self, dtype, head_dim):
        source = self.source_for(dtype, head_dim)
        module = load(source)
        return source, [(getattr(module, f"forward_{i}"), getattr(module, f"backward_{i}"))
                        for i in range(max(self._head_map) + 1)]

    def _head_groups(self, heads: int):
        """``(kernel index, int64 array of heads)`` for every kernel some head uses."""
        import numpy as np

        owner = [self._head_map[ir.pattern_of_head(h, len(self._head_map))] for h in range(heads)]
        return [(i, np.array([h for h in range(heads) if owner[h] == i], dtype=np.int64))
                for i in sorted(set(owner))]

    def forward_numpy(self, q, k, v, shape, scale):
        """``(out, lse)`` for contiguous ``(batch, heads, tokens, dim)`` numpy arrays."""
        import numpy as np

        source, kernels = self._kernels(q.dtype.name, q.shape[3])
        out = np.empty_like(q)
        lse = np.empty(q.shape[:3], dtype=q.dtype)
        typed_scale = q.dtype.type(scale)
        tiles = _lane_tiles(shape, self.lanes) if self.lanes else -(-q.shape[2] // QUERY_TILE)
        for i, group in self._head_groups(q.shape[1]):
            _run(kernels[i][0], source, q.shape[0] * len(group) * tiles,
                 q, k, v, typed_scale, *shape, group, out, lse)
        return out, lse

    def backward_numpy(self, q, k, v, out, dout, lse, shape, scale):
        """``(dq, dk, dv)``; dk and dv are summed over query splits when heads are few."""
        import numba
        import numpy as np

        source, kernels = self._kernels(q.dtype.name, q.shape[3])
        batch, heads = q.shape[:2]
        # dk/dv are scattered from every query: each split owns a copy, so that (batch, head)
        # pairs fewer than the threads still keep every thread busy without atomics
        splits = max(1, -(-2 * numba.get_num_threads() // (batch * heads)))
        splits = min(splits, _lane_tiles(shape, self.lanes) if self.lanes else q.shape[2])
        dq = np.empty_like(q)
        dk = np.zeros((splits, *q.shape), dtype=q.dtype)
        dv = np.zeros((splits, *q.shape), dtype=q.dtype)
        typed_scale = q.dtype.type(scale)
        for i, group in self._head_groups(heads):
            _run(kernels[i][1], source, batch * len(group) * splits,
                 q, k, v, out, dout, lse, typed_scale, *shape, group, dq, dk, dv)
        if splits == 1:
            return dq, dk[0], dv[0]
        return dq, dk.sum(axis=0), dv.sum(axis=0)


def _runs_first(node):
    """``node`` with, in each pattern, the terms that hold one key on the last axis (an ``Eq``
    there: an axis, criss-cross's column) after the others. The forward buffers the first
    term's last-axis run in one loop and tests later terms' keys one by one against it, so a
    long run pays most first (criss-cross as row | column: forward 0.92x the time)."""
    def order(head):  # sorted() is stable: the other terms keep their order
        return dataclasses.replace(head, terms=tuple(sorted(
            head.terms, key=lambda term: any(isinstance(a, ir.Eq) for a in term.rels[-1].atoms))))

    if isinstance(node, ir.HeadsIR):
        return dataclasses.replace(node, heads=tuple(order(h) for h in node.heads))
    return order(node)


def _lane_tiles(shape, lanes: int) -> int:
    """Work tiles of a kernel with ``lanes``: every row of the outer axes, cut into ``lanes``."""
    return math.prod(shape[:-1]) * -(-shape[-1] // lanes)


@functools.lru_cache(maxsize=256)
def _generate_cached(node, dtype: str, lanes: int, shared, head_dim: int) -> str:
    return generate(node, dtype, lanes, shared, head_dim)


register_backend("numba", NumbaBackend)
