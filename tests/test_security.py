"""The trust boundary (docs/security.md): what is read back from the cache cannot be planted,
temporary files are exclusive, calibration files are validated, inputs cannot exhaust the
machine, and bad input ends in a PatternError."""

import importlib.util
import json
import math
import os
import pickle
import py_compile
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numba
import numpy as np
import pytest

import patterngen as pg
from patterngen import calibrate, trust
from patterngen.backends.numba import module


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh private kernel cache and calibration directory, numba's caches beside it."""
    monkeypatch.setattr(trust, "_moved", {})
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("PATTERNGEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _source(tmp_path, body: str = "X = 'verified'\n") -> str:
    return f"{body}# {tmp_path}\n"  # a module of its own per test


def test_cache_files_are_private(cache, tmp_path):
    mod = module.load.__wrapped__(_source(tmp_path))
    path = Path(mod.__file__)
    assert path.parent == cache and mod.X == "verified"
    assert _mode(cache) == 0o700 and _mode(cache / "__pycache__") == 0o700
    assert _mode(path) == 0o600


def test_a_planted_pyc_does_not_run(cache, tmp_path):
    source = _source(tmp_path)
    path = Path(module.load.__wrapped__(source).__file__)
    # bytecode of other text, stamped with the file's own mtime and size: an import takes it
    planted = "X = 'planted'\n".ljust(len(source) - 1) + "\n"
    st = path.stat()
    path.write_text(planted)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    py_compile.compile(str(path), cfile=importlib.util.cache_from_source(str(path)))
    path.write_text(source)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    spec = importlib.util.spec_from_file_location("planted_probe", path)
    imported = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(imported)
    assert imported.X == "planted"  # the plant works on an ordinary import
    assert module.load.__wrapped__(source).X == "verified"


def _plant_index(directory: Path, source: str, marker: Path) -> None:
    """A numba index for ``f`` of ``source`` that makes a directory when unpickled."""
    stem = module.module_name(source, module.runtime_digest())
    name = f"{stem}.f-2.py{sys.version_info[0]}{sys.version_info[1]}{sys.abiflags}.nbi"
    (directory / "__pycache__").mkdir(parents=True, exist_ok=True)

    class Payload:
        def __reduce__(self):
            return os.makedirs, (str(marker), 0o777, True)  # numba reads it twice

    (directory / "__pycache__" / name).write_bytes(
        pickle.dumps(numba.__version__) + pickle.dumps((Payload(), {})))


_NJIT = "import numba\n@numba.njit(cache=True)\ndef f(x):\n    return x + 1\n"


def test_a_planted_numba_index_runs_only_from_a_private_cache(cache, tmp_path, monkeypatch):
    # control: a private directory is trusted, and numba does unpickle the planted index
    source = _source(tmp_path, _NJIT)
    cache.mkdir(mode=0o700)
    _plant_index(cache, source, tmp_path / "ran-private")
    assert module.load.__wrapped__(source).f(1) == 2
    assert (tmp_path / "ran-private").exists()
    # the same plant in a cache others can write to: refused, so never read
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("PATTERNGEN_CACHE", str(shared))
    source = _source(tmp_path, _NJIT + "# shared\n")
    _plant_index(shared, source, tmp_path / "ran-shared")
    with pytest.warns(RuntimeWarning, match=r"kernel cache directory .*shared' cannot be used "
                                            r"\(.* is writable by its group or by others "
                                            r"\(mode 777\); write access to a cache is code "
                                            r"execution\)"):
        mod = module.load.__wrapped__(source)
    assert mod.f(1) == 2 and not (tmp_path / "ran-shared").exists()
    assert Path(mod.__file__).parent != shared


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="making a directory another user owns needs root")
def test_a_foreign_owned_cache_is_refused(cache, tmp_path):
    cache.mkdir(mode=0o700)
    os.chown(cache, 12345, -1)
    with pytest.warns(RuntimeWarning, match=r"is owned by uid 12345, not by this user"):
        assert module.cache_dir() != cache


def test_an_open_directory_above_the_cache_is_refused_unless_sticky(tmp_path, monkeypatch):
    above = tmp_path / "above"
    above.mkdir()
    above.chmod(0o777)
    with pytest.raises(trust.UnsafeDirectory, match=r"above' is writable by its group"):
        trust.private_dir(above / "cache")
    above.chmod(0o1777)  # as /tmp: others cannot rename the cache away
    assert trust.private_dir(above / "cache") == above / "cache"


