"""Literal pictures of every primitive: 1-D masks, 2-D and 3-D neighbourhoods.

Each picture is checked on both paths: the dense mask (``materialize``, membership tests) and
the progression path (``key_counts`` and ``show``, from per-axis key ranges).
"""

import numpy as np
import pytest

import patterngen as pg


def rows(*lines):
    return np.array([[c == "1" for c in line.split()] for line in lines])


PICTURES_1D = {
    "window3-clamp": (pg.window(3), 5, rows(
        "1 1 1 0 0",
        "1 1 1 0 0",
        "0 1 1 1 0",
        "0 0 1 1 1",
        "0 0 1 1 1")),
    "window3-pad": (pg.window(3, border="pad"), 5, rows(
        "1 1 0 0 0",
        "1 1 1 0 0",
        "0 1 1 1 0",
        "0 0 1 1 1",
        "0 0 0 1 1")),
    "window4-even-clamp": (pg.window(4), 6, rows(  # even size: 2 left, 1 right
        "1 1 1 1 0 0",
        "1 1 1 1 0 0",
        "1 1 1 1 0 0",
        "0 1 1 1 1 0",
        "0 0 1 1 1 1",
        "0 0 1 1 1 1")),
    "window4-even-pad": (pg.window(4, border="pad"), 6, rows(
        "1 1 0 0 0 0",
        "1 1 1 0 0 0",
        "1 1 1 1 0 0",
        "0 1 1 1 1 0",
        "0 0 1 1 1 1",
        "0 0 0 1 1 1")),
    "window3-causal": (pg.window(3, causal=True), 5, rows(
        "1 0 0 0 0",
        "1 1 0 0 0",
        "1 1 1 0 0",
        "0 1 1 1 0",
        "0 0 1 1 1")),
    "window2-dilation2": (pg.window(2, dilation=2), 5, rows(
        "1 0 1 0 0",
        "0 1 0 1 0",
        "1 0 1 0 0",
        "0 1 0 1 0",
        "0 0 1 0 1")),
    "window2-dilation2-causal": (pg.window(2, dilation=2, causal=True), 5, rows(
        "1 0 0 0 0",
        "0 1 0 0 0",
        "1 0 1 0 0",
        "0 1 0 1 0",
        "0 0 1 0 1")),
    # stride 3 (NATTEN): groups [0, 3), [3, 6), [6, 9), [9, 11) share their leader's window;
    # leaders 1, 4, 7 and, for the short last group, the axis' last position 10
    "window5-stride3": (pg.window(5, stride=3), 11, rows(
        "1 1 1 1 1 0 0 0 0 0 0",
        "1 1 1 1 1 0 0 0 0 0 0",
        "1 1 1 1 1 0 0 0 0 0 0",
        "0 0 1 1 1 1 1 0 0 0 0",
        "0 0 1 1 1 1 1 0 0 0 0",
        "0 0 1 1 1 1 1 0 0 0 0",
        "0 0 0 0 0 1 1 1 1 1 0",
        "0 0 0 0 0 1 1 1 1 1 0",
        "0 0 0 0 0 1 1 1 1 1 0",
        "0 0 0 0 0 0 1 1 1 1 1",
        "0 0 0 0 0 0 1 1 1 1 1")),
    # causal stride 3: the group's last query leads (2, 5, then 7 for the short last group);
    # each query keeps its own end
    "window4-stride3-causal": (pg.window(4, stride=3, causal=True), 8, rows(
        "1 0 0 0 0 0 0 0",
        "1 1 0 0 0 0 0 0",
        "1 1 1 0 0 0 0 0",
        "0 0 1 1 0 0 0 0",
        "0 0 1 1 1 0 0 0",
        "0 0 1 1 1 1 0 0",
        "0 0 0 0 1 1 1 0",
        "0 0 0 0 1 1 1 1")),
    # stride groups form inside each dilation group (even coordinates 0..8, odd 1..7): pairs
    # of group positions, led by the right one of the two (positions 1, 3 and, for the short
    # last group, 4), each window clamped inside its dilation group
    "window3-stride2-dilation2": (pg.window(3, dilation=2, stride=2), 9, rows(
        "1 0 1 0 1 0 0 0 0",
        "0 1 0 1 0 1 0 0 0",
        "1 0 1 0 1 0 0 0 0",
        "0 1 0 1 0 1 0 0 0",
        "0 0 0 0 1 0 1 0 1",
        "0 0 0 1 0 1 0 1 0",
        "0 0 0 0 1 0 1 0 1",
        "0 0 0 1 0 1 0 1 0",
        "0 0 0 0 1 0 1 0 1")),
    "block2": (pg.block(2), 5, rows(
        "1 1 0 0 0",
        "1 1 0 0 0",
        "0 0 1 1 0",
        "0 0 1 1 0",
        "0 0 0 0 1")),
    "block2-offset1": (pg.block(2, offset=1), 5, rows(
        "1 0 0 0 0",
        "0 1 1 0 0",
        "0 1 1 0 0",
        "0 0 0 1 1",
        "0 0 0 1 1")),
    "area2": (pg.area(2), 4, rows(
        "1 1 0 0",
        "1 1 0 0",
        "0 0 1 1",
        "0 0 1 1")),
    "causal": (pg.causal(), 4, rows(
        "1 0 0 0",
        "1 1 0 0",
        "1 1 1 0",
        "1 1 1 1")),
    "global0": (pg.global_tokens([0]), 4, rows(
        "1 1 1 1",
        "1 0 0 0",
        "1 0 0 0",
        "1 0 0 0")),
    "window3-or-global3": (pg.window(3, border="pad") | pg.global_tokens([3]), 5, rows(
        "1 1 0 1 0",
        "1 1 1 1 0",
        "0 1 1 1 0",
        "1 1 1 1 1",
        "0 0 0 1 1")),
    "window3-and-causal": (pg.window(3) & pg.causal(), 5, rows(
        "1 0 0 0 0",
        "1 1 0 0 0",
        "0 1 1 0 0",
        "0 0 1 1 0",
        "0 0 1 1 1")),
    "full": (pg.full(), 3, rows(
        "1 1 1",
        "1 1 1",
        "1 1 1")),
}

