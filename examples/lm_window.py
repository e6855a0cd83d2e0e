"""A 1-D causal sliding window with an attention-sink token, as in long-context language models.

Each token sees itself and the ``w - 1`` tokens before it (Mistral's sliding window), plus
token 0, which every token keeps as a global key (Longformer's global token, StreamingLLM's
sink). Intersecting with ``causal()`` keeps token 0 from looking ahead. This script checks the
pattern against the index arithmetic a language model would write, costs it, shows how the
global key shortens the path between any two tokens, and checks the kernel against the oracle.

Run: python examples/lm_window.py
"""

import numpy as np

import patterngen as pg
from _common import check_and_time, cost_line, expect, parse_args
from patterngen.analysis import layers_to_global

N, WINDOW = 512, 32


def main():
    args = parse_args(__doc__)
    local = pg.window(WINDOW, causal=True)
    pattern = (local | pg.global_tokens([0])) & pg.causal()
    print(pg.show(pattern, grid=N, query=100))
    i = np.arange(N)
    q, k = i[:, None], i[None, :]
    expected = (k <= q) & ((q - k < WINDOW) | (k == 0))
    expect((pg.materialize(pattern, N) == expected).all(), "pattern differs from index rule")
    print(f"\n{pattern!r} == (k <= q) & (q - k < {WINDOW} or k == 0)")
    print(f"symbolic pairs of the window: {pg.cost(local, grid='n').pairs}")
    print(cost_line(pattern, (N,)))
    # causal attention never sends information backwards, so no depth is global; the sink
    # shortens the path from token 0 to everything instead
    print(f"layers to global: {layers_to_global(pattern, grid=N)} (causal: never)")
    check_and_time(pattern, (N,), args.backend)
    print("ok")


if __name__ == "__main__":
    main()
