"""FlexAttention backend: a ``mask_mod`` generated from the IR and a ``BlockMask`` from the layout.

The ``BlockMask`` is built with ``BlockMask.from_kv_blocks`` straight from
:func:`patterngen.layout.layout` (full and partial tiles kept apart, so FlexAttention skips the
``mask_mod`` on full tiles): no ``create_block_mask`` sweep over every (query, key) pair. The
``mask_mod`` evaluates the IR's own per-axis progressions on torch index tensors
(:func:`patterngen.ir.torch_ops`), so the block mask and the element mask cannot disagree. With
a tiled order the tokens are permuted in and out around ``flex_attention`` and the ``mask_mod``
reads layout positions through the permutation.

With keys on another grid (``ir.key_grid``) the ``mask_mod`` reads ``q_idx`` as a query-grid
token and ``kv_idx`` as a key-grid token (each through its own order), maps the query's
coordinates through :func:`patterngen.ir.center` and applies the pattern on the key grid; the
block mask's key blocks cut the key grid (the same :func:`patterngen.layout.layout`), and the
key length is the key grid's token count.

A relative position bias table and a softcap become a ``score_mod`` generated beside the
``mask_mod`` (:func:`make_score_mod`): the pair's key-minus-query offset is computed from the
same coordinates and gathers one table entry; FlexAttention differentiates through the captured
table on CUDA.

FlexAttention has no backward pass on CPU (torch raises); this backend says so before running.

Example:
    >>> import patterngen as pg
    >>> attn = pg.compile(pg.window(3), grid=(16, 16), backend="flex")
    >>> attn.block_mask.shape
    (1, 1, 256, 256)
"""

from __future__ import annotations

import functools

import numpy as np

from patterngen import bias
from patterngen import ir as _ir
from patterngen.backends import Backend, register_backend
from patterngen.backends.inputs import non_finite
from patterngen.errors import BackendUnavailable, PatternError
from patterngen.layout import layout

__all__ = ["FlexBackend", "make_mask_mod", "make_score_mod", "flex_available",
           "check_cpu_block"]

#: FlexAttention's default sparse block size
DEFAULT_BLOCK = 128
#: key block sizes that torch's compiled CPU FlexAttention computes wrongly, per CPU capability
#: (``torch.backends.cpu.get_cpu_capability()``, which inductor's vector ISA follows) and the
#: head_dims affected. Measured with torch 2.13 against the dense reference, each capability
#: with its own inductor cache (``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine emulates
#: AVX2): on AVX2 a key block of 8 with head_dim 8 or 16 is off by up to 4, while key blocks of
#: 4, 16, 32 and 128, and head_dim 32 and 64, are exact; on AVX-512 every one of these is exact
WRONG_CPU_BLOCKS = {"AVX2": ((8, range(1, 32)),)}
#: key block sizes measured exact on every capability above
EXACT_CPU_BLOCKS = (16, 32, 64, 128)


def check_cpu_block(block, head_dim: int, capability: str | None = None) -> None:
    """Refuse a block size that compiled CPU FlexAttention runs wrongly here
    (:data:`WRONG_CPU_BLOCKS`), and a CPU it does not run on (capability DEFAULT).

    Raises:
        PatternError: naming the block size, the capability and the sizes that work.
    """
    import torch

    capability = capability or torch.backends.cpu.get_cpu_capability()
    if capability == "DEFAULT":
        raise PatternError(
            "flex: compiled CPU FlexAttention needs AVX2 or AVX-512 (torch's inductor refuses "
            "it otherwise), and this CPU reports capability DEFAULT; use compile=False, or "
            "backend='sdpa' or 'numba'.")
    for keys, head_dims in WRONG_CPU_BLOCKS.get(capability, ()):
        if block[1] == keys and head_dim in head_dims:
            raise PatternError(
                f"flex: block={tuple(block)} with head_dim={head_dim} on this CPU "
                f"(capability {capability}): torch's compiled CPU FlexAttention computes key "
                f"blocks of {keys} wrongly there for head_dim {head_dims.start} to "
                f"{head_dims.stop - 1} (measured against the dense reference); use a key "
                f"block of {', '.join(map(str, EXACT_CPU_BLOCKS))} (exact on every capability "
                f"measured), or compile=False.")


