"""Numba CPU backend: attention kernels generated as Python source from the IR, then compiled.

Two stages, kept apart as in finch's ``numba_codegen``:

- :func:`generate` turns an IR into the source text of one module (pure and deterministic: the
  same IR structure and dtype always give the same text). Every term becomes one loop per grid
  axis over that term's key progression, written by :meth:`patterngen.ir.Rel.bounds` on
  :class:`~patterngen.ir.Src` names, so the atoms' constants are folded and no mask is tested
  inside a term. A union visits its terms in order and skips a key when an earlier term
  already holds it, so every key is visited once.
- :func:`load` writes that text to a cache directory, imports it with ``importlib`` (a fresh
  module namespace, with only the imports the text declares) and returns the module, whose
  functions are ``numba.njit(nogil=True, cache=True)``: numba's on-disk cache then survives
  the process. Grid extents are runtime arguments, so a new grid with the same structure reuses
  the compiled kernels. :func:`_run` spreads a kernel's work items over threads.

:class:`NumbaBackend` wraps the kernels in a ``torch.autograd.Function``: forward is an online
softmax over chunks of keys that saves the log-sum-exp; backward recomputes the probabilities
from it (FlashAttention-2: ``D = rowsum(dO * O)``, ``dS = P * (dP - D)``). No tokens x tokens
buffer is ever built. A query without keys outputs zeros and gets zero gradients.

Example:
    >>> import torch, patterngen as pg
    >>> attn = pg.compile(pg.window(3), grid=(8,), backend="numba")
    >>> q = k = v = torch.randn(1, 2, 8, 4)
    >>> attn(q, k, v).shape
    torch.Size([1, 2, 8, 4])
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import importlib.util
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

from patterngen import ir
from patterngen.backends import Backend, register_backend
from patterngen.errors import PatternError
from patterngen.grid import is_number

__all__ = ["NumbaBackend", "generate", "load", "cache_dir"]

log = logging.getLogger(__name__)

#: queries per parallel work item in the forward kernel
QUERY_TILE = 32
#: scores held before an online-softmax rescale; bounds the per-thread scratch
KEY_CHUNK = 128
#: without ``nnan``/``ninf``: the kernels rely on ``-inf`` for "no key yet"
FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})
DTYPES = {"float32": "np.float32", "float64": "np.float64"}


# --------------------------------------------------------------------------------------------
# generate: IR -> source text


class _Emitter:
    """Lines of source with an indentation level; :meth:`block` opens a nested scope."""

    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def __call__(self, line: str = "") -> None:
        self.lines.append("    " * self.depth + line if line else "")

    @contextlib.contextmanager
    def block(self, header: str):
        self(header)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _prologue(ndim: int) -> str:
    return ", ".join(f"n{a}" for a in range(ndim))


def _unflatten(em: _Emitter, ndim: int) -> None:
    """Query coordinates ``i0..`` from the flat row-major index ``iq``."""
    rest = "iq"
    for a in range(ndim - 1):
        inner = " * ".join(f"n{b}" for b in range(a + 1, ndim))
        em(f"i{a} = {rest} // ({inner})")
        if a < ndim - 2:
            em(f"r{a} = {rest} - i{a} * ({inner})")
            rest = f"r{a}"
        else:
            em(f"i{ndim - 1} = {rest} - i{a} * ({inner})")
    if ndim == 1:
        em("i0 = iq")


def _visit(node, em: _Emitter, ctx: dict) -> None:
    """Emit ``node``: the structural walk of the generator (one case per IR node)."""
    match node:
        case ir.HeadsIR() | ir.IR():
            ctx["ndim"] = node.grid.ndim
            for index, head in enumerate(_distinct_heads(node)):
                ctx["kernel"] = index
                _emit_forward(head, em, ctx)
                em()
                em()
                _emit_backward(head, em, ctx)
                em()
                em()
        case ir.Term():
            _emit_term_loops(node, em, ctx)
        case ir.Rel():
            a, t = ctx["axis"], ctx["term"]
            start, stop = node.bounds(ir.Src(f"i{a}"), ir.Src(f"n{a}"), ir.SOURCE_OPS)
            em(f"lo{t}_{a} = {start}")
            em(f"hi{t}_{a} = {stop}")
        case _:
            raise PatternError(f"Unrecognized node {node!r} of type {type(node).__name__}; "
                               f"the numba generator handles IR, HeadsIR, Term and Rel.")


def _distinct_heads(node) -> list:
    out = []
    for head in node.per_head:
        if head.terms not in [h.terms for h in out]:
            out.append(head)
    return out


def _emit_bounds(head: ir.IR, em: _Emitter, ctx: dict) -> None:
    """Per query, every term's per-axis ``[lo, hi)``: loops and membership tests read them."""
    for t, term in enumerate(head.terms):
        for a, rel in enumerate(term.rels):
            ctx["axis"], ctx["term"] = a, t
            _visit(rel, em, ctx)