# 2-D pictures: the keys of one query on a small grid
PICTURES_2D = {
    "criss_cross-3x3": (pg.criss_cross(), (3, 3), (1, 1), rows(
        "0 1 0",
        "1 1 1",
        "0 1 0")),
    "axis0-3x4": (pg.axis(0), (3, 4), (0, 2), rows(
        "0 0 1 0",
        "0 0 1 0",
        "0 0 1 0")),
    "axis1-3x4": (pg.axis(1), (3, 4), (2, 1), rows(
        "0 0 0 0",
        "0 0 0 0",
        "1 1 1 1")),
    "stripe0-width2-3x4": (pg.stripe(0, width=2), (3, 4), (1, 3), rows(
        "0 0 1 1",
        "0 0 1 1",
        "0 0 1 1")),
    "window3-corner-4x5": (pg.window(3), (4, 5), (0, 0), rows(
        "1 1 1 0 0",
        "1 1 1 0 0",
        "1 1 1 0 0",
        "0 0 0 0 0")),
    "window3-pad-corner-4x5": (pg.window(3, border="pad"), (4, 5), (0, 0), rows(
        "1 1 0 0 0",
        "1 1 0 0 0",
        "0 0 0 0 0",
        "0 0 0 0 0")),
    # stride (2, 3): query (3, 4) is in row group [2, 4) (leader 3) and column group [3, 6)
    # (leader 4): the 3x3 window around (3, 4), clamped inside the 5x6 grid
    "window3-stride-2x3-5x6": (pg.window(3, stride=(2, 3)), (5, 6), (3, 4), rows(
        "0 0 0 0 0 0",
        "0 0 0 0 0 0",
        "0 0 0 1 1 1",
        "0 0 0 1 1 1",
        "0 0 0 1 1 1")),
    "block2-offset1-4x5": (pg.block(2, offset=1), (4, 5), (2, 2), rows(
        "0 0 0 0 0",
        "0 1 1 0 0",
        "0 1 1 0 0",
        "0 0 0 0 0")),
    "area2-axis1-3x4": (pg.area(2, axis=1), (3, 4), (0, 3), rows(
        "0 0 1 1",
        "0 0 1 1",
        "0 0 1 1")),
    "causal-3x3": (pg.causal(), (3, 3), (1, 1), rows(
        "1 1 1",
        "1 1 0",
        "0 0 0")),
    "window-per-axis-5x5": (pg.window((1, 3), causal=(False, True)), (5, 5), (2, 3), rows(
        "0 0 0 0 0",
        "0 0 0 0 0",
        "0 1 1 1 0",
        "0 0 0 0 0",
        "0 0 0 0 0")),
}


