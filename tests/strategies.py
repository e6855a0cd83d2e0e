"""Hypothesis strategies: random grids and random specs drawn from the valid region only.

Shared by the cost, semantics, layout and backend tests so that every layer is checked on the
same family of patterns.
"""

from __future__ import annotations

from hypothesis import strategies as st

import patterngen as pg


@st.composite
def grids(draw, max_tokens=400, ndim=None):
    """A numeric grid of 1 to 3 axes with at most ``max_tokens`` tokens."""
    ndim = ndim or draw(st.integers(1, 3))
    limits = {1: max_tokens, 2: 24, 3: 8}
    shape = []
    for _ in range(ndim):
        budget = max(1, max_tokens // max(1, _prod(shape)))
        shape.append(draw(st.integers(1, min(limits[ndim], budget))))
    return tuple(shape)


def _prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


@st.composite
def windows(draw, shape):
    sizes, dils, borders, causal = [], [], [], []
    for n in shape:
        d = draw(st.integers(1, max(1, min(3, n))))
        k = draw(st.integers(1, max(1, n // d)))
        sizes.append(k)
        dils.append(d)
        borders.append(draw(st.sampled_from(["clamp", "pad"])))
        causal.append(draw(st.booleans()))
    per_axis = draw(st.booleans())
    if not per_axis and len(set(zip(sizes, dils, borders, causal))) == 1:
        return pg.window(sizes[0], dilation=dils[0], border=borders[0], causal=causal[0])
    return pg.window(tuple(sizes), dilation=tuple(dils), border=tuple(borders),
                     causal=tuple(causal))


@st.composite
def primitives(draw, shape):
    kind = draw(st.sampled_from(
        ["window", "window", "block", "area", "stripe", "axis", "criss_cross", "global",
         "causal", "full"]))
    ndim = len(shape)
    if kind == "window":
        return draw(windows(shape))
    if kind == "block":
        sizes = tuple(draw(st.integers(1, n + 2)) for n in shape)
        offsets = tuple(draw(st.integers(0, m - 1)) for m in sizes)
        return pg.block(sizes, offset=offsets)
    if kind == "area":
        a = draw(st.integers(0, ndim - 1))
        divisors = [l for l in range(1, shape[a] + 1) if shape[a] % l == 0]
        return pg.area(draw(st.sampled_from(divisors)), axis=a)
    if kind == "stripe":
        return pg.stripe(draw(st.integers(0, ndim - 1)),
                         width=tuple(draw(st.integers(1, n)) for n in shape))
    if kind == "axis":
        return pg.axis(draw(st.integers(0, ndim - 1)))
    if kind == "criss_cross":
        return pg.criss_cross()
    if kind == "global":
        count = draw(st.integers(1, 2))
        return pg.global_tokens([tuple(draw(st.integers(0, n - 1)) for n in shape)
                                 for _ in range(count)])
    if kind == "causal":
        return pg.causal()
    return pg.full()


@st.composite
def patterns(draw, shape, depth=2):
    """A primitive, or a union/intersection of two random sub-patterns (nested once)."""
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return draw(primitives(shape))
    parts = [draw(patterns(shape, depth - 1)) for _ in range(2)]
    out = parts[0]
    for p in parts[1:]:
        out = (out | p) if draw(st.booleans()) else (out & p)
    return out


@st.composite
def head_patterns(draw, shape):
    """A pattern, or ``heads`` of two (head ``h`` uses pattern ``h % 2``)."""
    if draw(st.booleans()):
        return draw(patterns(shape))
    return pg.heads(draw(patterns(shape, 1)), draw(patterns(shape, 1)))


@st.composite
def cases(draw, max_tokens=400, ndim=None):
    """``(pattern, grid)`` pairs."""
    shape = draw(grids(max_tokens, ndim))
    return draw(patterns(shape)), shape


def random_spec(rng, ndim):
    """A seeded random spec (``rng`` a ``random.Random``) valid on every grid of ``ndim`` axes
    with sizes >= 7: windows, blocks, axes, global tokens, causal windows, and up to two unions
    or intersections with another of them or ``causal()``. For sweeps that are not hypothesis
    tests (each case compiles kernels, so the cases are few and chosen by seed)."""
    def leaf():
        kind = rng.choice(["window", "block", "axis", "global", "causal_window"])
        if kind == "window":
            return pg.window(rng.randint(1, 3), dilation=rng.randint(1, 2),
                             border=rng.choice(["clamp", "pad"]))
        if kind == "block":
            size = rng.randint(2, 4)
            return pg.block(size, offset=rng.randint(0, size - 1))
        if kind == "axis":
            return pg.axis(rng.randrange(ndim))
        if kind == "global":
            return pg.global_tokens([rng.randint(0, 6)])
        return pg.window(rng.randint(2, 3), causal=True)

    spec = leaf()
    for _ in range(rng.randint(0, 2)):
        other = rng.choice([leaf(), pg.causal()])
        spec = spec | other if rng.random() < 0.6 else spec & other
    return spec
