"""Run numba kernels on torch's own OpenMP threads.

torch runs its CPU ops on a GNU OpenMP team whose idle threads spin for milliseconds after
each op. Kernels run on other threads right after a torch op share the cores with those
spinning threads and take up to twice as long (``benchmarks/bench_omp_spin.py``). Handing
the work to that team instead, through libgomp's ``GOMP_parallel``, puts the spinning threads
to work at once: a generated kernel's ``*_team`` trampoline (compiled as a numba ``cfunc``)
runs on every thread of the team and takes work ranges from a shared atomic counter until none
is left.

Used when torch's parallel backend is OpenMP and the libgomp it loaded is found among the
process's mapped libraries (Linux); otherwise, or with ``PATTERNGEN_OPENMP=0``, the backend
runs kernels on its own Python thread pool.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

import numpy as np
from llvmlite import ir as llvm_ir
from numba import types
from numba.extending import intrinsic

log = logging.getLogger(__name__)

#: the trampoline's C signature: one pointer to the packed arguments (see :func:`launch`)
SIGNATURE = types.void(types.CPointer(types.voidptr))


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


@functools.cache
def team():
    """libgomp's ``GOMP_parallel`` from the runtime torch runs its ops on, or ``None``."""
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


def launch(parallel, trampoline, threads: int, parts: int, items: int, args) -> bool:
    """Run ``parts`` ranges of ``items`` work items on ``threads`` threads of torch's team.

    ``args`` are the kernel's arguments without ``start, stop``, packed in the order the
    generated trampolines unpack them (``numba_cpu._openmp_source``): a block of int64 (the
    counter, ``parts``, ``items``, each array's shape and each int), one of reals, then the
    arrays' data pointers.
    Returns ``False``, running nothing, when an array is not C-contiguous.
    """
    ints, reals, pointers = [0, parts, items], [], []
    for x in args:
        if isinstance(x, np.ndarray):
            if not x.flags.c_contiguous:
                return False
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
    parallel(trampoline.address, ctypes.addressof(block), threads, 0)
    return True