@pytest.mark.parametrize("name", PICTURES_1D)
def test_picture_1d(name):
    pattern, n, expected = PICTURES_1D[name]
    assert np.array_equal(pg.materialize(pattern, n), expected)
    assert np.array_equal(pg.lower(pattern, n).key_counts(), expected.sum(1))
    assert pg.lower(pattern, n).pairs() == expected.sum()
    for q in range(n):
        line = pg.show(pattern, grid=n, query=q).splitlines()[1].split()
        assert [c != "." for c in line] == list(expected[q] | (np.arange(n) == q))


@pytest.mark.parametrize("name", PICTURES_2D)
def test_picture_2d(name):
    pattern, grid, query, expected = PICTURES_2D[name]
    flat = np.ravel_multi_index(query, grid)
    assert np.array_equal(pg.materialize(pattern, grid)[flat].reshape(grid), expected)
    assert pg.lower(pattern, grid).key_counts()[flat] == expected.sum()
    body = pg.show(pattern, grid=grid, query=query).splitlines()[1:]
    drawn = np.array([[c in "#Q" for c in line.split()] for line in body])
    expected_drawn = expected.copy()
    expected_drawn[query] = True
    assert np.array_equal(drawn, expected_drawn)


def test_picture_3d_criss_cross():
    # each query sees the three lines through it: itself once, plus (n-1) keys per axis
    mask = pg.materialize(pg.criss_cross(), (2, 3, 4))
    assert np.array_equal(mask.sum(1), np.full(24, 1 + 1 + 2 + 3))
    keys = mask[np.ravel_multi_index((1, 2, 0), (2, 3, 4))].reshape(2, 3, 4)
    expected = np.zeros((2, 3, 4), dtype=bool)
    expected[:, 2, 0] = expected[1, :, 0] = expected[1, 2, :] = True
    assert np.array_equal(keys, expected)


def test_picture_3d_window():
    keys = pg.materialize(pg.window((1, 3, 3)), (3, 4, 4))[0].reshape(3, 4, 4)
    expected = np.zeros((3, 4, 4), dtype=bool)
    expected[0, :3, :3] = True  # clamped into the corner, same frame only
    assert np.array_equal(keys, expected)
    picture = pg.show(pg.window((1, 3, 3)), grid=(3, 4, 4), query=(0, 0, 0))
    assert picture.splitlines()[1:6] == ["[0]", "Q # # .", "# # # .", "# # # .", ". . . ."]


def test_show_long_sequence_uses_ranges():
    text = pg.show(pg.window(256, causal=True) | pg.global_tokens([0]), grid=4096, query=1000)
    assert "keys [0, 1), [745, 1001); query at 1000" in text
    assert text.splitlines()[-1].startswith("|") and len(text.splitlines()[-1]) == 66


def test_heads_materialize_stacks_patterns():
    masks = pg.materialize(pg.heads(pg.axis(0), pg.axis(1)), (3, 4))
    assert masks.shape == (2, 12, 12)
    assert np.array_equal(masks[0], pg.materialize(pg.axis(0), (3, 4)))
    assert np.array_equal(masks[1], pg.materialize(pg.axis(1), (3, 4)))
