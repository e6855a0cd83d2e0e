"""Sharded attention (patterngen.distributed) against one process and the dense oracle.

The plan (what each rank sends, receives and computes) is checked in this process against
brute-force enumeration of the dense mask, and by running every rank's local attention here.
Then one spawn of 4 gloo ranks over loopback runs the same patterns through real collectives on
groups of 4, 3 (uneven shards) and 2 ranks: outputs and q, k, v gradients against the float64
dense oracle, exchanged rows counted at ``all_to_all_single`` against the plan and the symbolic
halo, and errors that every rank must raise alike. Every wait is bounded.
"""

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import sympy
import torch

import patterngen as pg
from patterngen import ir
from patterngen.distributed.halo import exchange_rows, global_queries, query_rows, split_lines
from patterngen.backends import executors
from patterngen.call import Call
from patterngen.distributed.local import LocalProblem, ordinary_local, rank_share
from patterngen.distributed.reshard import column_slices, reshard
from patterngen.errors import PatternError
from oracle import reference

# (name, pattern, grid, compile options); every case runs on 2, 3 and 4 ranks
CASES = [
    ("window clamp", pg.window(3), (9, 4), {}),
    ("window pad", pg.window(5, border="pad"), (10, 5), {}),
    ("window dilation", pg.window(3, dilation=2), (11, 6), {}),
    ("window causal", pg.window(5, causal=True), (10, 5), {}),
    ("shifted blocks", pg.block(3, offset=1), (10, 4), {}),
    ("blocks | window", pg.block(4) | pg.window(3), (11, 4), {}),
    ("criss-cross", pg.criss_cross(), (7, 5), {}),
    ("axis along shards", pg.axis(0), (8, 3), {}),
    ("axis | window, re-shard", pg.axis(0) | pg.window(3), (12, 7), {}),
    ("criss-cross | global, re-shard", pg.criss_cross() | pg.global_tokens([(4, 1)]), (9, 6),
     {}),
    ("per-head axis, re-shard", pg.heads(pg.window(3), pg.axis(0)), (9, 5), {}),
    ("3-D axis, re-shard, auto local", pg.axis(0) | pg.window((1, 3, 1)), (6, 5, 2),
     {"backend": "auto"}),
    ("auto local", pg.window(3) | pg.block(2, offset=1), (9, 4), {"backend": "auto"}),
    ("numba local, line tables", pg.window(3) | pg.global_tokens([(5, 2)]), (12, 6),
     {"backend": "numba"}),
    ("auto local, global tokens", pg.window(3) | pg.global_tokens([(5, 2)]), (12, 6),
     {"backend": "auto"}),
    ("global tokens", pg.window(3) | pg.global_tokens([(5, 2), (0, 0)]), (12, 6), {}),
    ("causal", pg.causal(), (6, 3), {}),
    ("per-head", pg.heads(pg.window(3), pg.block(2, offset=1), pg.axis(1)), (9, 4), {}),
    ("1-D multi-hop", pg.window(9), 13, {}),
    ("1-D dilated multi-hop", pg.window(3, dilation=3), 14, {}),
    ("3-D", pg.window(3) | pg.block(2), (7, 4, 3), {}),
    ("axis 1 sharded", pg.window(3) | pg.axis(0), (4, 9), {"axis": 1}),
]
WORLDS = (4, 3, 2)
#: cases run with one key/value head for the 3 query heads (MQA): the halo moves kv heads only;
#: the re-sharded and global-query parts repeat them
GQA = [c for c in CASES if c[0] in ("window clamp", "auto local", "numba local, line tables",
                                     "criss-cross | global, re-shard")]
#: cases also run on one rank alone: nothing moves, but the global queries are still merged
SOLO = [c for c in CASES if "global" in c[0]]
#: the cases sharded along axis 0 (the plan's own frame; the spawned ranks also move axes)
LOCAL = [c for c in CASES if not c[3].get("axis")]


