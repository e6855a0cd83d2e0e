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
        view = SimpleNamespace(dim=8, heads=2, kv_heads=2, qkv=layer.qkv, proj=layer.proj,
                               rel_pos_bias_table=centre)
        want = plain_attention(view, x, pattern, grid)
        torch.testing.assert_close(layer(x), want, atol=1e-10, rtol=0)
    wide = nn.LocalSelfAttention(8, 2, pg.window(3) | pg.axis(0), grid=(5, 6),
                                 rel_pos_bias=True)
    with pytest.raises(PatternError, match=r"On grid=\(8, 6\) the pattern reaches \(7, 2\)"):
        wide(torch.randn(1, 8, 6, 8))


def two_blocks(backend="auto"):
    """A small Swin-like stack: W-MSA and SW-MSA layers with bias tables, a Swin block, then
    a head."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        nn.LocalSelfAttention(8, 2, pg.block(4), grid=(8, 8), rel_pos_bias=True,
                              backend=backend),
        nn.LocalSelfAttention(8, 2, "block(4, offset=2)", grid=(8, 8), rel_pos_bias=True,
                              backend=backend, softcap=3.0),
        nn.SwinBlock(8, 2, window=3, shift=1, backend=backend),
        torch.nn.Linear(8, 3))


FRESH = """
import sys, {first}, {second}
x, want = torch.load(sys.argv[1])
program = torch.export.load(sys.argv[2])
torch.testing.assert_close(program.module()(x), want, atol=1e-5, rtol=0)
model = torch.load(sys.argv[3], weights_only=False)
torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
print("ok")
"""


@pytest.mark.parametrize("first, second", [("torch", "patterngen"), ("patterngen", "torch")])
def test_saved_and_exported_models_run_in_a_fresh_process(tmp_path, first, second):
    model = two_blocks("numba")
    size = len(pickle.dumps(model))
    x = torch.randn(2, 8, 8, 8)
    want = model(x).detach()
    assert len(pickle.dumps(model)) == size  # the compiled attention is not pickled
    torch.save((x, want), tmp_path / "io.pt")
    torch.save(model, tmp_path / "model.pt")
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")
    code = FRESH.format(first=first, second=second)
    run = subprocess.run([sys.executable, "-c", code, *(str(tmp_path / n) for n in (
        "io.pt", "model.pt2", "model.pt"))], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["ok"]


def test_compiled_model_on_sizes_never_run_eagerly():
    # planning and compiling happen inside the operator, outside the traced region: a size
    # first seen by the compiled layer needs no eager call (aot_eager: dynamo and autograd's
    # tracing without inductor's C++ compile; inductor runs with PATTERNGEN_LONG=1)
    layer = two_blocks("auto")[1]
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for grid in ((12, 12), (4, 8)):
        assert not [k for k in nn._COMPILED if k[0] == layer.decl and k[1] == grid]
        x = torch.randn(2, *grid, 8, requires_grad=True)
        got = compiled(x)
        got.square().sum().backward()
        grads = [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad()
        xe = x.detach().clone().requires_grad_()
        want = layer(xe)
        want.square().sum().backward()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, xe.grad, atol=1e-5, rtol=1e-5)
        for g, p in zip(grads, layer.parameters()):
            torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-5)
        layer.zero_grad()


@LONG
@pytest.mark.parametrize("options", [{}, dict(fullgraph=True), dict(dynamic=True)])
def test_compiled_model_modes_on_new_sizes(options):
    model = two_blocks("numba")
    compiled = torch.compile(model, **options)
    for grid in ((16, 8), (8, 20)):
        x = torch.randn(1, *grid, 8)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_channels_first_is_an_explicit_option():
    torch.manual_seed(0)
    last = nn.LocalSelfAttention(8, 2, pg.window(3), backend="numba")
    first = nn.LocalSelfAttention(8, 2, pg.window(3), backend="numba", channels_first=True)
    first.load_state_dict(last.state_dict())
    x = torch.randn(2, 8, 5, 8)  # (batch, dim, H, W) with W == dim: never guessed
    torch.testing.assert_close(first(x), last(x.movedim(1, -1)).movedim(-1, 1))
    assert last(x).shape == x.shape  # read as (batch, H, W, dim), as declared
    flat = nn.LocalSelfAttention(8, 2, pg.window(3), grid=(5, 8), backend="numba",
                                 channels_first=True)
    flat.load_state_dict(last.state_dict())
    torch.testing.assert_close(flat(x.flatten(2)), first(x).flatten(2))
    with pytest.raises(PatternError, match=r"got x.shape=\(2, 8, 5, 6\); for a \(batch, dim, "
                                           r"\*grid\) feature map pass channels_first=True"):
        last(torch.randn(2, 8, 5, 6))
    with pytest.raises(PatternError, match=r"expects \(batch, 8, \*grid\); got x.shape=\(2, 5"):
        first(torch.randn(2, 5, 6, 8))
    gridded = nn.LocalSelfAttention(8, 2, pg.window(3), grid=(5, 8), backend="numba")
    with pytest.raises(PatternError, match=r"x.shape=\(2, 8, 5, 8\) is ambiguous: with "
                                           r"channels_first=False its grid is \(8, 5\), with "
                                           r"channels_first=True it is this layer's grid"):
        gridded(x)
    with pytest.raises(PatternError, match=r"Invalid channels_first='yes'"):
        nn.LocalSelfAttention(8, 2, pg.window(3), channels_first="yes")


def test_construction_on_meta_neither_plans_nor_calibrates(monkeypatch):
    from patterngen import calibrate

    def refuse(*args, **kwargs):
        raise AssertionError("planned or calibrated at construction")

    monkeypatch.setattr(nn, "compile_pattern", refuse)
    monkeypatch.setattr(calibrate, "measure", refuse)
    with torch.device("meta"):
        model = two_blocks().half()
    assert model[0].rel_pos_bias_table.is_meta
    monkeypatch.undo()
    model = model.to_empty(device="cpu").float()
    assert model(torch.randn(1, 8, 8, 8)).shape == (1, 8, 8, 3)


def test_calibration_reports_on_stderr_never_stdout(monkeypatch, capsys):
    from patterngen import calibrate

    monkeypatch.setattr(calibrate, "_best_ms", lambda fn, repeats=7: 1.0)
    calibrate.measure("cpu", "float32")
    out, err = capsys.readouterr()
    assert out == "" and "calibrated cpu/float32" in err


def test_pattern_text_is_accepted_wherever_a_pattern_is():
    text, pattern = "window(3) | axis(0)", pg.window(3) | pg.axis(0)
    assert pg.cost(text, grid=(5, 6)).pairs == pg.cost(pattern, grid=(5, 6)).pairs
    assert pg.show(text, grid=(5, 6)) == pg.show(pattern, grid=(5, 6))
    assert pg.plan(text, grid=(5, 6)).strategy == pg.plan(pattern, grid=(5, 6)).strategy
    assert pg.compile(text, (5, 6), backend="numba").ir == pg.lower(pattern, (5, 6))
    with pytest.raises(PatternError, match=r"Unknown pattern 'windw'"):
        pg.cost("windw(3)", grid=(5, 6))


def test_the_layer_operator_passes_opcheck():
    layer = two_blocks("numba")[0]
    q, k, v = (torch.randn(1, 2, 64, 4, requires_grad=True) for _ in range(3))
    table = layer.rel_pos_bias_table.detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.patterngen.attention.default,
                          (q, k, v, table, layer.decl, [8, 8], None))


class _Bare(torch.nn.Module):
    """Attention from pg.compile called directly: the graph holds the numba and planned
    operators' keys."""

    def __init__(self):
        super().__init__()
        pattern = pg.window(3) | pg.axis(0)
        self.numba = pg.compile(pattern, (6, 6), backend="numba")
        self.terms = pg.compile(pattern, (6, 6), backend="auto", strategy="terms",
                                terms="dense", softcap=2.0)

    def forward(self, q, k, v):
        return self.numba(q, k, v) + self.terms(q, k, v)


