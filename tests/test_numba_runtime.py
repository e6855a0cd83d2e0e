"""The numba backend's runtime helpers against numpy, the cache key of generated modules, and
recovery from a cache directory that cannot be used."""

import hashlib
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numba
import numpy as np
import pytest
import torch

import patterngen as pg
from patterngen import trust
from patterngen.backends.numba import module, runtime


@numba.njit
def _exp_shifted(x, bits, cnt, top):
    runtime.exp_shifted(x, bits, cnt, top)


# float32: the polynomial's error (about 1e-7) plus the rounding of (x - top) * log2(e),
# which grows with |x - top| (6e-8 of it, relative): 2e-6 over [-20, 0]
@pytest.mark.parametrize("dtype, bits, rtol", [(np.float32, np.int32, 2e-6),
                                               (np.float64, np.int64, 1e-15)])
def test_exp_shifted_matches_numpy(dtype, bits, rtol):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-20, 0, 200), [0.0, -1e-30, -87.0, -1e4, -np.inf]])
    x = x.astype(dtype)
    top = dtype(0.75)
    want = np.exp((x - top).astype(np.float64))
    got = x.copy()
    _exp_shifted(got, np.empty(len(x), bits), len(x) - 3, top)
    np.testing.assert_allclose(got[:-3], want[:-3], rtol=rtol, atol=1e-38)
    np.testing.assert_array_equal(got[-3:], x[-3:])  # past cnt: untouched
    _exp_shifted(got := x.copy(), np.empty(len(x), bits), len(x), top)
    assert got[-1] == 0.0 and got[-2] == 0.0  # -inf (a masked key) and underflow give 0


@numba.njit
def _online(q, k, v, keys, chunk, bits):
    dim = q.shape[0]
    acc, scores = np.zeros(dim, q.dtype), np.empty(chunk, q.dtype)
    buffer = np.empty(chunk, np.int64)
    out, lse = np.empty((1, dim), q.dtype), np.empty((1, 1, 1), q.dtype)
    m, l = q.dtype.type(-np.inf), q.dtype.type(0.0)
    for first in range(0, keys.shape[0], chunk):
        cnt = min(chunk, keys.shape[0] - first)
        buffer[:cnt] = keys[first:first + cnt]
        m, l = runtime.softmax_chunk(q, k, v, buffer, scores, bits, cnt, m, l, acc, dim)
    runtime.finish_row(out, lse, 0, 0, 0, acc, m, l, dim)
    return out[0], lse[0, 0, 0]


def _softmax_row(q, k, v, keys, chunk):
    """One query through the chunked online softmax, ``chunk`` keys at a time."""
    bits = np.empty(chunk, np.int32 if q.dtype == np.float32 else np.int64)
    return _online(q, k, v, keys.astype(np.int64), chunk, bits)


@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_online_softmax_matches_numpy(dtype, atol):
    rng = np.random.default_rng(1)
    q, k, v = rng.normal(size=5), rng.normal(size=(40, 5)), rng.normal(size=(40, 5))
    keys = np.array([3, 7, 8, 9, 20, 21, 22, 30, 31, 39, 0], dtype=np.int64)
    scores = k[keys] @ q
    p = np.exp(scores - scores.max())
    for chunk in (1, 4, 16):  # rescaling between chunks, four-key passes and their tails
        out, lse = _softmax_row(q.astype(dtype), k.astype(dtype), v.astype(dtype), keys, chunk)
        np.testing.assert_allclose(out, p @ v[keys] / p.sum(), atol=atol)
        assert math.isclose(lse, scores.max() + math.log(p.sum()), abs_tol=atol)


def test_online_softmax_non_finite_scores():
    rng = np.random.default_rng(2)
    q, v = np.ones(3), rng.normal(size=(6, 3))
    k = rng.normal(size=(6, 3))
    k[4] = -np.inf  # score -inf: probability 0
    out, lse = _softmax_row(q, k, v, np.array([0, 4, 5]), 2)
    scores = k[[0, 5]] @ q
    p = np.exp(scores - scores.max())
    np.testing.assert_allclose(out, p @ v[[0, 5]] / p.sum(), atol=1e-12)
    out, lse = _softmax_row(q, k, v, np.array([4]), 2)  # only -inf: zeros, lse -inf
    assert (out == 0).all() and lse == -np.inf
    out, lse = _softmax_row(q, k, v, np.array([], dtype=np.int64), 2)  # no keys: the same
    assert (out == 0).all() and lse == -np.inf
    for bad in (np.nan, np.inf):  # NaN or +inf score: the row is NaN, lse NaN
        k[2] = bad
        out, lse = _softmax_row(q, k, v, np.array([0, 1, 2, 3]), 2)
        assert np.isnan(out).all() and np.isnan(lse)