def _oracle(pattern, grid, q, k, v, cotangent):
    """Dense float64 output and q, k, v gradients on the whole grid (one process); k and v
    may have fewer heads (each repeated for its group of query heads)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = reference(pattern, grid, q, k, v)
    (out * cotangent).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _inputs(grid, seed=0):
    shape = (2, 3, *(grid if isinstance(grid, tuple) else (grid,)), 4)
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(4)]


def _shard(x, axis, lines):
    return x.narrow(2 + axis, lines[0], lines[1] - lines[0])


# --------------------------------------------------------------------------------------------
# in this process: the plan against brute force, and every rank's local attention


def _brute_rows(pattern, grid, shards):
    """``rows[src, dst]`` from the dense mask: tokens of src that dst's queries attend.

    Global queries are left out: they attend other ranks' keys through merged partial results.
    """
    mask = pg.materialize(pattern, grid)
    mask = mask.any(0) if mask.ndim == 3 else mask.copy()
    mask[global_queries(pg.lower(pattern, grid))] = False
    shape = grid if isinstance(grid, tuple) else (grid,)
    line = np.arange(mask.shape[0]) // int(np.prod(shape[1:]))
    rows = np.zeros((len(shards), len(shards)), dtype=np.int64)
    for dst, (a, b) in enumerate(shards):
        reached = mask[(line >= a) & (line < b)].any(0)
        for src, (c, d) in enumerate(shards):
            if src != dst:
                rows[src, dst] = int((reached & (line >= c) & (line < d)).sum())
    return rows


@pytest.mark.parametrize("name,pattern,grid,options", LOCAL, ids=[c[0] for c in LOCAL])
def test_exchange_is_exactly_the_attended_keys(name, pattern, grid, options):
    lowered = pg.lower(pattern, grid)
    n = lowered.grid.shape[0]
    for world in WORLDS:
        shards = split_lines(n, world)
        np.testing.assert_array_equal(exchange_rows(lowered, shards),
                                      _brute_rows(pattern, grid, shards))


@pytest.mark.parametrize("name,pattern,grid,options", LOCAL, ids=[c[0] for c in LOCAL])
def test_local_attention_of_every_rank_equals_the_oracle(name, pattern, grid, options):
    """Each rank's local grid, filled the way the exchange fills it, gives the oracle's rows."""
    lowered = pg.lower(pattern, grid)
    q, k, v, cot = _inputs(grid)
    want = _oracle(pattern, grid, q, k, v, cot)[0]
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    rest = int(np.prod(lowered.grid.shape[1:]))
    for world in WORLDS:
        shards = split_lines(lowered.grid.shape[0], world)
        shares = [rank_share(lowered, shards, rank) for rank in range(world)]
        for share, (lo, hi) in zip(shares, shards):
            rank = share.rank
            kv = torch.zeros(2, b, h, share.local_lines * rest, d, dtype=torch.float64)
            own = slice(share.own[0] * rest, share.own[1] * rest)
            for x, dst in ((k, kv[0]), (v, kv[1])):
                flat = x.reshape(b, h, -1, d)
                dst[:, :, own] = flat[:, :, lo * rest:hi * rest]
                for src, (c, _) in enumerate(shards):
                    theirs = shares[src].send[rank]
                    dst[:, :, share.recv[src]] = flat[:, :, c * rest + theirs]
            ql = torch.zeros_like(kv[0])
            ql[:, :, own] = q.reshape(b, h, -1, d)[:, :, lo * rest:hi * rest]
            local = np.ones(hi * rest - lo * rest, dtype=bool)  # global queries: merged
            mine = global_queries(lowered)
            local[mine[(mine >= lo * rest) & (mine < hi * rest)] - lo * rest] = False
            want_rows = want.reshape(b, h, -1, d)[:, :, lo * rest:hi * rest]
            # the line tables, and the pattern's own atoms on the local grid where they fit
            ordinary = ordinary_local(lowered, share)
            for form in (share.local, ordinary):
                if form is None:
                    continue
                attn = pg.compile(form, backend="sdpa", block=16, order="row-major")
                out = attn(ql, kv[0], kv[1])[:, :, own]
                torch.testing.assert_close(out[:, :, local], want_rows[:, :, local],
                                           rtol=1e-12, atol=1e-12)
            if name.startswith("window") or name.startswith("1-D"):
                assert ordinary is not None  # a window's local problem is a window


def test_the_local_executor_answers_for_a_ranks_problem():
    """Asked about rank 0's local problem of a 3x3 window on 8 x 4 lines split in two, the
    ``local`` executor says why flex and a bias table cannot run in words, prices the halo (line
    3 sent, line 4 received: 8 K/V rows) as copies, and its part gives the oracle's own rows."""
    lowered = pg.lower(pg.window(3), (8, 4))
    shards = ((0, 4), (4, 8))
    share = rank_share(lowered, shards, 0, reshard(lowered, shards))
    ex = executors()["local"]
    call = Call(dtype="float64", batch=2, heads=3, head_dim=4)
    problem = LocalProblem(share, "numba", share.local)
    assert ex.can_run(problem, call) is None
    assert "cannot read a rank's line tables" in ex.can_run(
        LocalProblem(share, "flex", share.local), call)
    assert "no bias table" in ex.can_run(problem, Call(bias=True))
    copy, *local = ex.work(problem, call)
    assert (copy.kind, copy.count) == ("copy", 2 * 8 * 2 * 3 * 4 * 8)
    assert local == executors()["numba"].work(share.local, call)
    q, k, v, _ = _inputs((8, 4))
    want = reference(pg.window(3), (8, 4), q, k, v).reshape(2, 3, -1, 4)[:, :, :16]
    flat = [t.reshape(2, 3, -1, 4)[:, :, :20] for t in (q, k, v)]  # own lines and the halo
    out, _ = ex.prepare(problem, call).forward(*flat, 4 ** -0.5)
    torch.testing.assert_close(out[:, :, :16], want, rtol=1e-12, atol=1e-12)
    # auto plans the call; a strategy named in the options (one name) is the planner's choice
    forced = LocalProblem(share, "auto", share.local, None, {"strategy": "sdpa"})
    assert ex.prepare(forced, call).plan.strategy == "sdpa"


