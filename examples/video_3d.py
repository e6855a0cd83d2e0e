"""3-D neighbourhood attention on a video: a (3, 7, 7) window over time, height and width.

Video transformers restrict attention to a spatio-temporal neighbourhood. patterngen treats the
video as a (T, H, W) grid; this script draws the neighbourhood frame by frame, costs it, gives
its receptive field after a few layers and its depth to global reach (the slowest axis decides),
and checks the kernel against the dense oracle.

Run: python examples/video_3d.py
"""

import patterngen as pg
from _common import check_and_time, cost_line, expect, parse_args
from patterngen.analysis import layers_to_global, receptive_field

GRID = (6, 14, 14)


def main():
    args = parse_args(__doc__)
    pattern = pg.window((3, 7, 7))
    print(pg.show(pattern, grid=(3, 9, 9), query=(1, 4, 4)))
    print(f"\nsymbolic pairs: {pg.cost(pattern, grid=('T', 'H', 'W')).pairs}")
    print(cost_line(pattern, GRID))
    rf = receptive_field(pattern, grid=GRID, query=(0, 0, 0), layers=2)
    print(f"receptive field of the first corner after 2 layers: {rf.size} tokens "
          f"(frames 0..{rf.mask.any(axis=(1, 2)).nonzero()[0].max()})")
    # from a corner, a clamped window first reaches k - 1 along each axis, then k // 2 more
    expect(rf.size == 4 * 10 * 10, f"expected a 4x10x10 box, got {rf.size}")
    depth = layers_to_global(pattern, grid=GRID)
    print(f"layers to global on {GRID}: {depth}")
    # 0 -> 6 -> 9 -> 12 -> 13 along the 14-long axes, 0 -> 2 -> 3 -> 4 -> 5 along time
    expect(depth == 4, f"expected 4 layers, got {depth}")
    check_and_time(pattern, GRID, args.backend)
    print("ok")


if __name__ == "__main__":
    main()
