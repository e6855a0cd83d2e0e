"""Learned 4x feature upsampling: a high-resolution grid of queries attends to a 3x3
neighbourhood of a low-resolution feature map.

``pg.nn.LocalCrossAttention(dim, heads, pg.window(3), grid=(32, 32), key_grid=(8, 8))``: the
query at ``x`` sits over the key ``floor((x + 0.5) * 8 / 32)`` per axis (torch's
``nearest-exact``) and attends the 3x3 key neighbourhood the same window gives that key on the
8x8 map (docs/cross.md). The script draws one query's keys, costs the layer symbolically in
both grids' sizes, checks the layer against the dense oracle, and trains it for a few steps on
CPU to reproduce a bicubic upsampling of random smooth features (the loss goes down).

Run: python examples/upsample_attention.py
"""

import torch
import torch.nn.functional as F

import patterngen as pg
from _common import expect, parse_args
from patterngen import backends

GRID, KEY_GRID, DIM, HEADS, STEPS = (32, 32), (8, 8), 32, 2, 40


def backend_for(name: str) -> str:
    """``name``, or ``numba`` for a backend that does not run key grids or has no backward on
    CPU, where this example trains (said on stdout)."""
    cls = backends.get_backend(name)
    if getattr(cls, "SUPPORTS_KEY_GRID", False) and "cpu" in cls.BACKWARD_DEVICES:
        return name
    print(f"backend {name!r} does not train keys on another grid on CPU; using 'numba'")
    return "numba"


def smooth_features(batch: int, generator) -> torch.Tensor:
    """Random low-resolution maps ``(batch, *KEY_GRID, DIM)``, smooth enough to upsample."""
    coarse = torch.randn(batch, DIM, 4, 4, generator=generator)
    return F.interpolate(coarse, size=KEY_GRID, mode="bilinear").movedim(1, -1)


def check_against_oracle(layer, x, context) -> None:
    """The layer's output against its projections around the dense masked oracle."""
    head_dim = DIM // HEADS
    with torch.no_grad():
        got = layer(x, context)
        q = layer.q(x.flatten(1, 2)).unflatten(-1, (HEADS, head_dim)).transpose(1, 2)
        k, v = layer.kv(context.flatten(1, 2)).unflatten(-1, (2 * HEADS, head_dim)).transpose(
            1, 2).split(HEADS, 1)
        mask = torch.as_tensor(pg.materialize(layer.pattern, GRID, key_grid=KEY_GRID))
        out = pg.dense_attention(q.double(), k.double(), v.double(), mask)
        want = layer.proj(out.float().transpose(1, 2).flatten(2)).reshape(got.shape)
    error = (got - want).abs().max().item()
    expect(error < 1e-4, f"LocalCrossAttention differs from the dense oracle by {error:.2e}")
    print(f"LocalCrossAttention output matches the dense oracle (max abs error {error:.1e})")


def main():
    args = parse_args(__doc__)
    pattern = pg.window(3)
    print(pg.show(pattern, grid=GRID, key_grid=KEY_GRID, query=(9, 30)))
    report = pg.cost(pattern, grid=("H", "W"), key_grid=("h", "w"), head_dim="d")
    print(f"symbolic pairs {report.pairs}, bytes {report.bytes} (float32)")

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = pg.nn.LocalCrossAttention(DIM, HEADS, pattern, grid=GRID, key_grid=KEY_GRID,
                                      backend=backend_for(args.backend))
    # the queries: the low-resolution map repeated 4x (nearest) and a learned position within
    # each 4x4 cell, so that the layer can blend its neighbours by where the query sits
    offsets = torch.nn.Parameter(torch.zeros(1, 4, 4, DIM))
    optimizer = torch.optim.Adam([*layer.parameters(), offsets], lr=1e-2)

    def queries(context):
        near = F.interpolate(context.movedim(-1, 1), size=GRID, mode="nearest").movedim(1, -1)
        return near + offsets.repeat(1, GRID[0] // 4, GRID[1] // 4, 1)

    context = smooth_features(2, generator)
    check_against_oracle(layer, queries(context), context)
    losses = []
    for _ in range(STEPS):
        context = smooth_features(8, generator)
        target = F.interpolate(context.movedim(-1, 1), size=GRID, mode="bicubic").movedim(1, -1)
        loss = F.mse_loss(layer(queries(context), context), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    print(f"{STEPS} training steps: loss {first:.4f} -> {last:.4f}")
    expect(last < 0.5 * first, f"the loss did not go down ({first:.4f} -> {last:.4f})")
    print("ok")


if __name__ == "__main__":
    main()