@numba.njit
def _tanh_each(x):
    for i in range(x.shape[0]):
        x[i] = runtime.tanh(x[i])


# float32: Eigen's rational approximation, clamped where float32's tanh is +-1 to a few ulp
@pytest.mark.parametrize("dtype, atol", [(np.float32, 3e-7), (np.float64, 1e-15)])
def test_tanh_matches_numpy(dtype, atol):
    x = np.concatenate([np.linspace(-12, 12, 40001), [1e-30, -1e-8, 3e38, np.inf, -np.inf]])
    got = x.astype(dtype)
    _tanh_each(got)
    np.testing.assert_allclose(got, np.tanh(x.astype(dtype).astype(np.float64)), atol=atol,
                               rtol=atol)
    nan = np.array([np.nan], dtype=dtype)
    _tanh_each(nan)
    assert np.isnan(nan[0])


def test_softcap_bias_and_the_table_gradient_match_numpy():
    rng = np.random.default_rng(3)
    dim, cap, shift = 4, 0.7, 2
    qs, dos = rng.normal(size=dim), rng.normal(size=dim)
    k, v = rng.normal(size=(12, dim)), rng.normal(size=(12, dim))
    keys = np.array([1, 4, 5, 9, 11], dtype=np.int64)
    offs = np.array([3, 2, 6, 3, 4], dtype=np.int64)  # two keys share a table entry
    table = rng.normal(size=8)
    t = np.tanh(k[keys] @ qs / cap)
    want = cap * t + table[offs - shift]

    scores, slopes = k[keys] @ qs, np.empty(5)
    runtime.soft_cap(scores, 5, cap, slopes)
    runtime.add_bias(scores, 5, table, offs, shift, None)
    np.testing.assert_allclose(scores, want, atol=1e-14)
    np.testing.assert_allclose(slopes, 1 - t * t, atol=1e-14)
    # a tile lane's mask: keys it does not hold get -inf and read (or write) no table entry
    mask, beyond = np.array([0.0, -np.inf, 0, 0, 0]), np.array([3, 99, 6, 3, 4])
    masked = np.zeros(5)
    runtime.add_bias(masked, 5, table, beyond, 0, mask)
    np.testing.assert_array_equal(masked, np.where(mask == 0, table[offs], -np.inf))
    grad = np.zeros(8)
    runtime.add_table_grad(grad, np.ones(5), 5, beyond, 0, mask)
    np.testing.assert_array_equal(grad, np.bincount(offs[mask == 0], minlength=8))

    # the backward: dS into the table by offset, dS times the cap's slope into q and k
    lse, delta = np.log(np.exp(want).sum()), 0.3
    p = np.exp(want - lse)
    ds = p * (v[keys] @ dos - delta)
    dqa, dkb, dvb, dtable = np.zeros(dim), np.zeros_like(k), np.zeros_like(v), np.zeros(8)
    runtime.backward_chunk(qs, dos, k, v, keys, np.empty(5), np.empty(5), np.empty(5, np.int64),
                           5, lse, delta, dqa, dkb, dvb, dim, table, offs, shift, cap,
                           np.empty(5), dtable)
    want_table, want_k, want_v = np.zeros(8), np.zeros_like(k), np.zeros_like(v)
    np.add.at(want_table, offs - shift, ds)
    np.add.at(want_k, keys, np.outer(ds * (1 - t * t), qs))
    np.add.at(want_v, keys, np.outer(p, dos))
    np.testing.assert_allclose(dtable, want_table, atol=1e-14)
    np.testing.assert_allclose(dqa, (ds * (1 - t * t)) @ k[keys], atol=1e-14)
    np.testing.assert_allclose(dkb, want_k, atol=1e-14)
    np.testing.assert_allclose(dvb, want_v, atol=1e-14)


def test_helpers_specialise_on_a_constant_head_dim():
    # a kernel compiled for one head_dim passes it as a constant: numba types it as a
    # literal and compiles the helper once more with loops of constant length
    @numba.njit
    def caller(x, rows, keys, out):
        runtime.dots(x, rows, keys, 4, out, 8)

    x, rows = np.ones(8, np.float32), np.ones((5, 8), np.float32)
    out = np.empty(4, np.float32)
    caller(x, rows, np.arange(4), out)
    np.testing.assert_array_equal(out, 8.0)
    assert any(str(sig[-1]) == "Literal[int](8)" for sig in runtime.dots.signatures)


