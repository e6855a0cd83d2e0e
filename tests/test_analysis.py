"""Receptive fields and layers-to-global against boolean matrix powers of the dense mask."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import analysis
from patterngen.errors import PatternError
from strategies import grids, head_patterns


def dense(pattern, grid):
    m = pg.materialize(pattern, grid)
    return m.any(axis=0) if m.ndim == 3 else m  # heads: a token concatenates every head


def dense_rf(stack, grid, query, residual):
    shape = tuple(grid)
    reached = np.zeros(int(np.prod(shape)), dtype=bool)
    reached[np.ravel_multi_index(query, shape)] = True
    for p in reversed(stack):
        keys = (reached.astype(np.int64) @ dense(p, grid)) > 0
        reached = reached | keys if residual else keys
    return reached.reshape(shape)


def dense_layers_to_global(stack, grid, residual, limit=300):
    tokens = int(np.prod(grid))
    mats = [dense(p, grid) | np.eye(tokens, dtype=bool) if residual else dense(p, grid)
            for p in stack]
    reach = np.eye(tokens, dtype=bool)
    if reach.all():
        return 0
    seen = set()
    for layer in range(1, limit):
        # the newest layer is the last one, applied to the query first: prepend it
        reach = (mats[(layer - 1) % len(mats)].astype(np.int64) @ reach) > 0
        if reach.all():
            return layer
        if layer % len(mats) == 0:
            key = reach.tobytes()
            if key in seen:
                return None
            seen.add(key)
    raise AssertionError("no answer within the limit")


# small grids: the oracle multiplies dense tokens x tokens masks layer after layer
GRIDS = grids(max_tokens=36)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), grid=GRIDS, residual=st.booleans())
def test_receptive_field_equals_dense_reachability(data, grid, residual):
    stack = data.draw(st.lists(head_patterns(grid), min_size=1, max_size=3), label="stack")
    query = data.draw(st.tuples(*(st.integers(0, n - 1) for n in grid)), label="query")
    rf = analysis.receptive_field(stack, grid=grid, query=query, residual=residual)
    expected = dense_rf(stack, grid, query, residual)
    np.testing.assert_array_equal(rf.mask, expected, err_msg=f"{stack} on {grid} at {query}")
    assert rf.size == expected.sum()


@settings(max_examples=60, deadline=None)
@given(data=st.data(), grid=GRIDS, residual=st.booleans())
def test_layers_to_global_equals_dense(data, grid, residual):
    stack = data.draw(st.lists(head_patterns(grid), min_size=1, max_size=2), label="stack")
    got = analysis.layers_to_global(stack, grid=grid, residual=residual)
    assert got == dense_layers_to_global(stack, grid, residual), f"{stack} on {grid}"


@pytest.mark.parametrize("stack, grid", [
    ([pg.window(3)], (11, 7)),
    ([pg.window((3, 5), dilation=(2, 1))], (12, 10)),
    ([pg.block(4), pg.block(4, offset=2)], (12, 9)),
    ([pg.window(5, border="pad"), pg.axis(1)], (10, 10)),
    ([pg.window((3, 1, 3))], (4, 5, 6)),
])
@pytest.mark.parametrize("residual", [True, False])
def test_separable_fast_path_matches_token_by_token(stack, grid, residual, monkeypatch):
    fast = analysis.layers_to_global(stack, grid=grid, residual=residual)
    monkeypatch.setattr(analysis, "_separable", lambda *args: False)
    assert analysis.layers_to_global(stack, grid=grid, residual=residual) == fast


def test_ccnet_recurrence_two_reaches_everything():
    assert analysis.layers_to_global(pg.criss_cross(), grid=(97, 97)) == 2
    rf = analysis.receptive_field(pg.criss_cross(), grid=(97, 97), query=(10, 20), layers=2)
    assert rf.is_global and rf.size == 97 * 97


def test_swin_shifted_pair_crosses_window_borders():
    w, sw = pg.block(7), pg.block(7, offset=3)
    plain = analysis.receptive_field([w, w], grid=(56, 56), query=(28, 28))
    assert plain.size == 49 and plain.mask[28:35, 28:35].all()
    shifted = analysis.receptive_field([w, sw], grid=(56, 56), query=(28, 28))
    assert shifted.size > 49 and shifted.mask[24:28, 24:28].all()
    assert analysis.layers_to_global([w, w], grid=(56, 56)) is None
    assert analysis.layers_to_global([w, sw], grid=(56, 56)) == 15


def test_contract_stack_of_four_swin_layers():
    rf = analysis.receptive_field([pg.block(7), pg.block(7, offset=3)] * 2, grid=(56, 56),
                                  query=(28, 28))
    assert rf.mask.shape == (56, 56)
    assert rf.size == int(dense_rf([pg.block(7), pg.block(7, offset=3)] * 2, (56, 56),
                                   (28, 28), True).sum())


def test_window_depth_is_the_one_dimensional_reach():
    # clamped window(7): one layer reaches 6 from a border, every later layer 3 more
    assert analysis.layers_to_global(pg.window(7), grid=(64, 64)) == 20
    assert analysis.layers_to_global(pg.window(7), grid=(64, 16)) == 20
    assert analysis.layers_to_global(pg.window(7) | pg.global_tokens([0]), grid=(64, 64)) == 2


def test_never_global_is_none():
    assert analysis.layers_to_global(pg.block(7), grid=(14, 14)) is None
    assert analysis.layers_to_global(pg.axis(0), grid=(8, 8)) is None
    assert analysis.layers_to_global(pg.window(3) & pg.causal(), grid=(9,)) is None


def test_single_token_grid_is_already_global():
    assert analysis.layers_to_global(pg.full(), grid=(1,)) == 0
    assert analysis.layers_to_global(pg.full(), grid=(5,)) == 1


def test_big_union_grid_is_refused_with_the_limit():
    with pytest.raises(PatternError, match=r"every token of a union.*: 20000 tokens exceed "
                                           r"MAX_BITSET_TOKENS=16384 \(grid=200x100\)"):
        analysis.layers_to_global(pg.criss_cross(), grid=(200, 100))
    with pytest.raises(PatternError, match=r"each axis alone.*: 20000 tokens exceed"):
        analysis.layers_to_global(pg.window(64), grid=20000)


def test_receptive_field_arguments():
    with pytest.raises(PatternError, match=r"Invalid query=\(9, 0\) for grid 9x9"):
        analysis.receptive_field(pg.window(3), grid=(9, 9), query=(9, 0))
    with pytest.raises(PatternError, match=r"Invalid layers=0"):
        analysis.receptive_field(pg.window(3), grid=(9, 9), layers=0)
    with pytest.raises(PatternError, match=r"non-empty list of patterns"):
        analysis.receptive_field([], grid=(9, 9))
    with pytest.raises(PatternError, match=r"needs a numeric grid"):
        analysis.layers_to_global(pg.window(3), grid=("H", "W"))
    with pytest.raises(PatternError, match=r"every layer needs the same grid; window\(3\) is on "
                                           r"8x8, the layers before on 9x9"):
        analysis.layers_to_global([pg.lower(pg.window(3), (9, 9)), pg.lower(pg.window(3), (8, 8))])
    flat = analysis.receptive_field(pg.window(3), grid=(9, 9), query=40)
    assert flat.query == (4, 4)


def test_receptive_field_repr_draws_the_field():
    rf = analysis.receptive_field([pg.window(3)] * 2, grid=(7, 7), query=(0, 0))
    text = repr(rf)
    assert text.splitlines()[0] == ("Receptive field of query (0, 0) after 2 layers "
                                    "[window(3) x 2] on grid 7x7: 16 of 49 tokens (32.7%)")
    assert text.splitlines()[1] == "Q # # # . . ."


def test_receptive_field_repr_of_large_grids_lists_ranges_or_skips_the_picture():
    long = analysis.receptive_field([pg.window(5, causal=True)] * 2, grid=200, query=100)
    assert repr(long).splitlines()[1] == "keys [92, 101); query at 100"
    assert repr(long).splitlines()[2].startswith("|")
    wide = analysis.receptive_field(pg.window(3), grid=(100, 4))
    assert repr(wide).splitlines()[1] == "(no picture: an axis is longer than 96; see .mask)"