def test_global_queries_are_the_query_in_terms():
    lowered = pg.lower(pg.window(3) | pg.global_tokens([(5, 2), (0, 0)]), (12, 6))
    assert global_queries(lowered).tolist() == [0, 5 * 6 + 2]
    queries, partials = query_rows(lowered, split_lines(12, 3))
    assert queries.tolist() == [1, 1, 2] and partials.tolist() == [2, 2, 0]
    assert global_queries(pg.lower(pg.window(3) | pg.axis(0), (6, 4))).tolist() == []


def test_reshard_is_chosen_where_it_moves_less():
    """Per head_dim element: gathering moves 2 per K/V token, the re-shard 2 per halo token of
    the other terms and 4 per transposed token (q, k, v out, the output back)."""
    lowered = pg.lower(pg.criss_cross(), (64, 64))
    # 2 ranks: 2 * 32 * 64 K/V tokens gathered per rank against 4 * 32 * 32: a tie, gathered
    assert reshard(lowered, split_lines(64, 2)) is None
    rs = reshard(lowered, split_lines(64, 4))
    assert rs.columns == ((0, 16), (16, 32), (32, 48), (48, 64))
    assert rs.pencil.tolist() == rs.returned.tolist() == [48 * 16] * 4
    # uneven: 7 columns over 3 ranks, and a rank without a column
    assert column_slices(7, 3) == ((0, 3), (3, 5), (5, 7))
    assert column_slices(3, 4)[-1] == (3, 3)
    assert pg.lower(pg.axis(0), 12).ndim == 1 and reshard(pg.lower(pg.axis(0), 12),
                                                          split_lines(12, 4)) is None


def test_reshard_refuses_queries_it_would_leave_empty():
    """Where other terms already hold a query's whole column, its re-sharded part would have no
    key (a virtual key of score -inf): gathered instead, though the re-shard moves less."""
    every, eq = ir.Rel.of(), ir.Rel.of(ir.Eq())
    column = ir.Term((every, ir.Rel.of(ir.KeyIn(0, 1))))  # column 0 for every query
    lowered = ir.make_ir(pg.Grid((8, 6)), [ir.Term((every, eq)), column], "axis | column 0")
    shards = split_lines(8, 4)
    axis_term = frozenset({(0, lowered.terms[0])})
    pencil = [(8 - 2) * w for w in (2, 2, 1, 1)]
    assert 2 * exchange_rows(lowered, shards, axis_term).sum() + 4 * sum(pencil) < \
        2 * exchange_rows(lowered, shards).sum()
    assert reshard(lowered, shards) is None
    near = ir.Term((ir.Rel.of(ir.Window(3)), ir.Rel.of(ir.KeyIn(0, 1))))
    assert reshard(ir.make_ir(lowered.grid, [lowered.terms[0], near]), shards) is not None


