"""The ``patterngen`` command line: show, cost, plan, profile, reach, codegen and demo.

Patterns are read by :func:`patterngen.parse.parse` (the pattern vocabulary only, never Python)
and grids by :func:`patterngen.parse.parse_grid`. Bad input exits with status 2 and one line
``patterngen: error: ...`` on stderr; a backend that cannot run exits with status 1 and its
reasons.

Example:
    >>> main(["cost", "block(M)", "--grid", "H,W"])  # doctest: +ELLIPSIS
    Cost of block(M) on grid HxW (head_dim=1, heads=1, batch=1)
      tokens ...
    0
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import BackendUnavailable, PatternError
from .parse import ascii_digits, parse, parse_grid

__all__ = ["main", "build_parser"]

EXAMPLES = {
    "show": ['patterngen show "window(7) | axis(0)" --grid 14x14 --query 0,0',
             'patterngen show "window(3)" --grid 16x16 --key-grid 4x4 --query 9,2'],
    "cost": ['patterngen cost "block(M)" --grid H,W --head-dim C',
             'patterngen cost "window(7)" --grid H,W --subs H=56 W=56',
             'patterngen cost "window(24, stride=8)" --grid 64x64 --block 64',
             'patterngen cost "window(5)" --grid H,W --key-grid h,w --head-dim d'],
    "plan": ['patterngen plan "criss_cross() | window(3)" --grid 64x64 --backward',
             'patterngen plan "block(7)" --grid 56x56 --heads 4 --dtype bfloat16'],
    "profile": ['patterngen profile "window(7)" --grid 64x64 --backend numba',
                'patterngen profile "window(7)" --sizes 32x32 64x64 128x128 --plot out.png'],
    "reach": ['patterngen reach "criss_cross()" --grid 97x97',
              'patterngen reach "block(7)" "block(7, offset=3)" --grid 56x56 --layers 4'],
    "codegen": ['patterngen codegen "criss_cross()" --grid 32x32 --backend numba'],
    "demo": ["patterngen demo --plot demo.png"],
}


def _epilog(lines) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _coords(text: str) -> tuple:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid coordinates {text!r}; expected integers such as 0,0") from None


def _grid(text: str) -> tuple:
    try:
        return parse_grid(text)
    except PatternError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _assignment(text: str) -> tuple:
    name, sep, value = text.partition("=")
    if not sep or not name.isidentifier() or not ascii_digits(value):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; expected NAME=INTEGER, "
                                         f"e.g. H=56")
    return name, int(value)


def _size(text: str):
    return int(text) if ascii_digits(text) else text


def _add_shape_options(p, head_dim, heads, symbolic=False):
    kind, size = ("a number or a name", _size) if symbolic else ("a number", int)
    p.add_argument("--head-dim", type=size, default=head_dim, metavar="D",
                   help=f"channels per head, {kind} (default {head_dim})")
    p.add_argument("--heads", type=size, default=heads, help=f"heads, {kind} (default {heads})")
    p.add_argument("--batch", type=size, default=1, help=f"batch size, {kind} (default 1)")
    p.add_argument("--dtype", default="float32", help="element type (default float32)")


def _add_run_options(p):
    p.add_argument("--backend", default="auto", help="backend name or auto (default auto)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeats", type=int, default=7, help="timed calls (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (every command's ``--help`` ends with an example)."""
    parser = argparse.ArgumentParser(
        prog="patterngen", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Declare local-attention patterns, cost them exactly, run and measure "
                    "generated kernels.",
        epilog="patterns use the vocabulary window, block, area, axis, stripe, criss_cross, "
               "global_tokens, causal, full, heads with | and &;\ngrids are 64x64, 56,56 or "
               "H,W (names are symbols).\n\n" + _epilog(v[0] for v in EXAMPLES.values()))
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def command(name, help_text):
        return sub.add_parser(name, help=help_text, description=help_text,
                              epilog=_epilog(EXAMPLES[name]),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = command("show", "draw the keys one query sees")
    p.add_argument("pattern", help='pattern expression, e.g. "window(7) | axis(0)"')
    p.add_argument("--grid", type=_grid, required=True, help="numeric grid, e.g. 14x14")
    p.add_argument("--query", type=_coords, help="query coordinates, e.g. 0,0 (default centre)")
    p.add_argument("--head", type=int, default=0, help="head to draw for heads(...) patterns")
    p.add_argument("--key-grid", type=_grid, help="the keys' grid when it is another, e.g. 4x4 "
                                                  "(docs/cross.md)")

    p = command("cost", "print the exact symbolic cost report")
    p.add_argument("pattern", help='pattern expression, e.g. "block(M)"')
    p.add_argument("--grid", type=_grid, required=True, help="grid, e.g. H,W or 56x56")
    _add_shape_options(p, 1, 1, symbolic=True)
    p.add_argument("--key-grid", type=_grid, help="the keys' grid when it is another, e.g. h,w "
                                                  "(docs/cross.md)")
    p.add_argument("--subs", type=_assignment, nargs="+", default=[], metavar="NAME=N",
                   help="substitute sizes after the symbolic report, e.g. H=56 W=56")
    p.add_argument("--block", type=_grid, metavar="BQxBK",
                   help="add the executed pairs and waste of a block-sparse layout with "
                        "these blocks, e.g. 64 or 128x64 (numeric grids)")

    p = command("plan", "explain how backend auto runs a pattern (executor per term, "
                        "predicted ms)")
    p.add_argument("pattern", help='pattern expression, e.g. "criss_cross() | window(3)"')
    p.add_argument("--grid", type=_grid, required=True, help="numeric grid, e.g. 64x64")
    _add_shape_options(p, 32, 4)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--backward", action="store_true",
                   help="predict forward+backward (training) instead of forward only")

    p = command("profile", "measure a backend beside the symbolic cost")
    p.add_argument("pattern", help='pattern expression, e.g. "window(7)"')
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--grid", type=_grid, help="one numeric grid, e.g. 64x64")
    size.add_argument("--sizes", type=_grid, nargs="+", help="several grids to sweep")
    p.add_argument("--key-grid", type=_grid, help="the keys' grid when it is another, e.g. 16x16 "
                   "(with --grid)")
    _add_shape_options(p, 32, 4)
    _add_run_options(p)
    p.add_argument("--plot", help="write a log-log PNG of time and symbolic prediction")

    p = command("reach", "layers until every token reaches every other; receptive fields")
    p.add_argument("patterns", nargs="+", help="one pattern per layer, cycled")
    p.add_argument("--grid", type=_grid, required=True, help="numeric grid, e.g. 56x56")
    p.add_argument("--layers", type=int, help="also draw the receptive field after this many")
    p.add_argument("--query", type=_coords, help="receptive field query (default centre)")
    p.add_argument("--no-residual", action="store_true",
                   help="layers without residual connections (bare attention)")

    p = command("codegen", "print what a backend generates (numba source, block layout)")
    p.add_argument("pattern", help='pattern expression, e.g. "criss_cross()"')
    p.add_argument("--grid", type=_grid, required=True, help="numeric grid, e.g. 32x32")
    p.add_argument("--backend", default="numba", help="backend name (default numba)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float32", help="element type (default float32)")

    p = command("demo", "the built-in catalogue: pictures, cost, measured times, a plot")
    _add_shape_options(p, 32, 4)
    _add_run_options(p)
    p.set_defaults(repeats=3, warmup=1)
    p.add_argument("--plot", default="patterngen-demo.png",
                   help="PNG of measured time against symbolic FLOPs (default "
                        "patterngen-demo.png)")
    p.add_argument("--no-measure", action="store_true", help="print the catalogue only")
    return parser


