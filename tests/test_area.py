"""pg.area against YOLOv12's AAttn (ultralytics/nn/modules/block.py), written here as its
forward writes it: the row-major token sequence cut into ``area`` equal chunks."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import patterngen as pg


def aattn_core(qkv, heads, area):
    """AAttn.forward between its qkv conv and its positional conv, as ultralytics writes it:
    ``qkv`` is the conv's (B, 3C, H, W) output, each head's channels q, k, v in turn."""
    B, C, H, W = qkv.shape[0], qkv.shape[1] // 3, qkv.shape[2], qkv.shape[3]
    N, head_dim = H * W, qkv.shape[1] // 3 // heads
    qkv = qkv.flatten(2).transpose(1, 2)
    if area > 1:
        qkv = qkv.reshape(B * area, N // area, C * 3)
        B, N, _ = qkv.shape
    q, k, v = (qkv.view(B, N, heads, head_dim * 3).permute(0, 2, 3, 1)
               .split([head_dim, head_dim, head_dim], dim=2))
    attn = ((q.transpose(-2, -1) @ k) * (head_dim ** -0.5)).softmax(dim=-1)
    x = (v @ attn.transpose(-2, -1)).permute(0, 3, 1, 2)
    if area > 1:
        x = x.reshape(B // area, N * area, C)
        B, N, _ = x.shape
    return x.reshape(B, H, W, C).permute(0, 3, 1, 2)


def chunk_mask(grid, area):
    """Pairs in one of ``area`` equal runs of the row-major token sequence."""
    chunk = np.arange(int(np.prod(grid))) // (int(np.prod(grid)) // area)
    return chunk[:, None] == chunk[None, :]


@given(grid=st.tuples(st.integers(1, 9), st.integers(1, 9)) | st.tuples(
    st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)), area=st.integers(1, 6))
def test_area_cuts_the_row_major_sequence_with_its_exact_cost(grid, area):
    tokens = int(np.prod(grid))
    if tokens % area:
        with pytest.raises(pg.PatternError, match=rf"needs the grid's {tokens} tokens "
                                                  rf"divisible by {area}|needs grid\[0\]"):
            pg.lower(pg.area(area), grid)
        return
    want = chunk_mask(grid, area)
    assert (pg.materialize(pg.area(area), grid) == want).all()
    assert pg.cost(pg.area(area), grid=grid).pairs == want.sum() == tokens ** 2 // area


@pytest.mark.parametrize("grid", [(30, 40), (10, 10), (15, 16)])
def test_named_feature_maps_are_ultralytics_chunks(grid):
    assert (pg.materialize(pg.area(4), grid) == chunk_mask(grid, 4)).all()


@pytest.mark.parametrize("backend", ["auto", pytest.param("numba", marks=pytest.mark.skipif(
    os.environ.get("PATTERNGEN_LONG") != "1",
    reason="a 16-term numba module compiles for 20 s; PATTERNGEN_LONG=1"))])
def test_attention_equals_aattn(backend):
    torch.manual_seed(0)
    heads, head_dim, grid = 2, 4, (10, 10)
    qkv = torch.randn(2, 3 * heads * head_dim, *grid, dtype=torch.float64)
    q, k, v = (qkv.flatten(2).view(2, heads, 3 * head_dim, -1).transpose(-1, -2)
               .split(head_dim, dim=-1))
    out = pg.compile(pg.area(4), grid, backend=backend)(*(t.contiguous() for t in (q, k, v)))
    ours = out.permute(0, 2, 1, 3).reshape(2, *grid, heads * head_dim).permute(0, 3, 1, 2)
    torch.testing.assert_close(ours, aattn_core(qkv, heads, 4), atol=1e-12, rtol=0)