SIZES = [(56, 16, 4), (60, 15, 3), (84, 14, 7), (28, 14, 28)]
SYMBOLIC = [pg.window(7), pg.window(7, dilation=2), pg.window(5, border="pad"),
            pg.window(5, causal=True), pg.block(7, offset=3), pg.block(4), pg.criss_cross(),
            pg.causal(), pg.window(5) | pg.global_tokens([0]), pg.axis(0), pg.axis(1),
            pg.heads(pg.window(3), pg.block(5, offset=2))]


@pytest.mark.parametrize("pattern", SYMBOLIC, ids=repr)
def test_symbolic_halo_equals_the_exchange(pattern):
    rep = pg.cost(pattern, grid=("H", "W"), head_dim="d", heads=2, ranks="R")
    halo = rep.halo
    either = [s for _, s in halo.schemes if s.startswith("re-shard or gather")]
    # an axis term along the shards is re-sharded or gathered, whichever moves less: counted
    assert halo.closed_form != bool(either), halo.tokens
    h_, w_, r_, d_ = (pg.symbol(x) for x in "HWRd")
    # heads 2, float32: K and V rows of d, q rows of d, partial rows of d + 1 (out and lse),
    # re-shard: q, k and v rows of d to the pencils, partial rows of d + 1 back
    t, q, p, pc, rt = (halo.tokens, halo.queries, halo.partials, halo.pencil, halo.returned)
    assert sympy.simplify(halo.bytes_forward - 8 * (2 * d_ * t + d_ * q + (d_ + 1) * p
                                                    + 3 * d_ * pc + (d_ + 1) * rt)) == 0
    assert halo.bytes_backward == halo.bytes_forward  # the gradients of what came in go back

    quantities = [halo.tokens, halo.queries, halo.partials, halo.pencil, halo.returned]
    closed = sympy.lambdify((h_, w_, r_, halo.rank), quantities)
    for h, w, world in SIZES:
        def rows_of(rank):
            if halo.closed_form:
                return closed(h, w, world, rank)
            return [x.subs({h_: h, w_: w, r_: world, halo.rank: rank}) for x in quantities]

        sizes = {h_: h, w_: w, r_: world}
        if not all(sympy.sympify(a).subs(sizes) for a in halo.assumptions):
            assert "window(" in repr(pattern)  # a window longer than a shard: no closed form
            continue
        lowered, shards = pg.lower(pattern, (h, w)), split_lines(h, world)
        queries, partials = query_rows(lowered, shards)
        resharded = reshard(lowered, shards)
        skip = resharded.terms if resharded else frozenset()
        pencil, returned = ((resharded.pencil, resharded.returned) if resharded
                            else ([0] * world,) * 2)
        assert [rows_of(r) for r in range(world)] == [
            list(row) for row in zip(exchange_rows(lowered, shards, skip).sum(0), queries,
                                     partials, pencil, returned)]
    at = rep.subs(H=56, W=16, R=4, d=8).halo.subs({"rank": 1})
    assert at.bytes_forward == 8 * (16 * at.tokens + 8 * at.queries + 9 * at.partials
                                    + 24 * at.pencil + 9 * at.returned)


def test_symbolic_halo_of_a_global_key_box():
    pattern = pg.window(3) | pg.global_tokens([(30, 2)])
    halo = pg.cost(pattern, grid=(84, 14), ranks="R").halo
    assert halo.closed_form
    rows = exchange_rows(pg.lower(pattern, (84, 14)), split_lines(84, 4))
    rows_of = sympy.lambdify((pg.symbol("R"), halo.rank), [halo.tokens, halo.partials])
    assert [rows_of(4, r)[0] for r in range(4)] == rows.sum(0).tolist()
    # rank 0: a halo line and the global key on line 30; rank 1 holds line 30, and its
    # global query gathers no key: two halo lines, and three partial results to merge
    assert rows.sum(0).tolist()[:2] == [14 + 1, 2 * 14]
    assert [rows_of(4, r)[1] for r in range(4)] == [0, 3, 0, 0]


def test_symbolic_halo_without_closed_form_counts_exactly():
    pattern = pg.window(5) & pg.window(3, dilation=2)
    rep = pg.cost(pattern, grid=("H", "W"), ranks="R")
    assert not rep.halo.closed_form
    rows = exchange_rows(pg.lower(pattern, (20, 9)), split_lines(20, 3))
    assert [rep.subs(H=20, W=9, R=3, rank=r).halo.tokens for r in range(3)] == \
        rows.sum(0).tolist()