def _show(args):
    from .pictures import show

    print(show(parse(args.pattern), grid=args.grid, query=args.query, head=args.head,
               key_grid=args.key_grid))


def _cost(args):
    from .cost import cost

    block = args.block if args.block is None or len(args.block) != 1 else args.block[0]
    report = cost(parse(args.pattern), grid=args.grid, head_dim=args.head_dim, heads=args.heads,
                  batch=args.batch, dtype=args.dtype, block=block, key_grid=args.key_grid)
    print(report)
    if args.subs:
        print()
        print(report.subs(dict(args.subs)))


def _plan(args):
    from .plan import plan

    print(plan(parse(args.pattern), grid=args.grid, head_dim=args.head_dim, heads=args.heads,
               batch=args.batch, device=args.device, dtype=args.dtype,
               backward=args.backward))


def _profile(args):
    from .profile import profile

    print(profile(parse(args.pattern), grid=args.grid, sizes=args.sizes,
                  head_dim=args.head_dim, heads=args.heads, batch=args.batch,
                  backend=args.backend, device=args.device, dtype=args.dtype,
                  warmup=args.warmup, repeats=args.repeats, plot=args.plot,
                  key_grid=args.key_grid))


def _reach(args):
    from .analysis import layers_to_global, receptive_field

    stack = [parse(p) for p in args.patterns]
    residual = not args.no_residual
    depth = layers_to_global(stack, grid=args.grid, residual=residual)
    names = ", ".join(map(repr, stack))
    grid = "x".join(map(str, args.grid))
    if depth is None:
        print(f"[{names}] on grid {grid}: never global (a full cycle of layers adds no reach)")
    else:
        print(f"[{names}] on grid {grid}: every token reaches every other after {depth} "
              f"layer{'s' * (depth != 1)}")
    if args.layers is not None or args.query is not None:
        print(receptive_field(stack, grid=args.grid, query=args.query,
                              layers=args.layers or len(stack), residual=residual))