def test_a_changed_runtime_renames_every_generated_module(monkeypatch):
    files = [Path(runtime.__file__), Path(module.launch.__file__)]
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]
    assert module.runtime_digest() == digest
    source = "X = 1  # test_a_changed_runtime_renames_every_generated_module\n"
    before = module.load(source)
    monkeypatch.setattr(module, "runtime_digest", lambda: "changed")
    module.load.cache_clear()
    after = module.load(source)
    # a new file: numba's cache of the old one (compiled against the old helpers) is not used
    assert before.__name__ != after.__name__ and before.__file__ != after.__file__
    assert after.__name__ == module.module_name(source, "changed")


def _run_small(spec=pg.window(3) | pg.axis(0), grid=(4, 5)):
    q, k, v = (torch.randn(1, 2, *grid, 4, dtype=torch.float64) for _ in range(3))
    out = pg.compile(spec, grid, backend="numba")(q, k, v)
    ref = pg.dense_attention(*(t.reshape(1, 2, -1, 4) for t in (q, k, v)),
                             pg.materialize(spec, grid))
    torch.testing.assert_close(out.reshape(ref.shape), ref)


@pytest.mark.parametrize("how", ["a file in its place", "read-only"])
def test_an_unusable_cache_directory_moves_to_a_temporary_one(how, tmp_path, monkeypatch):
    monkeypatch.setattr(trust, "_moved", {})
    if how == "read-only":
        target = tmp_path / "cache"
        target.mkdir()

        def refuse(path):  # as a read-only directory does for a user other than root
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(trust, "_probe", refuse)
    else:
        (tmp_path / "file").write_text("")
        target = tmp_path / "file" / "cache"
    monkeypatch.setenv("PATTERNGEN_CACHE", str(target))
    with pytest.warns(RuntimeWarning, match="the kernel cache directory .* cannot be used") as w:
        first = module.cache_dir()
        assert module.cache_dir() == first != target
    assert len(w) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        _run_small()


@pytest.mark.skipif(runtime.BOUNDSCHECK, reason="PATTERNGEN_NUMBA_BOUNDSCHECK=1 caches nothing")
def test_a_corrupt_kernel_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")  # the kernels' cache beside them
    spec = pg.window(3) | pg.global_tokens([2])
    _run_small(spec)
    indexes = list((tmp_path / "__pycache__").glob("*.nbi"))
    assert indexes
    for path in indexes:
        path.write_text("garbage")
    for name in [n for n in sys.modules if n.startswith("patterngen_numba_")]:
        del sys.modules[name]
    module.load.cache_clear()
    module.kernel.cache_clear()
    with pytest.warns(RuntimeWarning, match="could not read the cached kernel forward_0") as w:
        _run_small(spec)
    assert len(w) == 1
    assert all(path.read_bytes() != b"garbage" for path in indexes if path.exists())


