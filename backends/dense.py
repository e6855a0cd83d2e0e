"""Dense attention kernels: one batch of small problems, a mask, and the log-sum-exp.

Every executor that computes attention over an explicit set of keys per problem calls these:
the dense terms and extra keys of the term-wise planner (``backends/planned/``), the query
blocks of the block-sparse backend (``backends/sdpa.py``) and the distributed partials
(``patterngen/distributed/attention.py``). Inputs are ``(batch, problems, rows, head_dim)``
(queries) against ``(batch, problems, keys, head_dim)``.

- :func:`softmax_attention` / :func:`matmul_backward`: matmul, softmax, matmul returning the
  log-sum-exp, and FlashAttention-2's backward from a merged ``out`` and ``lse``, with a mask
  (additive, or :class:`Holes`) and a :class:`ScoreMod` (softcap, bias); the exact path for a
  row whose scores are all ``-inf``.
- :func:`fused_forward` / :func:`fused_backward`: the fused kernels that return the
  log-sum-exp (CPU flash, CUDA memory-efficient) and take it back.
- :func:`attention`, :func:`matmul_attention`, :func:`masked_attention`,
  :func:`softcapped_attention`, :class:`FlashBias`: output only, with torch's
  autograd, for the block-sparse backend's groups (fast paths measured there, see each).
- :func:`cap` / :func:`cap_` / :func:`cap_grad_`: the softcap ``c * tanh(s / c)`` and its
  gradient factor ``1 - tanh^2``, once (the numba kernels have their own, generated; the oracle
  ``patterngen.reference`` stays independent on purpose).
"""

from __future__ import annotations

import math

import torch

from patterngen.backends.inputs import non_finite, unit_stride
from patterngen.backends.merge import acc_dtype

__all__ = ["MATMUL_KEYS", "matmul_is_faster", "Holes", "ScoreMod", "cap", "cap_", "cap_grad_",
           "bias_grad", "score_matrix", "KeptAttention", "softmax_attention", "matmul_backward",
           "fused_forward", "fused_backward", "attention", "masked_attention", "matmul_attention",
           "flash_bias_grad_ok", "FlashBias", "softcapped_attention"]

#: most keys per problem for which float32/float64 problems on CPU run as
#: matmul-softmax-matmul rather than the fused kernel: 0.45-0.8x its forward time up to 128
#: keys, about even at 256 (see :func:`matmul_attention`)
MATMUL_KEYS = 128


