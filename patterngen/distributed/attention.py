"""The torch side of :mod:`patterngen.distributed`: agreement, exchange, local attention."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
import torch.distributed as dist

from .. import ir
from ..backends import dense, executors
from ..backends.merge import acc_dtype, finite_lse, merge
from ..call import Call
from ..errors import PatternError
from ..parse import as_ir
from .halo import split_lines
from .local import LocalProblem, ordinary_local, rank_share
from .reshard import reshard, reshard_mask
from .schemes import schemes

__all__ = ["DistributedAttention"]

#: ``auto``'s strategies on a rank's :class:`~patterngen.ir.LineTable` s: ``sdpa`` and
#: ``numba`` (CPU) read them (numba's kernels take their bounds from numpy's evaluation), flex
#: fails in inductor on the tables made inside its traced ``mask_mod``; where the pattern's own
#: atoms are exact on the local grid (:func:`~patterngen.distributed.local.ordinary_local`),
#: ``auto`` plans those among every strategy
LINE_TABLE_STRATEGIES = ("terms", "numba", "sdpa")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class _Exchange(torch.autograd.Function):
    """``all_to_all_single`` of packed rows; its backward is the transposed exchange."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = rows.new_empty((sum(recv_splits), rows.shape[1]))
        dist.all_to_all_single(out, rows.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        out = grad.new_empty((sum(send_splits), grad.shape[1]))
        dist.all_to_all_single(out, grad.contiguous(), send_splits, recv_splits,
                               group=ctx.group)
        return out, None, None, None


def _head_mask(mask, heads: int, device):
    """A ``(patterns, ...)`` boolean mask per head ``(heads, ...)``, as a tensor."""
    return torch.as_tensor(mask, device=device)[ir.pattern_of_head(torch.arange(heads),
                                                                   mask.shape[0])]


def _partial(q, k, v, mask, scale):
    """``(out, lse)`` of ``q`` over the keys ``mask`` allows, in float32 (float64 for float64),
    with autograd; ``lse = -inf`` for a row without a key (decided from the mask, not from a
    kernel), whose output is 0."""
    wide = acc_dtype(q.dtype)
    add = torch.zeros(mask.shape, dtype=wide, device=q.device).masked_fill(~mask, -math.inf)
    part, lse = dense.softmax_attention(q.to(wide), k.to(wide), v.to(wide), add, scale, True)
    return part, lse.squeeze(-1).masked_fill(~mask.any(-1), -math.inf)


class _Local(torch.autograd.Function):
    """A rank's local problem through its ``local`` executor part: the part's ``(out, lse)``
    is the whole softmax of these rows (the re-sharded terms enter as virtual keys), so its
    backward from its own out and lse is exact."""

    @staticmethod
    def forward(ctx, q, k, v, part, scale):
        out, lse = part.forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.part, ctx.scale = part, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, _ = ctx.part.backward(q, k, v, out, finite_lse(lse), dout.contiguous(),
                                          ctx.scale)
        return dq, dk, dv, None, None


def _device(group):
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _canonical(value) -> str:
    """Text equal on two ranks exactly when the option values are: tensors (a bias table) by
    their dtype, shape and a hash of their bytes, since their repr elides elements."""
    if isinstance(value, torch.Tensor):
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return (f"tensor({flat.dtype}, {tuple(value.shape)}, "
                f"{hashlib.sha256(data).hexdigest()[:16]})")
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_canonical(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(map(_canonical, value)) + ")"
    return repr(value)


class DistributedAttention:
    """Attention of one rank's shard; build it with :func:`patterngen.distributed.compile`.

    Call it on every rank with that rank's ``(batch, heads, *shard, head_dim)`` (or ``(batch,
    heads, shard_tokens, head_dim)``) q, k, v; it returns the rank's output rows, with autograd.
    Every rank must call it, and run backward, the same number of times (collectives).

    Attributes:
        shards: ``(start, stop)`` of every rank's lines of the sharded axis.
        rank, world: this rank and the group's size.
        share: this rank's :class:`~patterngen.distributed.local.RankShare`.
        local: this rank's :class:`~patterngen.distributed.local.LocalProblem`, run by the
            ``local`` executor (:class:`patterngen.backends.executor.LocalExecutor`), one part
            per kind of call; ``local_backend`` its backend's name; ``plans``: with ``auto``,
            its plans.
        schemes: ``(term, scheme)`` per term (see :func:`~patterngen.distributed.schemes`).
        sent_rows, received_rows: K/V tokens this rank sends and receives per forward step.
        resharded: the :class:`~patterngen.distributed.reshard.Reshard` of the axis terms, or
            ``None``; ``pencil_rows`` and ``returned_rows`` are this rank's q/k/v tokens and
            partial rows received in its two exchanges (0 without it).
    """

    def __init__(self, pattern, grid, axis, group, backend, shards, options):
        if not (dist.is_available() and dist.is_initialized()):
            raise PatternError("patterngen.distributed.compile needs a process group: call "
                               "torch.distributed.init_process_group first (gloo on CPU, nccl "
                               "on GPUs).")
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        error, digest, summary = None, "", ""
        try:
            lowered = as_ir(pattern, grid)
            shape = lowered.grid.require_numeric("patterngen.distributed.compile")
            if isinstance(axis, bool) or not isinstance(axis, int) or not (
                    -len(shape) <= axis < len(shape)):
                raise PatternError(f"axis={axis!r}: expected an axis of the {len(shape)}-D grid "
                                   f"{lowered.grid}, an int in [{-len(shape)}, {len(shape)}).")
            self.axis = axis % len(shape)
            self.shards = split_lines(shape[self.axis], self.world, shards)
            moved = ir.axis_first(lowered, self.axis)
            key = (tuple(tuple(map(repr, h.terms)) for h in moved.patterns), shape, self.axis,
                   self.shards, self.world, backend, _canonical(options))
            digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
            summary = (f"{lowered.label} on grid {lowered.grid}, axis={self.axis}, "
                       f"shards={list(self.shards)}, backend={backend!r}, options "
                       f"{_canonical(options)}")
            self.resharded = reshard(moved, self.shards)
            self.share = rank_share(moved, self.shards, self.rank, self.resharded)
            if self.resharded:
                self._pencil_mask = reshard_mask(moved, self.resharded, self.rank)
            self._moved_shape = moved.grid.shape
            ordinary = ordinary_local(moved, self.share) if backend == "auto" else None
            self.local_backend = backend
            self.local = LocalProblem(
                self.share, backend, self.share.local if ordinary is None else ordinary,
                LINE_TABLE_STRATEGIES if backend == "auto" and ordinary is None else None,
                {k: v for k, v in options.items() if k != "scale"})
            self._executor = executors()["local"]
            reason = self._executor.can_run(self.local, Call())
            if reason is not None:
                raise PatternError(f"{reason}.")
            self._parts = {}
            self.schemes = schemes(moved, self.resharded)
            self._shape = shape
        except PatternError as e:
            error = str(e)
        except Exception as e:  # noqa: BLE001 -- any failure must reach every rank, not hang
            error = f"{type(e).__name__}: {e}"
        self._agree((digest, summary, error))
        lo, hi = self.shards[self.rank]
        self._shard_shape = tuple(hi - lo if a == self.axis else n
                                  for a, n in enumerate(self._shape))
        self._rest = math.prod(n for a, n in enumerate(self._shape) if a != self.axis)
        self.sent_rows = sum(len(s) for s in self.share.send)
        self.received_rows = sum(len(r) for r in self.share.recv)
        rs = self.resharded
        self.pencil_rows = int(rs.pencil[self.rank]) if rs else 0
        self.returned_rows = int(rs.returned[self.rank]) if rs else 0
        # whether the received rows and the own shard tile the local grid exactly
        recv = np.concatenate(self.share.recv)
        own0, own1 = (x * self._rest for x in self.share.own)
        self._tiles = (len(recv) + own1 - own0 == self.share.local_lines * self._rest
                       and bool((np.diff(recv) > 0).all()))
        self._before = int((recv < own0).sum())
        self._indices = {}

    def __repr__(self):
        return (f"DistributedAttention(rank {self.rank} of {self.world}, lines "
                f"{self.shards[self.rank]} of axis {self.axis}, {self.local.lowered.label} on "
                f"{self.local_backend})")

    def _part(self, q, k, v):
        """The ``local`` executor's part for this kind of call, prepared once."""
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        call = Call(q.device.type, str(q.dtype).rsplit(".", 1)[-1], q.shape[0], q.shape[1],
                    q.shape[-1], k.shape[1], grad)
        if call not in self._parts:
            reason = self._executor.can_run(self.local, call)
            if reason is not None:
                raise PatternError(f"distributed attention, rank {self.rank}: the local problem "
                                   f"cannot run this call: {reason}.")
            self._parts[call] = self._executor.prepare(self.local, call)
        return self._parts[call]

    @property
    def plans(self) -> list:
        """With ``auto``, the plan of the local problem for each kind of call so far."""
        return [p.plan for p in self._parts.values() if hasattr(p, "plan")]

    def _agree(self, payload):
        """All-gather ``(digest, summary, error)``; raise the same error on every rank.

        ``all_gather_object`` unpickles what every peer sends: the ranks of one job trust
        each other (docs/security.md)."""
        gathered = [None] * self.world
        dist.all_gather_object(gathered, payload, group=self.group)
        failed = [(r, e) for r, (_, _, e) in enumerate(gathered) if e]
        if failed:
            raise PatternError("patterngen.distributed.compile failed on "
                               + "; ".join(f"rank {r}: {e}" for r, e in failed))
        if len({d for d, _, _ in gathered}) > 1:
            raise PatternError(
                "The ranks disagree on the sharded pattern (checked before any exchange); "
                "every rank must compile the same pattern, grid, axis, shards, backend and "
                "options: "
                + "; ".join(f"rank {r}: {s} [{d}]" for r, (d, s, _) in enumerate(gathered)))

    def _check(self, q, k, v):
        """Check every rank's inputs together; the same error on every rank when any is bad."""
        from patterngen.backends.inputs import flatten_qkv

        message, flat = None, None
        try:
            lo, hi = self.shards[self.rank]
            flat = flatten_qkv(q, k, v, self._shard_shape,
                               f"rank {self.rank} (lines {lo}:{hi} of axis {self.axis})")
            if q.dtype not in _DTYPES:
                raise PatternError(f"distributed: q has dtype={q.dtype}; expected one of "
                                   f"{_DTYPES}.")
        except PatternError as e:
            message, flat = str(e), None
        b, h, hk, d = (q.shape[0], q.shape[1], k.shape[1], q.shape[-1]) if flat else (0,) * 4
        grad = torch.is_grad_enabled() and flat is not None and (k.requires_grad
                                                                 or v.requires_grad)
        mine = torch.tensor([message is not None, b, h, d,
                             _DTYPES.index(q.dtype) if flat else -1, grad, hk],
                            dtype=torch.int64, device=_device(self.group))
        table = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(table, mine, group=self.group)
        table = [t.tolist() for t in table]
        if any(row[0] for row in table):
            messages = [None] * self.world
            dist.all_gather_object(messages, message, group=self.group)
            raise PatternError("distributed attention: bad inputs on "
                               + "; ".join(m for m in messages if m))
        if len({tuple(row[1:]) for row in table}) > 1:
            raise PatternError(
                "distributed attention: the ranks' inputs disagree; every rank needs the same "
                "batch, heads, kv heads, head_dim, dtype and whether K/V need gradients: "
                + "; ".join(f"rank {r}: batch={row[1]}, heads={row[2]}, kv_heads={row[6]}, "
                            f"head_dim={row[3]}, dtype={_DTYPES[row[4]]}, grad={bool(row[5])}"
                            for r, row in enumerate(table)))
        return flat

    def _index(self, device):
        if device not in self._indices:
            def cat(parts):
                return torch.cat([torch.as_tensor(p, dtype=torch.int64) for p in parts]).to(device)

            self._indices[device] = (cat(self.share.send), cat(self.share.recv))
        return self._indices[device]

    def _axis_first(self, x, b, h, d):
        """Flat shard rows in row-major order of the grid with the sharded axis first."""
        if self.axis == 0:
            return x
        x = x.reshape(b, h, *self._shard_shape, d).movedim(2 + self.axis, 2)
        return x.reshape(b, h, -1, d)

    def _global_queries(self, q, k, v, out, scale):
        """Replace the global queries' rows of ``out`` by their exact attention over all ranks.

        Their q rows go to every rank (one exchange), each rank attends them to its own keys
        and returns the partial ``(out, lse)`` to the holder (another), which merges them by
        log-sum-exp in float32/64 (:func:`~patterngen.backends.merge.merge`). Autograd
        runs through both exchanges (transposed) and the merge; no key row moves.
        """
        share, world, me = self.share, self.world, self.rank
        b, h, t, d = q.shape
        held = [int((share.holder == r).sum()) for r in range(world)]
        mine = torch.as_tensor(share.queries[share.holder == me]
                               - self.shards[me][0] * self._rest, device=q.device)
        rows = q.permute(2, 0, 1, 3).reshape(t, b * h * d).index_select(0, mine)
        others = [n if r != me else 0 for r, n in enumerate(held)]
        got = _Exchange.apply(rows.repeat(world - 1, 1), [0 if r == me else len(mine)
                                                          for r in range(world)],
                              others, self.group)
        # holders are in rank order, so their blocks concatenate to the queries' order
        blocks = list(got.split(others))
        blocks[me] = rows
        qg = torch.cat(blocks).reshape(-1, b, h, d).permute(1, 2, 0, 3)
        part, lse = _partial(qg, k, v, _head_mask(share.query_mask, h, q.device), scale)
        # (queries, b, h, d + 1) rows: each block goes to the query's holder
        partial = torch.cat([part, lse[..., None]], -1).permute(2, 0, 1, 3)
        partial = partial.reshape(-1, b * h * (d + 1))
        blocks = list(partial.split(held))
        sent = [x for r, x in enumerate(blocks) if r != me]  # none on one rank
        back = _Exchange.apply(torch.cat(sent) if sent else partial[:0],
                               others, [0 if r == me else len(mine) for r in range(world)],
                               self.group)
        parts = torch.cat([blocks[me], back]).reshape(world, len(mine), b, h, d + 1)
        merged, _ = merge(list(zip(parts[..., :d].unbind(0), parts[..., d].unbind(0))))
        return out.index_copy(2, mine, merged.permute(1, 2, 0, 3).to(out.dtype))

    def _pencils(self, qf, kf, vf, scale):
        """The re-sharded terms' partial ``(out, lse)`` of this rank's tokens (row frame).

        q, k, v go to the pencils (every line of a slice of axis 1) in one exchange, each
        rank attends its columns' pairs (:func:`~patterngen.distributed.reshard.reshard_mask`),
        and the partial rows come back in a second one; autograd runs through both
        (transposed) and the attention.
        """
        rs, me, world = self.resharded, self.rank, self.world
        b, h, _, d = qf.shape
        lines, width, *deep = self._moved_shape
        depth = math.prod(deep)
        rows = self.shards[me][1] - self.shards[me][0]
        lo, hi = rs.columns[me]
        heights = [b_ - a for a, b_ in self.shards]
        widths = [b_ - a for a, b_ in rs.columns]
        x = torch.stack([qf, kf, vf]).reshape(3, b, h, rows, width, depth, d)
        x = x.permute(3, 4, 5, 0, 1, 2, 6)  # (rows, width, depth, 3, b, h, d)
        blocks = [x[:, a:c].reshape(-1, 3 * b * h * d) for a, c in rs.columns]
        send = [0 if r == me else rows * widths[r] * depth for r in range(world)]
        recv = [0 if r == me else heights[r] * widths[me] * depth for r in range(world)]
        got = _Exchange.apply(torch.cat([blk for r, blk in enumerate(blocks) if r != me]),
                              send, recv, self.group)
        parts = list(got.split(recv))
        parts[me] = blocks[me]
        # sources in rank order hold the lines in order: one pencil (lines, columns, depth)
        pencil = torch.cat(parts).reshape(lines, hi - lo, depth, 3, b, h, d)
        pq, pk, pv = pencil.permute(3, 4, 5, 1, 0, 2, 6).reshape(3, b, h, hi - lo,
                                                                  lines * depth, d)
        part, lse = _partial(pq, pk, pv, _head_mask(self._pencil_mask, h, qf.device), scale)
        back = torch.cat([part, lse[..., None]], -1).reshape(b, h, hi - lo, lines, depth, d + 1)
        back = back.permute(3, 2, 4, 0, 1, 5)  # (lines, columns, depth, b, h, d + 1)
        blocks = [back[a:c].reshape(-1, b * h * (d + 1)) for a, c in self.shards]
        got = _Exchange.apply(torch.cat([blk for r, blk in enumerate(blocks) if r != me]),
                              recv, send, self.group)
        parts = list(got.split(send))
        parts[me] = blocks[me]
        mine = torch.cat([p.reshape(rows, w, depth, b * h * (d + 1))
                          for p, w in zip(parts, widths)], 1)
        mine = mine.reshape(-1, b, h, d + 1).permute(1, 2, 0, 3)
        return mine[..., :d], mine[..., d]

    @staticmethod
    def _virtual_keys(q, k, v, part, lse, scale):
        """The local problem with one more column and one virtual key per own query.

        Real keys get a 0 in the extra column and the queries a 1, so their scores do not
        change; the virtual key ``(0, ..., 0, lse / scale)`` scores ``lse`` and carries the
        value ``part``: the local softmax over the halo terms' keys and it is exactly the
        log-sum-exp merge of the two parts, and autograd reaches ``part`` and ``lse`` through
        the local part's backward. Queries whose re-sharded part is empty (only global
        queries, replaced later; :func:`~patterngen.distributed.reshard.reshard` refuses
        others) get a finite stand-in.
        """
        b, h, _, d = q.shape
        own = part.shape[2]
        lse = finite_lse(lse).to(q.dtype)

        def column(x, value):
            return torch.cat([x, x.new_full((*x.shape[:-1], 1), value)], -1)

        q = torch.cat([column(q, 1.0), q.new_zeros(b, h, own, d + 1)], 2)
        k = torch.cat([column(k, 0.0), torch.cat([k.new_zeros(b, h, own, d),
                                                  (lse / scale)[..., None]], -1)], 2)
        v = torch.cat([column(v, 0.0), column(part.to(v.dtype), 0.0)], 2)
        return q, k, v

    def __call__(self, q, k, v, scale=None):
        """This rank's output rows for its shard of q, k, v (same layout as ``q``).

        Raises:
            PatternError: on every rank, when any rank's inputs do not fit its shard or the
                ranks' batch, heads, head_dim, dtype or gradient needs differ.
        """
        qf, kf, vf, restore = self._check(q, k, v)
        b, h, tokens, d = qf.shape
        if kf.shape[1] != h and (self.resharded or len(self.share.queries)):
            # the re-sharded and global-query parts pair each query head with its own keys:
            # grouped key/value heads are repeated for them (the halo of the others is not)
            kf, vf = (x.repeat_interleave(h // kf.shape[1], 1) for x in (kf, vf))
        hk = kf.shape[1]
        qf, kf, vf = (self._axis_first(x, b, x.shape[1], d) for x in (qf, kf, vf))
        send, recv = self._index(qf.device)
        # one packed row per sent token: (K, V) x batch x kv heads x head_dim
        rows = torch.stack([kf.index_select(2, send), vf.index_select(2, send)])
        got = _Exchange.apply(rows.permute(3, 0, 1, 2, 4).reshape(len(send), 2 * b * hk * d),
                              [len(s) for s in self.share.send],
                              [len(r) for r in self.share.recv], self.group)
        got_k, got_v = got.reshape(len(recv), 2, b, hk, d).permute(1, 2, 3, 0, 4)
        own0, own1 = (x * self._rest for x in self.share.own)
        local_tokens = self.share.local_lines * self._rest
        if self._tiles:
            # the received rows arrive in local order (ranks in line order, each in token
            # order) and fill the local grid around the own shard: one copy, no scatter. Even
            # an empty `got` must enter the graph, or this rank would skip the backward
            # exchange that its peers wait in
            before = self._before
            k_loc, v_loc = (torch.cat([g[:, :, :before], x, g[:, :, before:]], 2)
                            for x, g in ((kf, got_k), (vf, got_v)))
        else:  # gaps no term reads (dilation on short shards, partial key lines) stay zero
            k_loc, v_loc = (torch.nn.functional.pad(x, (0, 0, own0, local_tokens - own1))
                            .index_copy(2, recv, g) for x, g in ((kf, got_k), (vf, got_v)))
        q_loc = qf if local_tokens == own1 - own0 else torch.nn.functional.pad(
            qf, (0, 0, own0, local_tokens - own1))
        scale = d ** -0.5 if scale is None else scale
        if self.resharded:
            q_loc, k_loc, v_loc = self._virtual_keys(q_loc, k_loc, v_loc,
                                                     *self._pencils(qf, kf, vf, scale), scale)
        part = self._part(q_loc, k_loc, v_loc)
        out = part.autograd_forward(q_loc, k_loc, v_loc, scale)
        if out is None:
            out = _Local.apply(q_loc, k_loc, v_loc, part, scale)
        out = out[:, :, own0:own1, :d]
        if len(self.share.queries):
            out = self._global_queries(qf, kf, vf, out, scale)
        if self.axis:
            moved = (self._shard_shape[self.axis],
                     *(n for a, n in enumerate(self._shard_shape) if a != self.axis))
            out = out.reshape(b, h, *moved, d).movedim(2, 2 + self.axis).reshape(b, h, -1, d)
        return restore(out)
