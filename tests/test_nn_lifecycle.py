"""A model's whole life with pg.nn layers: autocast, other grids, save and load in a fresh
process, torch.compile on sizes never run eagerly, conv layouts, meta construction."""

import os
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import patterngen as pg
from patterngen import nn
from patterngen.errors import PatternError
from test_nn import plain_attention

LONG = pytest.mark.skipif(os.environ.get("PATTERNGEN_LONG") != "1",
                          reason="torch.compile on CPU takes tens of seconds; PATTERNGEN_LONG=1")


def layer_pair(backend, pattern=pg.window(3) | pg.axis(0), grid=(5, 6), softcap=None):
    """A float32 layer with a bias table and a float64 copy on sdpa (the reference)."""
    torch.manual_seed(0)
    layer = nn.LocalSelfAttention(8, 2, pattern, grid=grid, backend=backend,
                                  rel_pos_bias=True, softcap=softcap)
    with torch.no_grad():
        layer.rel_pos_bias_table.normal_()
    ref = nn.LocalSelfAttention(8, 2, pattern, grid=grid, backend="sdpa",
                                rel_pos_bias=True, softcap=softcap).double()
    ref.load_state_dict(layer.state_dict())
    return layer, ref


@pytest.mark.parametrize("backend", ["numba", "sdpa", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_with_a_bias_table_and_softcap(backend, dtype):
    layer, ref = layer_pair(backend, softcap=2.0)
    x = torch.randn(2, 5, 6, 8)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype and layer.rel_pos_bias_table.dtype == torch.float32
    y.float().square().sum().backward()
    want = ref(x.double())
    want.square().sum().backward()
    torch.testing.assert_close(y.double(), want, atol=0.1, rtol=0.05)
    got, expected = layer.rel_pos_bias_table.grad, ref.rel_pos_bias_table.grad
    assert got.dtype == torch.float32
    assert (got.double() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.skipif(os.environ.get("PATTERNGEN_LONG") != "1",
                    reason="FlexAttention compiles for seconds on CPU; PATTERNGEN_LONG=1")
def test_flex_forward_under_autocast_with_a_table():
    layer, ref = layer_pair("flex", softcap=2.0)
    x = torch.randn(1, 5, 6, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref(x.double()).detach(), atol=0.1, rtol=0.05)


def test_a_backend_casts_the_table_only_under_autocast():
    attn = pg.compile(pg.window(3), (5, 6), backend="numba")
    q = torch.randn(1, 2, 30, 8, dtype=torch.bfloat16)
    table = torch.zeros(2, 5, 5, requires_grad=True)
    with pytest.raises(PatternError, match=r"rel_bias has dtype=torch.float32 and q "
                                           r"torch.bfloat16; expected one dtype"):
        attn(q, q, q, rel_bias=table)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn(q, q, q, rel_bias=table).float().sum().backward()
    assert table.grad.dtype == torch.float32


def test_a_biased_layer_runs_on_every_grid_its_table_covers():
    # Swin's block(7): the same 13 x 13 table on 28 x 28 and 56 x 56; its centre where the
    # pattern reaches less (a 5 x 9 grid holds short tiles only)
    pattern = pg.block(4, offset=2)
    layer = nn.LocalSelfAttention(8, 2, pattern, grid=(8, 8), rel_pos_bias=True,
                                  backend="numba").double()
    assert layer.rel_pos_bias_table.shape == (2, 7, 7)
    for grid in ((12, 16), (5, 9), (3, 3)):
        x = torch.randn(2, *grid, 8, dtype=torch.float64, requires_grad=True)
        reach = pg.bias.reach(pg.lower(pattern, grid))
        centre = nn.fit_table(layer.rel_pos_bias_table, reach, grid)
        assert centre.shape[1:] == tuple(2 * r + 1 for r in reach)
        view = SimpleNamespace(dim=8, heads=2, qkv=layer.qkv, proj=layer.proj,
                               rel_pos_bias_table=centre)
        want = plain_attention(view, x, pattern, grid)
        torch.testing.assert_close(layer(x), want, atol=1e-10, rtol=0)
    wide = nn.LocalSelfAttention(8, 2, pg.window(3) | pg.axis(0), grid=(5, 6),
                                 rel_pos_bias=True)
    with pytest.raises(PatternError, match=r"On grid=\(8, 6\) the pattern reaches \(7, 2\)"):
        wide(torch.randn(1, 8, 6, 8))
