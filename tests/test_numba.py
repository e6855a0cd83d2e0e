"""The numba backend against the dense oracle: forward, gradients, inputs, caching, golden source.

Numba compiles each generated module once per dtype (seconds each), so the cases share a few
pattern structures and vary grids, shapes and scales, which are runtime arguments. Set
``PATTERNGEN_LONG=1`` for the long random sweep, ``PATTERNGEN_UPDATE_GOLDEN=1`` to rewrite the
golden sources after an intended change to the generator.
"""

import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import patterngen as pg
from oracle import check_against_oracle
from patterngen.backends import numba as nb
from patterngen.backends.numba import launch, module
from patterngen.errors import PatternError
from strategies import random_spec

GOLDEN = Path(__file__).parent / "golden"

#: name -> (spec, grid ranks it is drawn on); every spec is one compiled structure
STRUCTURES = {
    "window_causal_dilated_1d": pg.window(4, dilation=2, causal=True),
    "window_or_global": pg.window(3) | pg.global_tokens([0, 7]),
    "criss_cross": pg.criss_cross(),
    "window_and_causal": pg.window(3) & pg.causal(),
    "global_and_causal": pg.global_tokens([(0, 5)]) & pg.causal(),
    "window_3d_pad_dilated": pg.window((1, 3, 3), dilation=(1, 2, 1), border="pad"),
    "heads": pg.heads(pg.block(3, offset=1), pg.axis(1), pg.block(3, offset=1)),
}


def _grid_for(name, rng):
    """A random valid grid for ``STRUCTURES[name]``: odd and even sizes, borders included."""
    if name.endswith("_1d"):
        return (rng.randint(8, 17),)
    if name.endswith("_3d_pad_dilated"):
        return (rng.randint(1, 3), rng.randint(6, 9), rng.randint(3, 6))
    return (rng.randint(3, 7), rng.randint(8, 10))


def _inputs(grid, batch, heads, dim, dtype, seed, gridded=True):
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, *grid, dim) if gridded else (batch, heads, math.prod(grid), dim)
    return [torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)
            for _ in range(3)]


def _check_against_oracle(spec, grid, q, k, v, scale=None, atol=1e-10, **options):
    return check_against_oracle("numba", spec, grid, q, k, v, scale=scale, atol=atol, **options)


