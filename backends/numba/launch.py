"""Run a kernel's work ranges on several threads: the packing protocol and both launchers.

Every generated kernel is a numba ``cfunc`` of one argument ``a``, a pointer to packed
arguments, so that the same machine code runs wherever the threads come from:

- :func:`pack` writes, in the kernel's argument order (:func:`kernel_args`), one block of
  int64 (a shared range counter, the number of ranges, the number of work items, then each
  array's shape and each int), one block of reals (the scale, in the arrays' dtype), then the
  arrays' data pointers; :func:`emit_unpack` writes the kernel's side, which unpacks them
  with ``numba.carray`` (through :func:`view`), and :func:`emit_ranges` its loop, which takes
  ranges from the counter with an atomic fetch-and-add (:func:`fetch_add`) until none is left.
- :func:`run` hands the kernel to torch's own GNU OpenMP team where torch runs its ops on one
  (libgomp's ``GOMP_parallel``): torch's idle team threads otherwise spin for milliseconds
  beside the kernel after every torch op and slow it up to twice
  (``benchmarks/bench_omp_spin.py``). Elsewhere, or with ``PATTERNGEN_OPENMP=0``, the calling
  thread and ``threads - 1`` pool threads call the kernel through ``ctypes``, which releases
  the GIL.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import functools
import logging
import os
import sys
from typing import NamedTuple

import numpy as np
import numba
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic

from patterngen.errors import PatternError

log = logging.getLogger(__name__)

#: the kernels' C signature: one pointer to the packed arguments
SIGNATURE = types.void(types.CPointer(types.voidptr))
#: work ranges per thread and call: a thread slowed by another tenant leaves its later ranges
#: to the others (1 to 8 measured the same within 1% on a 7x7 window's forward)
RANGES_PER_THREAD = 4


@intrinsic
def fetch_add(typingctx, ptr, value):
    """``*ptr += value`` atomically on an int64 behind a ``voidptr``; returns the old value."""
    if ptr != types.voidptr or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        target = builder.bitcast(args[0], llvm_ir.IntType(64).as_pointer())
        amount = context.cast(builder, args[1], signature.args[1], types.int64)
        return builder.atomic_rmw("add", target, amount, "seq_cst")

    return types.int64(types.voidptr, value), codegen


class Arg(NamedTuple):
    """One kernel argument: an array (``kind="array"``, of ``rank`` dimensions and element
    type ``dtype`` as the kernel's text names it), a scalar (``"int"``, ``"real"``) or a
    ``"slot"``, an int64 counter each call of the kernel takes its own number from."""

    name: str
    kind: str
    rank: int = 0
    dtype: str = "ACC"


def _arrays(names, rank: int, dtype: str = "ACC") -> list[Arg]:
    return [Arg(name, "array", rank, dtype) for name in names]


def kernel_args(ndim: int, backward: bool, bias: bool = False,
                softcap: bool = False, cross: bool = False) -> list[Arg]:
    """A kernel's arguments in packing order: the C-contiguous arrays of the kernel's dtype
    (``ACC``) but ``heads`` (the heads a launch runs), ``brows`` (each one's row of
    ``bounds``) and ``bounds`` (the table of each query's key bounds), which are int64; then
    the scalars.

    With ``bias``: the reach ``reach0..`` per axis, the flat ``table`` (rows, offsets) and, for
    the backward, ``dtable`` (one copy per call of the kernel, see :func:`threads`) and the
    ``slot`` counter that picks the copy. With ``softcap``: the cap, a real after the scale.
    With ``cross``: the key grid's extents ``m0..`` after the query grid's ``n0..``.
    """
    inputs = ["q", "k", "v", "out", "dout"] if backward else ["q", "k", "v"]
    return (_arrays(inputs, 4) + _arrays(["lse"] * backward, 3) + [Arg("scale", "real")]
            + [Arg("softcap", "real")] * softcap
            + [Arg(f"n{a}", "int") for a in range(ndim)]
            + [Arg(f"m{a}", "int") for a in range(ndim) if cross]
            + [Arg(f"reach{a}", "int") for a in range(ndim) if bias]
            + _arrays(["heads", "brows"], 1, "np.int64") + _arrays(["bounds"], 5, "np.int64")
            + _arrays(["table"] * bias, 2)
            + (_arrays(["dq"], 4) + _arrays(["dk", "dv"], 5) if backward
               else _arrays(["out"], 4) + _arrays(["lse"], 3))
            + (_arrays(["dtable"], 3) + [Arg("slot", "slot")] if bias and backward else []))


@numba.njit(cache=True, nogil=True)
def view(ptr, shape, dtype):
    """``numba.carray`` as a cached function. Inlined into the kernels all the same, but the
    carray implementation for each shape and dtype is compiled once into the disk cache, not
    again in every process (0.03 s per signature, five of them per kernel)."""
    return numba.carray(ptr, shape, dtype)


def emit_unpack(em, args: list[Arg]) -> None:
    """Emit the kernel's side of :func:`pack`: bind ``args`` (see :func:`kernel_args`), and
    ``parts, items``, from the packed pointer ``a``."""
    lines, slot, pointer, real = [], 3, 2, 0
    for arg in args:
        if arg.kind == "int":
            lines.append(f"{arg.name} = ints[{slot}]")
            slot += 1
        elif arg.kind == "real":
            lines.append(f"{arg.name} = reals[{real}]")
            real += 1
        elif arg.kind == "slot":  # a one-element int64 array; each call of the kernel takes one
            lines.append(f"{arg.name} = fetch_add(a[{pointer}], 1)")
            slot, pointer = slot + 1, pointer + 1
        else:
            shape = ", ".join(f"ints[{slot + i}]" for i in range(arg.rank))
            lines.append(f"{arg.name} = view(a[{pointer}], ({shape},), {arg.dtype})")
            slot, pointer = slot + arg.rank, pointer + 1
    em(f"ints = view(a[0], {slot}, np.int64)")
    em(f"reals = view(a[1], {max(real, 1)}, ACC)")
    for line in lines:
        em(line)
    em("parts, items = ints[1], ints[2]")


@contextlib.contextmanager
def emit_ranges(em):
    """Emit the loop that takes ranges from the shared counter until none is left, binding
    ``start, stop`` (work items); the body goes inside."""
    em("j = fetch_add(a[0], 1)")
    with em.block("while j < parts:"):
        em("start, stop = items * j // parts, items * (j + 1) // parts")
        yield
        em("j = fetch_add(a[0], 1)")


def pack(args, parts: int, items: int):
    """The packed block for ``args`` (the kernel's arguments, in order) and the arrays that
    must stay alive while it is used.

    Raises:
        PatternError: for an array that is not C-contiguous (the kernel indexes rows).
    """
    ints, reals, pointers = [0, parts, items], [], []
    for x in args:
        if isinstance(x, np.ndarray):
            if not x.flags.c_contiguous:
                raise PatternError(f"numba: an array of shape {x.shape} and strides "
                                   f"{x.strides} is not C-contiguous; the kernels expect "
                                   f"C-contiguous arrays.")
            ints.extend(x.shape)
            pointers.append(x.ctypes.data)
        elif isinstance(x, (int, np.integer)):
            ints.append(int(x))
        else:
            reals.append(x)
    int_block = np.array(ints, dtype=np.int64)
    real_block = np.array(reals or [0.0], dtype=type(reals[0]) if reals else np.float64)
    block = (ctypes.c_void_p * (2 + len(pointers)))(int_block.ctypes.data,
                                                    real_block.ctypes.data, *pointers)
    return block, (int_block, real_block, args)


def run(kernel, items: int, args) -> None:
    """Run work items ``0..items`` of ``kernel`` (a compiled ``cfunc``) over ``args``."""
    if items <= 0:
        return
    parallel = team()
    count = threads()
    parts = min(items, RANGES_PER_THREAD * count)
    block, _alive = pack(args, parts, items)  # _alive: what block points into, until we return
    if parallel is not None and parts > 1 and count > 1:
        parallel(kernel.address, ctypes.addressof(block), count, 0)
        return
    call = kernel.ctypes
    helpers = ([_pool(count - 1).submit(call, block) for _ in range(count - 1)]
               if parts > 1 and count > 1 else [])
    call(block)
    for helper in helpers:
        if not helper.cancel():  # one that never started has nothing left to take
            helper.result()


def threads() -> int:
    """How many times :func:`run` calls a kernel at most (once per thread): torch's thread
    count where torch's OpenMP team runs it, else numba's."""
    return sys.modules["torch"].get_num_threads() if team() is not None else _numba_threads()


def _numba_threads() -> int:
    import numba

    return numba.get_num_threads()


@functools.cache
def _pool(workers: int):
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="patterngen")


@functools.cache
def team():
    """libgomp's ``GOMP_parallel`` from the runtime torch runs its ops on, or ``None``.

    Used when torch's parallel backend is OpenMP and the libgomp it loaded (from torch's own
    directories) is among the process's mapped libraries (Linux).
    """
    if os.environ.get("PATTERNGEN_OPENMP", "1") == "0":
        return None
    torch = sys.modules.get("torch")
    if torch is None or "OpenMP" not in torch.__config__.parallel_info():
        return None
    package = os.path.dirname(os.path.abspath(torch.__file__))
    # the wheels keep their libgomp in torch/lib or, repaired by auditwheel, in torch.libs
    homes = (package + os.sep, os.path.join(os.path.dirname(package), "torch.libs") + os.sep)
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libgomp" in line})
    except OSError:
        return None
    for path in paths:
        if not path.startswith(homes):
            continue
        try:
            parallel = ctypes.CDLL(path).GOMP_parallel
        except (OSError, AttributeError) as e:
            log.debug("no GOMP_parallel in %s: %s", path, e)
            continue
        parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        parallel.restype = None
        return parallel
    return None
