"""Swin's W-MSA then SW-MSA, and the cyclic shift they replace.

Swin computes shifted-window attention by rolling the feature map by -M//2, cutting M x M
windows, and masking the pairs the roll brought together from opposite edges. patterngen states
the same pairs directly, ``block(M, offset=M//2)``: tiles cut at the grid edge, no roll, no
mask. This script builds Swin's construction literally and checks that both agree pair for pair
and output for output, then shows why the shift matters: two W-MSA layers never leave their
window, a W-MSA/SW-MSA pair does.

Run: python examples/swin_block.py
"""

import torch

import patterngen as pg
from _common import best_backend, check_and_time, cost_line, expect, oracle, parse_args
from patterngen.analysis import layers_to_global, receptive_field
from patterngen.nn import LocalSelfAttention

H = W = 28
M, SHIFT = 7, 3
W_MSA, SW_MSA = pg.block(M), pg.block(M, offset=SHIFT)


def to_windows(t):
    """(..., H, W, d) -> (..., windows, M*M, d), Swin's window_partition."""
    *lead, h, w, d = t.shape
    t = t.reshape(*lead, h // M, M, w // M, M, d).transpose(-4, -3)
    return t.reshape(*lead, (h // M) * (w // M), M * M, d)


def from_windows(t, h, w):
    *lead, _, _, d = t.shape
    t = t.reshape(*lead, h // M, w // M, M, M, d).transpose(-4, -3)
    return t.reshape(*lead, h, w, d)


def region_labels(h, w):
    """Swin's img_mask: after the roll, tokens from different edges get different labels."""
    labels = torch.zeros(h, w, dtype=torch.long)
    cuts = (slice(0, -M), slice(-M, -SHIFT), slice(-SHIFT, None))
    for i, rows in enumerate(cuts):
        for j, cols in enumerate(cuts):
            labels[rows, cols] = 3 * i + j
    return labels


def swin_shifted_attention(q, k, v):
    """SW-MSA as Swin writes it: roll, partition, region mask, attend, merge, roll back."""
    rolled = [torch.roll(t, shifts=(-SHIFT, -SHIFT), dims=(-3, -2)) for t in (q, k, v)]
    qw, kw, vw = map(to_windows, rolled)
    labels = to_windows(region_labels(H, W)[..., None]).squeeze(-1)
    allowed = labels[:, :, None] == labels[:, None, :]
    scores = (qw @ kw.transpose(-1, -2)) * q.shape[-1] ** -0.5
    out = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ vw
    return torch.roll(from_windows(out, H, W), shifts=(SHIFT, SHIFT), dims=(-3, -2))


def swin_pairs():
    """The (query, key) pairs Swin's construction allows, in original coordinates."""
    r, c = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    rr, cc = (r - SHIFT) % H, (c - SHIFT) % W  # where torch.roll(-SHIFT) moves each token
    window = (rr // M) * (W // M) + cc // M
    label = region_labels(H, W)[rr, cc]
    window, label = window.reshape(-1), label.reshape(-1)
    return ((window[:, None] == window[None, :]) & (label[:, None] == label[None, :])).numpy()


def main():
    args = parse_args(__doc__)
    for pattern in (W_MSA, SW_MSA):
        print(pg.show(pattern, grid=(H, W), query=(9, 9)))
        print(cost_line(pattern, (H, W)))
        print()
    expect((swin_pairs() == pg.materialize(SW_MSA, (H, W))).all(),
           "block(7, offset=3) differs from Swin's roll + region mask")
    print("block(7, offset=3) == Swin's cyclic shift + region mask, pair for pair")

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, H, W, 16, dtype=torch.float64) for _ in range(3))
    error = (swin_shifted_attention(q, k, v) - oracle(SW_MSA, (H, W), q, k, v)).abs().max()
    expect(error < 1e-12, f"SW-MSA outputs differ by {error:.2e}")
    print(f"and output for output (max abs error {error:.1e})\n")

    twice = receptive_field([W_MSA, W_MSA], grid=(H, W), query=(9, 9))
    pair = receptive_field([W_MSA, SW_MSA], grid=(H, W), query=(9, 9))
    print(twice, pair, sep="\n")
    expect(twice.size == M * M and pair.size > M * M, "the shifted pair should cross windows")
    depth = layers_to_global([W_MSA, SW_MSA], grid=(H, W))
    expect(layers_to_global([W_MSA, W_MSA], grid=(H, W)) is None and depth is not None,
           "W-MSA alone never becomes global, W/SW pairs do")
    print(f"W-MSA twice: never global; W-MSA/SW-MSA alternating: global after {depth} layers\n")

    backend = best_backend(SW_MSA, (H, W), args.backend)
    if backend is not None:
        # the SW-MSA layer as a torch module, checked against the literal construction
        layer = LocalSelfAttention(dim=32, heads=2, pattern=SW_MSA, backend=backend)
        x = torch.randn(1, H, W, 32)
        with torch.no_grad():
            qkv = layer.qkv(x).reshape(1, H, W, 3, 2, 16).permute(3, 0, 4, 1, 2, 5)
            heads = swin_shifted_attention(*qkv).permute(0, 2, 3, 1, 4).reshape(1, H, W, 32)
            error = (layer(x) - layer.proj(heads)).abs().max().item()
        expect(error < 1e-4, f"LocalSelfAttention(block(7, offset=3)) differs by {error:.2e}")
        print(f"LocalSelfAttention(pattern=block(7, offset=3)) == Swin SW-MSA layer "
              f"(max abs error {error:.1e})")
    for pattern in (W_MSA, SW_MSA):
        check_and_time(pattern, (H, W), args.backend)
    print("ok")


if __name__ == "__main__":
    main()
