"""A Swin block's attention step: patterngen's ``auto`` against the code Swin runs.

The Swin side is written here from timm's ``SwinTransformerBlock._attn`` and
``WindowAttention.forward`` (timm 1.0's ``swin_transformer.py``): ``torch.roll`` by
``-shift``, ``window_partition``, the ``qkv`` linear on the windows, ``q * scale @ k^T``, the
relative position bias gathered from ``relative_position_bias_table`` by
``relative_position_index`` and added to every window, the region mask (``get_attn_mask``:
-100 between tokens that the roll brought together from opposite edges) added per window,
softmax, ``@ v``, the ``proj`` linear, ``window_reverse`` and the roll back. timm has two
kernels: that matmul-softmax-matmul path (``fused_attn`` off) and
``scaled_dot_product_attention`` with the bias plus mask as ``attn_mask`` (on); both are timed.

The patterngen side is the same step as a user writes it: the ``qkv`` linear on the map, a
view to ``(batch, heads, H, W, head_dim)``, ``pg.compile(pg.block(7, offset=shift), grid,
backend="auto")`` called with ``rel_bias=`` (the table in patterngen's layout,
``pg.bias.from_swin``), the ``proj`` linear. Both sides share the weights; before timing they
are checked equal in float64: outputs, and the gradients of q, k, v (kept on both sides and
brought to the grid), of the table and of the input.

A second patterngen row, ``pg ordered``, is the step as Swin orders its tokens: ``x`` put in
the attention's token order once before the ``qkv`` linear (``attn.token_order.to_order``, the
roll and window partition in one gather), the attention called with ``ordered=True`` on the
projected tokens as they are, and the order reversed once after ``proj`` (``from_order``):
what ``pg.nn.SwinBlock`` runs on maps its windows tile.

Every configuration times its candidates interleaved, sample by sample (bench_maxvit's
``interleaved``), median of the rounds; ``pg / swin`` is patterngen's time over the faster of
Swin's two kernels (above 1: patterngen is slower). ``shift / none`` (last rows) is each side's
shifted time over its unshifted time.

Run:
    python benchmarks/bench_swin.py                 # the four Swin-T stages, batch 2 and 8
    python benchmarks/bench_swin.py --quick         # 5 rounds, batch 2
    python benchmarks/bench_swin.py --stages 56 --batches 2 --rounds 9 --threads 1
    python benchmarks/bench_swin.py --threads 1 --cpu-time    # on a machine others load
    python benchmarks/bench_swin.py --flush-denormal          # Swin without its subnormals
    python benchmarks/bench_swin.py --storage       # keep the probabilities or recompute
    python benchmarks/bench_swin.py --steps --threads 1 --rounds 100   # the ordered forward
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import patterngen as pg
from bench_maxvit import interleaved

THREADS = 2
WINDOW = 7
#: Swin-T's stages: grid side -> (dim, heads)
STAGES = {56: (96, 3), 28: (192, 6), 14: (384, 12), 7: (768, 24)}


def window_partition(x, ws: int):
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, ws, ws, c)


def window_reverse(windows, ws: int, h: int, w: int):
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, c)


def relative_position_index(ws: int):
    """timm's ``get_relative_position_index``: query minus key, per window."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += ws - 1
    rel[:, :, 1] += ws - 1
    rel[:, :, 0] *= 2 * ws - 1
    return rel.sum(-1)


