"""YOLOv12's area attention (A2) in an attention block.

A2 cuts the row-major token sequence into ``l`` equal areas and attends inside each (whole rows
when ``l`` divides the height, else runs of tokens), written in YOLOv12 as a reshape of
``(B, N, C)`` to ``(B * l, N / l, C)``. patterngen states it as
``area(l)``; its cost is ``N^2 / l`` pairs per head, a quarter of global attention for ``l = 4``
(the paper's ``n^2 h d / 2`` against ``2 n^2 h d``). This script checks the pattern against the
reshape, runs it in a ``LocalSelfAttention`` block, and checks the kernel against the oracle.

Run: python examples/yolov12_area.py
"""

import torch

import patterngen as pg
from _common import best_backend, check_and_time, cost_line, expect, parse_args
from patterngen.nn import LocalSelfAttention

GRID, AREAS, DIM, HEADS = (16, 16), 4, 32, 2


def yolo_area_attention(q, k, v, areas):
    """A2 as YOLOv12 writes it: fold the areas into the batch, attend densely, unfold."""
    b, h, n, d = q.shape
    fold = (lambda t: t.reshape(b, h, areas, n // areas, d))
    out = torch.softmax(fold(q) @ fold(k).transpose(-1, -2) * d ** -0.5, dim=-1) @ fold(v)
    return out.reshape(b, h, n, d)


def main():
    args = parse_args(__doc__)
    a2 = pg.area(AREAS)
    print(pg.show(a2, grid=(8, 8), query=(3, 3)))
    report = pg.cost(a2, grid=("H", "W"), head_dim="d", heads="h")
    print(f"\nsymbolic FLOPs: {report.flops}; dense: {report.dense_flops}; "
          f"ratio {report.speedup}")
    expect(report.speedup == AREAS, f"area({AREAS}) should cost 1/{AREAS} of dense")
    print(cost_line(a2, GRID), "\n")

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, GRID[0] * GRID[1], 16, dtype=torch.float64)
               for _ in range(3))
    mask = torch.as_tensor(pg.materialize(a2, GRID))
    error = (yolo_area_attention(q, k, v, AREAS) - pg.dense_attention(q, k, v, mask)).abs().max()
    expect(error < 1e-12, f"area({AREAS}) differs from YOLOv12's reshape by {error:.2e}")
    print(f"area({AREAS}) == YOLOv12's reshape into {AREAS} areas (max abs error {error:.1e})")

    backend = best_backend(a2, GRID, args.backend)
    if backend is not None:
        block = LocalSelfAttention(dim=DIM, heads=HEADS, pattern=a2, backend=backend)
        x = torch.randn(2, *GRID, DIM)
        y = x + block(x)  # the residual connection of an A2 block
        print(f"LocalSelfAttention block: {tuple(x.shape)} -> {tuple(y.shape)}")
    check_and_time(a2, GRID, args.backend)
    print("ok")


if __name__ == "__main__":
    main()
