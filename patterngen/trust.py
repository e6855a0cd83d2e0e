"""Files patterngen reads back: private cache directories and files written exclusively.

Write access to a cache directory is code execution (generated modules are imported from it and
numba unpickles its own index and data files there), so a directory is used only when no one but
this user (or root) can change it or any directory above it: the rule ssh applies to
``~/.ssh``. Files are written to a fresh ``mkstemp`` name (created exclusively, mode 0600, never
through a symlink) and moved into place. See docs/security.md.
"""

from __future__ import annotations

import os
import stat
import tempfile
import warnings
from pathlib import Path

__all__ = ["UnsafeDirectory", "check_private", "private_dir", "usable_dir", "write_private"]


class UnsafeDirectory(OSError):
    """A cache directory that someone other than this user could write to."""


def _problem(path: Path) -> str | None:
    """Why the existing directory ``path`` is not private to this user, or None."""
    if not hasattr(os, "geteuid"):  # no POSIX owners: nothing to check
        return None
    uid = os.geteuid()
    real = path.resolve()
    for depth, directory in enumerate((real, *real.parents)):
        st = directory.stat()
        if depth == 0 and not stat.S_ISDIR(st.st_mode):
            return f"{str(directory)!r} is not a directory"
        if st.st_uid not in (uid, 0):
            return (f"{str(directory)!r} is owned by uid {st.st_uid}, not by this user "
                    f"(uid {uid}) or root")
        # a sticky directory above the cache lets others create entries but not rename ours;
        # in the cache itself any foreign entry could be a planted module or index
        sticky = depth > 0 and st.st_mode & stat.S_ISVTX
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky:
            return (f"{str(directory)!r} is writable by its group or by others (mode "
                    f"{stat.S_IMODE(st.st_mode):o}); write access to a cache is code execution")
    return None


def _probe(path: Path) -> None:
    """Raise ``OSError`` unless a file can be written in ``path``."""
    with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
        pass


def check_private(path: Path) -> None:
    """Raise :class:`UnsafeDirectory` unless only this user (or root) can change the existing
    directory ``path`` and the directories above it."""
    why = _problem(path)
    if why:
        raise UnsafeDirectory(why)


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if needed and check that only this user can change it.

    Raises:
        UnsafeDirectory: it, or a directory above it, is writable by others or foreign-owned.
        OSError: it cannot be created or written.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(path)
    _probe(path)
    return path


_moved: dict[str, Path] = {}


def usable_dir(path: Path, what: str, hint: str, subdirs: tuple = ()) -> Path:
    """``path`` and its ``subdirs``, each a :func:`private_dir`, else (with one
    ``RuntimeWarning`` per path and process) a fresh private temporary directory.

    Args:
        what: the directory's role in the warning, e.g. ``"numba: the kernel cache directory"``.
        hint: how to point it elsewhere, e.g. ``"set PATTERNGEN_CACHE to ..."``.
    """
    if str(path) in _moved:
        return _moved[str(path)]
    try:
        for directory in (path, *(path / sub for sub in subdirs)):
            private_dir(directory)
        return path
    except OSError as e:
        # mkdtemp: mode 0700 at an unpredictable name, never a fixed shared fallback
        fallback = Path(tempfile.mkdtemp(prefix="patterngen-"))
        warnings.warn(f"{what} {str(path)!r} cannot be used ({e}); this process uses "
                      f"{str(fallback)!r} instead, which is not kept ({hint}).", RuntimeWarning,
                      stacklevel=3)
        _moved[str(path)] = fallback
        return fallback


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a fresh exclusive temporary file in the same
    directory (mode 0600), then a rename over ``path`` (a symlink there is replaced, not
    followed)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
