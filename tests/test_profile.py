"""profile: symbolic, counted and measured figures side by side (timings are never asserted)."""

import pytest

import patterngen as pg
from patterngen import backends
from patterngen.profile import measured_peak, profile
from patterngen.errors import BackendUnavailable, PatternError
from fakes import FakeDense, register_fake_backend

def real_backends():
    return [name for name in backends.available() if not name.startswith("test_")]


@pytest.fixture(scope="module")
def fake():
    return register_fake_backend()


def test_single_grid_sets_counts_beside_time(fake):
    prof = profile(pg.window(3) | pg.axis(0), grid=(6, 7), head_dim=8, heads=2, batch=2,
                           backend=fake, repeats=3, warmup=1)
    (row,) = prof.rows
    pairs = int(pg.materialize(pg.window(3) | pg.axis(0), (6, 7)).sum())
    assert row.grid == (6, 7) and row.backend == fake
    assert row.symbolic_pairs == row.counted_pairs == pairs
    assert row.flops == 4 * 8 * 2 * 2 * pairs
    assert len(row.times_ms) == 3 and row.median_ms > 0 and row.compile_ms > 0
    assert row.gflops > 0 and row.peak_share > 0
    text = repr(prof)
    assert text.startswith(f"Profile of (window(3) | axis(0)) with {fake} on cpu")
    for column in ("symbolic pairs", "counted pairs", "executed pairs", "compile ms",
                   "median ms", "GFLOP/s", "% peak"):
        assert column in text
    assert "6x7" in text and str(pairs) in text


def test_sweep_plots_and_shows_progress(fake, tmp_path, capsys):
    path = tmp_path / "scaling.png"
    prof = profile(pg.block(2), sizes=[(4, 4), (6, 6), (8, 8)], head_dim=4, heads=1,
                           backend=fake, repeats=2, warmup=0, plot=str(path))
    assert [r.grid for r in prof.rows] == [(4, 4), (6, 6), (8, 8)]
    assert [r.counted_pairs for r in prof.rows] == [64, 144, 256]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert prof.plot == str(path) and f"plot: {path}" in repr(prof)
    assert "profile block(2)" in capsys.readouterr().err


def test_heads_average_and_numeric_only_patterns(fake):
    prof = profile(pg.heads(pg.axis(0), pg.axis(1)), grid=(3, 5), heads=3, head_dim=4,
                           backend=fake, repeats=1, warmup=0)
    # heads 0 and 2 use axis(0) (3 keys), head 1 axis(1) (5 keys): mean (9 + 15 + 9) * 5 / 3
    assert prof.rows[0].counted_pairs == prof.rows[0].symbolic_pairs == 55
    # a flat global token index in 2-D needs a numeric grid: costed per size instead
    prof = profile(pg.window(3) | pg.global_tokens([7]), grid=(4, 4), head_dim=4,
                           heads=1, backend=fake, repeats=1, warmup=0)
    assert prof.symbolic is None
    assert prof.rows[0].counted_pairs == int(
        pg.materialize(pg.window(3) | pg.global_tokens([7]), (4, 4)).sum())


def test_executed_pairs_come_from_the_layout(fake):
    prof = profile(pg.window(3), grid=(8, 8), head_dim=4, heads=1, backend=fake, repeats=1,
                   warmup=0)
    assert prof.rows[0].executed_pairs >= prof.rows[0].counted_pairs
    assert "executed pairs: patterngen.layout, default blocks" in repr(prof)


def test_executed_pairs_prefer_the_backends_own_count(fake, monkeypatch):
    monkeypatch.setattr(FakeDense, "executed_pairs", (12345, 100), raising=False)
    prof = profile(pg.heads(pg.window(3), pg.axis(0)), grid=(8, 8), head_dim=4, heads=3,
                   backend=fake, repeats=1, warmup=0)
    assert prof.rows[0].executed_pairs == round((2 * 12345 + 100) / 3)  # heads 0, 2; head 1
    assert "executed pairs: the backend's own count" in repr(prof)


@pytest.mark.parametrize("name", ["sdpa", "flex"])
def test_block_sparse_backends_count_their_layouts_tiles(name):
    pattern = pg.heads(pg.window(3), pg.axis(0))
    attn = pg.compile(pattern, grid=(8, 8), backend=name, block=16)
    lay = pg.layout(pattern, (8, 8), block=16, order=attn.layout.order, tile=attn.layout.tile)
    assert attn.executed_pairs == (lay.patterns[0].executed_pairs,
                                   lay.patterns[1].executed_pairs)
    assert sum(attn.executed_pairs) == lay.executed_pairs > lay.attended_pairs


def test_peak_is_measured_once():
    peak = measured_peak("cpu")
    assert peak > 0 and measured_peak("cpu") == peak


def test_bad_arguments():
    with pytest.raises(PatternError, match=r"profile needs grid=\.\.\. or sizes="):
        profile(pg.window(3))
    with pytest.raises(PatternError, match=r"either grid= or sizes="):
        profile(pg.window(3), grid=(8, 8), sizes=[(8, 8)])
    with pytest.raises(PatternError, match=r"Invalid repeats=0"):
        profile(pg.window(3), grid=(8, 8), repeats=0)
    with pytest.raises(PatternError, match=r"Every size needs the same rank"):
        profile(pg.window(3), sizes=[(8, 8), (8,)])
    with pytest.raises(PatternError, match=r"Unknown dtype='float33'"):
        profile(pg.window(3), grid=(8, 8), dtype="float33")
    with pytest.raises(BackendUnavailable, match=r"device='meta'"):
        profile(pg.window(3), grid=(8, 8), device="meta")
    with pytest.raises(PatternError, match=r"key_grid=\(4, 4\) goes with one grid=\.\.\., not a "
                                           r"sweep of sizes=\[\(8, 8\)\]"):
        profile(pg.window(3), sizes=[(8, 8)], key_grid=(4, 4))


@pytest.mark.parametrize("name", real_backends())
def test_every_registered_backend_profiles(name):
    prof = profile(pg.window(3), grid=(8, 8), head_dim=8, heads=2, backend=name, repeats=2,
                   warmup=1)
    assert prof.rows[0].counted_pairs == 8 * 8 * 9


@pytest.mark.parametrize("name", ["auto", "sdpa"])
def test_keys_on_another_grid(name):
    prof = profile(pg.window(3), grid=(8, 8), key_grid=(4, 4), head_dim=8, heads=2,
                   backend=name, repeats=2, warmup=1)
    (row,) = prof.rows
    pairs = int(pg.materialize(pg.window(3), (8, 8), key_grid=(4, 4)).sum())
    assert row.symbolic_pairs == row.counted_pairs == pairs
    assert prof.symbolic.key_grid is not None and prof.key_grid == (4, 4)
    assert "keys on 4x4" in repr(prof)
