"""Counting a relation when the queries and the keys live on axes of different lengths.

The query at ``x`` of an axis of ``nq`` sits over key ``c(x) = floor((x + 0.5) * nk / nq)``
(:func:`patterngen.ir.center`) and sees the keys ``R(c(x))`` of the key axis. So the pairs of
one axis are ``sum_x |R(c(x))| = sum_c mult(c) * |R(c)|``, where ``mult(c)``, the number of
queries over key ``c``, is a difference of ceilings: ``mult(c) = M(c + 1) - M(c)`` with
``M(c) = #{x : c(x) < c} = ceiling(c * nq / nk - 1/2)``. A relation that gives every key the
same count sums to ``nq`` times it; border deficits and tiles telescope into a few ``M``
terms. A relation without such a form is counted exactly once its sizes are numbers.

Example:
    >>> from patterngen import ir
    >>> from patterngen.grid import symbol
    >>> axis_sum(ir.Rel.of(ir.Window(3, 1, "pad")), symbol("n"), symbol("m"))[0]
    2*n - ceiling(-1/2 + n/m) + ceiling(-1/2 + n*(m - 1)/m)
"""

from __future__ import annotations

import functools

import sympy

from . import ir
from .grid import is_number

__all__ = ["queries_below", "axis_sum"]

HALF = sympy.Rational(1, 2)


def queries_below(c, nq, nk):
    """``M(c)``: how many of the ``nq`` queries sit over a key coordinate below ``c``
    (``0 <= c <= nk``)."""
    return sympy.ceiling(sympy.sympify(c) * nq / nk - HALF)


def _free(rel: ir.Rel) -> list:
    syms = set()
    for atom in rel.atoms:
        for v in atom.params():
            if isinstance(v, sympy.Basic):
                syms |= v.free_symbols
    return sorted(syms, key=str)


@functools.lru_cache(maxsize=None)
def _exact(rel: ir.Rel, quantity: str):
    """An integer sympy function of ``(nq, nk, free symbols)`` counting ``rel`` by
    enumeration once every size is a number."""
    free = _free(rel)
    reduce = {"pairs": lambda c: c.sum(), "kmin": lambda c: c.min(), "kmax": lambda c: c.max()}

    def _eval(cls, nq, nk, *values):
        if nq.is_Integer and nk.is_Integer and all(v.is_Integer for v in values):
            numeric = rel.subs(dict(zip(free, values)))
            return sympy.Integer(int(reduce[quantity](numeric.counts(int(nk), int(nq)))))
        return None

    fn = type(f"{quantity}[{rel!r} over keys]", (sympy.Function,),
              {"eval": classmethod(_eval), "is_integer": True, "is_nonnegative": True})
    return lambda nq, nk: fn(nq, nk, *free)


def _window_sum(w: ir.Window, nq, nk):
    """Pairs of a stride-1, undilated truncated window: ``nq * k`` less the border deficits,
    ``sum_{j <= left} M(j)`` on the left and ``sum_{j <= right} (nq - M(nk - j))`` on the
    right (``None`` when the window's size is a symbol)."""
    k = w.size
    if not is_number(k):
        return None
    left, right = (k - 1, 0) if w.mode == "causal" else (k // 2, k - 1 - k // 2)
    lost = sum(queries_below(j, nq, nk) for j in range(1, left + 1))
    lost += sum(nq - queries_below(nk - j, nq, nk) for j in range(1, right + 1))
    return nq * k - lost


def _block_sum(b: ir.Block, nq, nk):
    """Pairs of key tiles ``[0, s)``, whole tiles of ``m`` and the remainder: each tile's size
    times the queries over it, which telescopes over the whole tiles."""
    m, s = b.size, b.offset
    first = sympy.Min(s, nk) if is_number(nk) else sympy.sympify(s)
    rest = nk - first
    end = first + sympy.floor(rest / m) * m
    return (first * queries_below(first, nq, nk)
            + m * (queries_below(end, nq, nk) - queries_below(first, nq, nk))
            + sympy.Mod(rest, m) * (nq - queries_below(end, nq, nk)))


def _closed(atom: ir.Atom, nq, nk) -> tuple:
    """``(pairs, kmin, kmax, assumptions)`` of a one-atom relation; ``None`` where no closed
    form is known."""
    if isinstance(atom, ir.Eq):
        return nq, sympy.Integer(1), sympy.Integer(1), ()
    if isinstance(atom, ir.QueryTokens):
        return (atom.stop - atom.start) * nk, None, nk, (sympy.Le(atom.stop, nq),)
    if isinstance(atom, ir.KeyIn):
        width = atom.stop - atom.start
        return nq * width, width, width, (sympy.Le(atom.stop, nk),)
    if isinstance(atom, ir.Window):
        need = (sympy.Ge(nk, atom.size * atom.dilation),)
        if atom.mode == "clamp":  # every key coordinate's window holds k keys
            return nq * atom.size, atom.size, atom.size, need
        if atom.dilation == 1 and atom.stride == 1:
            return _window_sum(atom, nq, nk), None, None, need
        return None, None, None, need
    if isinstance(atom, ir.Block):
        return _block_sum(atom, nq, nk), None, None, (sympy.Lt(atom.offset, atom.size),
                                                      sympy.Ge(nk, atom.offset))
    return None, None, None, ()


def axis_sum(rel: ir.Rel, nq, nk) -> tuple:
    """``(pairs, kmin, kmax, assumptions, closed)`` of ``rel`` with ``nq`` queries over a key
    axis of ``nk``: pairs ``sum_x |R(c(x))|``, the fewest and most keys of a query, the
    relations the forms need, and whether ``pairs`` is a closed form (else it is the exact
    count, evaluated once the sizes are numbers)."""
    nq, nk = sympy.sympify(nq), sympy.sympify(nk)
    if not rel.atoms:
        return nq * nk, nk, nk, (), True
    pairs, kmin, kmax, need = (_closed(rel.atoms[0], nq, nk) if len(rel.atoms) == 1
                               else (None, None, None, ()))
    exact = functools.partial(_exact, rel)
    return (pairs if pairs is not None else exact("pairs")(nq, nk),
            kmin if kmin is not None else exact("kmin")(nq, nk),
            kmax if kmax is not None else exact("kmax")(nq, nk), need, pairs is not None)
