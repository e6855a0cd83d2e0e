"""LocalSelfAttention against a plain torch layer with the same weights (forward and backward)."""

import pytest
import torch

import patterngen as pg
from patterngen import backends, nn
from patterngen.errors import PatternError
from fakes import register_fake_backend


def plain_attention(layer, x, pattern, grid):
    """The same layer written with the dense mask: qkv, masked softmax, projection."""
    b, tokens, dim = x.shape[0], int(torch.tensor(grid).prod()), layer.dim
    heads, hd = layer.heads, dim // layer.heads
    qkv = torch.nn.functional.linear(x.reshape(b, tokens, dim), layer.qkv.weight, layer.qkv.bias)
    kv = layer.kv_heads
    q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], -1)
    q, k, v = (t.reshape(b, tokens, -1, hd).transpose(1, 2) for t in (q, k, v))
    out = pg.dense_attention(q, k, v, torch.as_tensor(pg.materialize(pattern, grid)),
                             rel_bias=layer.rel_pos_bias_table, grid=grid)
    out = out.transpose(1, 2).reshape(b, tokens, dim)
    return torch.nn.functional.linear(out, layer.proj.weight, layer.proj.bias).reshape(x.shape)


def check_against_plain(backend, pattern, grid, x_shape, dtype=torch.float64, tol=1e-9,
                        backward=True, rel_pos_bias=False, heads=2, kv_heads=None):
    torch.manual_seed(0)
    layer = nn.LocalSelfAttention(dim=x_shape[-1], heads=heads, pattern=pattern,
                                  grid=grid if len(x_shape) == 3 or rel_pos_bias else None,
                                  backend=backend, rel_pos_bias=rel_pos_bias,
                                  kv_heads=kv_heads).to(dtype)
    x = torch.randn(*x_shape, dtype=dtype, requires_grad=backward)
    x_ref = x.detach().clone().requires_grad_(backward)
    with torch.set_grad_enabled(backward):
        y = layer(x)
        y_ref = plain_attention(layer, x_ref, pattern, grid)
    assert y.shape == x.shape
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    if not backward:
        return layer
    grad = torch.randn_like(y)
    params = list(layer.parameters())
    got = torch.autograd.grad(y, [x, *params], grad)
    want = torch.autograd.grad(y_ref, [x_ref, *params], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)
    return layer


@pytest.mark.parametrize("pattern, grid, x_shape", [
    (pg.window(3), (5, 6), (2, 5, 6, 8)),
    (pg.window(3), (5, 6), (2, 30, 8)),
    (pg.block(2, offset=1) | pg.axis(0), (4, 5), (1, 4, 5, 8)),
    (pg.heads(pg.axis(0), pg.axis(1)), (3, 4), (2, 3, 4, 8)),
    (pg.window(3, causal=True), (9,), (2, 9, 8)),
    (pg.window((1, 3, 3)), (2, 3, 4), (1, 2, 3, 4, 8)),
])
def test_matches_plain_torch_with_a_registered_backend(pattern, grid, x_shape):
    check_against_plain(register_fake_backend(), pattern, grid, x_shape)


@pytest.mark.parametrize("name", [n for n in backends.available() if not n.startswith("test_")])
def test_matches_plain_torch_with_each_real_backend(name):
    # FlexAttention has no CPU backward: such backends are checked forward only
    backward = "cpu" in backends.get_backend(name).BACKWARD_DEVICES
    check_against_plain(name, pg.window(3) | pg.axis(0), (5, 6), (2, 5, 6, 8),
                        dtype=torch.float32, tol=2e-4, backward=backward)


def test_auto_chooses_by_device_and_caches():
    layer = nn.LocalSelfAttention(dim=8, heads=2, pattern=pg.window(3))
    x = torch.randn(1, 5, 5, 8)
    layer(x)
    first = layer.attention((5, 5), x.device, x.dtype)
    layer(x)
    assert layer.attention((5, 5), x.device, x.dtype) is first
    twin = nn.LocalSelfAttention(dim=8, heads=2, pattern="window(3)")
    assert twin.attention((5, 5), x.device, x.dtype) is first  # one cache per declaration
    assert type(first).name == "auto"
    # the layer's call was planned for what it ran: this device, dtype and sizes, with the
    # backward (the layer has weights); the choice is the planner's for that description
    got = first.plan
    assert (got.device, got.dtype, got.head_dim, got.heads, got.batch, got.backward) == (
        "cpu", "float32", 4, 2, 1, True)
    want = pg.plan(pg.window(3), (5, 5), head_dim=4, heads=2, batch=1, device="cpu",
                   dtype="float32", backward=True, contiguous=got.contiguous)
    assert got.strategy == want.strategy and got.predicted_ms == want.predicted_ms
    assert got.options == want.options


def test_pattern_text_is_parsed():
    layer = nn.LocalSelfAttention(dim=8, heads=2, pattern="window(3) | axis(0)")
    assert layer.pattern == pg.window(3) | pg.axis(0)


def test_rel_pos_bias_is_refused_naming_the_backend():
    with pytest.raises(PatternError, match=rf"backend '{register_fake_backend()}' does not"):
        nn.LocalSelfAttention(8, 2, pg.window(3), backend=register_fake_backend(),
                              rel_pos_bias=True)
    with pytest.raises(PatternError, match=r"rel_pos_bias=True needs grid="):
        nn.LocalSelfAttention(8, 2, pg.window(3), rel_pos_bias=True)


