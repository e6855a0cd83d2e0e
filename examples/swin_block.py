"""Swin's W-MSA then SW-MSA, and the cyclic shift they replace.

Swin computes shifted-window attention by rolling the feature map by -M//2, cutting M x M
windows, and masking the pairs the roll brought together from opposite edges. patterngen states
the same pairs directly, ``block(M, offset=M//2)``: tiles cut at the grid edge, no roll, no
mask. This script builds Swin's construction literally and checks that both agree pair for pair
and output for output, then shows why the shift matters: two W-MSA layers never leave their
window, a W-MSA/SW-MSA pair does.

Last, two whole Swin blocks, ``pg.nn.SwinBlock`` (W-MSA, then SW-MSA, each with its relative
position bias table), load a timm-layout state dict through ``pg.nn.from_timm_swin``; they are
checked against Swin's block as its code writes it (roll, window partition, region mask at
-100, bias gathered with timm's relative position index), forward and the table's gradient.

Run: python examples/swin_block.py
"""

import torch

import patterngen as pg
from _common import best_backend, check_and_time, cost_line, expect, oracle, parse_args
from patterngen.analysis import layers_to_global, receptive_field
from patterngen.nn import LocalSelfAttention, SwinBlock, from_timm_swin

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


def relative_position_index():
    """timm's get_relative_position_index(M, M): query minus key, flattened per window."""
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += M - 1
    rel[:, :, 1] += M - 1
    rel[:, :, 0] *= 2 * M - 1
    return rel.sum(-1)


def swin_block_reference(block, swin_table, x):
    """The same block as Swin's code computes it, with ``swin_table`` in timm's layout
    ``((2M-1)^2, heads)``: norm, roll, window partition, scaled q.k plus the table gathered by
    the relative position index, region mask (-100), softmax, merge, roll back, MLP."""
    layer, heads, shifted = block.attn, block.attn.heads, any(block.shift)
    batch, dim, n = x.shape[0], x.shape[-1], M * M
    shortcut, x = x, block.norm1(x)
    if shifted:
        x = torch.roll(x, shifts=(-SHIFT, -SHIFT), dims=(1, 2))
    windows = to_windows(x).reshape(-1, n, dim)  # (batch * windows, M*M, C)
    q, k, v = layer.qkv(windows).reshape(-1, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    attn = (q * (dim // heads) ** -0.5) @ k.transpose(-2, -1)
    table = swin_table[relative_position_index().view(-1)].view(n, n, heads).permute(2, 0, 1)
    attn = attn + table[None]
    if shifted:
        labels = to_windows(region_labels(H, W)[..., None]).squeeze(-1)
        mask = torch.zeros(labels.shape[0], n, n, dtype=x.dtype)
        mask = mask.masked_fill(labels[:, :, None] != labels[:, None, :], -100.0)
        attn = (attn.view(batch, -1, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, dim)
    out = from_windows(layer.proj(out).reshape(batch, -1, n, dim), H, W)
    if shifted:
        out = torch.roll(out, shifts=(SHIFT, SHIFT), dims=(1, 2))
    x = shortcut + out
    return x + block.mlp(block.norm2(x))


def check_swin_blocks(backend="auto", dim=32, heads=2):
    """W-MSA then SW-MSA blocks with timm-layout tables against Swin's own formulation.

    Returns:
        ``(output error, table gradient error)``, the largest over both blocks (float64).
    """
    torch.manual_seed(0)
    errors = [0.0, 0.0]
    x = torch.randn(2, H, W, dim, dtype=torch.float64)
    for shifted in (False, True):
        block = SwinBlock(dim, heads, window=M, shift=SHIFT if shifted else 0,
                          backend=backend).to(torch.float64)
        swin_table = (0.02 * torch.randn((2 * M - 1) ** 2, heads, dtype=torch.float64)
                      ).requires_grad_()
        # a timm checkpoint: timm's key and layout for the table, converted on loading
        timm = {k: v for k, v in block.state_dict().items() if k != "attn.rel_pos_bias_table"}
        block.load_state_dict(from_timm_swin(
            {**timm, "attn.relative_position_bias_table": swin_table.detach()}, M))
        ours, want = block(x), swin_block_reference(block, swin_table, x)
        grad = torch.randn_like(ours)
        ours.backward(grad)
        want.backward(grad)
        errors[0] = max(errors[0], (ours - want).abs().max().item())
        table_grad = pg.bias.from_swin(swin_table.grad, M)
        errors[1] = max(errors[1],
                        (block.attn.rel_pos_bias_table.grad - table_grad).abs().max().item())
        x = ours.detach()  # the SW-MSA block runs on the W-MSA block's output, as in Swin
    return tuple(errors)


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
    # FlexAttention has no CPU backward; the table's gradient is checked on the others
    bias_backend = "auto" if args.backend == "flex" else args.backend
    out_error, grad_error = check_swin_blocks(bias_backend)
    expect(out_error < 1e-9 and grad_error < 1e-9,
           f"Swin blocks with relative position bias differ: output {out_error:.2e}, table "
           f"gradient {grad_error:.2e}")
    print(f"pg.nn.SwinBlock W-MSA + SW-MSA with relative position bias (timm state dict via "
          f"pg.nn.from_timm_swin) == Swin's roll + partition + region mask + bias index "
          f"(max abs error {out_error:.1e}, table gradient {grad_error:.1e})")
    for pattern in (W_MSA, SW_MSA):
        check_and_time(pattern, (H, W), args.backend)
    print("ok")


if __name__ == "__main__":
    main()
