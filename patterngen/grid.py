"""Token grids: per-axis sizes (ints or sympy symbols) and the row-major flattening order.

A grid is the shape of the token layout a pattern is declared on: ``(n,)`` for a sequence,
``(H, W)`` for an image, ``(T, H, W)`` for a video. Tokens are flattened in row-major order
(the last axis varies fastest), the order ``x.flatten(2, -2)`` gives for ``(batch, heads,
*grid, dim)`` tensors.

Example:
    >>> as_grid((14, "W")).shape
    (14, W)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import sympy

from .errors import PatternError

__all__ = ["Grid", "as_grid", "symbol", "as_size", "is_number"]


#: the largest number a size may be (the product of two fits an int64)
MAX_SIZE = 2 ** 31 - 1


@functools.lru_cache(maxsize=None)
def symbol(name: str) -> sympy.Symbol:
    """The one positive-integer sympy symbol of this name (same name, same symbol)."""
    return sympy.Symbol(name, positive=True, integer=True)


def is_number(value) -> bool:
    """True for a plain or sympy integer, False for a size that still holds symbols."""
    return isinstance(value, (int, np.integer)) or (
        isinstance(value, sympy.Basic) and value.is_Integer
    )


def as_size(value, name: str, minimum: int = 1):
    """Normalise one size: an int, a sympy expression, or a name string (becomes a symbol).

    Raises:
        PatternError: for bools, floats, other types, or a number below ``minimum`` or
            above :data:`MAX_SIZE`.
    """
    if isinstance(value, str):
        if not value.isidentifier():
            raise PatternError(
                f"Invalid size {name}={value!r}; a symbolic size must be an identifier "
                f"such as 'H' or 'n_1'."
            )
        return symbol(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, sympy.Basic)):
        raise PatternError(
            f"Invalid size {name}={value!r} of type {type(value).__name__}; expected an "
            f"integer >= {minimum} or a symbol."
        )
    if isinstance(value, sympy.Basic):
        if value.is_Integer:
            value = int(value)
        elif value.is_integer is False or (value.is_number and not value.is_Integer):
            raise PatternError(f"Invalid size {name}={value}; expected an integer >= {minimum}.")
        else:
            return value
    value = int(value)
    if value < minimum:
        raise PatternError(f"Invalid size {name}={value}; expected an integer >= {minimum}.")
    if value > MAX_SIZE:
        # beyond this, products of sizes overflow the int64 arithmetic of counts and kernels
        raise PatternError(f"Invalid size {name}={value}; expected an integer <= "
                           f"{MAX_SIZE} (2**31 - 1).")
    return value


@dataclass(frozen=True)
class Grid:
    """A token grid.

    Attributes:
        shape: per-axis sizes, each an int or a sympy expression.
    """

    shape: tuple

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def numeric(self) -> bool:
        return all(is_number(n) for n in self.shape)

    @property
    def tokens(self):
        """Number of tokens (an int for numeric grids, a sympy product otherwise)."""
        out = 1
        for n in self.shape:
            out = out * n
        return out

    def require_numeric(self, what: str) -> tuple[int, ...]:
        if not self.numeric:
            raise PatternError(
                f"{what} needs a numeric grid, got grid={self}; substitute the symbols first."
            )
        return tuple(int(n) for n in self.shape)

    def subs(self, mapping) -> "Grid":
        return Grid(tuple(n if is_number(n) else sympy.sympify(n).subs(mapping, simultaneous=True)
                          for n in self.shape)).normalised()

    def normalised(self) -> "Grid":
        return Grid(tuple(int(n) if is_number(n) else n for n in self.shape))

    def __str__(self) -> str:
        return "x".join(str(n) for n in self.shape)


def as_grid(grid) -> Grid:
    """Normalise ``64``, ``(64, 64)``, ``("H", "W")`` or a :class:`Grid` into a :class:`Grid`.

    Raises:
        PatternError: for an empty grid, more than three axes, or a bad size.
    """
    if isinstance(grid, Grid):
        return grid
    if isinstance(grid, (int, np.integer, str, sympy.Basic)) and not isinstance(grid, bool):
        grid = (grid,)
    if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3:
        raise PatternError(
            f"Invalid grid={grid!r}; expected 1 to 3 axis sizes, e.g. 4096, (64, 64) or "
            f"('T', 'H', 'W')."
        )
    return Grid(tuple(as_size(n, f"grid[{a}]") for a, n in enumerate(grid)))
