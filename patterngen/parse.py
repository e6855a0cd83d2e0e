"""Read pattern expressions and grid sizes from text, safely (the command line's input).

An expression uses the pattern vocabulary only: the constructors ``window``, ``block``,
``area``, ``axis``, ``stripe``, ``criss_cross``, ``global_tokens``, ``causal``, ``full`` and
``heads``, integer, string and ``True``/``False`` literals, tuples and lists, keyword
arguments, and ``|`` and ``&``. A bare name such as ``M`` is a size symbol. The text is parsed
with :func:`ast.parse` and walked node by node against that whitelist; nothing is evaluated as
Python, so ``__import__('os')`` is an error that names its column.

Example:
    >>> parse("window(7) | axis(0)")
    (window(7) | axis(0))
    >>> parse("block(M, offset=3)")
    block(M, offset=3)
    >>> parse_grid("64x64"), parse_grid("H,W")
    ((64, 64), ('H', 'W'))
"""

from __future__ import annotations

import ast

from . import ir, limits, spec
from .errors import PatternError
from .grid import as_grid

__all__ = ["parse", "parse_grid", "lower", "as_ir", "CONSTRUCTORS"]

#: the callable names an expression may use
CONSTRUCTORS = {name: getattr(spec, name) for name in (
    "window", "block", "area", "axis", "stripe", "criss_cross", "global_tokens", "causal",
    "full", "heads")}


def _error(text: str, node, message: str, col: int | None = None) -> PatternError:
    col = col or getattr(node, "col_offset", 0) + 1
    return PatternError(f"{message.rstrip('.')} (column {col} of {text!r}).")