def test_line_table_counts_exactly_in_cost_and_runs_on_numba():
    table = ir.LineTable((0, 0, 1, 3), (2, 3, 4, 3), 1)
    term = ir.Term((ir.Rel.of(table), ir.Rel.of(ir.Window(3))))
    lowered = ir.make_ir(pg.Grid((4, 5)), [term], "table")
    rep = pg.cost(lowered)
    mask = pg.materialize(lowered)
    assert rep.pairs == int(mask.sum()) == (2 + 3 + 3 + 0) * 15
    assert rep.notes
    # the numba kernels read each query's bounds from numpy's evaluation: tables too
    q, k, v = (torch.randn(1, 2, 20, 4, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(pg.compile(lowered, backend="numba")(q, k, v),
                               pg.dense_attention(q, k, v, mask))
    with pytest.raises(PatternError, match="4 lines, not n=5"):
        table.bounds(np.arange(5), 5, ir.NUMPY_OPS)


@pytest.mark.parametrize("n,world,sizes,match", [
    (3, 4, None, "n=3 lines but there are 4 ranks"),
    (6, 3, [3, 0, 3], r"shards\[1\]=0"),
    (6, 2, [3, 2], "add up to 5"),
    (6, 2, [6], "one per rank"),
])
def test_bad_shards_are_clear_errors(n, world, sizes, match):
    with pytest.raises(PatternError, match=match):
        split_lines(n, world, sizes)


def test_compile_without_a_process_group_is_a_clear_error():
    with pytest.raises(PatternError, match="init_process_group"):
        pg.distributed.compile(pg.window(3), grid=(8, 8))


def test_import_and_cost_do_not_import_torch_distributed():
    code = ("import sys, patterngen as pg; pg.cost(pg.window(3), grid=('H', 'W'), ranks='R'); "
            "import patterngen.distributed; assert 'torch.distributed' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------
# spawned gloo ranks


def _counting(calls):
    """Wrap ``all_to_all_single`` to count the rows each call sends and receives."""
    real = torch.distributed.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        calls.append((int(sum(input_split_sizes)), int(sum(output_split_sizes)),
                      int(input.shape[1])))
        return real(output, input, output_split_sizes, input_split_sizes, **kw)

    torch.distributed.all_to_all_single = counted


def _run_case(name, pattern, grid, options, group, world, rank, calls, kv_heads=None):
    q, k, v, cot = _inputs(grid, seed=len(name))
    if kv_heads:
        k, v = k[:, :kv_heads], v[:, :kv_heads]
    want = _oracle(pattern, grid, q, k, v, cot)
    # sdpa with one block size: it skips its layout search (time, not exactness)
    local = {} if options.get("backend") else dict(backend="sdpa", block=16, order="row-major")
    attn = pg.distributed.compile(pattern, grid, group=group, **local, **options)
    axis = options.get("axis", 0)
    lines = attn.shards[rank]
    mine = [_shard(x, axis, lines).clone().requires_grad_() for x in (q, k, v)]
    del calls[:]
    out = attn(*mine)
    (out * _shard(cot, axis, lines)).sum().backward()
    errors = [float((got.detach() - _shard(ref, axis, lines)).abs().max())
              for got, ref in zip([out, *(x.grad for x in mine)], want)]
    n = pg.lower(pattern, grid).grid.shape[axis]
    skip = attn.resharded.terms if attn.resharded else frozenset()
    plan_rows = int(exchange_rows(_axis_first_ir(pattern, grid, axis),
                                  split_lines(n, world), skip).sum(0)[rank])
    return dict(errors=errors, calls=list(calls), plan_rows=plan_rows,
                received=attn.received_rows, resharded=attn.resharded is not None,
                pencil=attn.pencil_rows, returned=attn.returned_rows,
                schemes=[s for _, s in attn.schemes], local_backend=attn.local_backend)


def _axis_first_ir(pattern, grid, axis):
    return pg.ir.axis_first(pg.lower(pattern, grid), axis)


def _error_cases(group, world, rank):
    """Each must raise on every rank of ``group`` (or return normally nowhere)."""
    q = torch.randn(1, 2, 3, 4, 4, dtype=torch.float64)
    cases = {
        "disagree": lambda: pg.distributed.compile(pg.window(3 if rank else 5), (12, 6),
                                                   group=group),
        "grid smaller than ranks": lambda: pg.distributed.compile(pg.window(1), (world - 1, 4),
                                                                  group=group),
        "empty shard": lambda: pg.distributed.compile(
            pg.window(3), (12, 4), group=group, shards=[0, 12] + [0] * (world - 2)),
        "bad shape on one rank": lambda: pg.distributed.compile(
            pg.window(3), (3 * world, 4), group=group)(q if rank else q[:, :, :2],
                                                       q if rank else q[:, :, :2],
                                                       q if rank else q[:, :, :2]),
        "flex refused": lambda: pg.distributed.compile(pg.window(3), (3 * world, 4),
                                                       group=group, backend="flex"),
        "scale differs": lambda: pg.distributed.compile(
            pg.window(3), (3 * world, 4), group=group, backend="sdpa", scale=0.5 + (rank > 0)),
        "backend differs": lambda: pg.distributed.compile(
            pg.window(3), (3 * world, 4), group=group, backend="sdpa" if rank else "numba"),
        "batch differs": lambda: pg.distributed.compile(
            pg.window(3), (3 * world, 4), group=group)(*(q[:, :1 + rank % 2],) * 3),
    }
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = None
        except PatternError as e:
            out[name] = str(e)
    return out


def _worker(rank, world, init, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)  # 4 ranks on a few cores: more threads only oversubscribe them
    calls = []
    _counting(calls)
    report = {}
    groups = {size: None if size == world else dist.new_group(list(range(size)))
              for size in WORLDS}
    for size in WORLDS:
        if rank >= size:
            continue
        group = groups[size]
        for name, pattern, grid, options in CASES:
            report[f"{size}/{name}"] = _run_case(name, pattern, grid, options, group, size,
                                                 rank, calls)
        for name, pattern, grid, options in GQA:
            report[f"{size}/gqa {name}"] = _run_case(name, pattern, grid, options, group, size,
                                                     rank, calls, kv_heads=1)
        report[f"{size}/errors"] = _error_cases(group, size, rank)
    solo = dist.new_group([0])
    for name, pattern, grid, options in SOLO if rank == 0 else ():
        report[f"1/{name}"] = _run_case(name, pattern, grid, options, solo, 1, rank, calls)
    with open(os.path.join(results, f"{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned():
    """Results of every rank of one spawn of 4 gloo ranks (bounded waits throughout)."""
    world = 4
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        ctx = torch.multiprocessing.start_processes(
            _worker, args=(world, init, tmp), nprocs=world, start_method="spawn", join=False)
        deadline = time.monotonic() + 240
        try:
            while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
                if time.monotonic() > deadline:
                    pytest.fail("the spawned ranks did not finish within 240 s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        reports = []
        for rank in range(world):
            with open(os.path.join(tmp, f"{rank}.json")) as f:
                reports.append(json.load(f))
    return reports


def _symbolic_halo(pattern, grid, world):
    """Forward and backward halo bytes per rank from the cost report: the closed form where its
    assumptions hold on these sizes, else the exact count (uneven shards included)."""
    shape = grid if isinstance(grid, tuple) else (grid,)
    halo = pg.cost(pattern, grid=shape, head_dim=4, heads=3, batch=2, dtype="float64",
                   ranks=world).halo
    assert all(a.subs(halo.rank, r) for a in halo.assumptions for r in range(world))
    if not halo.closed_form:  # an exact count: evaluated by substitution
        return [[int(h.bytes_forward), int(h.bytes_backward)]
                for h in (halo.subs({"rank": rank}) for rank in range(world))]
    fn = sympy.lambdify(halo.rank, [halo.bytes_forward, halo.bytes_backward])
    return [fn(rank) for rank in range(world)]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name,pattern,grid,options", CASES, ids=[c[0] for c in CASES])
def test_sharded_ranks_equal_one_process(spawned, world, name, pattern, grid, options):
    # pg.cost shards axis 0 only: a case sharded along another axis has no report to compare
    halo = None if options.get("axis") else _symbolic_halo(pattern, grid, world)
    lowered = _axis_first_ir(pattern, grid, options.get("axis", 0))
    shards = split_lines(lowered.grid.shape[0], world)
    queries, partials = query_rows(lowered, shards)
    merged = len(global_queries(lowered)) > 0
    resharded = reshard(lowered, shards)
    for rank in range(world):
        r = spawned[rank][f"{world}/{name}"]
        assert max(r["errors"]) < 1e-12, (rank, r["errors"])
        assert r["resharded"] == (resharded is not None)
        assert ("re-shard" in r["schemes"]) == r["resharded"]
        # forward: K/V rows, (re-shard) q/k/v to the pencils and partial rows back, then
        # (global queries) q rows and partial results; backward: the same exchanges
        # transposed, in reverse order
        calls = r["calls"]
        extra = [] if resharded is None else [[r["pencil"], 3 * 2 * 3 * 4],
                                              [r["returned"], 2 * 3 * 5]]
        if merged:
            extra += [[queries[rank], 2 * 3 * 4], [partials[rank], 2 * 3 * 5]]
        assert len(calls) == 2 + 2 * len(extra)
        forward, backward = calls[:len(calls) // 2], calls[len(calls) // 2:]
        (_, kv_got, width), (kv_back_sent, _, _) = forward[0], backward[-1]
        # one packed row per token: K and V x batch 2 x heads 3 x head_dim 4
        assert width == 2 * 2 * 3 * 4
        assert kv_got == kv_back_sent == r["received"] == r["plan_rows"]
        assert [c[1:] for c in forward[1:]] == extra
        assert [c[0] for c in backward[-2::-1]] == [e[0] for e in extra]
        if resharded is not None:
            assert [r["pencil"], r["returned"]] == [resharded.pencil[rank],
                                                    resharded.returned[rank]]
        assert r["local_backend"] == options.get("backend", "sdpa")
        if halo is not None:  # float64: 8 bytes an element; received, then sent back
            assert halo[rank] == [sum(c[1] * c[2] * 8 for c in forward),
                                  sum(c[0] * c[2] * 8 for c in backward)]
    for step in range(len(spawned[0][f"{world}/{name}"]["calls"])):
        calls = [spawned[rank][f"{world}/{name}"]["calls"][step] for rank in range(world)]
        assert sum(c[0] for c in calls) == sum(c[1] for c in calls)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name,pattern,grid,options", GQA, ids=[c[0] for c in GQA])
def test_grouped_kv_heads_on_ranks_equal_one_process(spawned, world, name, pattern, grid,
                                                     options):
    merged = len(global_queries(_axis_first_ir(pattern, grid, options.get("axis", 0)))) > 0
    for rank in range(world):
        r = spawned[rank][f"{world}/gqa {name}"]
        assert max(r["errors"]) < 1e-12, (rank, r["errors"])
        # the halo's packed rows: K and V x batch 2 x kv heads (1, or 3 where the re-sharded
        # and global-query parts need them repeated) x head_dim 4
        kv = 3 if r["resharded"] or merged else 1
        assert r["calls"][0][2] == 2 * 2 * kv * 4


@pytest.mark.parametrize("name,pattern,grid,options", SOLO, ids=[c[0] for c in SOLO])
def test_one_rank_equals_one_process(spawned, name, pattern, grid, options):
    r = spawned[0][f"1/{name}"]
    assert max(r["errors"]) < 1e-12, r["errors"]
    assert r["received"] == 0 and all(c[:2] == [0, 0] for c in r["calls"]), r["calls"]


def test_sharded_windows_never_gather_whole_kv(spawned):
    for world in WORLDS:
        for rank in range(world):
            r = spawned[rank][f"{world}/window clamp"]
            assert r["received"] <= 2 * 4  # one line of 4 tokens from each neighbour


@pytest.mark.parametrize("world", WORLDS)
def test_every_rank_raises_the_same_clear_error(spawned, world):
    messages = [spawned[rank][f"{world}/errors"] for rank in range(world)]
    expected = {"disagree": "disagree", "grid smaller than ranks": "needs at least one line",
                "empty shard": r"shards\[0\]=0", "bad shape on one rank": "bad inputs on rank 0",
                "flex refused": "backend='flex'",
                "scale differs": r"same pattern, grid, axis, shards, backend and options: "
                                 r"rank 0: .*options \{'scale': 0.5\}.*rank 1: .*'scale': 1.5",
                "backend differs": r"rank 0: .*backend='numba'.*rank 1: .*backend='sdpa'",
                "batch differs": "inputs disagree"}
    for name, match in expected.items():
        if name in ("batch differs", "scale differs", "backend differs") and world == 1:
            continue
        got = [m[name] for m in messages]
        assert got[0] is not None, name
        assert all(g == got[0] for g in got), (name, got)
        assert re.search(match, got[0]), (name, got[0])
