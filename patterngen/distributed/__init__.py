"""Local attention on a grid sharded across processes: halo exchange over ``torch.distributed``.

Each rank holds a contiguous range of lines of one grid axis (its *shard*) of Q, K and V. Only K
and V move: every rank receives exactly the tokens its queries read on other ranks (the halo,
:mod:`patterngen.distributed.halo`), in one ``all_to_all_single`` with per-rank split sizes
(several hops when a shard is shorter than the reach), computes its queries on a local grid, and
keeps its output rows. The backward sends the halo's gradients back to their owners, who add
them. Axis terms along the sharded axis are re-sharded (a pencil transpose, the partial
results merged by log-sum-exp) where that moves less than gathering every line
(:func:`~patterngen.distributed.reshard.reshard`). gloo (CPU) and NCCL (GPU) run the same code.

Example (every rank runs it, after ``torch.distributed.init_process_group``)::

    attn = pg.distributed.compile(pg.window(7) | pg.global_tokens([0]), grid=(512, 512))
    start, stop = attn.shards[dist.get_rank()]
    out = attn(q[:, :, start:stop], k[:, :, start:stop], v[:, :, start:stop])

``import patterngen.distributed`` does not import torch; :func:`compile` does.
"""

from .. import ir
from ..errors import PatternError
from ..parse import as_ir
from .halo import exchange_rows, split_lines
from .halo_cost import HaloCost, halo_cost
from .local import RankShare, rank_share
from .reshard import Reshard, reshard
from .schemes import schemes

__all__ = ["compile", "DistributedAttention", "HaloCost", "RankShare", "Reshard",
           "exchange_rows", "halo_cost", "rank_share", "reshard", "schemes", "split_lines"]


def compile(pattern, grid=None, axis=0, group=None, backend="auto", shards=None, key_grid=None,
            **options):
    """Compile ``pattern`` for a grid sharded along ``axis`` over the ranks of ``group``.

    Every rank of ``group`` must call it with the same arguments: the ranks check that they
    agree (a hash of the pattern, grid, axis and shards, all-gathered) before any exchange.

    Args:
        pattern: a spec or a lowered IR (numeric grid).
        grid: the whole grid, e.g. ``(512, 512)``.
        axis: the sharded axis.
        group: a ``torch.distributed`` process group; ``None`` is the default group.
        backend: the local executor: ``"auto"`` (the planner; where the rank's local problem
            needs line tables, among ``terms``, ``numba`` and ``sdpa``), ``"sdpa"`` or
            ``"numba"`` (CPU), which read any rank's line tables (see ``docs/distributed.md``).
        shards: lines per rank; ``None`` splits as evenly as possible.
        key_grid: keys on another grid are not sharded: anything but ``None`` or
            ``grid`` is refused.
        **options: options of the local backend (with ``"auto"``, the planner's).

    Returns:
        A :class:`DistributedAttention`.

    Raises:
        PatternError: on every rank, with the same message, when any rank's arguments are
            invalid or the ranks disagree; or when no process group is initialised; for keys
            on another grid.
    """
    from .attention import DistributedAttention

    if key_grid is not None or isinstance(pattern, (ir.IR, ir.HeadsIR)):
        keys = as_ir(pattern, grid, key_grid).key_grid
        if keys is not None:  # the halo would need key units on the sharded axis
            raise PatternError(
                f"patterngen.distributed.compile: keys on another grid (key_grid={keys}, "
                f"grid={grid}) are not supported; shard a self-attention pattern, or run the "
                f"cross-attention on one process with pg.compile(..., key_grid=...).")

    return DistributedAttention(pattern, grid, axis, group, backend, shards, options)


def __getattr__(name):
    # the torch-side class lives in .attention, imported on first use
    if name == "DistributedAttention":
        from .attention import DistributedAttention

        return DistributedAttention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
