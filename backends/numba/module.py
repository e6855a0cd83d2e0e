"""Module: source text -> an imported module on disk -> compiled kernels, with numba's disk cache.

:func:`load` writes the text to the cache directory under a name made of its hash and of the
runtime's (so a changed helper in ``runtime.py`` or ``launch.py`` gives every kernel a new file
and numba, whose cache only watches the kernel's own file, compiles it again), runs that
text (never bytecode read back from the disk) in a fresh module, and compiles nothing.
:func:`kernel` compiles one kernel, on first use, as a ``cfunc`` with ``cache=True``: a
forward compiles its forward kernels only, the backward its own when gradients are first asked
for, and a later process loads both from disk. What is trusted on disk: docs/security.md.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import traceback
import types
import warnings
from pathlib import Path

from patterngen import trust
from patterngen.errors import PatternError

from . import launch, runtime

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where generated modules (and numba's caches, in their ``__pycache__``) are kept.

    ``$PATTERNGEN_CACHE`` when set, else ``~/.cache/patterngen/numba``, created private to the
    user (0700). A directory that cannot be created or written (read-only, or a file in its
    place), or that others could write to (:mod:`patterngen.trust`), is replaced, with one
    warning, by a private temporary directory.
    """
    root = os.environ.get("PATTERNGEN_CACHE")
    path = Path(root) if root else Path.home() / ".cache" / "patterngen" / "numba"
    # numba keeps its pickled index and data in __pycache__: private too, made before numba
    # would make it 0755
    return trust.usable_dir(path, "numba: the kernel cache directory",
                            "set PATTERNGEN_CACHE to a directory only you can write",
                            subdirs=("__pycache__",))


@functools.cache
def runtime_digest() -> str:
    """Hash of the code every kernel links: ``runtime.py`` and ``launch.py``."""
    text = b"".join(Path(m.__file__).read_bytes() for m in (runtime, launch))
    return hashlib.sha256(text).hexdigest()[:12]


def module_name(source: str, digest: str) -> str:
    """The generated module's name: a hash of its text and of the runtime it links."""
    return "patterngen_numba_" + hashlib.sha256(f"{digest}\n{source}".encode()).hexdigest()[:20]


@functools.cache
def load(source: str):
    """Run the module that ``source`` defines, compiling no kernel yet.

    The module runs from ``source`` itself, compiled with the cache file's path as its file
    name: numba's ``cache=True`` finds its cache beside that file, and no bytecode or text read
    back from the disk is ever run. The file is written once (exclusively, then renamed into
    place); a file of that name with other bytes (a torn write, other text) is rewritten.

    Raises:
        PatternError: a directory stands where the file belongs, or ``NUMBA_CACHE_DIR`` is
            not private to the user.
        SyntaxError, ImportError: with the generated source attached as a note.
    """
    _check_numba_caches()
    name = module_name(source, runtime_digest())
    path = cache_dir() / f"{name}.py"
    text = source.encode()
    try:
        current = path.read_bytes()
    except FileNotFoundError:
        current = None
    except IsADirectoryError:
        raise PatternError(f"numba: {str(path)!r} is a directory where the generated module "
                           f"belongs; remove it.") from None
    if current != text:
        trust.write_private(path, text)
    log.debug("numba kernel module %s:\n%s", path, source)
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module  # as an import would: numba's cache finds functions by module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    except Exception as e:
        del sys.modules[name]
        attach_source(e, f"while importing generated module {path}:\n{source}")
        raise
    return module


def _check_numba_caches() -> None:
    """Refuse numba cache directories others could write to: ``NUMBA_CACHE_DIR``, and where
    the runtime helpers' caches are when not beside ``runtime.py`` (numba's user-wide cache,
    when the installation is read-only). numba unpickles code from them; the installation's
    own ``__pycache__`` is trusted as the installation is."""
    import numba

    if numba.config.CACHE_DIR:
        try:
            trust.private_dir(Path(numba.config.CACHE_DIR))
        except OSError as e:
            raise PatternError(f"numba: NUMBA_CACHE_DIR={numba.config.CACHE_DIR!r} cannot be "
                               f"used ({e}); numba loads pickled code from it, so it must be "
                               f"a directory only you can write. Point it elsewhere or unset "
                               f"it.") from None
    installed = Path(runtime.__file__).parent / "__pycache__"
    paths = {getattr(getattr(helper, "_cache", None), "cache_path", None)
             for helper in vars(runtime).values()}
    for path in sorted(Path(p) for p in paths - {None} if Path(p) != installed):
        try:
            trust.check_private(path)
        except OSError as e:
            raise PatternError(f"numba: the runtime helpers' cache {str(path)!r} cannot be "
                               f"used ({e}); numba loads pickled code from it. Make it "
                               f"private (chmod 700) or set NUMBA_CACHE_DIR to a directory "
                               f"only you can write.") from None


@functools.cache
def kernel(module, name: str):
    """Kernel ``name`` of a module from :func:`load`, compiled as a ``cfunc`` (first call
    compiles or loads from numba's cache).

    A cache file numba cannot read (corrupt, or cut short) is removed, with one warning, and
    the kernel compiled again: first the kernel's own files, then, if that was not enough,
    the index of every runtime helper.

    Raises:
        numba.core.errors.NumbaError: a compile failure, with the generated source attached.
    """
    import numba

    py_func = getattr(module, name)
    for attempt, drop in enumerate((_drop_kernel_caches, _drop_runtime_caches, None)):
        try:
            return _compile(py_func)
        except numba.core.errors.NumbaError as e:
            log.error("numba failed to compile generated kernel %s", name)
            attach_source(e, f"generated source:\n{Path(module.__file__).read_text()}")
            raise
        except Exception as e:
            if drop is None or not _while_reading_cache(e):
                raise
            drop(module)
            if attempt == 0:
                warnings.warn(f"numba: could not read the cached kernel {name} "
                              f"({type(e).__name__}: {e}); removed its cache files and "
                              f"compiled it again.", RuntimeWarning, stacklevel=2)


def _while_reading_cache(error: Exception) -> bool:
    """Whether ``error`` was raised inside numba's cache loading (a file it cannot read)."""
    frames = traceback.extract_tb(error.__traceback__)
    return any(Path(frame.filename).name == "caching.py" for frame in frames)


def _compile(py_func):
    import numba

    options = {key: value for key, value in runtime.JIT.items() if key != "nogil"}
    return numba.cfunc(launch.SIGNATURE, nopython=True, **options)(py_func)


def _drop_kernel_caches(module) -> None:
    """Remove numba's cache files of the generated ``module``."""
    import numba

    roots = [Path(module.__file__).parent / "__pycache__"]
    if numba.config.CACHE_DIR:
        roots.append(Path(numba.config.CACHE_DIR))
    stem = Path(module.__file__).stem
    for root in roots:
        for path in root.rglob(f"{stem}.*"):
            path.unlink(missing_ok=True)


def _drop_runtime_caches(module) -> None:
    """Empty the cache index of every runtime helper: each compiles again and rewrites it."""
    for helper in vars(runtime).values():
        cache = getattr(helper, "_cache", None)
        if cache is not None and hasattr(cache, "flush"):
            cache.flush()


def attach_source(error: Exception, text: str) -> None:
    """Add the generated source to ``error`` (a note from Python 3.11, else the log)."""
    if hasattr(error, "add_note"):
        error.add_note(text)
    else:
        log.error("%s", text)
