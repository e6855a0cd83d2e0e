"""CCNet's criss-cross attention, applied twice (recurrence R = 2), reaches every position.

One criss-cross layer lets a pixel see its row and column: H + W - 1 keys instead of H * W.
CCNet applies the same module twice so that information travels row then column; this script
checks that claim exactly (receptive field and layers-to-global from the IR), compares the cost
with CCNet's ``(H + W - 1)`` keys per pixel, and checks the kernel against the dense oracle.

Run: python examples/ccnet.py
"""

import sympy

import patterngen as pg
from _common import check_and_time, cost_line, expect, parse_args
from patterngen.analysis import layers_to_global, receptive_field

GRID = (24, 32)


def main():
    args = parse_args(__doc__)
    cc = pg.criss_cross()
    print(pg.show(cc, grid=(9, 11), query=(3, 4)))
    h, w = sympy.symbols("H W", positive=True, integer=True)
    pairs = pg.cost(cc, grid=("H", "W")).pairs
    print(f"\nsymbolic pairs: {pairs} = (H + W - 1) * H * W")
    expect(sympy.expand(pairs - (h + w - 1) * h * w) == 0, "criss-cross pairs != (H+W-1)HW")
    print(cost_line(cc, GRID), "\n")

    one = receptive_field(cc, grid=GRID, query=(5, 7), layers=1)
    two = receptive_field(cc, grid=GRID, query=(5, 7), layers=2)
    print(f"after R=1: {one.size} tokens (a cross of {GRID[0] + GRID[1] - 1}); "
          f"after R=2: {two.size} of {two.mask.size}")
    expect(one.size == GRID[0] + GRID[1] - 1 and two.is_global, "R=2 should reach everything")
    depth = layers_to_global(cc, grid=(97, 97))
    print(f"layers_to_global(criss_cross(), grid=(97, 97)) = {depth}\n")
    expect(depth == 2, f"CCNet needs R=2, got {depth}")
    check_and_time(cc, GRID, args.backend)
    print("ok")


if __name__ == "__main__":
    main()