@pytest.mark.parametrize("backend", ["sdpa", "auto", "numba"])
@pytest.mark.parametrize("pattern, grid, x_shape", [
    (pg.window(3), (5, 6), (2, 5, 6, 8)),
    (pg.block(3, offset=1), (6, 6), (1, 36, 8)),
    (pg.heads(pg.window(3), pg.axis(0)), (4, 5), (2, 4, 5, 8)),
])
def test_rel_pos_bias_matches_plain_torch(pattern, grid, x_shape, backend):
    layer = check_against_plain(backend, pattern, grid, x_shape, rel_pos_bias=True)
    reach = pg.bias.reach(pg.lower(pattern, grid))
    assert layer.rel_pos_bias_table.shape == (2, *(2 * r + 1 for r in reach))
    assert "rel_pos_bias_table" in dict(layer.named_parameters())


def test_rel_pos_bias_is_initialised_as_swin_trains_and_round_trips():
    torch.manual_seed(0)
    layer = nn.LocalSelfAttention(16, 4, pg.block(7, offset=3), grid=(56, 56),
                                  rel_pos_bias=True)
    table = layer.rel_pos_bias_table
    assert table.shape == (4, 13, 13) and layer.reach == (6, 6)
    assert 0.015 < table.std().item() < 0.025 and table.abs().max().item() <= 2.0

    pattern = pg.window(3) | pg.axis(0)  # its reach grows with the grid
    small = nn.LocalSelfAttention(8, 2, pattern, grid=(6, 6), rel_pos_bias=True)
    start = small.rel_pos_bias_table.detach().clone()
    x, target = torch.randn(4, 6, 6, 8), torch.randn(4, 6, 6, 8)
    opt = torch.optim.SGD(small.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (small(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(small.rel_pos_bias_table.detach(), start)

    copy = nn.LocalSelfAttention(8, 2, pattern, grid=(6, 6), rel_pos_bias=True)
    copy.load_state_dict(small.state_dict())
    torch.testing.assert_close(copy(x), small(x), atol=0, rtol=0)

    other = nn.LocalSelfAttention(8, 2, pattern, grid=(8, 6), rel_pos_bias=True)
    with pytest.raises(PatternError,
                       match=r"has shape \(2, 11, 5\).*\(2, 15, 5\).*grid=\(8, 6\)"):
        other.load_state_dict(small.state_dict())
    with pytest.raises(PatternError, match=r"On grid=\(7, 7\) the pattern reaches \(6, 2\).*"
                                           r"table \(2, 11, 5\) covers \(5, 2\)"):
        small(torch.randn(1, 7, 7, 8))
    with pytest.raises(PatternError, match=r"relative position table.*built for that grid"):
        small(torch.randn(1, 35, 8))


def test_bad_shapes_and_arguments():
    with pytest.raises(PatternError, match=r"dim must be a multiple of heads: dim=10, heads=4"):
        nn.LocalSelfAttention(10, 4, pg.window(3))
    with pytest.raises(PatternError, match=r"Invalid heads=0"):
        nn.LocalSelfAttention(8, 0, pg.window(3))
    layer = nn.LocalSelfAttention(8, 2, pg.window(3), grid=(4, 4), backend=register_fake_backend())
    with pytest.raises(PatternError, match=r"x.shape=\(1, 15, 8\) does not match grid=\(4, 4\)"):
        layer(torch.randn(1, 15, 8))
    with pytest.raises(PatternError, match=r"expects \(batch, \*grid, 8\)"):
        layer(torch.randn(1, 16, 9))


@pytest.mark.parametrize("backend", ["auto", "numba", "sdpa"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_kv_heads(backend, kv_heads):
    # 4 query heads over kv_heads key/value heads (MQA with 1): the projection makes
    # heads + 2 * kv_heads heads, and the attention reads each kv head for its group
    layer = check_against_plain(backend, pg.window(3) | pg.axis(0), (5, 6), (2, 5, 6, 16),
                                heads=4, kv_heads=kv_heads, rel_pos_bias=True)
    assert layer.qkv.out_features == 16 + 2 * kv_heads * 4
    assert f"kv_heads={kv_heads}" in layer.extra_repr()


def test_kv_heads_must_divide_heads():
    with pytest.raises(PatternError, match=r"Invalid kv_heads=3; expected a divisor of heads=4"):
        nn.LocalSelfAttention(16, 4, pg.window(3), kv_heads=3)


@pytest.mark.parametrize("pattern, grid, x_shape, heads, kv_heads", [
    (pg.window(3, dilation=2), (6, 6), (2, 6, 6, 8), 2, None),
    (pg.block(3, offset=1), (6, 6), (1, 36, 16), 4, 2),
])
def test_a_dense_pattern_runs_in_its_token_order(pattern, grid, x_shape, heads, kv_heads):
    # auto on one dense term: x put in the token order before the qkv projection and back
    # after the output projection, exact to the plain layer (outputs and every gradient)
    layer = check_against_plain("auto", pattern, grid, x_shape, rel_pos_bias=True,
                                heads=heads, kv_heads=kv_heads)
    assert nn.ordered_attention(layer.decl, grid, torch.zeros(1, dtype=torch.float64))
    assert nn.ordered_attention(nn.declaration(pg.window(3)), grid,
                                torch.zeros(1, dtype=torch.float64)) is None