def _member(t: int, a: int, rel: ir.Rel) -> str:
    test = f"lo{t}_{a} <= p{a} < hi{t}_{a}"
    step = rel.step
    return test if step == 1 else f"{test} and (p{a} - lo{t}_{a}) % {step} == 0"


def _emit_term_loops(term: ir.Term, em: _Emitter, ctx: dict) -> None:
    """One loop per axis over term ``ctx['term']``'s keys; ``ctx['body']`` emits one key.

    Keys held by an earlier term are skipped: the earlier term's membership on axis ``a`` is
    known once ``p0..pa`` are, so it is computed at that loop depth and tested at the last.
    """
    t, earlier, last = ctx["term"], ctx["terms"][:ctx["term"]], len(term.rels) - 1
    with contextlib.ExitStack() as scopes:
        for a, rel in enumerate(term.rels):
            step = f", {rel.step}" if rel.step != 1 else ""
            scopes.enter_context(em.block(f"for p{a} in range(lo{t}_{a}, hi{t}_{a}{step}):"))
            em(f"k{a} = p{a}" if a == 0 else f"k{a} = k{a - 1} * n{a} + p{a}")
            tests = []
            for u, other in enumerate(earlier):
                prev = f"c{u}_{a - 1} and " if a else ""
                tests.append(f"{prev}{_member(u, a, other.rels[a])}")
                if a < last:
                    em(f"c{u}_{a} = {tests[-1]}")
            if a == last and tests:
                with em.block("if " + " or ".join(f"({x})" for x in tests) + ":"):
                    em("continue")
        ctx["body"](em, f"k{last}")


def _emit_keys(head: ir.IR, em: _Emitter, ctx: dict, body) -> None:
    ctx["terms"], ctx["body"] = head.terms, body
    for t, term in enumerate(head.terms):
        ctx["term"] = t
        em(f"# term {t}: {term!r}" + (" (keys of earlier terms skipped)" if t else ""))
        _visit(term, em, ctx)