def attn_mask(h: int, w: int, ws: int, ss: int, dtype):
    """timm's ``get_attn_mask``: ``(windows, N, N)``, -100 across the roll's regions."""
    if not ss:
        return None
    img = torch.zeros(1, h, w, 1, dtype=dtype)
    cnt = 0
    for hs in ((0, -ws), (-ws, -ss), (-ss, None)):
        for wsl in ((0, -ws), (-ws, -ss), (-ss, None)):
            img[:, hs[0]:hs[1], wsl[0]:wsl[1], :] = cnt
            cnt += 1
    windows = window_partition(img, ws).view(-1, ws * ws)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class SwinStep:
    """timm's SW-MSA/W-MSA attention step on ``(B, H, W, C)``; ``fused`` picks the kernel.
    ``keep``: a dict that receives q, k, v (for the gradient check)."""

    def __init__(self, qkv, proj, table, heads, grid, shift, fused):
        self.qkv, self.proj, self.table, self.heads = qkv, proj, table, heads
        self.shift, self.fused = shift, fused
        self.index = relative_position_index(WINDOW).view(-1)
        self.mask = attn_mask(*grid, WINDOW, shift, table.dtype)

    def __call__(self, x, keep=None):
        b, h, w, c = x.shape
        n, heads = WINDOW * WINDOW, self.heads
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = window_partition(x, WINDOW).view(-1, n, c)
        bw = windows.shape[0]
        q, k, v = self.qkv(windows).reshape(bw, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if keep is not None:
            for name, t in zip("qkv", (q, k, v)):
                t.retain_grad()
                keep[name] = t
        bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if self.fused:
            mask = bias
            if self.mask is not None:
                nw = self.mask.shape[0]
                mask = self.mask.view(1, nw, 1, n, n).expand(bw // nw, -1, heads, -1, -1)
                mask = bias + mask.reshape(-1, heads, n, n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
            if self.mask is not None:
                nw = self.mask.shape[0]
                attn = attn.view(-1, nw, heads, n, n) + self.mask.unsqueeze(1).unsqueeze(0)
                attn = attn.view(-1, heads, n, n)
            out = attn.softmax(-1) @ v
        out = self.proj(out.transpose(1, 2).reshape(bw, n, -1))
        x = window_reverse(out.view(-1, WINDOW, WINDOW, c), WINDOW, h, w)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        return x

    def to_grid(self, t, b, h, w):
        """``(B * windows, heads, N, d)`` (rolled windows) -> ``(B, heads, H, W, d)``."""
        d = t.shape[-1]
        t = t.view(b, -1, self.heads, WINDOW, WINDOW, d).permute(0, 2, 1, 3, 4, 5)
        t = window_reverse(t.reshape(-1, WINDOW, WINDOW, d), WINDOW, h, w).view(
            b, self.heads, h, w, d)
        return torch.roll(t, shifts=(self.shift, self.shift), dims=(2, 3)) if self.shift else t


class PatterngenStep:
    """The same step with patterngen doing the attention (``rel_bias`` in its layout)."""

    def __init__(self, qkv, proj, table, heads, grid, shift, batch, backward):
        self.qkv, self.proj, self.table, self.heads = qkv, proj, table, heads
        self.attn = pg.compile(pg.block(WINDOW, offset=shift), grid, backend="auto",
                               head_dim=qkv.in_features // heads, heads=heads, batch=batch,
                               backward=backward, dtype=str(table.dtype))

    def __call__(self, x, keep=None):
        b, h, w, c = x.shape
        q, k, v = self.qkv(x).view(b, h, w, 3, self.heads, -1).permute(3, 0, 4, 1, 2, 5)
        if keep is not None:
            for name, t in zip("qkv", (q, k, v)):
                t.retain_grad()
                keep[name] = t
        out = self.attn(q, k, v, rel_bias=self.table)
        return self.proj(out.permute(0, 2, 3, 1, 4).reshape(b, h, w, c))


class OrderedStep(PatterngenStep):
    """The same step in patterngen's token order, as Swin orders its tokens: ``x`` put in
    ``attn.token_order`` once (the roll and the window partition in one gather), the ``qkv``
    linear on the ordered tokens, the attention called with ``ordered=True``, the ``proj``
    linear, and the order reversed once (``from_order``: the window reverse and the roll
    back)."""

    def __call__(self, x, keep=None, mark=None):
        """``mark``: called with each step's name as it ends (:func:`steps` times them)."""
        mark = mark or (lambda name: None)
        b, c = x.shape[0], x.shape[-1]
        order = self.attn.token_order
        n = order.positions
        t = order.to_order(x)
        mark("to_order")
        q, k, v = self.qkv(t).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mark("qkv linear")
        if keep is not None:
            for name, t in zip("qkv", (q, k, v)):
                t.retain_grad()
                keep[name] = t
        out = self.attn(q, k, v, rel_bias=self.table, ordered=True)
        mark("attention")
        y = self.proj(out.transpose(1, 2).reshape(b, n, c))
        mark("proj linear")
        y = order.from_order(y)
        mark("from_order")
        return y

    def to_grid(self, t, b, h, w):
        """``(B, heads, positions, d)`` in the token order -> ``(B, heads, H, W, d)``."""
        return self.attn.token_order.on_grid(t).view(b, self.heads, h, w, -1)


def make_steps(size, dim, heads, shift, batch, backward, dtype=torch.float32, seed=0):
    """``(patterngen step, {"swin-matmul": ..., "swin-sdpa": ..., "pg-ordered": ...}, swin
    table)`` sharing one set of weights; the patterngen table is Swin's converted (a leaf of
    its own, shared by the two patterngen steps)."""
    torch.manual_seed(seed)
    qkv = torch.nn.Linear(dim, 3 * dim).to(dtype)
    proj = torch.nn.Linear(dim, dim).to(dtype)
    swin_table = (0.5 * torch.randn((2 * WINDOW - 1) ** 2, heads, dtype=dtype)).requires_grad_()
    grid = (size, size)
    reach = pg.bias.reach(pg.lower(pg.block(WINDOW, offset=shift), grid))
    table = pg.bias.from_swin(swin_table.detach(), WINDOW, reach).contiguous().requires_grad_()
    ours = PatterngenStep(qkv, proj, table, heads, grid, shift, batch, backward)
    swin = {f"swin-{kind}": SwinStep(qkv, proj, swin_table, heads, grid, shift, kind == "sdpa")
            for kind in ("matmul", "sdpa")}
    swin["pg-ordered"] = OrderedStep(qkv, proj, table, heads, grid, shift, batch, backward)
    return ours, swin, swin_table


def check(size, dim, heads, shift, batch=2, tol=1e-9):
    """Swin's two kernels and patterngen's ordered step equal patterngen's step in float64:
    outputs, and the gradients of q, k, v, the table and the input. Returns the largest
    difference seen."""
    ours, swin, swin_table = make_steps(size, dim, heads, shift, batch, True, torch.float64)
    x = torch.randn(batch, size, size, dim, dtype=torch.float64, requires_grad=True)
    keep = {}
    want = ours(x, keep)
    dout = torch.randn_like(want)
    want.backward(dout)
    wants = [want, *(keep[n].grad for n in "qkv"), ours.table.grad, x.grad]
    worst = 0.0
    wants[4] = wants[4].clone()
    for step in swin.values():
        x.grad = swin_table.grad = ours.table.grad = None
        kept = {}
        got = step(x, kept)
        got.backward(dout)
        b = x.shape[0]
        dtable = (ours.table.grad if isinstance(step, OrderedStep) else
                  pg.bias.from_swin(swin_table.grad, WINDOW, pg.bias.reach(ours.attn.ir)))
        gots = [got, *(step.to_grid(kept[n].grad, b, size, size) for n in "qkv"), dtable,
                x.grad]
        for name, a, w in zip(("out", "dq", "dk", "dv", "dtable", "dx"), gots, wants):
            err = (a - w).abs().max().item()
            worst = max(worst, err)
            if err > tol:
                raise AssertionError(f"{size}x{size} shift {shift}: {name} differs by {err:.2e}")
    return worst


def run(size, batch, shifts, backward, rounds, clock=time.perf_counter) -> dict:
    """``{shift: row}`` for the shifts of one stage, batch and pass, every step of every shift
    in one interleaving: a row's candidates and the shifted step over the unshifted one are
    each timed in the same rounds (timed as separate rows, the ratio of two rows carried each
    row's own drift: ``pg ordered``'s forward read 1.02-1.37 in three runs where the same
    steps interleaved by ``--steps`` read 1.04-1.07, two threads). A row: each candidate's
    median ms, and ``plan``, ``pg``'s plan."""
    dim, heads = STAGES[size]
    threads = torch.get_num_threads()
    made = {shift: make_steps(size, dim, heads, shift, batch, backward) for shift in shifts}
    torch.set_num_threads(threads)  # a first calibration for this thread count resets it
    x = torch.randn(batch, size, size, dim, requires_grad=backward)

    def step_of(fn):
        def step():
            with torch.set_grad_enabled(backward):
                out = fn(x)
                if backward:
                    out.sum().backward()
        return step

    steps = {(shift, name): step_of(fn) for shift, (ours, swin, _) in made.items()
             for name, fn in {"pg": ours, **swin}.items()}
    ms = interleaved(steps, rounds, clock)
    rows = {}
    for shift, (ours, _, _) in made.items():
        plan = ours.attn.plans[-1]
        shape = plan.strategy if plan.strategy != "terms" else "+".join(
            repr(tp.dense) if tp.dense is not None else tp.executor
            for tp in plan.patterns[0])
        # a dense shape's axes are joined by "|", a column break in the Markdown table
        rows[shift] = {name: t for (s, name), t in ms.items() if s == shift}
        rows[shift]["plan"] = shape.replace("|", "\\|")
    return rows


def storage(size, shift, batch, rounds, clock=time.perf_counter) -> dict:
    """A lone dense term's training step at the attention call, ms: keeping the probabilities
    (torch autograd through bmm-softmax-bmm, what ``auto`` runs) against recomputing them
    from the log-sum-exp (the merged parts' backward, which every union runs)."""
    from patterngen.backends import planned

    heads = STAGES[size][1]
    threads = torch.get_num_threads()
    attn = pg.compile(pg.block(WINDOW, offset=shift), (size, size), backend="auto",
                      heads=heads, batch=batch, backward=True)
    torch.set_num_threads(threads)
    q, k, v = (torch.randn(batch, heads, size, size, 32, requires_grad=True) for _ in range(3))
    table = torch.randn(heads, *(2 * r + 1 for r in attn.reach), requires_grad=True)
    keep = planned.DenseTerm.autograd_forward

    def step_with(forward):
        def step():
            planned.DenseTerm.autograd_forward = forward
            try:
                attn(q, k, v, rel_bias=table).sum().backward()
            finally:
                planned.DenseTerm.autograd_forward = keep
        return step

    return interleaved({"keep": step_with(keep),
                        "recompute": step_with(lambda *args, **kwargs: None)}, rounds, clock)


def steps(size, batch, rounds, clock=time.perf_counter) -> dict:
    """Where the time of the step in the token order goes, forward (``OrderedStep``, no
    gradients), unshifted against shifted: ``{shift: {step: ms}}``, medians of ``rounds``
    interleaved rounds, each step timed by ``clock`` as it ends."""
    dim, heads = STAGES[size]
    threads = torch.get_num_threads()
    ordered = {shift: make_steps(size, dim, heads, shift, batch, False)[1]["pg-ordered"]
               for shift in (0, 3)}
    torch.set_num_threads(threads)
    x = torch.randn(batch, size, size, dim)
    times = {shift: {} for shift in ordered}
    with torch.no_grad():
        for r in range(rounds + 1):  # round 0 warms up
            for shift, step in ordered.items():
                ends = [("start", clock())]
                step(x, mark=lambda name: ends.append((name, clock())))
                for (_, t0), (name, t1) in zip(ends, ends[1:]):
                    if r:
                        times[shift].setdefault(name, []).append(1e3 * (t1 - t0))
    return {shift: {name: statistics.median(ts) for name, ts in by.items()}
            for shift, by in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", default="56,28,14,7")
    ap.add_argument("--batches", default="2,8")
    ap.add_argument("--shifts", default="0,3")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="5 rounds, batch 2")
    ap.add_argument("--flush-denormal", action="store_true",
                    help="torch.set_flush_denormal(True): Swin's -100 region mask gives "
                         "probabilities of about exp(-100), subnormal in float32, which slow "
                         "its shifted step's matmuls on CPU by about 3x")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the process's CPU time, not the wall clock: with --threads 1 "
                         "it holds on a machine that other jobs load")
    ap.add_argument("--steps", action="store_true",
                    help="time each step of the forward in the token order (to_order, qkv, "
                         "attention, proj, from_order), shifted against unshifted, instead")
    ap.add_argument("--storage", action="store_true",
                    help="time a training step keeping the probabilities against recomputing "
                         "them, at the attention call (head_dim 32), instead")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.batches = 5, "2"
    torch.set_num_threads(args.threads)
    stages = [int(s) for s in args.stages.split(",")]
    shifts = [int(s) for s in args.shifts.split(",")]
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_flush_denormal(args.flush_denormal)
    if args.steps:
        print("| grid | batch | step | unshifted ms | shifted ms | shifted - unshifted ms |")
        print("|---|---|---|---|---|---|")
        for size in stages:
            for batch in map(int, args.batches.split(",")):
                if size <= WINDOW:
                    continue
                ms = steps(size, batch, args.rounds, clock)
                for name in [*ms[0], "sum"]:
                    a, z = ((sum(ms[s].values()) for s in (0, 3)) if name == "sum"
                            else (ms[0][name], ms[3][name]))
                    print(f"| {size}x{size} | {batch} | {name} | {a:.3f} | {z:.3f} | "
                          f"{z - a:+.3f} |", flush=True)
        return 0
    if args.storage:
        print("| grid | heads | batch | shift | keep ms | recompute ms | keep / recompute |")
        print("|---|---|---|---|---|---|---|")
        for size in stages:
            for batch in map(int, args.batches.split(",")):
                for shift in shifts:
                    if shift and size <= WINDOW:
                        continue
                    ms = storage(size, shift, batch, args.rounds, clock)
                    print(f"| {size}x{size} | {STAGES[size][1]} | {batch} | {shift} | "
                          f"{ms['keep']:.2f} | {ms['recompute']:.2f} | "
                          f"{ms['keep'] / ms['recompute']:.2f} |", flush=True)
        return 0
    for size in stages:
        for shift in shifts:
            if shift and size <= WINDOW:
                continue
            check(min(size, 14), 16, 2, shift)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; window {WINDOW}, float32, median of "
          f"{args.rounds} interleaved rounds ({'CPU time' if args.cpu_time else 'wall clock'}"
          f"{', subnormals flushed' if args.flush_denormal else ''}); "
          f"checked equal to Swin's step in float64 (output, dq, dk, dv, dtable, dx)")
    print("| grid | dim/heads | batch | shift | pass | pg plan | pg ms | pg ordered ms "
          "| swin matmul ms | swin sdpa ms | pg / swin | pg ordered / swin |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    passes = [False] if args.forward_only else [False, True]
    shifted = []
    for size in stages:
        for batch in map(int, args.batches.split(",")):
            for backward in passes:
                got = {}
                rows = run(size, batch, [s for s in shifts if not s or size > WINDOW],
                           backward, args.rounds, clock)
                for shift, r in rows.items():
                    best = min(r["swin-matmul"], r["swin-sdpa"])
                    got[shift] = (r["pg"], best, r["pg-ordered"])
                    dim, heads = STAGES[size]
                    print(f"| {size}x{size} | {dim}/{heads} | {batch} | {shift} | "
                          f"{'fwd+bwd' if backward else 'fwd'} | {r['plan']} | {r['pg']:.2f} | "
                          f"{r['pg-ordered']:.2f} | {r['swin-matmul']:.2f} | "
                          f"{r['swin-sdpa']:.2f} | {r['pg'] / best:.2f} | "
                          f"{r['pg-ordered'] / best:.2f} |", flush=True)
                if len(got) == 2:
                    (p0, s0, o0), (p1, s1, o1) = got[shifts[0]], got[shifts[1]]
                    shifted.append((size, batch, backward, p1 / p0, o1 / o0, s1 / s0))
    if shifted:
        print("\n| grid | batch | pass | pg shift / none | pg ordered shift / none "
              "| swin shift / none |")
        print("|---|---|---|---|---|---|")
        for size, batch, backward, ours, ordered, theirs in shifted:
            print(f"| {size}x{size} | {batch} | {'fwd+bwd' if backward else 'fwd'} | "
                  f"{ours:.2f} | {ordered:.2f} | {theirs:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