BARE = """
import sys, torch, patterngen
q, k, v, want = torch.load(sys.argv[1])
program = torch.export.load(sys.argv[2])
torch.testing.assert_close(program.module()(q, k, v), want, atol=1e-5, rtol=0)
print("ok")
"""


def test_an_exported_bare_attention_rebuilds_from_its_op_keys(tmp_path):
    q, k, v = (torch.randn(1, 2, 36, 4) for _ in range(3))
    model = _Bare()
    torch.save((q, k, v, model(q, k, v)), tmp_path / "io.pt")
    torch.export.save(torch.export.export(model, (q, k, v)), tmp_path / "bare.pt2")
    run = subprocess.run([sys.executable, "-c", BARE, str(tmp_path / "io.pt"),
                          str(tmp_path / "bare.pt2")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["ok"]


def test_a_key_rebuilds_only_the_ir_it_carries():
    import hashlib

    from patterngen.backends import ops

    attn = pg.compile(pg.window(5), (7, 7), backend="numba")
    del ops._COMPILED[attn.op_key]
    rebuilt = ops.lookup(attn.op_key)
    assert rebuilt is not attn and rebuilt.ir == attn.ir and rebuilt.op_key == attn.op_key
    name, digest, payload = attn.op_key.split(":", 2)
    with pytest.raises(PatternError, match=r"carries none to rebuild"):
        ops.lookup(f"{name}:{digest}:{payload.replace('5', '6')}")  # digest no longer fits
    forged = payload.replace('"node":"Window"', '"node":"system"')
    digest = hashlib.sha256(f"numba:{forged}".encode()).hexdigest()[:20]
    with pytest.raises(PatternError, match=r"names 'system', which is not an IR node"):
        ops.lookup(f"numba:{digest}:{forged}")