def _emit_forward(head: ir.IR, em: _Emitter, ctx: dict) -> None:
    ndim, idx = ctx["ndim"], ctx["kernel"]
    tokens = " * ".join(f"n{a}" for a in range(ndim))
    em("@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)")
    with em.block(f"def forward_{idx}(q, k, v, scale, {_prologue(ndim)}, heads, out, lse, "
                  f"start, stop):"):
        em(f'"""Pattern {idx}: out and log-sum-exp of work items ``start..stop``.')
        em()
        em("Item ``w`` is a tile of QUERY_TILE queries of batch ``w // (nh * tiles)`` and head")
        em("``heads[w // tiles % nh]``; the caller runs disjoint ranges on several threads.")
        em('"""')
        em("dim = q.shape[3]")
        em(f"tokens = {tokens}")
        em("tiles = (tokens + QUERY_TILE - 1) // QUERY_TILE")
        em("nh = heads.shape[0]")
        with em.block("for w in range(start, stop):"):
            em("b = w // (nh * tiles)")
            em("h = heads[(w // tiles) % nh]")
            em("first = (w % tiles) * QUERY_TILE")
            em("qb, kb, vb, ob = q[b, h], k[b, h], v[b, h], out[b, h]")
            em("qs = np.empty(dim, ACC)")
            em("acc = np.empty(dim, ACC)")
            em("scores = np.empty(KEY_CHUNK, ACC)")
            em("keys = np.empty(KEY_CHUNK, np.int64)")
            em("bits = np.empty(KEY_CHUNK, BITS)")
            with em.block("for iq in range(first, min(first + QUERY_TILE, tokens)):"):
                _unflatten(em, ndim)
                _emit_bounds(head, em, ctx)
                with em.block("for d in range(dim):"):
                    em("qs[d] = qb[iq, d] * scale")
                    em("acc[d] = 0.0")
                em("m = ACC(-np.inf)")
                em("l = ACC(0.0)")
                em("cnt = 0")

                def body(em, key):
                    em("s = ACC(0.0)")
                    with em.block("for d in range(dim):"):
                        em(f"s += qs[d] * kb[{key}, d]")
                    em("scores[cnt] = s")
                    em(f"keys[cnt] = {key}")
                    em("cnt += 1")
                    with em.block("if cnt == KEY_CHUNK:"):
                        em("m, l = _softmax_chunk(scores, keys, bits, cnt, m, l, acc, vb)")
                        em("cnt = 0")

                _emit_keys(head, em, ctx, body)
                with em.block("if cnt > 0:"):
                    em("m, l = _softmax_chunk(scores, keys, bits, cnt, m, l, acc, vb)")
                em("_finish_row(ob, lse, b, h, iq, acc, m, l)")


def _emit_backward(head: ir.IR, em: _Emitter, ctx: dict) -> None:
    ndim, idx = ctx["ndim"], ctx["kernel"]
    tokens = " * ".join(f"n{a}" for a in range(ndim))
    em("@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)")
    with em.block(f"def backward_{idx}(q, k, v, out, dout, lse, scale, {_prologue(ndim)}, heads, "
                  f"dq, dk, dv, start, stop):"):
        em(f'"""Pattern {idx}: dq, and dk, dv per split ``dk[s]`` (zero on entry), of items '
           f'``start..stop``.')
        em()
        em("Item ``w`` is split ``w % splits`` of the queries of batch ``w // (nh * splits)`` and")
        em("head ``heads[w // splits % nh]``: it alone writes its dk and dv copy.")
        em('"""')
        em("dim, splits = q.shape[3], dk.shape[0]")
        em(f"tokens = {tokens}")
        em("nh = heads.shape[0]")
        with em.block("for w in range(start, stop):"):
            em("b = w // (nh * splits)")
            em("h = heads[(w // splits) % nh]")
            em("split = w % splits")
            em("qb, kb, vb, ob, dob = q[b, h], k[b, h], v[b, h], out[b, h], dout[b, h]")
            em("dqb, dkb, dvb = dq[b, h], dk[split, b, h], dv[split, b, h]")
            em("dqa = np.empty(dim, ACC)")
            em("qs = np.empty(dim, ACC)")
            em("dos = np.empty(dim, ACC)")
            em("scores = np.empty(KEY_CHUNK, ACC)")
            em("dps = np.empty(KEY_CHUNK, ACC)")
            em("keys = np.empty(KEY_CHUNK, np.int64)")
            em("bits = np.empty(KEY_CHUNK, BITS)")
            with em.block("for iq in range(split * tokens // splits, "
                          "(split + 1) * tokens // splits):"):
                em("lse_q = lse[b, h, iq]")
                with em.block("if lse_q == np.inf:"):
                    em("dqb[iq, :] = 0.0")
                    em("continue")
                em("delta = ACC(0.0)")
                with em.block("for d in range(dim):"):
                    em("delta += dob[iq, d] * ob[iq, d]")
                    em("qs[d] = qb[iq, d] * scale")
                    em("dos[d] = dob[iq, d]")
                    em("dqa[d] = 0.0")
                _unflatten(em, ndim)
                _emit_bounds(head, em, ctx)
                em("cnt = 0")
                flush = ("_backward_chunk(scores, dps, keys, bits, cnt, delta, qs, dos, kb, dqa, "
                         "dkb, dvb)")

                def body(em, key):
                    em("s = ACC(0.0)")
                    em("dp = ACC(0.0)")
                    with em.block("for d in range(dim):"):
                        em(f"s += qs[d] * kb[{key}, d]")
                        em(f"dp += dos[d] * vb[{key}, d]")
                    em("scores[cnt] = s - lse_q")
                    em("dps[cnt] = dp")
                    em(f"keys[cnt] = {key}")
                    em("cnt += 1")
                    with em.block("if cnt == KEY_CHUNK:"):
                        em(flush)
                        em("cnt = 0")

                _emit_keys(head, em, ctx, body)
                em(flush)
                with em.block("for d in range(dim):"):
                    em("dqb[iq, d] = dqa[d] * scale")