def test_an_open_numba_cache_dir_is_refused(cache, tmp_path, monkeypatch):
    shared = tmp_path / "numba"
    shared.mkdir()
    shared.chmod(0o775)
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(shared))
    with pytest.raises(pg.PatternError, match=r"NUMBA_CACHE_DIR='.*numba' cannot be used "
                                              r"\(.*mode 775.*\); numba loads pickled code"):
        module.load.__wrapped__(_source(tmp_path))


def test_an_open_cache_of_the_runtime_helpers_is_refused(cache, tmp_path, monkeypatch):
    # numba's user-wide cache, where the helpers' caches go when the installation is read-only
    from types import SimpleNamespace

    from patterngen.backends.numba import runtime

    shared = tmp_path / "numba-user-wide"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(runtime.dots, "_cache", SimpleNamespace(cache_path=str(shared)))
    with pytest.raises(pg.PatternError, match=r"runtime helpers' cache '.*numba-user-wide' "
                                              r"cannot be used \(.*mode 777.*\); numba loads"):
        module.load.__wrapped__(_source(tmp_path))


def test_a_damaged_module_file_is_rewritten_or_named(cache, tmp_path):
    source = _source(tmp_path)
    path = Path(module.load.__wrapped__(source).__file__)
    path.write_bytes(b"\xff\xfe not utf-8")
    assert module.load.__wrapped__(source).X == "verified"
    assert path.read_text() == source
    path.unlink()
    path.mkdir()
    with pytest.raises(pg.PatternError, match=r"is a directory where the generated module "
                                              r"belongs; remove it"):
        module.load.__wrapped__(source)


