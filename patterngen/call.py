"""What a call of compiled attention is, and the work an executor does for it.

A :class:`Call` describes one kind of call (device, dtype, sizes, gradients, bias, softcap,
extra keys, input layout): every executor is asked about it alone, whether it can run it
(``can_run``) and what it would launch (``work``), so the planner never branches on an
executor's name. The work is a list of :class:`Op`: each op a primitive the calibration
measures (a batch of dense attention problems at one shape, a numba kernel over so many pairs,
a copy of so many bytes, a launch), priced by :meth:`patterngen.calibrate.Rates.price`.

Example:
    >>> from patterngen.call import Call, Op
    >>> Call(device="cpu", dtype="float32", head_dim=32, heads=4).kv_heads
    4
    >>> Op("copy", 4096)
    Op(copy x 4096)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PatternError

__all__ = ["Call", "Op", "ITEMSIZE", "CACHE_BYTES", "spilled", "bias_trains"]

#: bytes per element of each dtype the executors take
ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}

#: bytes of one kernel call's score matrices that the caches keep between the passes over
#: them (the scores' GEMM, the softmax, the second GEMM, the backward's): on the 2-core
#: AVX-512 machine, one thread, the kept path's time per unit was flat up to 8-12 MiB of
#: scores (64 x 64 and 49 x 49 problems, head_dim 32) and 1.1-1.2x that beyond 16 MiB
CACHE_BYTES = 8 << 20


def spilled(problems: int, rows: int, keys: int, itemsize: int, calls: int = 1) -> int:
    """Bytes of ``problems`` score matrices of ``rows x keys`` beyond :data:`CACHE_BYTES`,
    the problems split evenly over ``calls`` kernel calls."""
    scores = problems * rows * keys * itemsize
    return calls * max(0, -(-scores // calls) - CACHE_BYTES)


def bias_trains(bias: bool, backward: bool, bias_grad: bool | None) -> bool:
    """Whether a call's bias table gets a gradient: it has one, the call has a backward, and
    ``bias_grad`` (``None``: a table that trains) does not say otherwise."""
    return bool(bias and backward and bias_grad is not False)


@dataclass(frozen=True)
class Call:
    """One kind of call: what every executor is asked about.

    Attributes:
        device: ``"cpu"`` or ``"cuda"`` (the device type).
        dtype: the inputs' dtype name (``"float32"``).
        batch, heads, head_dim: q's sizes; ``kv_heads``: k's and v's heads (default q's).
        backward: gradients are needed (forward + backward).
        bias: a relative position bias table is passed.
        bias_grad: the table needs a gradient (default: ``bias and backward``, a table that
            trains); a backward without it skips the table's gradient.
        softcap: a softcap is set.
        extra_keys: tokens outside the grid every query attends (0: none).
        contiguous: q, k and v are contiguous.
    """

    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 1
    heads: int = 4
    head_dim: int = 32
    kv_heads: int = 0
    backward: bool = False
    bias: bool = False
    softcap: bool = False
    extra_keys: int = 0
    contiguous: bool = True
    bias_grad: bool | None = None

    def __post_init__(self):
        for name in ("batch", "heads", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PatternError(f"plan: {name}={value!r}; expected a positive int.")
        if not self.kv_heads:
            object.__setattr__(self, "kv_heads", self.heads)
        object.__setattr__(self, "bias_grad",
                           bias_trains(self.bias, self.backward, self.bias_grad))

    @property
    def itemsize(self) -> int:
        return ITEMSIZE.get(self.dtype, 4)

    @property
    def pass_name(self) -> str:
        return "forward+backward" if self.backward else "forward"


@dataclass(frozen=True)
class Op:
    """One primitive an executor launches.

    Attributes:
        kind: what the calibration measured for it: ``attend`` (``count`` problems of
            ``shape`` on ``kernel``), ``numba`` (the kernels: ``count`` pairs), ``copy``
            (``count`` bytes), ``launch`` (``count``
            calls of the path ``kernel``), ``merge`` (``count`` elements merged), ``restride``
            (``count`` elements of inputs that are not contiguous, copied), ``recopy``
            (``count`` bytes copied again in a backward: the merge's views of q, k, v; the
            fused backward's key gradients before a gather's ``index_add``), ``rebuild``
            (``count`` problems of ``shape`` whose ``kernel`` forward work a backward redoes),
            ``fault`` (``count`` bytes of memory new to the process), ``blockmask``
            (``count`` elements of per-problem masks the fused kernel reads), ``mask``
            (``count`` scores a dense term's mask is added to on the matmul paths, ``kernel``
            the path), ``spill`` (``count`` bytes of the matmul paths' scores beyond the
            caches, :func:`spilled`).
        count: how many.
        shape: the shape class: ``(rows, keys, head_dim)`` (``attend``), ``(head_dim,)``
            (``numba``).
        kernel: which kernel (``matmul``, ``fused``, ``kept``; the lane plan of ``numba``:
            ``one`` or ``tiles``) or path (``launch``). ``kept`` is the matmul path through
            torch's autograd, which keeps the probabilities: a dense term that is the whole
            plan. ``roll`` marks a ``copy`` or ``recopy`` that a rolled view makes by gathers
            (priced at the ``gather`` rate).
    """

    kind: str
    count: int
    shape: tuple = field(default=())
    kernel: str = ""

    def __repr__(self):
        what = f"{self.kind}{'/' + self.kernel if self.kernel else ''}"
        shape = ("x".join(map(str, self.shape[:-1])) + " " if len(self.shape) > 1 else "") + \
            (f"d{self.shape[-1]} " if self.shape else "")
        return f"Op({what} {shape}x {self.count})"