def _codegen(args):
    from .compile import compile as compile_pattern

    attn = compile_pattern(parse(args.pattern), args.grid, backend=args.backend,
                           device=args.device, dtype=args.dtype)
    for attribute in ("source", "block_mask", "layout"):
        artefact = getattr(attn, attribute, None)
        if artefact is not None:
            print(artefact)
            return
    print(f"backend {args.backend!r} exposes no generated artefact (source, block_mask or "
          f"layout)")


def _demo(args):
    from .catalogue import CATALOGUE, demo_text

    print(demo_text(head_dim=args.head_dim, heads=args.heads))
    if args.no_measure:
        return
    from .profile import profile

    rows = []
    for entry in CATALOGUE:
        try:
            prof = profile(entry.pattern, grid=entry.grid, head_dim=args.head_dim,
                           heads=args.heads, batch=args.batch, backend=args.backend,
                           device=args.device, dtype=args.dtype, warmup=args.warmup,
                           repeats=args.repeats)
        except BackendUnavailable as e:
            rows.append((entry.name, None, str(e).splitlines()[0]))
            continue
        rows.append((entry.name, prof.rows[0], None))
    print()
    print(_demo_table(rows, args))
    measured = [(name, r) for name, r, _ in rows if r is not None]
    if measured and args.plot:
        _demo_plot(measured, args)
        print(f"plot: {args.plot}")


def _demo_table(rows, args) -> str:
    header = ("pattern", "grid", "backend", "GFLOP", "compile ms", "median ms", "GFLOP/s",
              "% peak")
    table = [header]
    for name, r, why in rows:
        if r is None:
            table.append((name, "", "none", "", "", "", "", why))
            continue
        table.append((name, "x".join(map(str, r.grid)), r.backend, f"{r.flops / 1e9:.3f}",
                      f"{r.compile_ms:.0f}", f"{r.median_ms:.2f}", f"{r.gflops:.2f}",
                      f"{100 * r.peak_share:.1f}%"))
    widths = [max(len(row[c]) for row in table) for c in range(len(header) - 1)]
    lines = [f"measured on {args.device} (head_dim={args.head_dim}, heads={args.heads}, "
             f"batch={args.batch}, {args.dtype}; median of {args.repeats})"]
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1]
              for row in table]
    return "\n".join(lines)


def _demo_plot(measured, args):
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flops = [r.flops for _, r in measured]
    times = [r.median_ms for _, r in measured]
    # one rate for the whole catalogue: how well symbolic FLOPs alone predict time
    rate = math.exp(sum(math.log(f / t) for f, t in zip(flops, times)) / len(flops))
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.loglog(flops, times, "o")
    for (name, r) in measured:
        ax.annotate(name, (r.flops, r.median_ms), fontsize=7, textcoords="offset points",
                    xytext=(4, 3))
    line = [min(flops), max(flops)]
    ax.loglog(line, [f / rate for f in line], "--",
              label=f"symbolic FLOPs / {rate * 1e3 / 1e9:.2f} GFLOP/s (fitted)")
    ax.set_xlabel("symbolic FLOPs per call")
    ax.set_ylabel("measured time per call (ms)")
    ax.set_title(f"patterngen catalogue on {args.device} (head_dim={args.head_dim}, "
                 f"heads={args.heads})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)


COMMANDS = {"show": _show, "cost": _cost, "plan": _plan, "profile": _profile, "reach": _reach,
            "codegen": _codegen, "demo": _demo}


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 no backend, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except BrokenPipeError:
        # `patterngen ... | head` closed stdout: not an error. Point stdout at devnull so the
        # interpreter's final flush does not raise again (the recipe in Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except BackendUnavailable as e:
        print(f"patterngen: {e}", file=sys.stderr)
        return 1
    except ImportError as e:  # e.g. a built-in backend whose module or dependency is missing
        print(f"patterngen: unavailable: {e}", file=sys.stderr)
        return 1
    except PatternError as e:
        message = str(e)
        print(f"patterngen: error: {message}", file=sys.stderr)
        return 2
    return 0
