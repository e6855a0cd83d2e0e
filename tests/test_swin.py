"""pg.nn.SwinBlock against timm's SwinTransformerBlock, whose code path (timm 1.0's
swin_transformer.py: window_partition/window_reverse, get_relative_position_index,
WindowAttention without fused attention, get_attn_mask, the block's roll, pad, crop and roll
back) is written here as timm writes it; timm is not a dependency."""

import pytest
import torch
import torch.nn.functional as F

from patterngen import nn
from patterngen.errors import PatternError


def window_partition(x, ws):
    B, H, W, C = x.shape
    x = x.view(B, H // ws[0], ws[0], W // ws[1], ws[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws[0], ws[1], C)


def window_reverse(windows, ws, H, W):
    C = windows.shape[-1]
    x = windows.view(-1, H // ws[0], W // ws[1], ws[0], ws[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, H, W, C)


def get_relative_position_index(win_h, win_w):
    coords = torch.stack(torch.meshgrid(torch.arange(win_h), torch.arange(win_w),
                                        indexing="ij"))
    coords_flatten = torch.flatten(coords, 1)
    relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
    relative_coords = relative_coords.permute(1, 2, 0).contiguous()
    relative_coords[:, :, 0] += win_h - 1
    relative_coords[:, :, 1] += win_w - 1
    relative_coords[:, :, 0] *= 2 * win_w - 1
    return relative_coords.sum(-1)


def get_attn_mask(H, W, ws, ss, dtype):
    if not any(ss):
        return None
    H, W = -(-H // ws[0]) * ws[0], -(-W // ws[1]) * ws[1]
    img_mask = torch.zeros((1, H, W, 1), dtype=dtype)
    cnt = 0
    for h in ((0, -ws[0]), (-ws[0], -ss[0]), (-ss[0], None)):
        for w in ((0, -ws[1]), (-ws[1], -ss[1]), (-ss[1], None)):
            img_mask[:, h[0]:h[1], w[0]:w[1], :] = cnt
            cnt += 1
    mask_windows = window_partition(img_mask, ws).view(-1, ws[0] * ws[1])
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, 0.0)


def window_attention(sd, x, heads, ws, mask):
    B_, N, C = x.shape
    qkv = F.linear(x, sd["attn.qkv.weight"], sd["attn.qkv.bias"])
    q, k, v = qkv.reshape(B_, N, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    q = q * (C // heads) ** -0.5
    attn = q @ k.transpose(-2, -1)
    index = get_relative_position_index(*ws)
    bias = sd["attn.relative_position_bias_table"][index.view(-1)].view(N, N, -1)
    attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
    if mask is not None:
        num_win = mask.shape[0]
        attn = attn.view(-1, num_win, heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, N, N)
    x = (attn.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, -1)
    return F.linear(x, sd["attn.proj.weight"], sd["attn.proj.bias"])


def timm_block(sd, x, heads, ws, ss):
    """SwinTransformerBlock.forward (always_partition=True, dynamic_mask=True), eval mode."""
    B, H, W, C = x.shape
    shortcut = x
    x = F.layer_norm(x, (C,), sd["norm1.weight"], sd["norm1.bias"])
    shifted_x = torch.roll(x, shifts=(-ss[0], -ss[1]), dims=(1, 2)) if any(ss) else x
    pad_h = (ws[0] - H % ws[0]) % ws[0]
    pad_w = (ws[1] - W % ws[1]) % ws[1]
    shifted_x = F.pad(shifted_x, (0, 0, 0, pad_w, 0, pad_h))
    _, Hp, Wp, _ = shifted_x.shape
    x_windows = window_partition(shifted_x, ws).view(-1, ws[0] * ws[1], C)
    attn_windows = window_attention(sd, x_windows, heads, ws,
                                    get_attn_mask(Hp, Wp, ws, ss, x.dtype))
    attn_windows = attn_windows.view(-1, ws[0], ws[1], C)
    shifted_x = window_reverse(attn_windows, ws, Hp, Wp)[:, :H, :W, :].contiguous()
    x = torch.roll(shifted_x, shifts=ss, dims=(1, 2)) if any(ss) else shifted_x
    x = shortcut + x
    x = x.reshape(B, -1, C)
    y = F.layer_norm(x, (C,), sd["norm2.weight"], sd["norm2.bias"])
    y = F.linear(F.gelu(F.linear(y, sd["mlp.fc1.weight"], sd["mlp.fc1.bias"])),
                 sd["mlp.fc2.weight"], sd["mlp.fc2.bias"])
    return (x + y).reshape(B, H, W, C)


def timm_state_dict(dim, heads, ws, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
              "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim),
              "attn.proj.bias": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
              "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
              "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,),
              "attn.relative_position_bias_table": ((2 * ws[0] - 1) * (2 * ws[1] - 1), heads)}
    sd = {k: 0.3 * torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    sd["attn.relative_position_index"] = get_relative_position_index(*ws)
    return sd


@pytest.mark.parametrize("grid, backend", [((8, 12), "numba"), ((10, 13), "numba"),
                                           ((3, 5), "numba"), ((8, 12), "auto"),
                                           ((4, 4), "auto"), ((10, 13), "auto")])
@pytest.mark.parametrize("shift", [0, 2])
def test_swin_block_equals_timm(grid, backend, shift):
    # auto on maps the windows tile: the attention in its token order (roll and partition
    # once on x, before the qkv projection)
    dim, heads, ws, ss = 8, 2, (4, 4), (shift, shift)
    sd = timm_state_dict(dim, heads, ws)
    block = nn.SwinBlock(dim, heads, window=4, shift=shift, backend=backend).double().eval()
    block.load_state_dict(nn.from_timm_swin(sd, 4))
    x = torch.randn(2, *grid, dim, dtype=torch.float64)
    table = sd["attn.relative_position_bias_table"].requires_grad_()
    want = timm_block(sd, x, heads, ws, ss)
    got = block(x)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    tiled = backend == "auto" and not (grid[0] % 4 or grid[1] % 4)
    assert (nn.ordered_attention(block.tiled_decl, grid, x) is not None) == tiled
    grad = torch.randn_like(got)
    want.backward(grad)
    got.backward(grad)
    torch.testing.assert_close(block.attn.rel_pos_bias_table.grad,
                               nn.from_timm_swin({"t.relative_position_bias_table": table.grad},
                                                 4)["t.rel_pos_bias_table"], atol=1e-10, rtol=0)


def test_input_resolution_clamps_window_and_shift_as_timm_does():
    # timm's default always_partition=False: an axis no longer than the window gets a window of
    # its length and no shift (Swin-T's last stage: 7 x 7 maps, window 7, no shift)
    block = nn.SwinBlock(8, 2, window=4, shift=2, input_resolution=(3, 5),
                         backend="numba").double().eval()
    assert block.window == (3, 4) and block.shift == (0, 2)
    sd = timm_state_dict(8, 2, (3, 4))
    block.load_state_dict(nn.from_timm_swin(sd, (3, 4)))
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(block(x), timm_block(sd, x, 2, (3, 4), (0, 2)), atol=1e-10,
                               rtol=0)
    kept = nn.SwinBlock(8, 2, window=4, shift=2, input_resolution=(3, 5),
                        always_partition=True)
    assert kept.window == (4, 4) and kept.shift == (2, 2)


def test_swin_block_options_and_refusals():
    block = nn.SwinBlock(16, 2, window=(4, 5), shift=(2, 1), mlp_ratio=2.0, qkv_bias=False,
                         proj_drop=0.1, drop_path=0.2)
    assert block.attn.qkv.bias is None and block.mlp.fc1.out_features == 32
    block.train()
    x = torch.randn(8, 9, 7, 16)
    assert block(x).shape == x.shape
    kept = nn.DropPath(0.5).train()(torch.ones(64, 3))
    assert set(kept[:, 0].tolist()) <= {0.0, 2.0} and (kept == kept[:, :1]).all()
    with pytest.raises(PatternError, match=r"Invalid shift=4; expected 0 <= shift < window"):
        nn.SwinBlock(16, 2, window=4, shift=4)
    with pytest.raises(PatternError, match=r"attn_drop=0.1 is not supported"):
        nn.SwinBlock(16, 2, attn_drop=0.1)
    with pytest.raises(PatternError, match=r"Invalid drop_path=1.0"):
        nn.SwinBlock(16, 2, drop_path=1.0)
    with pytest.raises(PatternError, match=r"expects \(batch, H, W, 16\)"):
        block(torch.randn(2, 16, 7))
