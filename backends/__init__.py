"""Backends: one registry of code generators, each compiling an IR into ``attn(q, k, v)``.

Each backend class declares what it supports as class attributes and explains refusals with
:meth:`Backend.not_supported_reasons`; :func:`select` walks a priority list and, when nothing
fits, raises one error listing every backend and its reasons. Backend modules import torch or
numba lazily, inside the backend, so ``import patterngen`` stays light.
"""

from __future__ import annotations

import functools
import importlib

from patterngen.operators import register_pending
from patterngen import bias
from patterngen.errors import BackendUnavailable, PatternError, UnknownBackend

__all__ = ["Backend", "register_backend", "get_backend", "available", "select", "PRIORITY",
           "executors", "register_executor"]

_REGISTRY: dict[str, type] = {}
#: executors registered besides the built-in ones (:mod:`.executor`)
_EXECUTORS: dict = {}
#: module that defines each built-in backend (imported on first use)
_BUILTIN = {"numba": "numba", "sdpa": "sdpa", "flex": "flex", "auto": "planned"}
#: the order :func:`select` tries, per device type
PRIORITY = {"cpu": ("numba", "sdpa", "flex"), "cuda": ("flex", "sdpa")}


class Backend:
    """Base of compiled backends.

    Subclasses set the class attributes and implement ``__init__(ir, **options)`` and
    ``__call__(q, k, v, scale=None)``. ``ir`` is an :class:`patterngen.ir.IR` or ``HeadsIR``.
    A compiled backend may expose what it generated (``source``, ``layout``, ``block_mask``)
    and ``executed_pairs``: a tuple with the (query, key) pairs it computes for each listed
    pattern, which :func:`patterngen.profile` sets beside the attended pairs.
    """

    name = "?"
    SUPPORTED_DEVICES: tuple = ("cpu",)
    SUPPORTED_DTYPES: tuple = ("float32", "float64")
    #: devices on which gradients flow through the compiled attention
    BACKWARD_DEVICES: tuple = ("cpu", "cuda")
    #: ``__call__`` takes ``rel_bias``, a table indexed by key minus query (patterngen.bias)
    SUPPORTS_REL_POS_BIAS: bool = False
    #: the constructor takes ``softcap`` (scores become ``c * tanh(s / c)``)
    SUPPORTS_SOFTCAP: bool = False
    #: ``__call__`` takes ``additional_keys``/``additional_values``: tokens outside the grid
    #: that every query attends besides its pattern (NATTEN's)
    SUPPORTS_ADDITIONAL_KEYS: bool = False
    #: runs an IR whose keys live on another grid (``ir.key_grid``, see patterngen.lower)
    SUPPORTS_KEY_GRID: bool = False
    #: the compiled softcap; ``None``: off
    softcap = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a backend without bias or softcap refuses them by name: a TypeError about an
        # unexpected keyword says nothing useful, and dropping them would be a silent wrong result
        if not cls.SUPPORTS_SOFTCAP and "__init__" in cls.__dict__:
            cls.__init__ = _refusing(cls.__init__, cls, "softcap", "SUPPORTS_SOFTCAP")
        if not cls.SUPPORTS_REL_POS_BIAS and "__call__" in cls.__dict__:
            cls.__call__ = _refusing(cls.__call__, cls, "rel_bias", "SUPPORTS_REL_POS_BIAS")
        if not cls.SUPPORTS_ADDITIONAL_KEYS and "__call__" in cls.__dict__:
            for option in ("additional_values", "additional_keys"):  # keys checked first
                cls.__call__ = _refusing(cls.__call__, cls, option, "SUPPORTS_ADDITIONAL_KEYS")

    @functools.cached_property
    def reach(self) -> tuple[int, ...]:
        """Per axis, the largest ``|key - query|`` over the attended pairs
        (:func:`patterngen.bias.reach`); a ``rel_bias`` table has ``2 * reach + 1`` entries on
        each axis."""
        return bias.reach(self.ir)

    @functools.cached_property
    def _table_offsets(self) -> tuple[int, ...]:
        """A ``rel_bias`` table's shape after its heads: ``2 * reach + 1`` per axis."""
        return bias.table_shape(self.reach)[1:]

    def check_rel_bias(self, rel_bias, q):
        """Check a ``rel_bias`` table against the reach, the heads, device and dtype of the
        flattened ``q`` ``(batch, heads, tokens, dim)``; ``None`` passes.

        Under autocast a floating table of another dtype is cast to ``q``'s.

        Raises:
            PatternError: naming ``rel_bias``, what it is and the expected shape from ``reach``.
        """
        if rel_bias is None:
            return None
        import torch

        heads = q.shape[1]

        def want():  # spelled out for an error only: formatted on every call, a few us each
            return "(" + ", ".join(map(str, bias.table_shape(self.reach, f"{heads} or 1"))) + ")"

        if not isinstance(rel_bias, torch.Tensor):
            raise PatternError(f"{self.name}: rel_bias must be a torch.Tensor of shape "
                               f"{want()}, got {type(rel_bias).__name__}.")
        if (rel_bias.shape[1:] != self._table_offsets or rel_bias.dim() != 1 + len(self.reach)
                or rel_bias.shape[0] not in (1, heads)):
            raise PatternError(
                f"{self.name}: rel_bias has shape {tuple(rel_bias.shape)}; the pattern's reach "
                f"is {self.reach} and q has {heads} heads, so expected rel_bias of shape {want()} "
                f"(heads or 1 shared, then 2 * reach + 1 offsets per axis, key minus query).")
        if rel_bias.device != q.device:
            raise PatternError(f"{self.name}: rel_bias is on device={str(rel_bias.device)!r} "
                               f"and q on {str(q.device)!r}; expected one device.")
        if rel_bias.dtype != q.dtype and rel_bias.is_floating_point() and \
                torch.is_autocast_enabled(q.device.type):
            # autocast casts a layer's weights to the compute dtype; the table is one of
            # them, and its gradient flows back through the cast in the table's own dtype
            rel_bias = rel_bias.to(q.dtype)
        if rel_bias.dtype != q.dtype:
            raise PatternError(f"{self.name}: rel_bias has dtype={rel_bias.dtype} and q "
                               f"{q.dtype}; expected one dtype (convert with .to(q.dtype)).")
        return rel_bias

    def check_extra_keys(self, ak, av, q, rel_bias=None, kv_heads=None):
        """``(ak, av)`` (``additional_keys``/``additional_values``) checked against the
        flattened ``q`` ``(batch, heads, tokens, dim)`` and made contiguous; ``None`` when
        there are none (both ``None``, or zero tokens). They have ``kv_heads`` heads (k's;
        default q's).

        Raises:
            PatternError: naming the tensor, what was expected and what was received; for
                extra keys with a ``rel_bias`` table, which they have no grid offset in.
        """
        if ak is None and av is None:
            return None
        import torch

        if rel_bias is not None:
            raise PatternError(f"{self.name}: additional_keys with rel_bias is not supported: "
                               f"the table is indexed by grid offsets, which extra keys do not "
                               f"have; pass one or the other.")

        if ak is None or av is None:
            given, missing = ("additional_keys", "additional_values") if av is None else (
                "additional_values", "additional_keys")
            raise PatternError(f"{self.name}: {given} was given without {missing}; pass both, "
                               f"of shape (batch, heads, n_extra, head_dim).")
        b, _, _, d = q.shape
        h = kv_heads or q.shape[1]
        for name, t in (("additional_keys", ak), ("additional_values", av)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or (
                    t.shape[0], t.shape[1], t.shape[3]) != (b, h, d):
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise PatternError(f"{self.name}: {name} has shape {shape}; q has batch={b}, "
                                   f"head_dim={d} and k heads={h}, so expected ({b}, {h}, "
                                   f"n_extra, {d}).")
            if t.dtype != q.dtype or t.device != q.device:
                raise PatternError(f"{self.name}: {name} is {t.dtype} on {t.device}; expected "
                                   f"q's {q.dtype} on {q.device}.")
        if ak.shape[2] != av.shape[2]:
            raise PatternError(f"{self.name}: additional_keys has {ak.shape[2]} tokens and "
                               f"additional_values {av.shape[2]}; expected the same number.")
        if ak.shape[2] == 0:
            return None
        return ak.contiguous(), av.contiguous()

    @classmethod
    def not_supported_reasons(cls, ir, device: str = "cpu", dtype: str = "float32") -> list[str]:
        """Why this backend cannot run ``ir`` on ``device`` with ``dtype`` (empty: it can)."""
        reasons = []
        device = str(device).split(":")[0]
        dtype = str(dtype).rsplit(".", 1)[-1]
        if device not in cls.SUPPORTED_DEVICES:
            reasons.append(f"device={device!r} not in {cls.SUPPORTED_DEVICES}")
        if dtype not in cls.SUPPORTED_DTYPES:
            reasons.append(f"dtype={dtype!r} not in {cls.SUPPORTED_DTYPES}")
        if not ir.grid.numeric:
            reasons.append(f"grid={ir.grid} is symbolic; substitute its sizes first")
        if getattr(ir, "key_grid", None) is not None and not cls.SUPPORTS_KEY_GRID:
            reasons.append(f"keys on another grid (key_grid={ir.key_grid}, queries on "
                           f"{ir.grid}) are not supported; backends that run them: "
                           f"{_supporting('SUPPORTS_KEY_GRID')}")
        return reasons

    def prepare(self, device, dtype=None, head_dim=None, heads=None) -> None:
        """Build now what calls on ``device`` (with these sizes, where they matter) need, so
        that a call traced by ``torch.compile`` only reads it: building index tensors or
        plans inside a traced call would break the graph. Backends that build nothing per
        device keep this no-op."""

    def flatten_inputs(self, q, k, v):
        """Check ``q, k, v`` against the compiled grid (``self.shape``) and this backend's
        devices and dtypes, and flatten them (see :func:`inputs.flatten_qkv`).

        Raises:
            PatternError: naming the device or dtype received and what this backend runs on.
        """
        from .inputs import flatten_qkv

        qf, kf, vf, restore = flatten_qkv(q, k, v, self.shape, self.name,
                                          getattr(self, "key_shape", None))
        if qf.device.type not in self.SUPPORTED_DEVICES:
            raise PatternError(
                f"{self.name}: q is on device={str(qf.device)!r}; the {self.name} backend runs on "
                f"{self.SUPPORTED_DEVICES}, so expected a tensor there (move it with .to()).")
        dtype = str(qf.dtype).rsplit(".", 1)[-1]
        if dtype not in self.SUPPORTED_DTYPES:
            raise PatternError(
                f"{self.name}: q has dtype={dtype}; expected one of {self.SUPPORTED_DTYPES} "
                f"(convert with .to(dtype)).")
        return qf, kf, vf, restore


def _supporting(flag: str) -> list[str]:
    """The built-in backends that set ``flag`` (those whose module imports)."""
    out = []
    for name in sorted(_BUILTIN):
        try:
            if getattr(get_backend(name), flag, False):
                out.append(name)
        except ImportError:  # the backend's own dependency is missing
            continue
    return out


def _refusing(method, cls, option: str, flag: str):
    """``method`` that raises when given ``option`` other than ``None``, and drops it."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if kwargs.pop(option, None) is not None:
            raise PatternError(
                f"{cls.name}: {option}= is not supported by the {cls.name} backend ({flag} is "
                f"not set); use a backend that sets it ({', '.join(_supporting(flag))}) or "
                f"leave {option}=None.")
        return method(self, *args, **kwargs)

    return wrapper


def register_backend(name: str, cls: type) -> None:
    """Register ``cls`` under ``name``; a name can be registered once."""
    if name in _REGISTRY:
        raise PatternError(f"A backend named {name!r} is already registered.")
    _REGISTRY[name] = cls


def register_executor(executor) -> None:
    """Register an :class:`.executor.Executor` instance under its ``name``, once."""
    if executor.name in executors():
        raise PatternError(f"An executor named {executor.name!r} is already registered.")
    _EXECUTORS[executor.name] = executor


def executors() -> dict:
    """Every executor by name (:mod:`.executor`): the whole-pattern ones (``whole``), each a
    strategy of the planner, then the parts of a term-wise plan, then registered ones."""
    module = importlib.import_module(f"{__name__}.executor")
    return {**module.WHOLE, **module.PARTS, **_EXECUTORS}


def available() -> list[str]:
    """Names of every known backend (built-in and registered)."""
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def get_backend(name: str) -> type:
    """The backend class called ``name``.

    Raises:
        UnknownBackend: naming the valid backends.
    """
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(f"{__name__}.{_BUILTIN[name]}")
        register_pending(__name__)  # when that import brought torch in
    if name not in _REGISTRY:
        raise UnknownBackend(f"Unknown backend {name!r}; valid backends are {available()}.")
    return _REGISTRY[name]


def select(ir, device: str = "cpu", dtype: str = "float32", priority=None,
           backward: bool = False) -> type:
    """The first backend in ``priority`` that supports the inputs (and, with ``backward``,
    computes gradients on ``device``: see ``BACKWARD_DEVICES``). ``backend="auto"`` plans by
    cost instead (:func:`patterngen.plan.plan`); this fixed order is for callers that want
    one whole-pattern backend.

    Raises:
        BackendUnavailable: listing every backend tried and its reasons.
    """
    device_type = str(device).split(":")[0]
    names = priority or PRIORITY.get(device_type, available())
    refusals = []
    for name in names:
        try:
            cls = get_backend(name)
        except ImportError as e:  # the backend's own dependency is missing
            refusals.append(f"  {name}: cannot import ({e})")
            continue
        reasons = cls.not_supported_reasons(ir, device, dtype)
        if backward and device_type not in cls.BACKWARD_DEVICES:
            reasons.append(f"no backward on {device_type} (BACKWARD_DEVICES="
                           f"{cls.BACKWARD_DEVICES})")
        if not reasons:
            return cls
        refusals.append(f"  {name}: " + "; ".join(reasons))
    raise BackendUnavailable(
        f"No backend can run {getattr(ir, 'label', ir)} on device={device!r} with "
        f"dtype={dtype!r}:\n" + "\n".join(refusals)
    )