def test_temporary_names_are_exclusive_and_symlinks_not_followed(cache, tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    cache.mkdir(mode=0o700)
    source = _source(tmp_path)
    path = cache / f"{module.module_name(source, module.runtime_digest())}.py"
    pid = os.getpid()
    # the names the code once wrote to, and the final names, all pointing at the victim
    for name in (f"{path.stem}.{pid}.tmp", f".probe.{pid}", f"calibration.{pid}.tmp",
                 path.name, "calibration.json"):
        (cache / name).symlink_to(victim)
    assert module.load.__wrapped__(source).X == "verified"
    monkeypatch.delenv("PATTERNGEN_CALIBRATION", raising=False)
    monkeypatch.setattr(calibrate, "_MEMO", {})
    monkeypatch.setattr(calibrate, "measure", lambda *a: _measured())
    with pytest.warns(UserWarning, match="is unreadable"):  # the victim is not JSON
        calibrate.rates("cpu", "float32")
    assert victim.read_text() == "precious"
    for final in (path, cache / "calibration.json"):
        assert not final.is_symlink() and _mode(final) == 0o600


def _measured() -> calibrate.Rates:
    return calibrate.Rates(calibrate.Rates.default().executors, "measured")


def _stored_key(tmp_path, monkeypatch) -> str:
    """The key ``rates`` files CPU float32 rates under, read back from the file it writes in
    a cache directory of its own (the test's ``PATTERNGEN_CACHE`` is left as it was)."""
    before = os.environ["PATTERNGEN_CACHE"]
    monkeypatch.delenv("PATTERNGEN_CALIBRATION", raising=False)
    monkeypatch.setenv("PATTERNGEN_CACHE", str(tmp_path / "probe"))
    monkeypatch.setattr(calibrate, "measure", lambda *a: _measured())
    calibrate.rates("cpu", "float32", refresh=True)
    (key,) = json.loads(calibrate.calibration_path().read_text())
    monkeypatch.setenv("PATTERNGEN_CACHE", before)
    return key


def test_no_shared_fallback_for_calibration(cache, tmp_path, monkeypatch):
    # an unusable cache once fell back to $TMPDIR/patterngen, where anyone could plant rates
    planted = tmp_path / "tmp" / "patterngen"
    planted.mkdir(parents=True)
    key = _stored_key(tmp_path, monkeypatch)
    negative = {name: {"call_ms": -1e6, "pair_ns": 0.0, "backward_factor": 1.0}
                for name in calibrate.Rates.default().executors}
    (planted / "calibration.json").write_text(json.dumps({key: negative}))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    cache.write_text("a file where the cache directory belongs")
    monkeypatch.delenv("PATTERNGEN_CALIBRATION", raising=False)
    monkeypatch.setattr(calibrate, "_MEMO", {})
    calls = []
    monkeypatch.setattr(calibrate, "measure", lambda *a: calls.append(a) or _measured())
    with pytest.warns(RuntimeWarning, match=r"calibration directory .* cannot be used"):
        got = calibrate.rates("cpu", "float32")
    assert calls and got.executors == _measured().executors
    path = calibrate.calibration_path()
    assert path.parent != planted and _mode(path.parent) == 0o700


_GOOD = {"call_ms": 0.1, "pair_ns": 0.2, "backward_factor": 3.0}


@pytest.mark.parametrize("entry, why", [
    (5, r"expected an object of executors, got 5"),
    ({"copy": _GOOD}, r"no rate for primitives \['attend/fused/16x1024/d16', .*\] and "
                      r"\d+ more"),
    ("nan", r"rate of 'copy': Rate: call_ms=nan; expected a finite number >= 0.0"),
    ("-1", r"rate of 'copy': Rate: call_ms=-1.0; expected a finite number >= 0.0"),
    ("'x'", r"rate of 'copy': Rate: call_ms='x'; expected a finite number"),
    ("null", r"rate of 'copy': Rate: call_ms=None; expected a finite number"),
    ("Infinity", r"rate of 'copy': Rate: call_ms=inf"),
    ("extra", r"rate of 'copy': .*unexpected keyword argument 'extra'"),
    ("list", r"rate of 'copy' is \[1, 2, 3\], not an object"),
])
def test_invalid_stored_rates_are_measured_again(entry, why, cache, tmp_path, monkeypatch):
    key = _stored_key(tmp_path, monkeypatch)
    if isinstance(entry, str):
        table = {name: dict(_GOOD) for name in calibrate.Rates.default().executors}
        if entry == "extra":
            table["copy"]["extra"] = 1
        elif entry == "list":
            table["copy"] = [1, 2, 3]
        else:
            table["copy"]["call_ms"] = {"nan": math.nan, "-1": -1.0, "'x'": "x", "null": None,
                                         "Infinity": math.inf}[entry]
        entry = table
    monkeypatch.delenv("PATTERNGEN_CALIBRATION", raising=False)
    monkeypatch.setattr(calibrate, "_MEMO", {})
    calls = []
    monkeypatch.setattr(calibrate, "measure", lambda *a: calls.append(a) or _measured())
    path = calibrate.calibration_path()
    path.write_text(json.dumps({key: entry}))
    with pytest.warns(UserWarning, match=r"is unreadable \(" + why):
        got = calibrate.rates("cpu", "float32")
    assert len(calls) == 1 and got.source == "measured"
    ms = pg.plan(pg.window(3), grid=(8, 8), rates=got).predicted_ms
    assert math.isfinite(ms) and ms >= 0


@pytest.mark.parametrize("field, value", [("call_ms", -1.0), ("pair_ns", math.nan),
                                          ("backward_factor", 0.5), ("pair_ns", True)])
def test_a_rate_out_of_range_is_refused(field, value):
    with pytest.raises(pg.PatternError, match=rf"Rate: {field}={value!r}; expected a finite"):
        calibrate.Rate(**{**_GOOD, field: value})


def test_an_unknown_dtype_is_a_pattern_error():
    with pytest.raises(pg.PatternError, match=r"plan: dtype='nonexistent' is not a torch "
                                              r"dtype; expected a name such as 'float32'"):
        pg.plan(pg.window(3), grid=(8, 8), dtype="nonexistent")
    with pytest.raises(pg.PatternError, match=r"rates: dtype='Tensor' is not a torch dtype"):
        calibrate.rates("cpu", "Tensor")


# --------------------------------------------------------------------------------------------
# bounded work: the size bombs, each in one subprocess under a memory and a time limit

_UNION = " | ".join(f"window({i})" for i in range(1, 1000))
_BOMBS = [
    # (argv, exit status, what stderr or stdout says)
    (["show", "window(7)", "--grid", "100000x100000"], 2,
     r"show: grid 100000x100000's tokens is 10000000000, more than PATTERNGEN_MAX_TOKENS="),
    (["reach", "window(3)", "--grid", "8x8", "--layers", "100000000"], 0,
     r"after 100000000 layers \[window\(3\) x 100000000\] on grid 8x8: 64 of 64 tokens"),
    (["cost", " | ".join(f"block(M{i})" for i in range(10)), "--grid", "H,W"], 2,
     r"symbolic pair count of a union of 10 terms, after \d+ of its 1023 inclusion-exclusion "
     r"pieces .* is 129, more than PATTERNGEN_MAX_SYMBOLIC_TERMS=128"),
    (["plan", "window(7)", "--grid", "2000x2000"], 2,
     r"plan: grid 2000x2000's tokens .* is 4000000, more than PATTERNGEN_MAX_PLAN_TOKENS="),
    (["show", "heads(" + ", ".join(f"window({i})" for i in range(1, 501)) + ")", "--grid",
      "8x8"], 2, r"patterns in heads\(\.\.\.\) is 500, more than PATTERNGEN_MAX_HEAD_PATTERNS"),
    (["show", _UNION, "--grid", "8x8"], 2,
     r"one chain of '\|' and '&' is 999, more than PATTERNGEN_MAX_TERMS=256"),
    (["show", " & ".join(f"(window({i}) | block({i}))" for i in range(2, 12)), "--grid",
      "64x64"], 2, r"product of terms \(256 x 2\) is 512, more than PATTERNGEN_MAX_TERMS"),
    (["show", "window(" * 300 + "3" + ")" * 300, "--grid", "8x8"], 2,
     r"too many nested parentheses|nested too deeply"),
    (["show", "block(9223372036854775808)", "--grid", "8x8"], 2,
     r"Invalid size size=9223372036854775808; expected an integer <= 2147483647"),
    (["show", "window(3)", "--grid", "99999999999999999999x4"], 2,
     r"Invalid size grid\[0\]=99999999999999999999; expected an integer <= 2147483647"),
    (["show", "window(3)", "--grid", "20000000x2"], 2,
     r"longest axis of grid=20000000x2 is 20000000, more than PATTERNGEN_MAX_AXIS"),
    (["cost", "window(3)", "--grid", "8x8", "--block", "99999999999999999999"], 2,
     r"Invalid block=99999999999999999999; block sizes must be positive integers up to "
     r"2147483647"),
    (["cost", "window(3)", "--grid", "5000x5000", "--block", "64"], 2,
     r"layout: grid 5000x5000.s tokens is 25000000, more than "
     r"PATTERNGEN_MAX_TOKENS"),
    (["profile", "window(3)", "--grid", "4000x4000", "--heads", "64", "--backend", "sdpa"], 2,
     r"profile: the elements of each of q, k and v is 32768000000, more than "
     r"PATTERNGEN_MAX_PROFILE_ELEMENTS"),
    (["codegen", "window(3)", "--grid", "16000000x1000"], 2,
     r"compile: grid 16000000x1000's tokens is 16000000000, more than PATTERNGEN_MAX_TOKENS"),
    # the test lowers this limit (2**28 word operations take about 5 s here)
    (["reach", "window(3) | axis(0)", "--grid", "128x128"], 2,
     r"layers_to_global: the bitset words x terms x axes of 2 layers is 33554432, more than "
     r"PATTERNGEN_MAX_GLOBAL_WORK=16777216"),
    (["cost", "window(3) | block(5, offset=2)", "--grid", "H,W", "--subs", "H=2147483647",
      "W=5"], 2, r"subs: the longest axis of grid=2147483647x5 is 2147483647, more than "
                 r"PATTERNGEN_MAX_AXIS"),
    (["show", "window(3)", "--grid", "²x4"], 2, r"part '²' is neither a number nor a name"),
    (["cost", "window(3)", "--grid", "8x8", "--subs", "H=²"], 2, r"invalid size 'H=²'"),
    (["plan", "heads(window(3), axis(0), block(2))", "--grid", "8x8", "--heads", "2147483647"],
     0, r"heads=2147483647"),
    (["plan", "window(3)", "--grid", "8x8", "--dtype", "nonexistent"], 2,
     r"plan: dtype='nonexistent' is not a torch dtype"),
]

_RUN_BOMBS = r"""
import contextlib, io, json, resource, sys
import numba, torch
from patterngen.cli import main
# 3 GiB beyond what the imports mapped (a CUDA build of torch maps gigabytes of libraries)
with open("/proc/self/status") as status:
    mapped = next(int(line.split()[1]) for line in status if line.startswith("VmSize:")) << 10
resource.setrlimit(resource.RLIMIT_AS, (mapped + (3 << 30), mapped + (3 << 30)))
out = []
for argv in json.loads(sys.stdin.read()):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    out.append((status, stdout.getvalue(), stderr.getvalue()))
print(json.dumps(out))
"""


def test_size_bombs_are_refused_within_time_and_memory_limits(tmp_path):
    env = {**os.environ, "PATTERNGEN_CACHE": str(tmp_path), "PATTERNGEN_CALIBRATION": "default",
           "PATTERNGEN_MAX_GLOBAL_WORK": str(1 << 24)}
    done = subprocess.run([sys.executable, "-c", _RUN_BOMBS], input=json.dumps(
        [argv for argv, _, _ in _BOMBS]), capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for (argv, status, says), (got, out, err) in zip(_BOMBS, json.loads(done.stdout)):
        text = out + err
        assert got == status and re.search(says, text), (argv[:2], got, text[-500:])
        assert "Traceback" not in text
        if status == 2:  # one error line (after argparse's usage, for its own checks)
            lines = err.strip().splitlines()
            assert [line for line in lines if "error:" in line] == lines[-1:], err
            assert len(lines) == 1 or lines[0].startswith("usage:"), err


def test_a_limit_is_raised_by_its_variable(monkeypatch):
    monkeypatch.setenv("PATTERNGEN_MAX_TOKENS", "15")
    with pytest.raises(pg.PatternError, match=r"grid 4x4's tokens is 16, more than "
                                              r"PATTERNGEN_MAX_TOKENS=15, the limit on"):
        pg.show(pg.window(3), grid=(4, 4))
    monkeypatch.setenv("PATTERNGEN_MAX_TOKENS", "16")
    assert "16 of 16" in str(pg.receptive_field(pg.window(3), grid=(4, 4), layers=3))
    monkeypatch.setenv("PATTERNGEN_MAX_TOKENS", "²")
    with pytest.raises(pg.PatternError, match=r"PATTERNGEN_MAX_TOKENS='²'; expected a "
                                              r"positive integer \(default 16777216\)"):
        pg.show(pg.window(3), grid=(4, 4))


def test_the_reach_work_limit_stops_a_slowly_growing_field(monkeypatch):
    monkeypatch.setenv("PATTERNGEN_MAX_REACH_WORK", str(64 * 10))
    assert pg.receptive_field(pg.window(3), grid=64, query=32, layers=10).size == 21
    with pytest.raises(pg.PatternError, match=r"receptive_field: the tokens x terms of the "
                                              r"layers applied .* is 704, more than "
                                              r"PATTERNGEN_MAX_REACH_WORK=640"):
        pg.receptive_field(pg.window(3), grid=64, query=32, layers=100)


def _naive_field(cycle, grid, query, layers, residual):
    """Every layer applied, the last one first, on the oracle's dense masks: what
    receptive_field skips must not matter."""
    masks = [pg.materialize(p, grid) for p in cycle]
    # a token's output concatenates all of its heads: a listed pattern's keys are any head's
    masks = [m.any(0) if m.ndim == 3 else m for m in masks]
    reached = np.zeros(math.prod(grid), dtype=bool)
    reached[np.ravel_multi_index(query, grid)] = True
    for i in reversed(range(layers)):
        keys = masks[i % len(masks)][reached].any(0)
        reached = reached | keys if residual else keys
    return reached.reshape(grid)


@pytest.mark.parametrize("cycle, residual", [
    ([pg.window(3), pg.block(4, offset=2)], True),
    ([pg.block(4), pg.block(4, offset=2), pg.axis(1)], True),
    ([pg.stripe(0, 3) & pg.causal(), pg.global_tokens([5])], False),  # the field moves
    ([pg.window(3, causal=True), pg.axis(0)], False),
])
def test_a_deep_stack_skips_only_layers_that_repeat_the_field(cycle, residual):
    grid, query = (7, 6), (3, 2)
    for layers in (*range(1, 40), 500, 501):
        got = pg.receptive_field(cycle, grid=grid, query=query, layers=layers,
                                 residual=residual).mask
        naive = _naive_field(cycle, grid, query, layers, residual)
        np.testing.assert_array_equal(got, naive, err_msg=f"layers={layers}")
    if residual:  # a growing field settles within tokens cycles: a deeper stack of the same
        # phase ends where it does
        got = pg.receptive_field(cycle, grid=grid, query=query, layers=10 ** 9).mask
        same_phase = 42 * len(cycle) + 10 ** 9 % len(cycle)
        np.testing.assert_array_equal(got, _naive_field(cycle, grid, query, same_phase, True))