@pytest.mark.parametrize("name", STRUCTURES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_dense_oracle(name, seed):
    rng = random.Random(f"{name}-{seed}")
    grid = _grid_for(name, rng)
    batch, heads, dim = rng.randint(1, 2), rng.randint(1, 4), rng.choice([1, 3, 8, 16])
    q, k, v = _inputs(grid, batch, heads, dim, torch.float64, seed, gridded=bool(seed))
    _check_against_oracle(STRUCTURES[name], grid, q, k, v)


# tiles of queries: terms run lane by lane (a narrow window, criss-cross's column, global
# rows), unions with skipped keys, empty queries, 3-D dilated, per-head kernels; odd widths
# leave a single-lane tail and rows that end inside a tile
@pytest.mark.parametrize("name, lanes", [("window_or_global", 3), ("global_and_causal", 2),
                                         ("window_3d_pad_dilated", 3), ("heads", 2),
                                         ("criss_cross", 4)])
def test_lanes_match_dense_oracle(name, lanes):
    rng = random.Random(f"lanes-{name}")
    grid = _grid_for(name, rng)
    q, k, v = _inputs(grid, 2, 3, rng.choice([1, 5, 8]), torch.float64, seed=11)
    _check_against_oracle(STRUCTURES[name], grid, q, k, v, lanes=lanes)


# runs of keys that fill the key buffer exactly (two rows of area(2)'s; eight rows of the
# window for each lane of a term run lane by lane), then more rows: the run must flush it
_CHUNK = nb.source.KEY_CHUNK


@pytest.mark.parametrize("spec, grid, lanes", [(pg.area(2), (8, _CHUNK // 2), 0),
                                               (pg.window((9, _CHUNK // 8)), (12, 40), 8)])
def test_runs_that_fill_the_key_buffer(spec, grid, lanes):
    attn = nb.NumbaBackend(pg.lower(spec, grid), lanes=lanes)
    assert attn.lanes == lanes and (not lanes or attn.shared == ((False,),))
    q, k, v = _inputs(grid, 1, 2, 4, torch.float64, seed=3)
    _check_against_oracle(spec, grid, q, k, v, lanes=lanes)


def test_lanes_share_overlapping_terms():
    """Two shared terms: the block's keys inside the window are masked for the second."""
    spec, grid = pg.window(6) | pg.block(8, offset=2), (21,)
    attn = pg.compile(spec, grid, backend="numba", lanes=2)
    assert attn.shared == ((True, True),)
    q, k, v = _inputs(grid, 1, 2, 6, torch.float64, seed=13)
    _check_against_oracle(spec, grid, q, k, v, lanes=2)


def test_lanes_float32_chosen_automatically():
    spec, grid = pg.window(64, causal=True), (200,)
    attn = pg.compile(spec, grid, backend="numba")
    assert attn.lanes == 4  # 64 of 67 union keys per lane; 8 lanes would hold 64 of 71
    q, k, v = _inputs(grid, 1, 2, 32, torch.float32, seed=12)
    _check_against_oracle(spec, grid, q, k, v, atol=2e-5)


@pytest.mark.parametrize("spec, grid, plan", [
    (pg.window(256, causal=True), (8192,), (8, ((True,),))),  # W1: 256 of 263 keys per lane
    (pg.block(7), (56, 56), (7, ((True,),))),                 # Swin: tiles are blocks' rows
    (pg.axis(1), (8, 40), (8, ((True,),))),
    # global query rows see every key: lane by lane; the window and the global keys shared
    (pg.window(256, causal=True) | pg.global_tokens([0]), (8192,), (8, ((True, True, False),))),
    (pg.window(7), (64, 64), (0, None)),        # half of an 8-query tile's keys are wasted
    (pg.criss_cross(), (64, 64), (0, None)),    # its row alone would share: not enough
])
def test_plan_lanes(spec, grid, plan):
    assert nb.plan_lanes(pg.lower(spec, grid), grid) == plan


@pytest.mark.parametrize("spec, grid", [(pg.window(5, dilation=2), (11, 13)), (pg.block(3), (9,)),
                                        (pg.window(4, causal=True), (5, 10)),
                                        (pg.block(3, offset=1), (4, 7))])
@pytest.mark.parametrize("lanes", [2, 3, 4])
def test_lane_pairs_count_what_tiles_compute(spec, grid, lanes):
    """Against enumeration: a tile computes, for each lane, every key whose outer coordinates
    some lane attends and whose last coordinate lies in the lanes' union (one-term patterns)."""
    lowered = pg.lower(spec, grid)
    assert len(lowered.terms) == 1
    mask = pg.materialize(spec, grid).reshape(*grid, *grid)
    n, computed = grid[-1], 0
    for outer in np.ndindex(*grid[:-1]):
        for first in range(0, n, lanes):
            held = mask[outer][first:first + lanes].reshape(-1, *grid)  # lanes x key grid
            keys = np.argwhere(held.any(axis=0))
            if len(keys):
                rows = {tuple(key[:-1]) for key in keys}
                computed += lanes * len(rows) * (keys[:, -1].max() - keys[:, -1].min() + 1)
    assert nb.lane_pairs(lowered, grid, lanes, shared=(True,)) == computed
    assert nb.lane_pairs(lowered, grid, lanes, shared=(False,)) == mask.sum()


def test_bad_lanes_are_refused():
    for lanes in (1, -2, 2.0, True):
        with pytest.raises(PatternError, match=r"numba: lanes=.*expected 0 .* or an int >= 2"):
            pg.compile(pg.window(3), (8,), backend="numba", lanes=lanes)


def test_float32_matches_float64_oracle():
    q, k, v = _inputs((5, 9), 2, 3, 24, torch.float32, seed=3)
    _check_against_oracle(STRUCTURES["window_or_global"], (5, 9), q, k, v, atol=2e-5)


def test_scale_option():
    q, k, v = _inputs((4, 9), 1, 2, 8, torch.float64, seed=4)
    _check_against_oracle(STRUCTURES["window_or_global"], (4, 9), q, k, v, scale=0.7)
    attn = pg.compile(STRUCTURES["window_or_global"], (4, 9), backend="numba", scale=0.7)
    torch.testing.assert_close(attn(q, k, v), attn(q, k, v, scale=0.7), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["criss_cross", "heads"])
def test_gradcheck(name):
    grid = (3, 4)
    q, k, v = _inputs(grid, 1, 3, 3, torch.float64, seed=5)
    attn = pg.compile(STRUCTURES[name], grid, backend="numba")
    assert torch.autograd.gradcheck(attn, (q, k, v), eps=1e-6, atol=1e-7)


def test_queries_without_keys_output_zeros():
    spec, grid = STRUCTURES["global_and_causal"], (3, 8)
    mask = pg.materialize(spec, grid)
    empty = ~mask.any(axis=1)
    assert empty.sum() == 5  # queries (0, 0..4) come before their only key (0, 5)
    q, k, v = _inputs(grid, 1, 2, 4, torch.float64, seed=6, gridded=False)
    attn = pg.compile(spec, grid, backend="numba")
    out = attn(q, k, v)
    out.sum().backward()
    assert torch.all(out[:, :, torch.from_numpy(empty)] == 0)
    assert torch.all(q.grad[:, :, torch.from_numpy(empty)] == 0)
    q.grad = k.grad = v.grad = None
    _check_against_oracle(spec, grid, q, k, v)


def test_non_contiguous_inputs_are_copied():
    q, k, v = _inputs((5, 9), 1, 2, 8, torch.float64, seed=7)
    attn = pg.compile(STRUCTURES["window_or_global"], (5, 9), backend="numba")
    qt = q.detach().transpose(2, 3).contiguous().transpose(2, 3)
    assert not qt.is_contiguous()
    torch.testing.assert_close(attn(qt, k, v), attn(q, k, v), atol=0, rtol=0)


@pytest.mark.parametrize("name, lanes", [("heads", 0), ("window_3d_pad_dilated", 0),
                                         ("window_or_global", 3)])
def test_openmp_team_and_thread_pool_agree(name, lanes, monkeypatch):
    # where torch runs on GNU OpenMP the kernels run on its team; else on a Python thread pool
    real_team = launch.team()
    launches = []
    team = (lambda *a: launches.append(a) or real_team(*a)) if real_team is not None else None
    monkeypatch.setattr(launch, "team", lambda: team)
    spec, grid = STRUCTURES[name], _grid_for(name, random.Random(name))
    q, k, v = _inputs(grid, 2, 3, 5, torch.float64, seed=11)
    _check_against_oracle(spec, grid, q, k, v, lanes=lanes)
    assert bool(launches) == (real_team is not None)
    team_out = pg.compile(spec, grid, backend="numba", lanes=lanes)(q, k, v)
    monkeypatch.setattr(launch, "team", lambda: None)
    launches.clear()
    pool_out = pg.compile(spec, grid, backend="numba", lanes=lanes)(q, k, v)
    assert not launches
    torch.testing.assert_close(team_out, pool_out, atol=1e-12, rtol=1e-12)


def test_thread_pool_takes_every_range(monkeypatch):
    # more ranges than threads, one thread or several: every work item is computed once
    monkeypatch.setattr(launch, "team", lambda: None)
    spec, grid = STRUCTURES["criss_cross"], (7, 9)
    q, k, v = _inputs(grid, 3, 4, 3, torch.float64, seed=12)
    for threads in (1, 2, 3):
        monkeypatch.setattr(launch, "_numba_threads", lambda threads=threads: threads)
        _check_against_oracle(spec, grid, q, k, v)


def test_pack_refuses_non_contiguous_arrays():
    strided = np.zeros((4, 6))[:, ::2]
    with pytest.raises(PatternError, match=r"numba: an array of shape \(4, 3\) and strides "
                                           r"\(48, 16\) is not C-contiguous"):
        launch.pack((strided, 1, np.float64(0.5)), 2, 2)


def test_one_head_splits_the_backward():
    # one (batch, head) pair: backward splits the queries, each split owning a dk/dv copy
    q, k, v = _inputs((6, 9), 1, 1, 5, torch.float64, seed=8)
    _check_against_oracle(STRUCTURES["criss_cross"], (6, 9), q, k, v)


def _kernels_built() -> int:
    """Kernels compiled (or loaded from numba's disk cache) so far in this process: each is
    built once, on the first call of :func:`module.kernel` for it."""
    return module.kernel.cache_info().misses


def test_new_grid_reuses_the_compiled_kernels():
    # grid extents are kernel arguments: once the first grid ran, the second compiles nothing
    spec = pg.window((3, 2), dilation=(1, 2)) | pg.global_tokens([1, 6])
    first = pg.compile(spec, (5, 8), backend="numba")
    second = pg.compile(spec, (7, 11), backend="numba")
    assert first.source_for("float64") == second.source_for("float64")
    _check_against_oracle(spec, (5, 8), *_inputs((5, 8), 1, 1, 4, torch.float64, seed=9))
    built = _kernels_built()
    _check_against_oracle(spec, (7, 11), *_inputs((7, 11), 1, 1, 4, torch.float64, seed=9))
    assert _kernels_built() == built


def test_patterns_of_one_shape_share_the_compiled_kernels():
    # the kernels read each query's bounds from a table: a window, a padded window and a
    # causal one with the same step run the same module, and each gets its own answer
    specs = [pg.window(3, dilation=(3, 1)), pg.window((2, 5), dilation=(3, 1), border="pad"),
             pg.window((3, 2), dilation=(3, 1), causal=True)]
    sources = {pg.compile(spec, (10, 8), backend="numba", lanes=0).source_for("float64")
               for spec in specs}
    assert len(sources) == 1
    inputs = _inputs((10, 8), 1, 2, 4, torch.float64, seed=21)
    _check_against_oracle(specs[0], (10, 8), *inputs, lanes=0)
    built = _kernels_built()
    for spec in specs[1:]:
        _check_against_oracle(spec, (10, 8), *inputs, lanes=0)
    assert _kernels_built() == built


def test_the_text_depends_on_the_shape_only():
    # rank, terms and steps: the rest is the bounds table
    def text(spec, grid=(12, 12)):
        return pg.compile(spec, grid, backend="numba", lanes=0).source_for("float32")

    shared = text(pg.window(3))
    for spec in (pg.window(5, border="pad"), pg.block(3, offset=1), pg.axis(0),
                 pg.stripe(1, width=2), pg.window(5, stride=2), pg.area(3)):
        assert text(spec) == shared, spec
    assert text(pg.window(3, dilation=2)) != shared  # the loops' step
    assert text(pg.criss_cross()) != shared  # two terms
    assert text(pg.window(3), (12, 12, 3)) != shared  # three axes
    # heads of one shape run one kernel, each on its own rows of the table
    assert text(pg.heads(pg.axis(0), pg.block(2), pg.window(5))) == shared
    attn = pg.compile(pg.window((5, 3)), (12, 12), backend="numba")
    i = np.arange(12)
    first = np.clip(i - 2, 0, 7), np.clip(i - 1, 0, 9)
    assert attn.bounds.shape == (1, 1, 2, 2, 12)
    np.testing.assert_array_equal(attn.bounds[0, 0, :, 0], np.stack(first))
    np.testing.assert_array_equal(attn.bounds[0, 0, :, 1], np.stack(first) + [[5], [3]])
    assert attn.source.startswith("# window((5, 3)) runs this module, its table `bounds` "
                                  "evaluated from\n#   pattern 0, term 0: (Window(5, clamp), "
                                  "Window(3, clamp))\n")


def test_executed_pairs_are_the_attended_pairs_or_the_tiles_unions():
    spec = pg.heads(pg.criss_cross(), pg.window(3))
    attn = pg.compile(spec, (6, 7), backend="numba", lanes=0)
    assert attn.executed_pairs == tuple(int(m.sum()) for m in pg.materialize(spec, (6, 7)))
    tiled = pg.compile(spec, (6, 7), backend="numba", lanes=3)
    assert tiled.executed_pairs == tuple(nb.lane_pairs(h, (6, 7), 3, shared)
                                         for h, shared in zip(tiled.ir.patterns, tiled.shared))


def test_terms_with_one_key_on_the_last_axis_run_last():
    # the forward buffers the first term's last-axis run in one loop: the row before the column
    lowered = pg.lower(pg.criss_cross(), (5, 8))
    attn = pg.compile(pg.criss_cross(), (5, 8), backend="numba")
    assert [repr(t) for t in lowered.terms] == ["(All(), Eq())", "(Eq(), All())"]
    assert [repr(t) for t in attn.ir.terms] == ["(Eq(), All())", "(All(), Eq())"]
    assert "pattern 0, term 1: (All(), Eq())" in attn.source
    assert "# term 1: steps (1, 1) (keys of earlier terms skipped)" in attn.source


def test_source_is_readable_and_names_the_spec():
    attn = pg.compile(pg.window(7) | pg.axis(0), (64, 64), backend="numba")
    src = attn.source
    assert src.startswith("# (window(7) | axis(0)) runs this module")
    assert "pattern 0, term 1: (All(), Eq())" in src
    assert "lo0_0 = bounds[r, 0, 0, 0, i0]" in src  # the bounds come from its head's row
    assert "64" not in src.split('"""')[2]  # ... and the grid's extents are arguments
    assert "ACC = np.float64" in attn.source_for("float64")
    assert repr(attn) == "NumbaBackend((window(7) | axis(0)) on grid 64x64, lanes=0)"


@pytest.mark.parametrize("spec, grid, lanes, head_dim", [
    (STRUCTURES["window_or_global"], (4, 9), 0, 48),
    (STRUCTURES["criss_cross"], (5, 8), 3, 64),
])
def test_kernels_for_one_head_dim_match_the_oracle(spec, grid, lanes, head_dim):
    # from SPECIALISED_HEAD_DIM up the kernels are compiled with head_dim a loop constant
    assert head_dim >= nb.SPECIALISED_HEAD_DIM
    q, k, v = _inputs(grid, 1, 2, head_dim, torch.float64, seed=head_dim)
    _check_against_oracle(spec, grid, q, k, v, lanes=lanes)
    attn = pg.compile(spec, grid, backend="numba", lanes=lanes)
    assert f"HEAD_DIM = {head_dim}  #" in attn.source_for("float64", head_dim)


def test_small_head_dims_share_the_kernels_for_any_head_dim():
    attn = pg.compile(pg.window(3), (8,), backend="numba")
    generic = attn.source_for("float32")
    assert "HEAD_DIM = 0  #" in generic
    assert attn.source_for("float32", nb.SPECIALISED_HEAD_DIM - 1) == generic
    assert attn.source_for("float32", nb.SPECIALISED_HEAD_DIM) != generic
    with pytest.raises(PatternError, match=r"head_dim=-1; expected 0 \(any head_dim\) or a "
                                           r"positive int"):
        nb.generate(pg.lower(pg.window(3), (8,)), head_dim=-1)


GOLDEN_CASES = {
    "window_2d": (pg.window(7), (64, 64)),
    "window_or_axis": (pg.window(7) | pg.axis(0), (64, 64)),
    "criss_cross": (pg.criss_cross(), (64, 64)),
    "causal_window_1d": (pg.window(256, causal=True), (8192,)),
    # two shapes (steps 1 and 2): two kernels; heads of one shape would share one
    "heads_3d": (pg.heads(pg.window((3, 7, 7)), pg.block((1, 7, 7), offset=3),
                          pg.window((1, 7, 7), dilation=(1, 2, 2))), (8, 32, 32)),
    "lanes_window_or_global": (pg.window(3) | pg.global_tokens([0]), (4, 16)),
    # the variants with a bias table and a softcap (named by them), one query and tiles
    "bias_softcap_window_2d": (pg.window(7), (64, 64)),
    "lanes_bias_window_or_global": (pg.window(3) | pg.global_tokens([0]), (4, 16)),
}


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_source(name):
    spec, grid = GOLDEN_CASES[name]
    src = nb.generate(pg.lower(spec, grid), lanes=4 if name.startswith("lanes") else 0,
                      bias="bias" in name, softcap="softcap" in name)
    path = GOLDEN / f"numba_{name}.py"
    if os.environ.get("PATTERNGEN_UPDATE_GOLDEN") == "1":
        path.write_text(src)
    assert src == path.read_text(), f"generated source differs from {path}"
    compile(src, str(path), "exec")


def test_generate_rejects_unknown_nodes_and_dtypes():
    with pytest.raises(PatternError, match=r"Unrecognized node 'x' of type str"):
        nb.generate("x")
    with pytest.raises(PatternError, match=r"Unsupported dtype='float16'.*\('float32', "
                                           r"'float64'\)"):
        nb.generate(pg.lower(pg.window(3), (8,)), "float16")


def test_failures_carry_the_generated_source():
    broken = "import numba\n\n\ndef kernel(:\n    pass\n"
    with pytest.raises(SyntaxError) as info:
        nb.load(broken)
    assert any("def kernel(:" in note for note in info.value.__notes__)

    untyped = "def kernel(a):\n    return undefined_name\n"
    import numba
    with pytest.raises(numba.core.errors.TypingError, match="undefined_name") as info:
        module.kernel(nb.load(untyped), "kernel")
    assert any("generated source:" in note for note in info.value.__notes__)


@pytest.fixture(scope="module")
def attn():
    return pg.compile(STRUCTURES["window_or_global"], (4, 6), backend="numba")


def test_bad_rank(attn):
    q = torch.randn(2, 24, 8)
    with pytest.raises(PatternError, match=r"q has shape \(2, 24, 8\); the pattern was "
                                           r"compiled for grid 4x6, so expected"):
        attn(q, q, q)


def test_qkv_shape_mismatch(attn):
    q, k = torch.randn(1, 2, 24, 8), torch.randn(1, 2, 24, 4)
    with pytest.raises(PatternError, match=r"q, k, v shapes differ: q=\(1, 2, 24, 8\), "
                                           r"k=\(1, 2, 24, 4\)"):
        attn(q, k, k)


def test_grid_mismatch(attn):
    q = torch.randn(1, 2, 6, 4, 8)
    with pytest.raises(PatternError, match=r"compiled for grid 4x6, so expected \(batch, "
                                           r"heads, 4, 6, head_dim\) or \(batch, heads, 24, "):
        attn(q, q, q)


def test_unsupported_dtype(attn):
    q = torch.randn(1, 2, 24, 8).to(torch.int32)
    with pytest.raises(PatternError, match=r"numba: q has dtype=int32; expected one of "
                                           r"\('float32', 'float64', 'bfloat16', 'float16'\)"):
        attn(q, q, q)


def test_non_cpu_device(attn):
    # meta tensors take the same path as CUDA ones: anything but the CPU is refused
    q = torch.empty(1, 2, 24, 8, device="meta")
    with pytest.raises(PatternError, match=r"numba: q is on device='meta'; the numba backend "
                                           r"runs on \('cpu',\), so expected a tensor there"):
        attn(q, q, q)


def test_not_a_tensor(attn):
    with pytest.raises(PatternError, match=r"q must be a torch.Tensor, got ndarray"):
        attn(np.zeros((1, 1, 24, 8)), None, None)


def test_backend_refuses_cuda_and_half_at_compile_time():
    with pytest.raises(pg.BackendUnavailable, match=r"device='cuda' not in \('cpu',\)"):
        pg.compile(pg.window(3), (8,), backend="numba", device="cuda")
    with pytest.raises(pg.BackendUnavailable, match=r"dtype='int8' not in"):
        pg.compile(pg.window(3), (8,), backend="numba", dtype="int8")


def test_dilations_with_a_common_factor_meet_exactly():
    # steps 2 and 4 share a factor: the generated bounds go through a traced `where`
    spec = pg.window(3, dilation=2) & pg.window(5, dilation=4) | pg.window(2, dilation=3)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    out = pg.compile(spec, (40,), backend="numba")(q, k, v)
    torch.testing.assert_close(out, pg.dense_attention(q, k, v, pg.materialize(spec, 40)))


@pytest.mark.skipif(os.environ.get("PATTERNGEN_LONG") != "1",
                    reason="long random sweep: set PATTERNGEN_LONG=1")
@pytest.mark.parametrize("seed", range(40))
def test_random_sweep(seed):
    rng = random.Random(seed)
    ndim = rng.randint(1, 3)
    grid = tuple(rng.randint(7, 9 if ndim > 1 else 20) for _ in range(ndim))
    spec = random_spec(rng, ndim)
    q, k, v = _inputs(grid, rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 9),
                      torch.float64, seed)
    # half the cases one query at a time, half in tiles (the choice would rarely tile them)
    _check_against_oracle(spec, grid, q, k, v, lanes=rng.choice([0, 2, 3, 5]) if seed % 2 else 0)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
@pytest.mark.parametrize("lanes", [0, 3])
def test_half_precision_runs_in_float32(dtype, atol, lanes):
    # computed in float32, returned (and graded) in the input dtype, forward and gradients
    spec, grid = STRUCTURES["window_or_global"], (5, 9)
    q, k, v = _inputs(grid, 1, 2, 16, dtype, seed=14)
    _check_against_oracle(spec, grid, q, k, v, atol=atol, lanes=lanes)


def test_the_source_names_the_spec_it_was_compiled_for():
    # window(7) and window((7, 7)) lower to equal IRs; each names its own label
    first = pg.compile(pg.window(7), (9, 9), backend="numba")
    second = pg.compile(pg.window((7, 7)), (9, 9), backend="numba")
    assert first.ir == second.ir
    assert first.source.startswith("# window(7) runs this module")
    assert second.source.startswith(f"# {second.ir.label} runs this module")
    assert first.source_for("float32") == second.source_for("float32")
    assert second.ir.label != first.ir.label