_HELPERS = '''\
@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _softmax_chunk(scores, keys, bits, cnt, m, l, acc, vb):
    \"\"\"Fold ``cnt`` scores into the running max ``m``, sum ``l`` and output ``acc``.\"\"\"
    top = m
    for c in range(cnt):
        top = max(top, scores[c])
    alpha = math.exp(m - top)
    l *= alpha
    dim = acc.shape[0]
    for d in range(dim):
        acc[d] *= alpha
    _exp_shifted(scores, bits, cnt, top)
    for c in range(cnt):
        l += scores[c]
    c = 0
    # four keys per pass over acc: a quarter of the loads and stores of acc
    while c + 4 <= cnt:
        p0, p1, p2, p3 = scores[c], scores[c + 1], scores[c + 2], scores[c + 3]
        k0, k1, k2, k3 = keys[c], keys[c + 1], keys[c + 2], keys[c + 3]
        for d in range(dim):
            acc[d] += p0 * vb[k0, d] + p1 * vb[k1, d] + p2 * vb[k2, d] + p3 * vb[k3, d]
        c += 4
    while c < cnt:
        p0, k0 = scores[c], keys[c]
        for d in range(dim):
            acc[d] += p0 * vb[k0, d]
        c += 1
    return top, l


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _backward_chunk(scores, dps, keys, bits, cnt, delta, qs, dos, kb, dqa, dkb, dvb):
    \"\"\"Gradients of ``cnt`` keys of one query: ``P = exp(S - lse)``, ``dS = P (dP - D)``.

    ``qs`` is the query already scaled, so ``dk += dS q scale``; the caller scales ``dqa``.
    \"\"\"
    _exp_shifted(scores, bits, cnt, ACC(0.0))
    dim = dqa.shape[0]
    for c in range(cnt):
        p, key = scores[c], keys[c]
        ds = p * (dps[c] - delta)
        for d in range(dim):
            dqa[d] += ds * kb[key, d]
        for d in range(dim):
            dkb[key, d] += ds * qs[d]
        for d in range(dim):
            dvb[key, d] += p * dos[d]


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _finish_row(ob, lse, b, h, iq, acc, m, l):
    \"\"\"Normalise one output row; a query without keys gets zeros and ``lse = +inf``.\"\"\"
    if l > 0.0:
        inv = ACC(1.0) / l
        for d in range(acc.shape[0]):
            ob[iq, d] = acc[d] * inv
        lse[b, h, iq] = m + math.log(l)
    else:
        ob[iq, :] = 0.0
        lse[b, h, iq] = np.inf
'''

