"""Every rule of the pattern language has a clear error, pinned here so messages cannot drift."""

import pytest

import patterngen as pg

CASES = {
    "size-zero": (lambda: pg.window(0), r"Invalid size size=0; expected an integer >= 1"),
    "size-float": (lambda: pg.window(7.5),
                   r"Invalid size size=7.5 of type float; expected an integer >= 1 or a symbol"),
    "size-bool": (lambda: pg.block(True), r"Invalid size size=True of type bool"),
    "dilation-zero": (lambda: pg.window(3, dilation=(1, 0)),
                      r"Invalid size dilation\[1\]=0; expected an integer >= 1"),
    "size-times-dilation": (
        lambda: pg.lower(pg.window(7, dilation=2), (10, 20)),
        r"The product of size and dilation cannot exceed the axis length: size=7, dilation=2, "
        r"grid\[0\]=10 \(size\*dilation=14 > 10\)\. \[pattern window\(7, dilation=2\) on grid "
        r"10x20\]"),
    "unknown-border": (lambda: pg.window(7, border="wrap"),
                       r"Unknown border='wrap'; expected one of \('clamp', 'pad'\)"),
    "causal-not-bool": (lambda: pg.window(7, causal="yes"),
                        r"Invalid causal='yes'; expected True or False per axis"),
    "axis-out-of-range": (lambda: pg.lower(pg.axis(2), (4, 4)),
                          r"Invalid axis=2 for a grid of rank 2 \(grid=4x4\); expected "
                          r"-2 <= axis < 2"),
    "per-axis-rank": (lambda: pg.lower(pg.window((7, 5)), 64),
                      r"Invalid size=\(7, 5\): 2 entries for a grid of rank 1 \(grid=64\); "
                      r"expected a scalar or 1 entries"),
    "grid-rank": (lambda: pg.lower(pg.window(3), (4, 4, 4, 4)),
                  r"Invalid grid=\(4, 4, 4, 4\); expected 1 to 3 axis sizes"),
    "grid-size": (lambda: pg.lower(pg.window(3), (0, 4)), r"Invalid size grid\[0\]=0"),
    "grid-name": (lambda: pg.cost(pg.window(3), grid=("H W",)),
                  r"Invalid size grid\[0\]='H W'; a symbolic size must be an identifier"),
    "area-divides": (lambda: pg.lower(pg.area(3), (10, 4)),
                     r"area\(areas=3\) needs the grid's 40 tokens divisible by 3"),
    "global-outside": (lambda: pg.lower(pg.global_tokens([(4, 0)]), (4, 4)),
                       r"Global token \(4, 0\) is outside the grid: coordinate 4 on axis 0 with "
                       r"grid\[0\]=4; expected 0 <= index < 4"),
    "global-coords": (lambda: pg.lower(pg.global_tokens([(1, 2, 3)]), (4, 4)),
                      r"Global token \(1, 2, 3\) has 3 coordinates for a grid of rank 2"),
    "global-negative": (lambda: pg.global_tokens([-1]),
                        r"Invalid size token index=-1; expected an integer >= 0"),
    "bool-and": (lambda: pg.window(3) and pg.axis(0),
                 r"Conversion of a pattern to bool is unsupported; this is usually `and`/`or` "
                 r"used where the bitwise `&`/`\|` combine patterns"),
    "bool-or": (lambda: pg.window(3) or pg.axis(0), r"Conversion of a pattern to bool"),
    "combine-non-pattern": (lambda: pg.window(3) | 5,
                            r"Cannot combine a pattern with 5 of type int using '\|'"),
    "heads-nested": (lambda: pg.heads(pg.axis(0)) & pg.causal(),
                     r"heads\(\.\.\.\) must be the outermost pattern"),
    "heads-inside": (lambda: pg.causal() | pg.heads(pg.axis(0)),
                     r"heads\(\.\.\.\) must be the outermost pattern"),
    "materialize-symbolic": (lambda: pg.materialize(pg.window(3), ("H",)),
                             r"materialize needs a numeric grid, got grid=H"),
    "materialize-large": (lambda: pg.materialize(pg.window(3), (256, 256)),
                          r"tokens=65536 exceeds 32768; use layout\(\) or key_counts\(\)"),
    "show-query": (lambda: pg.show(pg.window(3), (4, 4), query=(4, 0)),
                   r"Invalid query=\(4, 0\) for grid 4x4; expected coordinates 0 <= q < n"),
    "lower-non-pattern": (lambda: pg.lower(7, 8),
                          r"Expected a pattern such as pg.window\(7\), got 7"),
    "grid-missing": (lambda: pg.materialize(pg.window(3)), r"needs a grid, e.g. grid=\(64, 64\)"),
}


@pytest.mark.parametrize("name", CASES)
def test_error_message(name):
    make, message = CASES[name]
    with pytest.raises(pg.PatternError, match=message):
        make()


def test_errors_are_value_errors():
    assert issubclass(pg.PatternError, ValueError)
    assert issubclass(pg.BackendUnavailable, pg.PatternError)