def matmul_is_faster(q, keys: int) -> bool:
    """Whether problems of ``keys`` keys with queries like ``q`` run faster as
    matmul-softmax-matmul than in the fused kernel: float32/float64 on CPU, at most
    :data:`MATMUL_KEYS` keys (read at call time, or for a lone dense term's direct path when a
    kind of call is first seen, so a test can move it)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and keys <= MATMUL_KEYS)


def cap(scores, softcap):
    """The softcap ``softcap * tanh(scores / softcap)``, with autograd."""
    return softcap * torch.tanh(scores / softcap)


def cap_(scores, softcap, keep_tanh: bool = False):
    """:func:`cap` in place; returns ``tanh(scores / softcap)`` when ``keep_tanh`` (what
    :func:`cap_grad_` needs), else ``None``."""
    scores.div_(softcap).tanh_()
    tanh = scores.clone() if keep_tanh else None
    scores.mul_(softcap)
    return tanh


def cap_grad_(grad, tanh):
    """The gradient of capped scores taken back through the cap, in place:
    ``grad * (1 - tanh^2)`` (``tanh`` is overwritten)."""
    return grad.mul_(tanh.mul_(tanh).neg_().add_(1.0))


class Holes:
    """A mask given by its few excluded entries (CCNet's diagonal): flat indices into each
    problem's scores (``shared``) or into all problems', filled with ``-inf`` after the GEMM,
    where adding a dense mask would take one more pass over every score."""

    def __init__(self, index, shared: bool):
        self.index, self.shared = index, shared


class ScoreMod:
    """Softcap (``c * tanh(s / c)``) then a bias ``(heads or 1, problems or 1, rows, keys)``
    added to the scores of ``(batch * heads, problems, rows, keys)``."""

    def __init__(self, softcap, bias, heads: int):
        self.softcap, self.bias, self.heads = softcap, bias, heads

    def apply(self, scores, keep_tanh: bool = False):
        """Modify ``scores`` in place; returns ``tanh(s / c)`` when ``keep_tanh`` (the
        backward's chain rule needs it), else ``None``."""
        tanh = None
        if self.softcap is not None and scores.requires_grad:
            # autograd (the protocol's parts): in place, the mask's add would overwrite the
            # output tanh saved for its backward
            scores.copy_(cap(scores, self.softcap))
        elif self.softcap is not None:
            tanh = cap_(scores, self.softcap, keep_tanh)
        if self.bias is not None:
            scores.view(-1, self.heads, *scores.shape[1:]).add_(self.bias.to(scores.dtype))
        return tanh


def bias_grad(grad, shape):
    """``grad`` (``(batch, heads, problems, rows, keys)``) summed to a bias of ``shape``
    ``(heads or 1, problems or 1, rows, keys)``. Over problems it is a GEMV with ones (torch's
    reduction over a middle dimension took 3x as long on Swin's 64 windows), then over the
    batch."""
    b, h, p, n, k = grad.shape
    if shape[1] == 1 and p > 1:
        grad = torch.matmul(grad.new_ones(1, p), grad.view(b, h, p, n * k)).view(b, h, 1, n, k)
    return grad.sum(0).sum_to_size(shape)


def score_matrix(q, k, mask, scale, mod=None, keep_tanh: bool = False):
    """``scale * q k^T`` (``(..., rows, keys)``, a problem per leading index), modified by
    ``mod`` (a :class:`ScoreMod`), with ``mask`` added: an additive tensor, a :class:`Holes`,
    or ``None``. With ``keep_tanh``, returns ``(scores, tanh)``.

    The scale is the GEMM's alpha, no pass of its own, and the rest is in place (no
    autograd: :class:`KeptAttention` records the whole as one node)."""
    *lead, n, d = q.shape  # (batch, problems) or more leading dimensions
    keys = k.shape[-2]
    # a bmm's operands already: no reshape and no view back (each torch call, a view
    # included, is about 1 us of a 0.2 ms call)
    flat = q.dim() == k.dim() == 3
    q3 = q if flat else q.reshape(-1, n, d)
    k3 = (k if flat else k.reshape(-1, keys, d)).transpose(1, 2)
    scores = torch.empty(math.prod(lead), n, keys, dtype=q.dtype, device=q.device)
    scores.baddbmm_(q3, k3, beta=0, alpha=scale)
    scores = scores if flat else scores.view(*lead, n, keys)
    tanh = mod.apply(scores, keep_tanh) if mod is not None else None
    if isinstance(mask, Holes):
        rows = scores.view(-1, n * keys) if mask.shared else scores.view(lead[0], -1)
        rows.index_fill_(1, mask.index, float("-inf"))
    elif mask is not None:
        scores.add_(mask)
    return (scores, tanh) if keep_tanh else scores


class KeptAttention(torch.autograd.Function):
    """``softmax(scale q k^T + bias + mask) v`` with its probabilities kept for the backward,
    as one autograd node: a lone dense term's training (Swin's and MaxViT's windows, where
    keeping 49 x 49 probabilities took 0.67-0.93x the time of recomputing them from the
    log-sum-exp, docs/swin.md). Recorded op by op, the scale was a pass over the scores and
    one over their gradient; here it is the GEMMs' alpha both ways.

    ``q`` ``(..., rows, d)``, ``k`` and ``v`` ``(..., keys, d)`` with the same leading
    dimensions (contiguous: a bmm's operands); ``bias`` ``(heads, 1 or problems, rows,
    keys)`` over ``(batch, heads, problems)`` leading dimensions (see :class:`ScoreMod`),
    its gradient summed by :func:`bias_grad`; ``mask`` additive, without a gradient."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, heads):
        *lead, n, d = q.shape
        keys = k.shape[-2]
        mod = None if bias is None else ScoreMod(None, bias, heads)
        p = torch.softmax(score_matrix(q, k, mask, scale, mod), -1).view(-1, n, keys)
        q3, k3, v3 = q.reshape(-1, n, d), k.reshape(-1, keys, d), v.reshape(-1, keys, d)
        ctx.save_for_backward(q3, k3, v3, p)
        ctx.scale, ctx.heads, ctx.lead = scale, heads, lead
        ctx.bias_shape = None if bias is None else bias.shape
        return torch.bmm(p, v3).view(*lead, n, v.shape[-1])

    @staticmethod
    def backward(ctx, dout):
        q, k, v, p = ctx.saved_tensors
        # a loss's broadcast gradient (out.sum()'s, stride 0) made contiguous: torch's CPU
        # bmm runs a gradient it cannot hand to one batched GEMM one problem at a time,
        # copying each operand, on one thread (MaxViT's grid, 128 problems of 49 x 49: the
        # backward 1.8x the time of a contiguous gradient's at two threads)
        dout = dout.contiguous().view(p.shape[0], p.shape[1], -1)
        need_q, need_k, need_v, need_bias = ctx.needs_input_grad[:4]
        dv = torch.bmm(p.transpose(1, 2), dout) if need_v else None
        ds = torch._softmax_backward_data(torch.bmm(dout, v.transpose(1, 2)), p, -1, p.dtype)
        dbias = None
        if need_bias:
            dbias = bias_grad(ds.view(-1, ctx.heads, *ctx.lead[1:], *ds.shape[1:]),
                              ctx.bias_shape)
        dq = _scaled_bmm(ds, k, ctx.scale) if need_q else None
        dk = _scaled_bmm(ds.transpose(1, 2), q, ctx.scale) if need_k else None
        lead = ctx.lead
        return (None if dq is None else dq.view(*lead, *dq.shape[1:]),
                None if dk is None else dk.view(*lead, *dk.shape[1:]),
                None if dv is None else dv.view(*lead, *dv.shape[1:]), dbias, None, None, None)


#: rows shorter than this take :func:`softmax_attention`'s own softmax on CPU (float32, float64)
SHORT_ROWS = 16


def softmax_attention(q, k, v, mask, scale, need_lse: bool, mod=None):
    """``(out, lse (..., rows, 1))`` by baddbmm, softmax, bmm (``lse`` ``None`` unless
    ``need_lse``). The log-sum-exp comes from two row maxima, ``max S - log(max P)``: one
    fused softmax and two reads of the scores, where ``logsumexp`` then exp would take six
    passes. A row whose scores are all ``-inf`` (no key, or keys of ``-inf`` score) attends
    nothing: output 0, ``lse = -inf``, as SDPA on that query's keys alone. Such a row's
    scores are zeroed first, so that its softmax's ``0 / 0`` puts no NaN into the output:
    CPU's bfloat16 GEMM carries a NaN row of the probabilities into other rows (measured:
    a padded tile's dead rows turned its live rows NaN), and with autograd (the distributed
    partials) into the gradients."""
    scores = score_matrix(q, k, mask, scale, mod)
    top = scores.amax(dim=-1, keepdim=True)
    dead = top == float("-inf")
    any_dead = bool(dead.any())
    if any_dead:
        scores = (scores.masked_fill(dead, 0.0) if scores.requires_grad
                  else scores.masked_fill_(dead, 0.0))
    if scores.shape[-1] < SHORT_ROWS and scores.device.type == "cpu" \
            and scores.dtype in (torch.float32, torch.float64) and not scores.requires_grad:
        # torch's CPU softmax is 6x slower per row below 16 keys (measured: 2730 rows of 12,
        # 526 us against 80 by its formula, with the row maxima at hand); half precision
        # keeps torch's, which sums in float32
        shift = top.masked_fill(dead, 0.0) if any_dead else top
        probs = scores.sub_(shift).exp_()
        total = probs.sum(dim=-1, keepdim=True)
        probs.div_(total)
        lse = shift + total.log()
    else:
        probs = torch.softmax(scores, dim=-1)
        lse = top - probs.amax(dim=-1, keepdim=True).log() if need_lse else None
    out = probs @ v
    if any_dead:
        out = out.masked_fill(dead, 0.0)
    if not need_lse:
        return out, None
    return out, lse.masked_fill(dead, float("-inf"))


def matmul_backward(q, k, v, out, lse, dout, mask, scale, mod=None, delta=None):
    """FlashAttention-2's backward by batched matmuls: ``P = exp(S - lse)``,
    ``dS = P (dout v^T - rowsum(dout * out))``; through a softcap,
    ``dS_raw = dS (1 - tanh^2)``. ``delta``: ``rowsum(dout * out)`` when the caller has it
    (``out`` is then not read). Returns ``(dq, dk, dv, dbias)``, ``dbias`` the score
    gradient summed to the bias's ``(heads or 1, problems or 1, rows, keys)`` (``None``
    without)."""
    p, tanh = score_matrix(q, k, mask, scale, mod, keep_tanh=True)
    p.sub_(lse.to(p.dtype)).exp_()
    if delta is None:
        delta = (dout * out).sum(-1, keepdim=True)
    ds = (dout @ v.transpose(-1, -2)).sub_(delta).mul_(p)
    dbias = None
    if mod is not None and mod.bias is not None:
        dbias = bias_grad(ds.view(-1, mod.heads, *ds.shape[1:]), mod.bias.shape)
    if tanh is not None:
        ds = cap_grad_(ds, tanh)
    dq = _scaled_bmm(ds, k, scale)
    dk = _scaled_bmm(ds.transpose(-1, -2), q, scale)
    dv = p.transpose(-1, -2) @ dout
    return dq, dk, dv, dbias


def _scaled_bmm(a, b, alpha):
    """``alpha * a @ b`` for ``(..., n, m) @ (..., m, d)``, the scale as the GEMM's alpha (no
    pass of its own)."""
    lead = a.shape[:-2]
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    out = torch.empty(a3.shape[0], a3.shape[1], b3.shape[2], dtype=a.dtype, device=a.device)
    return out.baddbmm_(a3, b3, beta=0, alpha=alpha).view(*lead, *out.shape[1:])


def fused_forward(q, k, v, mask, scale):
    """The fused kernel that returns the log-sum-exp: ``(out, lse (B, P, rows))``.

    On CPU, problems of fewer than :data:`SHORT_ROWS` keys get a zero mask when they have
    none: without one, the kernel's row maximum over fewer keys than a vector drops a NaN,
    so a query with a NaN gave zeros and a finite log-sum-exp (with a mask it gives NaN, as
    SDPA on its keys does). Half-precision queries holding an infinity run in float32
    (:func:`_half_inf_query`)."""
    if _half_inf_query(q):
        out, lse = fused_forward(q.float(), k.float(), v.float(),
                                 None if mask is None else mask.float(), scale)
        return out.to(q.dtype), lse
    q, k, v = unit_stride(q, k, v)
    if mask is None and q.device.type == "cpu" and k.shape[-2] < SHORT_ROWS:
        mask = q.new_zeros(1, 1, 1, k.shape[-2])
    if q.device.type == "cuda":
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, mask.expand(q.shape[0], *mask.shape[1:]) if mask is not None else None,
            True, 0.0, False, scale=scale)
        return out, lse[..., :q.shape[2]]  # padded to a multiple of 32 rows
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    return out, lse


def fused_backward(q, k, v, out, lse, dout, mask, scale):
    lse = lse.to(acc_dtype(q.dtype)).contiguous()
    q, k, v = unit_stride(q, k, v)
    if q.device.type == "cuda":
        # the forward returned the log-sum-exp padded to a multiple of 32 rows; the backward
        # reads it with that length
        lse = torch.nn.functional.pad(lse.float(), (0, -q.shape[2] % 32)).contiguous()
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        bias = mask.expand(q.shape[0], *mask.shape[1:]) if mask is not None else None
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dout.contiguous(), q, k, v, bias, out.contiguous(), lse, seed, seed, 0.0,
            [True, True, True, False], False, scale=scale)
        return dq, dk, dv
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.contiguous(), q, k, v, out.contiguous(), lse, 0.0, False, attn_mask=mask,
        scale=scale)


def attention(q, k, v, scale, softcap=None, add=None):
    """Attention with an optional softcap and additive mask/bias ``add`` (half-precision
    queries holding an infinity in float32, :func:`_half_inf_query`)."""
    if softcap is not None:
        return softcapped_attention(q, k, v, scale, softcap, add)
    if _half_inf_query(q):
        return attention(q.float(), k.float(), v.float(), scale, None,
                         None if add is None else add.float()).to(q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=scale)


def _half_inf_query(q) -> bool:
    """Whether a CPU half-precision ``q`` holds an infinity (or a NaN), which the fused
    bfloat16 kernel turns into a row of zeros where SDPA's rule on its keys gives NaN
    (torch 2.13; float32 gives the rule's NaN): one pass over q, on half-precision CPU calls
    only."""
    return (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)
            and non_finite(q))


def _autograd_scores(q, k, scale, softcap):
    """``scale * q k^T``, capped when ``softcap`` is set, in :func:`acc_dtype` (half precision
    rounded only after the softmax, as the fused kernels do), with autograd."""
    work = acc_dtype(q.dtype)
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
    return scores if softcap is None else cap(scores, softcap)


def masked_attention(q, k, v, scale, softcap, add, need_lse: bool = False):
    """Attention of a partial block where keys or values are not all finite, by the rule of
    SDPA run on each query's attended keys alone; ``(out, lse (..., rows, 1))`` with
    ``need_lse`` (``-inf`` for a query that attends nothing).

    The fused kernels add ``-inf`` to a masked key's score and multiply its value by a zero
    probability, so a NaN there poisons every query of the block. Here masked scores are
    replaced (not added to), a query whose attended scores are all ``-inf`` gets zeros, and
    the values' non-finite entries are applied entry by entry to the queries that attend their
    key, ``P_ij * v_jc`` (so ``0 * inf`` stays NaN as in SDPA): they are few, and this path
    runs only when there are some."""
    work = acc_dtype(q.dtype)
    scores = _autograd_scores(q, k, scale, softcap)
    seen = (add > float("-inf")).expand(scores.shape)
    scores = torch.where(seen, scores + add, float("-inf"))
    probs = torch.where(scores.amax(-1, keepdim=True) == float("-inf"), 0.0,
                        scores.softmax(-1))
    finite = torch.isfinite(v)
    out = torch.matmul(probs, torch.where(finite, v, 0).to(work))
    rows, blocks, keys, dims = (~finite).nonzero(as_tuple=True)
    if len(rows):
        term = torch.where(seen[rows, blocks, :, keys], probs[rows, blocks, :, keys]
                           * v[rows, blocks, keys, dims].to(work)[:, None], 0.0)
        queries = torch.arange(q.shape[-2], device=q.device)
        out = out.index_put((rows[:, None], blocks[:, None], queries, dims[:, None]), term,
                            accumulate=True)
    if need_lse:
        return out.to(q.dtype), torch.logsumexp(scores, dim=-1, keepdim=True)
    return out.to(q.dtype)


def matmul_attention(q, k, v, scale, add=None):
    """Mask-free attention of ``(batch * heads, blocks, rows, dim)`` blocks as baddbmm, softmax
    and bmm.

    For small blocks on CPU this beats the fused kernel, which works through each block in
    chunks of 32 queries with two small GEMM calls each: 0.45-0.8x its time up to 128 keys
    (Swin's 49-token windows: 0.55-0.6x), about even at 256, slower beyond (float32, head_dim
    32 and 64, 2 threads). Its backward is not: autograd through these ops took 1.5x the fused
    kernel's forward+backward on Swin windows, so it only runs without autograd. The scale is
    the GEMM's ``alpha`` rather than one more op: each op is a parallel region, and on shared
    cores every region can wait out another process's time slice. ``baddbmm_`` fills the
    scores in place; ``baddbmm`` would allocate a second scores buffer, and the extra 2.4 MB
    per Swin call showed up as page faults and a slow tail. A bias ``add`` (broadcasting to
    the scores) is copied into the buffer first and accumulated onto (``beta=1``).
    """
    shape = q.shape
    scores = q.new_empty(*shape[:-1], k.shape[-2])
    if add is not None:
        scores.copy_(add)
    q, k, v = (t.reshape(-1, t.shape[-2], t.shape[-1]) for t in (q, k, v))
    scores = scores.view(q.shape[0], q.shape[1], k.shape[1])
    scores.baddbmm_(q, k.transpose(1, 2), beta=0 if add is None else 1, alpha=scale)
    return torch.bmm(scores.softmax(-1), v).view(shape)


def flash_bias_grad_ok(q, add) -> bool:
    """Whether a CPU call whose bias needs a gradient can run the fused kernel both ways."""
    return (add is not None and add.requires_grad and torch.is_grad_enabled()
            and q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


class FlashBias(torch.autograd.Function):
    """The fused CPU kernel, forward and backward, plus the gradient of its additive mask:
    ``FlashBias.apply(q, k, v, bias, scale)`` (where :func:`flash_bias_grad_ok`).

    SDPA falls back to its unfused math path on CPU when the mask needs a gradient (measured
    3x the time of the fused kernel with a 7x7 window's bias table, ``bench_bias.py``). Here
    the fused kernel computes q, k, v and their gradients (:func:`fused_forward`,
    :func:`fused_backward`), and the mask's gradient is the scores' gradient rebuilt from the
    saved log-sum-exp: ``P * (dO V^T - rowsum(dO * O))`` with
    ``P = exp(scale q k^T + mask - lse)`` (zero where the mask is ``-inf``), summed over the
    dimensions the mask broadcasts over.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        q, k, v = unit_stride(q, k, v)
        out, lse = fused_forward(q, k, v, bias, scale)
        ctx.save_for_backward(q, k, v, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, bias, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = fused_backward(q, k, v, out, lse, grad, bias, ctx.scale)
        scores = torch.matmul(q, k.transpose(-1, -2)).mul_(ctx.scale).add_(bias)
        probs = scores.sub_(lse.to(q.dtype)[..., None]).exp_()
        dp = torch.matmul(grad, v.transpose(-1, -2))
        dbias = probs.mul_(dp.sub_((grad * out).sum(-1, keepdim=True)))
        return dq, dk, dv, dbias.sum_to_size(bias.shape), None


def softcapped_attention(q, k, v, scale, softcap, add):
    """``softmax(c * tanh(scale * q.k / c) + add) @ v`` with autograd; half precision computes
    the scores in float32 (the fused kernels' accuracy)."""
    scores = _autograd_scores(q, k, scale, softcap)
    if add is not None:
        scores = scores + add
    return torch.matmul(scores.softmax(-1).to(v.dtype), v)