# exp(x - top) in place over a chunk, by dtype: float32 takes a polynomial that vectorises
# (numba has no vector exp without SVML); float64 keeps math.exp for full precision
_EXP = {
    "float32": '''\
@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _exp_shifted(x, bits, cnt, top):
    \"\"\"``x[c] = exp(x[c] - top)``: 2**n from exponent bits, 2**f by Taylor on |f| <= 1/2.\"\"\"
    scale = bits.view(np.float32)
    for c in range(cnt):
        t = max((x[c] - top) * np.float32(1.4426950408889634), np.float32(-126.0))
        n = np.floor(t + np.float32(0.5))
        f = (t - n) * np.float32(0.6931471805599453)
        x[c] = np.float32(1.0) + f * (np.float32(1.0) + f * (np.float32(0.5) + f * (
            np.float32(1.0 / 6) + f * (np.float32(1.0 / 24) + f * (
                np.float32(1.0 / 120) + f * np.float32(1.0 / 720))))))
        bits[c] = (np.int32(n) + np.int32(127)) << np.int32(23)
    for c in range(cnt):
        x[c] *= scale[c]
''',
    "float64": '''\
@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def _exp_shifted(x, bits, cnt, top):
    \"\"\"``x[c] = exp(x[c] - top)``.\"\"\"
    for c in range(cnt):
        x[c] = math.exp(x[c] - top)
''',
}
_BITS = {"float32": "np.int32", "float64": "np.int64"}


def _header(node, dtype: str) -> str:
    lines = [f'"""patterngen numba kernels for {node.label or "?"} ({dtype}).', ""]
    lines.append("Generated by patterngen.backends.numba_cpu.generate; do not edit. Grid extents")
    lines.append("n0.. are runtime arguments: any grid with this structure reuses these kernels.")
    for index, head in enumerate(_distinct_heads(node)):
        lines.append("")
        lines.append(f"Pattern {index}: {head.label or '?'}")
        for t, term in enumerate(head.terms):
            lines.append(f"    term {t}: {term!r}")
    if isinstance(node, ir.HeadsIR):
        lines.append("")
        lines.append(f"Head h uses pattern {_head_map(node)}[h % {len(node.heads)}].")
    lines.append('"""')
    return "\n".join(lines) + "\n"


def _head_map(node) -> list[int]:
    """Index of each listed head's kernel in :func:`_distinct_heads`."""
    distinct = [h.terms for h in _distinct_heads(node)]
    return [distinct.index(h.terms) for h in node.per_head]


def generate(node, dtype: str = "float32") -> str:
    """The source of the module that computes ``node``'s attention in ``dtype``.

    Pure and deterministic: the text depends on the IR's terms and ``dtype`` only, never on
    the grid's extents, which the kernels take as arguments ``n0, n1, ...``.

    Args:
        node: an :class:`~patterngen.ir.IR` or :class:`~patterngen.ir.HeadsIR`.
        dtype: ``"float32"`` or ``"float64"``; scores, softmax and accumulators use it.

    Raises:
        PatternError: for an unsupported dtype or an unrecognised IR node.

    Example:
        >>> import patterngen as pg
        >>> src = generate(pg.lower(pg.window(3), (8,)))
        >>> "for p0 in range(lo0_0, hi0_0):" in src
        True
    """
    if dtype not in DTYPES:
        raise PatternError(f"Unsupported dtype={dtype!r} for the numba backend; supported "
                           f"dtypes are {tuple(DTYPES)}.")
    em = _Emitter()
    em("import math")
    em()
    em("import numba")
    em("import numpy as np")
    em()
    em(f"ACC = {DTYPES[dtype]}")
    em(f"QUERY_TILE = {QUERY_TILE}")
    em(f"BITS = {_BITS[dtype]}")
    em(f"KEY_CHUNK = {KEY_CHUNK}")
    em("FASTMATH = {" + ", ".join(repr(f) for f in sorted(FASTMATH)) + "}")
    em()
    em()
    em.lines.append(_HELPERS)
    em()
    em()
    em.lines.append(_EXP[dtype])
    em()
    _visit(node, em, {})
    return _header(node, dtype) + "\n" + em.text().rstrip() + "\n"


# --------------------------------------------------------------------------------------------
# compile: source text -> module of numba kernels


