"""The built-in catalogue: the local-attention families patterngen starts from, on default grids.

``patterngen demo`` prints it: each entry's picture on a small grid, its symbolic cost on a
symbolic grid, and its numbers on the default grid.

Example:
    >>> from patterngen.catalogue import CATALOGUE
    >>> [e.name for e in CATALOGUE][:3]
    ['natten', 'natten-dilated', 'padded-window']
"""

from __future__ import annotations

from dataclasses import dataclass

from . import spec as pg
from .cost import cost
from .pictures import show

__all__ = ["Entry", "CATALOGUE", "demo_text"]


@dataclass(frozen=True)
class Entry:
    """One catalogue pattern.

    Attributes:
        name: short identifier.
        family: where the pattern comes from.
        pattern: the spec.
        grid: the default (numeric) grid for numbers and measurements.
        picture_grid: a small grid for the text picture.
        symbolic_grid: axis names for the symbolic report.
    """

    name: str
    family: str
    pattern: pg.Pattern
    grid: tuple
    picture_grid: tuple
    symbolic_grid: tuple


_2D = ("H", "W")
CATALOGUE = [
    Entry("natten", "NATTEN 7x7 neighbourhood, clamped at borders", pg.window(7),
          (56, 56), (14, 14), _2D),
    Entry("natten-dilated", "NATTEN with per-axis sizes and dilation",
          pg.window((7, 5), dilation=(2, 1)), (56, 56), (16, 16), _2D),
    Entry("padded-window", "zero-padded sliding window (truncated at borders)",
          pg.window(7, border="pad"), (56, 56), (14, 14), _2D),
    Entry("lm-window", "1-D causal sliding window (Mistral)", pg.window(256, causal=True),
          (4096,), (4096,), ("n",)),
    Entry("swin", "Swin W-MSA: non-overlapping 7x7 windows", pg.block(7), (56, 56), (14, 14), _2D),
    Entry("swin-shifted", "Swin SW-MSA: shifted windows", pg.block(7, offset=3),
          (56, 56), (14, 14), _2D),
    # checked equal to timm's grid_partition (maxxvit.py) in tests/test_strided.py
    Entry("maxvit-grid", "MaxViT grid attention, G=7 on its 14x14 stage: each token with its "
          "residue class modulo H/G (timm's grid_partition)", pg.window(7, dilation=2),
          (14, 14), (14, 14), _2D),
    Entry("area", "YOLOv12 area attention, 4 areas", pg.area(4), (64, 64), (16, 16), _2D),
    Entry("axial", "axial attention along axis 0 (the column)", pg.axis(0),
          (56, 56), (14, 14), _2D),
    Entry("criss-cross", "CCNet criss-cross: row and column", pg.criss_cross(),
          (56, 56), (14, 14), _2D),
    Entry("stripe", "CSWin stripes 2 lines wide along axis 0", pg.stripe(0, width=2),
          (56, 56), (14, 14), _2D),
    Entry("longformer", "sliding window with a global token (Longformer)",
          pg.window(512) | pg.global_tokens([0]), (4096,), (4096,), ("n",)),
    Entry("window-causal", "neighbourhood intersected with row-major causal order",
          pg.window(7) & pg.causal(), (56, 56), (14, 14), _2D),
    Entry("per-head-axial", "a different pattern per head: columns, then rows",
          pg.heads(pg.axis(0), pg.axis(1)), (56, 56), (14, 14), _2D),
    Entry("video", "3-D 3x7x7 neighbourhood", pg.window((3, 7, 7)), (8, 32, 32), (4, 9, 9),
          ("T", "H", "W")),
]


def demo_text(head_dim: int = 64, heads: int = 8, entries=None) -> str:
    """The catalogue as text: picture, symbolic pairs, and numbers on each default grid."""
    blocks = []
    for e in entries or CATALOGUE:
        symbolic = cost(e.pattern, grid=e.symbolic_grid)
        numeric = cost(e.pattern, grid=e.grid, head_dim=head_dim, heads=heads)
        picture = show(e.pattern, grid=e.picture_grid)
        blocks.append("\n".join([
            f"== {e.name}: {e.family}",
            f"   pattern {e.pattern!r}",
            picture,
            f"   pairs on grid {'x'.join(e.symbolic_grid)}: {symbolic.pairs}"
            + (f"   (assuming {', '.join(map(str, symbolic.assumptions))})"
               if symbolic.assumptions else ""),
            *(f"   note: {n}" for n in symbolic.notes),
            f"   on grid {'x'.join(map(str, e.grid))}, head_dim={head_dim}, heads={heads}: "
            f"pairs={numeric.pairs}, keys/query={numeric.keys_min}..{numeric.keys_max}, "
            f"GFLOP={float(numeric.flops) / 1e9:.3f}, density={float(numeric.density):.2%}, "
            f"{float(numeric.speedup):.1f}x fewer FLOPs than dense",
        ]))
    return "\n\n".join(blocks)
