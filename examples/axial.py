"""Axial attention: a column layer then a row layer, or one of each per head.

Axial transformers factor 2-D attention into attention along axis 0 and along axis 1. This
script costs both layers symbolically (``H`` keys, then ``W``, per query), shows that the pair
is global after two layers, compares the per-head variant ``heads(axis(0), axis(1))``, and
checks each against the dense oracle.

Run: python examples/axial.py
"""

import patterngen as pg
from _common import check_and_time, cost_line, expect, parse_args
from patterngen.analysis import layers_to_global

GRID = (16, 24)


def main():
    args = parse_args(__doc__)
    column, row = pg.axis(0), pg.axis(1)
    print(pg.show(column, grid=(6, 8), query=(2, 3)))
    print(pg.show(row, grid=(6, 8), query=(2, 3)))
    for pattern in (column, row):
        print(f"{pattern!r}: {pg.cost(pattern, grid=('H', 'W')).pairs} pairs")
        print(cost_line(pattern, GRID))
    depth = layers_to_global([column, row], grid=GRID)
    print(f"\ncolumn then row: global after {depth} layers; one axis alone: "
          f"{layers_to_global(column, grid=GRID)}")
    expect(depth == 2 and layers_to_global(column, grid=GRID) is None, "axial reach is wrong")

    per_head = pg.heads(column, row)
    print(f"\n{per_head!r}: heads alternate axes inside one layer")
    print(cost_line(per_head, GRID))
    depth = layers_to_global(per_head, grid=GRID)
    expect(depth == 2, f"per-head axial should be global after 2 layers, got {depth}")
    for pattern in (column, row, per_head):
        check_and_time(pattern, GRID, args.backend)
    print("ok")


if __name__ == "__main__":
    main()