def flex_available() -> str | None:
    """``None`` when FlexAttention can be imported, else the reason it cannot."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError as e:  # torch < 2.5, or a build without it
        return f"torch.nn.attention.flex_attention is not available ({e})"
    return None


@functools.cache
def _compiled_flex():
    """One ``torch.compile(flex_attention)`` shared by every compiled pattern."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def make_mask_mod(ir_, permutation=None, device="cpu", padded=True, key_permutation=None):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` of an IR, over layout positions.

    Args:
        ir_: an :class:`~patterngen.ir.IR` or ``HeadsIR`` on a numeric grid (head ``h`` uses
            pattern ``h % patterns``).
        permutation: row-major token at each position (``None``: row-major positions).
        device: where the permutation tensor the ``mask_mod`` reads lives.
        padded: guard positions at or beyond the token count (FlexAttention's padding of a
            ragged last block): they are masked out. ``False`` drops the guard, for block sizes
            that divide the token count.
        key_permutation: with keys on another grid, the row-major key token at each key
            position (``None``: row-major).

    Example:
        >>> import torch, patterngen as pg
        >>> mod = make_mask_mod(pg.lower(pg.window(3), 8))
        >>> i = torch.arange(8)
        >>> mod(0, 0, i[:, None], i[None, :]).sum().item()
        24
    """
    import torch

    shape = ir_.grid.require_numeric("mask_mod")
    key_shape = ir_.keys.require_numeric("mask_mod")
    tokens, key_tokens = int(np.prod(shape)), int(np.prod(key_shape))
    heads = ir_.patterns
    ops = _ir.torch_ops()
    coords = _coordinates(shape, permutation, device, padded)
    key_coords = coords if ir_.key_grid is None else _coordinates(key_shape, key_permutation,
                                                                  device, padded)

    def one(head, qc, kc):
        out = None
        for term in head.terms:
            m = term.contains(qc, kc, shape, ops, key_shape)
            out = m if out is None else out | m
        return out if out is not None else qc[0] < 0

    def mask_mod(b, h, q_idx, kv_idx):
        qc, kc = coords(q_idx), key_coords(kv_idx)
        out = one(heads[-1], qc, kc)
        for p in range(len(heads) - 2, -1, -1):
            out = torch.where(_ir.pattern_of_head(h, len(heads)) == p, one(heads[p], qc, kc), out)
        return out & (q_idx < tokens) & (kv_idx < key_tokens) if padded else out

    mask_mod.__name__ = f"patterngen_{ir_.label or 'pattern'}"
    return mask_mod


def _coordinates(shape, permutation, device, padded):
    """``coords(idx)``: per-axis grid coordinates of layout positions ``idx`` (torch)."""
    import torch

    tokens = int(np.prod(shape))
    perm = (None if permutation is None
            else torch.as_tensor(np.asarray(permutation), device=device))

    def coords(idx):
        if padded:
            idx = torch.clamp(idx, 0, tokens - 1)
        if perm is not None:
            idx = perm[idx]
        # constants folded: no division by a stride of 1, no modulo on the outermost axis
        return bias.coordinates(idx, shape)

    return coords


def _centres(coords, shape, key_shape, idx):
    """The key coordinates :func:`patterngen.ir.center` the query positions ``idx`` sit over."""
    return [_ir.center(c, n, m) for c, n, m in zip(coords(idx), shape, key_shape)]


def make_score_mod(shape, reach, table=None, softcap=None, permutation=None, device="cpu",
                   padded=True, key_shape=None, key_permutation=None):
    """FlexAttention ``score_mod(score, b, h, q_idx, kv_idx)``: softcap, then the bias table.

    ``score`` arrives scaled; with ``softcap=c`` it becomes ``c * tanh(score / c)``, then the
    table entry of the pair's key-minus-query offset is added: ``table[h]`` per head, row 0
    when the table's first dimension is 1 (:mod:`patterngen.bias`). Offsets of pairs outside
    the pattern are clipped into the table (the ``mask_mod`` removes those pairs), so every
    gather stays in bounds, as Triton kernels need. The table is captured, so FlexAttention's
    backward on CUDA returns its gradient.

    Args:
        shape: the numeric grid.
        reach: the pattern's reach (the table has ``2 * reach + 1`` entries per axis).
        table: ``None`` or ``(heads or 1, 2 * reach[0] + 1, ...)`` torch tensor.
        softcap: ``None`` or a float ``> 0``.
        permutation, device, padded, key_permutation: as for :func:`make_mask_mod`.
        key_shape: the keys' grid when it is another: the offset is then key minus the key
            coordinate the query sits over (:func:`patterngen.ir.center`).

    Example:
        >>> import torch
        >>> mod = make_score_mod((5,), (1,), torch.tensor([[-1.0, 0.0, 2.0]]))
        >>> i = torch.arange(5)
        >>> mod(torch.zeros(5, 5), 0, 0, i[:, None], i[None, :])[1, :3]
        tensor([-1.,  0.,  2.])
    """
    from patterngen.backends.dense import cap

    shape = tuple(int(n) for n in shape)
    coords = key_coords = _coordinates(shape, permutation, device, padded)
    if key_shape is not None:
        key_shape = tuple(int(n) for n in key_shape)
        key_coords = _coordinates(key_shape, key_permutation, device, padded)
        coords = functools.partial(_centres, coords, shape, key_shape)
    ops = _ir.torch_ops()
    shared = table is not None and table.shape[0] == 1

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = cap(score, softcap)
        if table is None:
            return score
        # the user's table itself is captured (a leaf that FlexAttention's backward reaches)
        offsets = bias.axis_offsets(coords(q_idx), key_coords(kv_idx), reach, ops)
        return score + table[(h * 0 if shared else h, *offsets)]

    score_mod.__name__ = "patterngen_score_mod"
    return score_mod


def _kv_blocks(lay, torch, device):
    """``(num, indices, full_num, full_indices)`` of one layout in ``BlockMask`` form.

    Ragged edge tiles count as partial, as ``create_block_mask`` pads them with ``False``.
    """
    rows, cols, is_full = lay.tiles(pad_ragged=True)
    out = []
    for sel in (~is_full, is_full):
        r, c = rows[sel], cols[sel]
        num = np.bincount(r, minlength=lay.q_blocks)
        rank = np.arange(len(r)) - np.concatenate([[0], np.cumsum(num)])[r]
        idx = np.zeros((lay.q_blocks, lay.kv_blocks), dtype=np.int32)
        idx[r, rank] = c
        out += [torch.as_tensor(num.astype(np.int32), device=device),
                torch.as_tensor(idx, device=device)]
    return out


def _with_non_finite_values(fn, q, k, v, score_mod, block_mask, scale, torch):
    """FlexAttention when ``k`` or ``v`` holds NaNs or infinities, by the rule of SDPA run on
    each query's attended keys alone (on CPU ``fn`` is eager FlexAttention, which replaces a
    masked score; the compiled CPU kernel does not, and returns no log-sum-exp).

    FlexAttention multiplies a masked key's value by a zero probability, so a NaN there
    poisons every query of the block. Here it runs on ``v`` with those entries zeroed and
    returns the log-sum-exp; each non-finite entry ``v[b, h, j, c]`` then adds
    ``P_ij * v[b, h, j, c]`` (``P_ij = exp(s_ij - lse_i)``, from the same ``score_mod``) to
    the queries the ``mask_mod`` lets see key ``j``: they are few, and this runs only when
    there are some."""
    finite = torch.isfinite(v)
    out, lse = fn(q, k, torch.where(finite, v, 0), score_mod=score_mod, block_mask=block_mask,
                  scale=scale, return_lse=True)
    b, h, j, c = (~finite).nonzero(as_tuple=True)
    rows = torch.arange(q.shape[2], device=q.device)
    idx = (b[:, None], h[:, None], rows, j[:, None])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    score = torch.einsum("erd,ed->er", q[b, h].float(), k[b, h, j].float()) * scale
    if score_mod is not None:
        score = score_mod(score, *idx)
    seen = block_mask.mask_mod(*idx) & (lse[b, h] > float("-inf"))
    term = torch.where(seen, torch.exp(score - lse[b, h]) * v[b, h, j, c].float()[:, None], 0.0)
    return out.index_put((b[:, None], h[:, None], rows, c[:, None]), term.to(out.dtype),
                         accumulate=True)


class FlexBackend(Backend):
    """FlexAttention with a ``BlockMask`` built from patterngen's layout.

    Call with ``(batch, heads, *grid, head_dim)`` or ``(batch, heads, tokens, head_dim)``
    tensors. CUDA: forward and backward. CPU: forward only (FlexAttention has no CPU backward).

    Args:
        ir: the lowered pattern (numeric grid).
        block: FlexAttention's sparse block size, one integer or ``(Bq, Bk)`` (default 128).
        order: ``"row-major"``, ``"tiled"`` or ``"auto"`` token order (see
            :func:`patterngen.layout`); tokens are permuted in and out.
        tile: tile shape for the tiled order.
        scale: default score scale; ``None`` means ``head_dim ** -0.5``.
        softcap: ``None``, or ``c > 0``: scores become ``c * tanh(s / c)`` before the bias.
        compile: run ``torch.compile(flex_attention)`` (default); ``False`` runs eager
            FlexAttention, which materialises scores (debugging only).

    Attributes:
        layout: the :class:`~patterngen.layout.Layout` the block mask comes from.
        block_mask: the ``BlockMask`` for one head per listed pattern, on CPU.

    Raises:
        BackendUnavailable: when the installed torch has no FlexAttention.
    """

    name = "flex"
    SUPPORTED_DEVICES = ("cpu", "cuda")
    SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
    BACKWARD_DEVICES = ("cuda",)  # FlexAttention has no CPU backward; CPU refuses clearly
    SUPPORTS_REL_POS_BIAS = True
    SUPPORTS_SOFTCAP = True
    SUPPORTS_ADDITIONAL_KEYS = True
    SUPPORTS_KEY_GRID = True

    @classmethod
    def not_supported_reasons(cls, ir_, device="cpu", dtype="float32") -> list[str]:
        reasons = super().not_supported_reasons(ir_, device, dtype)
        missing = flex_available()
        if missing:
            reasons.append(missing)
        return reasons

    def __init__(self, ir_, block=DEFAULT_BLOCK, order="row-major", tile=None, scale=None,
                 softcap=None, compile=True):
        missing = flex_available()
        if missing:
            raise BackendUnavailable(f"flex: {missing}; upgrade torch to >= 2.5 or use "
                                     f"backend='sdpa'.")
        self.ir = ir_
        self.shape = ir_.grid.require_numeric("the flex backend")
        self.key_shape = None if ir_.key_grid is None else ir_.key_grid.require_numeric(
            "the flex backend")
        self.scale = scale
        self.softcap = bias.check_softcap(softcap)
        self.compile = compile
        self.layout = layout(ir_, block=block, order=order, tile=tile)
        perm, kperm = self.layout.permutation, self.layout.key_permutation
        self._identity = bool((perm == np.arange(len(perm))).all()
                              and (kperm == np.arange(len(kperm))).all())
        self._perm, self._kperm = perm, kperm
        self._cache = {}  # block masks and permutation tensors, by heads and device
        self._mask_mods = {}
        self._score_mod = None  # (table, device, score_mod) of the last call

    @property
    def _padded(self) -> bool:
        bq, bk = self.layout.block
        return bool(self.layout.tokens % bq or self.layout.key_tokens % bk)

    @property
    def mask_mod(self):
        """The generated ``mask_mod`` over layout positions (CPU)."""
        return self._mask_mod("cpu")

    def _mask_mod(self, device: str, padded: bool | None = None):
        padded = self._padded if padded is None else padded
        if (device, padded) not in self._mask_mods:
            self._mask_mods[device, padded] = make_mask_mod(
                self.ir, None if self._identity else self._perm, device, padded=padded,
                key_permutation=None if self._identity else self._kperm)
        return self._mask_mods[device, padded]

    def __repr__(self):
        return f"FlexBackend({self.ir.label or self.ir!r} on grid {self.ir.grid})"

    @property
    def block_mask(self):
        """The ``BlockMask`` (CPU) with one head per listed pattern."""
        return self.block_mask_for(len(self.layout.patterns), "cpu")

    @property
    def executed_pairs(self) -> tuple[int, ...]:
        """Pairs computed per listed pattern: the block mask's tiles
        (:attr:`patterngen.layout.Layout.executed_pairs`)."""
        return tuple(lay.executed_pairs for lay in self.layout.patterns)

    def prepare(self, device, dtype=None, head_dim=None, heads=None) -> None:
        if head_dim is not None and self.compile and str(device).startswith("cpu"):
            check_cpu_block(self.layout.block, head_dim)
        if heads is not None:
            self.block_mask_for(heads, device)

    def block_mask_for(self, heads: int, device, extra: int = 0):
        """The ``BlockMask`` for ``heads`` heads on ``device`` (cached); with ``extra``
        additional keys, over keys padded to whole blocks with the extra keys after them
        (see :meth:`_with_extra`)."""
        key = (heads, str(device), extra)
        if key not in self._cache:
            import torch
            from torch.nn.attention.flex_attention import BlockMask

            parts = [_kv_blocks(lay, torch, device) for lay in self.layout.patterns]
            pick = [_ir.pattern_of_head(h, len(parts)) for h in range(heads)]
            stacked = [torch.stack([parts[p][i] for p in pick])[None] for i in range(4)]
            tokens = self.layout.tokens
            mask_mod, keys = self._mask_mod(str(device)), self.layout.key_tokens
            if extra:
                stacked, mask_mod, keys = self._with_extra(stacked, extra, torch)
            self._cache[key] = BlockMask.from_kv_blocks(
                *stacked, BLOCK_SIZE=tuple(self.layout.block), mask_mod=mask_mod,
                seq_lengths=(tokens, keys))
        return self._cache[key]

    def _with_extra(self, stacked, extra: int, torch):
        """Block mask parts, ``mask_mod`` and key count for keys laid out as the pattern's
        keys padded to ``kv_blocks * Bk``, then the ``extra`` keys: every query block gets
        the extra keys' blocks as partial blocks, whose ``mask_mod`` admits exactly them."""
        num, idx, full_num, full_idx = stacked
        start = self.layout.kv_blocks * self.layout.block[1]
        blocks = -(-extra // self.layout.block[1])
        added = torch.arange(self.layout.kv_blocks, self.layout.kv_blocks + blocks,
                             dtype=idx.dtype, device=idx.device)
        # the extra blocks go after each row's own partial blocks (the rest is ignored)
        grown = torch.cat([idx, idx.new_zeros((*idx.shape[:-1], blocks))], -1)
        cols = num[..., None].long() + torch.arange(blocks, device=idx.device)
        grown.scatter_(-1, cols, added.expand_as(cols))
        full_idx = torch.cat([full_idx, full_idx.new_zeros((*full_idx.shape[:-1], blocks))], -1)
        base, tokens = self._mask_mod(str(idx.device), padded=True), self.layout.tokens

        def mask_mod(b, h, q_idx, kv_idx):
            seen = (kv_idx >= start) & (kv_idx < start + extra) & (q_idx < tokens)
            return base(b, h, q_idx, kv_idx) | seen

        mask_mod.__name__ = f"{base.__name__}_and_{extra}_extra"
        return (num + blocks, grown, full_num, full_idx), mask_mod, start + blocks * \
            self.layout.block[1]

    def score_mod(self, table, device):
        """The ``score_mod`` for ``table`` (or ``None``) and the softcap; ``None`` when there is
        nothing to add. The last one is kept, so a training loop passing the same table
        (a parameter updated in place) reuses one function and one compiled kernel."""
        if table is None and self.softcap is None:
            return None
        last = self._score_mod
        if last is None or last[0] is not table or last[1] != str(device):
            fn = make_score_mod(self.shape, self.reach, table, self.softcap,
                                None if self._identity else self._perm, str(device),
                                padded=self._padded, key_shape=self.key_shape,
                                key_permutation=None if self._identity else self._kperm)
            self._score_mod = last = (table, str(device), fn)
        return last[2]

    def __call__(self, q, k, v, scale=None, rel_bias=None, additional_keys=None,
                 additional_values=None):
        """Attention of ``q`` over ``k, v`` under the compiled pattern.

        ``rel_bias``: ``None`` or a table ``(heads or 1, 2 * reach[0] + 1, ...)`` added by
        key-minus-query offset (:mod:`patterngen.bias`). ``additional_keys`` and
        ``additional_values``: ``(batch, heads, n_extra, head_dim)`` tokens outside the grid
        that every query attends besides its pattern, in the same softmax (NATTEN's): keys
        appended after the pattern's, in blocks of their own.

        Raises:
            PatternError: for wrong shapes, dtypes or devices, for gradients on CPU, and for
                a block size that compiled CPU FlexAttention runs wrongly on this CPU
                (:func:`check_cpu_block`).
        """
        import torch

        qf, kf, vf, restore = self.flatten_inputs(q, k, v)
        table = self.check_rel_bias(rel_bias, qf)
        extra = self.check_extra_keys(additional_keys, additional_values, qf, table,
                                      kf.shape[1])
        device = qf.device
        if device.type == "cpu" and torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (qf, kf, vf, table, *(extra or ()))):
            raise PatternError(
                "flex: gradients were requested on CPU, but FlexAttention has no CPU backward; "
                "run under torch.no_grad() / torch.inference_mode(), or use backend='sdpa' or "
                "'numba' for training on CPU.")
        if self.compile and device.type == "cpu":
            check_cpu_block(self.layout.block, qf.shape[-1])
        scale = scale if scale is not None else self.scale
        block_mask = self.block_mask_for(qf.shape[1], device, 0 if extra is None
                                         else extra[0].shape[2])
        if not self._identity:
            perm, inverse, kperm = self._permutation(device)
            qf, kf, vf = qf[:, :, perm], kf[:, :, kperm], vf[:, :, kperm]
        elif self.compile:  # the compiled kernel is specialised to strides: one layout
            qf, kf, vf = (t.contiguous() for t in (qf, kf, vf))
        if extra is not None:
            pad = self.layout.kv_blocks * self.layout.block[1] - kf.shape[2]
            tail = -extra[0].shape[2] % self.layout.block[1]
            kf, vf = (torch.cat([t, t.new_zeros(*t.shape[:2], pad, t.shape[3]), e,
                                 t.new_zeros(*t.shape[:2], tail, t.shape[3])], 2)
                      for t, e in zip((kf, vf), extra))
        if self.compile and not (device.type == "cpu" and non_finite(qf)):
            fn = _compiled_flex()
        else:
            # the compiled CPU kernel gives a query holding a NaN a finite output (torch
            # 2.13), where its scores, all NaN, give SDPA's NaN: eager FlexAttention does
            from torch.nn.attention.flex_attention import flex_attention as fn
        score_mod = self.score_mod(table, device)
        # masked pairs exist only in partial blocks: without any, every key is attended
        group = qf.shape[1] // kf.shape[1]
        if not (self._partial or extra is not None) or not non_finite(kf, vf):
            out = fn(qf, kf, vf, score_mod=score_mod, block_mask=block_mask, scale=scale,
                     enable_gqa=group > 1)
        else:
            if device.type == "cpu":  # the compiled CPU kernel lets a masked NaN score through
                from torch.nn.attention.flex_attention import flex_attention as fn
            # this path indexes k and v by the query's head: grouped ones are repeated for it
            kf, vf = (t.repeat_interleave(group, 1) for t in (kf, vf))
            out = _with_non_finite_values(fn, qf, kf, vf, score_mod, block_mask, scale, torch)
        if not self._identity:
            out = out[:, :, inverse]
        return restore(out)

    def forward_lse(self, q, k, v, scale, table=None):
        """``(out, lse)`` for checked, flattened ``(batch, heads, tokens, head_dim)`` inputs
        (``k``, ``v`` may have fewer heads) and a checked bias ``table``: FlexAttention with
        the log-sum-exp (gradients flow through both, on devices with a FlexAttention
        backward); the executor protocol's part (:mod:`patterngen.backends.executor`).

        Raises:
            PatternError: for keys or values that are not all finite with partial blocks
                (the rule :meth:`__call__` applies to them returns no log-sum-exp).
        """
        if self._partial and non_finite(k, v):
            raise PatternError(
                "flex: forward_lse got keys or values that are not all finite and the layout "
                "has partial blocks; expected finite k and v (call the backend itself for "
                "SDPA's rule on them).")
        from torch.nn.attention.flex_attention import AuxRequest

        if self.compile:
            fn = _compiled_flex()
        else:
            from torch.nn.attention.flex_attention import flex_attention as fn
        block_mask = self.block_mask_for(q.shape[1], q.device)
        if not self._identity:
            perm, inverse = self._permutation(q.device)
            q, k, v = (t[:, :, perm] for t in (q, k, v))
        out, aux = fn(q, k, v, score_mod=self.score_mod(table, q.device), block_mask=block_mask,
                      scale=scale, enable_gqa=q.shape[1] != k.shape[1],
                      return_aux=AuxRequest(lse=True))
        lse = aux.lse
        if not self._identity:
            out, lse = out[:, :, inverse], lse[:, :, inverse]
        return out, lse

    @functools.cached_property
    def _partial(self) -> bool:
        """Whether some block of the layout is partial (ragged edge tiles count)."""
        return any(not lay.tiles(pad_ragged=True)[2].all() for lay in self.layout.patterns)

    def _permutation(self, device):
        key = ("perm", str(device))
        if key not in self._cache:
            import torch

            self._cache[key] = (torch.as_tensor(self._perm, device=device),
                                torch.as_tensor(np.argsort(self._perm), device=device),
                                torch.as_tensor(self._kperm, device=device))
        return self._cache[key]


register_backend("flex", FlexBackend)
