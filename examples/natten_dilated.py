"""NATTEN-style 2-D neighbourhood attention with dilation.

A neighbourhood of ``k x k`` keys around each query, shifted inward at the borders so every
query keeps ``k^2`` keys; dilation ``d`` spaces the keys ``d`` apart (each axis splits into ``d``
interleaved groups). This script rebuilds the mask from NATTEN's own window-start rule and
checks it against ``window(k, dilation=d)`` on a grid that ``d`` does not divide, costs it, and
checks the kernel against the dense oracle.

Run: python examples/natten_dilated.py
"""

import numpy as np

import patterngen as pg
from _common import check_and_time, cost_line, expect, parse_args
from patterngen.analysis import layers_to_global

GRID, KERNEL, DILATION = (23, 20), 5, 3


def natten_window_start(index, length, kernel_size, dilation):
    """NATTEN's get_window_start (odd kernels): the first key of a query on one axis."""
    nb = kernel_size // 2
    if dilation <= 1:
        return max(index - nb, 0) + (index + nb >= length) * (length - index - nb - 1)
    if index - nb * dilation < 0:
        return index % dilation
    if index + nb * dilation >= length:
        imodd = index % dilation
        a = (length // dilation) * dilation
        b = length - a
        if imodd < b:
            return length - b + imodd - 2 * nb * dilation
        return a + imodd - kernel_size * dilation
    return index - nb * dilation


def natten_mask(shape, kernel_size, dilation):
    per_axis = []
    for n in shape:
        m = np.zeros((n, n), dtype=bool)
        for i in range(n):
            start = natten_window_start(i, n, kernel_size, dilation)
            m[i, start + dilation * np.arange(kernel_size)] = True
        per_axis.append(m)
    rows, cols = per_axis
    tokens = len(rows) * len(cols)
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(tokens, tokens)


def main():
    args = parse_args(__doc__)
    pattern = pg.window(KERNEL, dilation=DILATION)
    print(pg.show(pattern, grid=GRID, query=(1, 10)))
    expect((natten_mask(GRID, KERNEL, DILATION) == pg.materialize(pattern, GRID)).all(),
           "window(k, dilation=d) differs from NATTEN's window-start rule")
    print(f"\n{pattern!r} == NATTEN's neighbourhood on {GRID} (dilation does not divide it)")
    print(f"symbolic pairs: {pg.cost(pattern, grid=('H', 'W')).pairs}")
    print(cost_line(pattern, GRID))
    for p in (pg.window(KERNEL), pattern, [pg.window(KERNEL), pattern]):
        print(f"layers to global, {p!r}: {layers_to_global(p, grid=GRID)}")
    expect(layers_to_global(pattern, grid=GRID) is None,
           "a dilated window alone never mixes its groups")
    check_and_time(pattern, GRID, args.backend)
    print("ok")


if __name__ == "__main__":
    main()