def test_boundscheck_mode_checks_the_helpers():
    # PATTERNGEN_NUMBA_BOUNDSCHECK=1: a key past the rows raises instead of reading beyond
    # them. The runtime file alone is imported (numba, numpy): patterngen would double the time
    code = ("import importlib.util\n"
            "import numpy as np\n"
            f"spec = importlib.util.spec_from_file_location('runtime', {runtime.__file__!r})\n"
            "runtime = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(runtime)\n"
            "assert runtime.JIT['boundscheck'] and not runtime.JIT['cache']\n"
            "rows, out = np.zeros((4, 8)), np.zeros(1)\n"
            "try:\n"
            "    runtime.dots(np.ones(8), rows, np.array([4]), 1, out, 8)\n"
            "except IndexError:\n"
            "    print('checked')\n")
    env = {**os.environ, "PATTERNGEN_NUMBA_BOUNDSCHECK": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "checked", done.stderr


@numba.njit
def _tile(q, k, v, keys, held, chunk, masked, bits, width, n):
    """A tile of lanes through cols_softmax_chunk, ``chunk`` keys at a time (lane ``u``
    holds key ``keys[c]`` where ``held[c, u]``), then finish_lanes over ``n`` of ``width``."""
    lanes, dim = q.shape
    acc, out = np.zeros((lanes, dim), q.dtype), np.full((lanes, dim), 7.0, q.dtype)
    scores, mask = np.empty((chunk, lanes), q.dtype), np.empty((chunk, lanes), q.dtype)
    top, check = np.empty(lanes, q.dtype), np.empty(lanes, q.dtype)
    lse = np.full((1, 1, lanes), 7.0, q.dtype)
    m, l = np.full(lanes, -np.inf, q.dtype), np.zeros(lanes, q.dtype)
    buffer = np.empty(chunk, np.int64)
    for first in range(0, keys.shape[0], chunk):
        cnt = min(chunk, keys.shape[0] - first)
        buffer[:cnt] = keys[first:first + cnt]
        for c in range(cnt):
            for u in range(lanes):
                mask[c, u] = 0.0 if held[first + c, u] else -np.inf
        runtime.cols_softmax_chunk(q, k, v, buffer, scores, mask, masked, bits, cnt, m, l, acc,
                                   top, check, dim)
    runtime.finish_lanes(out, lse, 0, 0, np.arange(lanes), acc, m, l, 0, width, n, dim)
    return out, lse[0, 0]


def _tile_reference(q, k, v, keys, held):
    """Per lane, softmax attention over the keys it holds (numpy, float64)."""
    out, lse = np.zeros(q.shape), np.full(q.shape[0], -np.inf)
    for u in range(q.shape[0]):
        mine = keys[held[:, u]]
        scores = k[mine] @ q[u]
        if len(mine) and np.isnan(scores).any() | (scores == np.inf).any():
            out[u], lse[u] = np.nan, np.nan
        elif len(mine) and scores.max() > -np.inf:
            p = np.exp(scores - scores.max())
            out[u], lse[u] = p @ v[mine] / p.sum(), scores.max() + np.log(p.sum())
    return out, lse


@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-12), (np.float32, 3e-6)])
@pytest.mark.parametrize("masked", [True, False])
def test_key_major_tile_chunks_match_numpy(dtype, atol, masked):
    """A tile's chunk with scores [key, lane]: masked per lane or held by every lane, over
    chunks of 1, 4 and 16 keys (a lane's max growing between chunks rescales its sums), five
    lanes (a tail past the 2-lane blocks), the last lane outside the grid left unwritten."""
    rng = np.random.default_rng(3)
    q, k, v = rng.normal(size=(5, 6)), rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    keys = np.array([3, 7, 8, 9, 20, 21, 22, 30, 31, 39, 0, 5], dtype=np.int64)
    k[keys[6]] *= 4  # a late key with a large score: the running max grows
    held = rng.random((len(keys), 5)) < 0.6 if masked else np.ones((len(keys), 5), bool)
    if masked:
        held[:, 1] = False  # a lane without keys: zeros, lse -inf
    want_out, want_lse = _tile_reference(q, k, v, keys, held)
    bits = np.int32 if dtype == np.float32 else np.int64
    for chunk in (1, 4, 16):
        out, lse = _tile(q.astype(dtype), k.astype(dtype), v.astype(dtype), keys, held, chunk,
                         masked, np.empty((chunk, 5), bits), 5, 4)
        np.testing.assert_allclose(out[:4], want_out[:4], atol=atol, rtol=0)
        np.testing.assert_allclose(lse[:4], want_lse[:4], atol=atol, rtol=0)
        assert (out[4] == 7).all() and lse[4] == 7  # outside the grid: not written


def test_key_major_tile_chunks_non_finite_scores():
    """A NaN or +inf score poisons only the lanes that hold its key; -inf gives probability 0;
    a lane whose every score is -inf outputs zeros with lse -inf."""
    rng = np.random.default_rng(4)
    q, v = np.ones((4, 3)), rng.normal(size=(8, 3))
    k = rng.normal(size=(8, 3))
    keys = np.arange(8, dtype=np.int64)
    held = np.ones((8, 4), bool)
    held[2, 0] = held[2, 1] = False  # key 2 (bad below) held by lanes 2 and 3 only
    held[:, 3] = False
    held[5, 3] = True  # lane 3: key 5 alone, a -inf score
    k[5] = -np.inf
    for bad in (np.nan, np.inf):
        k[2] = bad
        want_out, want_lse = _tile_reference(q, k, v, keys, held)
        for chunk in (3, 8):
            out, lse = _tile(q, k, v, keys, held, chunk, True, np.empty((chunk, 4), np.int64),
                             4, 4)
            np.testing.assert_allclose(out[:2], want_out[:2], atol=1e-12)
            np.testing.assert_allclose(lse[:2], want_lse[:2], atol=1e-12)
            assert np.isnan(out[2]).all() and np.isnan(lse[2])
            assert (out[3] == 0).all() and lse[3] == -np.inf