def _value(node, text: str):
    """The value of one whitelisted node (a pattern, a size, a literal or a sequence)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, str, bool)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) \
            and isinstance(node.operand, ast.Constant) and type(node.operand.value) is int:
        return -node.operand.value  # axis(-1)
    if isinstance(node, ast.Name):
        if node.id in CONSTRUCTORS:
            raise _error(text, node, f"{node.id} is a constructor; call it as {node.id}(...)")
        if node.id in ("True", "False"):
            return node.id == "True"
        return node.id  # a size symbol: sizes accept names
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [_value(e, text) for e in node.elts]
        return tuple(values) if isinstance(node, ast.Tuple) else values
    if _combines(node):
        return _chain(node, text)
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in CONSTRUCTORS:
            name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)
            raise _error(text, node.func, f"Unknown pattern {name!r}; expected one of "
                                          f"{sorted(CONSTRUCTORS)}")
        args = [_value(a, text) for a in node.args]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise _error(text, kw.value, "'**' arguments are not allowed")
            kwargs[kw.arg] = _value(kw.value, text)
        try:
            return CONSTRUCTORS[node.func.id](*args, **kwargs)
        except TypeError as e:
            raise _error(text, node, f"Bad arguments to {node.func.id}: {e}") from None
        except PatternError as e:
            raise _error(text, node, str(e)) from None
    col = None
    if isinstance(node, ast.BinOp):  # point at the operator, not at the left operand
        gap = text[node.left.end_col_offset:node.right.col_offset]
        token = gap.strip()[:2] or type(node.op).__name__
        col = node.left.end_col_offset + len(gap) - len(gap.lstrip()) + 1
    elif isinstance(node, ast.Attribute):
        token, col = "." + node.attr, node.value.end_col_offset + 1
    else:
        token = ast.unparse(node)
    raise _error(text, node, f"Unsupported {token!r}; an expression may use pattern "
                             f"constructors, integers, names, strings, tuples, keyword "
                             f"arguments, '|' and '&'", col)


def _combines(node) -> bool:
    return isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitOr, ast.BitAnd))


def _chain(node, text: str) -> spec.Pattern:
    """``a | b | ...`` (and ``&``), walked down its left spine in a loop: a union of a
    thousand terms is a tree a thousand deep."""
    spine = []
    while _combines(node):
        spine.append(node)
        node = node.left
    limits.check("PATTERNGEN_MAX_TERMS", len(spine) + 1,
                 "The number of patterns combined by one chain of '|' and '&'")

    def operand(side):
        v = _value(side, text)
        if not isinstance(v, spec.Pattern):
            raise _error(text, side, f"'|' and '&' combine patterns, not {v!r}")
        return v

    value = operand(node)
    for op in reversed(spine):
        right = operand(op.right)
        value = value | right if isinstance(op.op, ast.BitOr) else value & right
    return value


def parse(text: str) -> spec.Pattern:
    """A pattern from its expression, e.g. ``"window(7) | global_tokens([0])"``.

    ``repr(pattern)`` parses back to an equal pattern.

    Raises:
        PatternError: naming the column of the first token outside the vocabulary.

    Example:
        >>> parse("heads(axis(0), axis(1))")
        heads(axis(0), axis(1))
    """
    if not isinstance(text, str) or not text.strip():
        raise PatternError(f"Invalid pattern expression {text!r}; expected text such as "
                           f"'window(7) | axis(0)'.")
    text = text.strip()
    try:
        tree = ast.parse(text, mode="eval")
        value = _value(tree.body, text)
    except SyntaxError as e:
        raise PatternError(f"Syntax error: {e.msg} (column {e.offset or 1} of "
                           f"{text!r}).") from None
    except (RecursionError, MemoryError):
        raise PatternError(f"Pattern expression nested too deeply ({len(text)} characters "
                           f"starting {text[:40]!r}); write long unions as a flat chain "
                           f"a | b | c.") from None
    if not isinstance(value, spec.Pattern):
        raise _error(text, tree.body, f"Expected a pattern such as window(7), got {value!r}")
    return value


def ascii_digits(text: str) -> bool:
    """Only ASCII digits: ``str.isdigit`` also accepts ``"²"``, which ``int`` refuses."""
    return text.isascii() and text.isdigit()


def parse_grid(text: str) -> tuple:
    """Grid sizes from ``"64x64"``, ``"56,56"``, ``"H,W"``, ``"8x32x32"`` or ``"4096"``.

    Numbers become ints and names stay names (symbols downstream).

    Raises:
        PatternError: for an empty part or a part that is neither a number nor a name.

    Example:
        >>> parse_grid("T,56,56")
        ('T', 56, 56)
    """
    parts = str(text).replace(" ", "").split("," if "," in str(text) else "x")
    out = []
    for part in parts:
        if ascii_digits(part):
            out.append(int(part))
        elif part.isidentifier():
            out.append(part)
        else:
            raise PatternError(f"Invalid grid {text!r}: part {part!r} is neither a number nor "
                               f"a name; write sizes as 64x64, 56,56 or H,W.")
    return tuple(out)


def lower(pattern, grid, key_grid=None) -> ir.IR | ir.HeadsIR:
    """:func:`patterngen.spec.lower` of a spec or of its expression text (:func:`parse`).

    Raises:
        PatternError: with the spec and grid added to the message.
    """
    return spec.lower(parse(pattern) if isinstance(pattern, str) else pattern, grid, key_grid)


def as_ir(pattern, grid=None, key_grid=None):
    """Accept a spec or its expression text (lowered on ``grid``, keys on ``key_grid`` when
    given), or an already lowered IR."""
    if isinstance(pattern, (ir.IR, ir.HeadsIR)):
        if grid is not None and as_grid(grid) != pattern.grid:
            raise PatternError(f"IR lowered for grid {pattern.grid} used with grid={grid}.")
        if key_grid is not None and as_grid(key_grid) != pattern.keys:
            raise PatternError(f"IR lowered with keys on {pattern.keys} used with "
                               f"key_grid={key_grid}.")
        return pattern
    if grid is None:
        raise PatternError(f"{pattern!r} needs a grid, e.g. grid=(64, 64).")
    return lower(pattern, grid, key_grid)