def cache_dir() -> Path:
    """Where generated modules (and numba's caches, in their ``__pycache__``) are kept.

    ``$PATTERNGEN_CACHE`` when set, else ``~/.cache/patterngen/numba``, else a temporary
    directory when the home directory is not writable.
    """
    root = os.environ.get("PATTERNGEN_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "patterngen" / "numba"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "patterngen-numba"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


@functools.cache
def load(source: str):
    """Import the module that ``source`` defines, compiling nothing yet (numba is lazy).

    The file is named by the hash of its text and written once (atomically), so numba's
    ``cache=True`` finds the kernels it compiled in an earlier process.

    Raises:
        SyntaxError, ImportError: with the generated source attached as a note.
    """
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    name = f"patterngen_numba_{digest}"
    path = cache_dir() / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    log.debug("numba kernel module %s:\n%s", path, source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: numba's cache finds functions by module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        _attach_source(e, f"while importing generated module {path}:\n{source}")
        raise
    return module


def _attach_source(error: Exception, text: str) -> None:
    """Add the generated source to ``error`` (a note from Python 3.11, else the log)."""
    if hasattr(error, "add_note"):
        error.add_note(text)
    else:
        log.error("%s", text)


@functools.cache
def _pool(threads: int):
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="patterngen")


def _run(kernel, source: str, items: int, *args) -> None:
    """Run work items ``0..items`` of ``kernel`` on numba's thread count, in ranges.

    The kernels are ``nogil``, so plain threads run them in parallel; ``parallel=True`` would
    double their compile time. A kernel not yet compiled runs an empty range first, so that
    one thread compiles it (a numba compile failure carries the generated source).
    """
    import numba

    if not kernel.signatures:
        try:
            kernel(*args, 0, 0)
        except numba.core.errors.NumbaError as e:
            log.error("numba failed to compile generated kernel %s", kernel.__name__)
            _attach_source(e, f"generated source:\n{source}")
            raise
    threads = numba.get_num_threads()
    parts = min(items, 4 * threads)
    if parts <= 1 or threads == 1:
        kernel(*args, 0, items)
        return
    bounds = [items * j // parts for j in range(parts + 1)]
    list(_pool(threads).map(lambda j: kernel(*args, bounds[j], bounds[j + 1]), range(parts)))


# --------------------------------------------------------------------------------------------
# the backend


def _attention_function():
    import torch

    class NumbaAttention(torch.autograd.Function):
        """``out = softmax(q k^T * scale, masked) v`` by the generated kernels."""

        @staticmethod
        def forward(ctx, q, k, v, backend, shape, scale):
            out, lse = backend.forward_numpy(*(t.detach().numpy() for t in (q, k, v)), shape,
                                             scale)
            out, lse = torch.from_numpy(out), torch.from_numpy(lse)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.backend, ctx.shape, ctx.scale = backend, shape, scale
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            arrays = (t.detach().numpy() for t in (q, k, v, out, dout.contiguous(), lse))
            grads = ctx.backend.backward_numpy(*arrays, ctx.shape, ctx.scale)
            return (*(torch.from_numpy(g) for g in grads), None, None, None)

    return NumbaAttention


_function = functools.cache(_attention_function)


class NumbaBackend(Backend):
    """Generated Numba CPU kernels, forward and backward, for any IR.

    Call with ``(batch, heads, *grid, head_dim)`` or ``(batch, heads, tokens, head_dim)``
    float32 or float64 CPU tensors. Non-contiguous inputs are copied to contiguous ones first.
    Grid extents are kernel arguments: compiling the same pattern on another grid of the same
    structure reuses the compiled kernels.

    Args:
        ir: the lowered pattern (numeric grid).
        scale: default score scale; ``None`` means ``head_dim ** -0.5``.

    Attributes:
        source: the generated float32 module (``source_for("float64")`` for the other dtype).
    """

    name = "numba"
    SUPPORTED_DEVICES = ("cpu",)
    SUPPORTED_DTYPES = tuple(DTYPES)
    BACKWARD_DEVICES = ("cpu",)

    def __init__(self, ir_, scale=None):
        self.ir = ir_
        self.shape = ir_.grid.require_numeric("the numba backend")
        self.scale = scale
        self._head_map = _head_map(ir_) if isinstance(ir_, ir.HeadsIR) else [0]

    @property
    def source(self) -> str:
        return self.source_for("float32")

    @property
    def executed_pairs(self) -> tuple[int, ...]:
        """Pairs computed per listed pattern: exactly the attended ones (unions deduplicated)."""
        return tuple(head.pairs() for head in self.ir.per_head)

    def source_for(self, dtype: str) -> str:
        """The generated module text for ``dtype`` (``"float32"`` or ``"float64"``)."""
        return _generate_cached(self.ir, dtype)

    def __repr__(self):
        return f"NumbaBackend({self.ir.label} on grid {self.ir.grid})"

    def __call__(self, q, k, v, scale=None):
        """Attention of ``q`` over ``k, v`` under the compiled pattern.

        Args:
            q, k, v: ``(batch, heads, *grid, head_dim)`` or ``(batch, heads, tokens,
                head_dim)`` CPU tensors of one dtype, float32 or float64.
            scale: score scale; default the constructor's, else ``head_dim ** -0.5``.

        Raises:
            PatternError: for a wrong type, shape, grid, device or dtype, naming the values.
        """
        qf, kf, vf, restore = self.flatten_inputs(q, k, v)
        if qf.shape[-1] < 1 or qf.shape[0] * qf.shape[1] == 0:
            raise PatternError(f"numba: q has shape {tuple(q.shape)}; expected batch, heads "
                               f"and head_dim of at least 1.")
        scale = scale if scale is not None else self.scale
        scale = float(qf.shape[-1] ** -0.5 if scale is None else scale)
        qf, kf, vf = (t.contiguous() for t in (qf, kf, vf))
        return restore(_function().apply(qf, kf, vf, self, self.shape, scale))

    def _kernels(self, dtype):
        source = self.source_for(dtype)
        module = load(source)
        return source, [(getattr(module, f"forward_{i}"), getattr(module, f"backward_{i}"))
                        for i in range(max(self._head_map) + 1)]

    def _head_groups(self, heads: int):
        """``(kernel index, int64 array of heads)`` for every kernel some head uses."""
        import numpy as np

        owner = [self._head_map[h % len(self._head_map)] for h in range(heads)]
        return [(i, np.array([h for h in range(heads) if owner[h] == i], dtype=np.int64))
                for i in sorted(set(owner))]

    def forward_numpy(self, q, k, v, shape, scale):
        """``(out, lse)`` for contiguous ``(batch, heads, tokens, dim)`` numpy arrays."""
        import numpy as np

        source, kernels = self._kernels(q.dtype.name)
        out = np.empty_like(q)
        lse = np.empty(q.shape[:3], dtype=q.dtype)
        typed_scale = q.dtype.type(scale)
        tiles = -(-q.shape[2] // QUERY_TILE)
        for i, group in self._head_groups(q.shape[1]):
            _run(kernels[i][0], source, q.shape[0] * len(group) * tiles,
                 q, k, v, typed_scale, *shape, group, out, lse)
        return out, lse

    def backward_numpy(self, q, k, v, out, dout, lse, shape, scale):
        """``(dq, dk, dv)``; dk and dv are summed over query splits when heads are few."""
        import numba
        import numpy as np

        source, kernels = self._kernels(q.dtype.name)
        batch, heads = q.shape[:2]
        # dk/dv are scattered from every query: each split owns a copy, so that (batch, head)
        # pairs fewer than the threads still keep every thread busy without atomics
        splits = max(1, -(-2 * numba.get_num_threads() // (batch * heads)))
        splits = min(splits, q.shape[2])
        dq = np.empty_like(q)
        dk = np.zeros((splits, *q.shape), dtype=q.dtype)
        dv = np.zeros((splits, *q.shape), dtype=q.dtype)
        typed_scale = q.dtype.type(scale)
        for i, group in self._head_groups(heads):
            _run(kernels[i][1], source, batch * len(group) * splits,
                 q, k, v, out, dout, lse, typed_scale, *shape, group, dq, dk, dv)
        if splits == 1:
            return dq, dk[0], dv[0]
        return dq, dk.sum(axis=0), dv.sum(axis=0)


@functools.lru_cache(maxsize=256)
def _generate_cached(node, dtype: str) -> str:
    return generate(node, dtype)


register_backend("numba", NumbaBackend)
