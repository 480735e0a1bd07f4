"""Confine file paths from parameters and service calls to one output directory.

``confine("maps/run1.ply", root)`` returns an absolute path inside ``root`` or raises
:class:`PathEscapeError`: ``..`` components, absolute paths outside the root, and symlinks
(anywhere along the path, existing ones resolved) that lead outside are all rejected.
"""
from __future__ import annotations

import os
from pathlib import Path


class PathEscapeError(ValueError):
    """A requested path would leave the confined output directory."""


def confine(requested: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Resolve ``requested`` (relative to ``root``, or absolute) strictly inside ``root``.

    Args:
        requested: file name or relative path (absolute accepted only if inside root).
        root: the output directory (need not exist yet; it is resolved as far as it exists).
    Returns:
        The resolved absolute path (symlinks resolved), guaranteed to be inside resolved root.
    Raises:
        PathEscapeError with the reason.
    """
    req = os.fspath(requested)
    if not req or "\x00" in req:
        raise PathEscapeError(f"invalid path {req!r}")
    parts = Path(req).parts
    if ".." in parts:
        raise PathEscapeError(f"path {req!r} contains '..'")
    root_resolved = Path(root).expanduser().resolve()
    candidate = Path(req) if Path(req).is_absolute() else root_resolved / req
    resolved = candidate.resolve()   # follows existing symlinks, keeps the rest literal
    if resolved != root_resolved and root_resolved not in resolved.parents:
        raise PathEscapeError(f"path {req!r} resolves to {resolved}, outside output_dir "
                              f"{root_resolved}")
    return resolved


def open_confined(requested: str | os.PathLike, root: str | os.PathLike, mode: str = "wb"):
    """Create parent directories inside ``root`` and open the confined path.

    The check is repeated after the directories exist (a symlink created in between is caught)
    and the final component is opened with O_NOFOLLOW when writing.
    """
    path = confine(requested, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path = confine(path, root)
    if "w" in mode or "a" in mode:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
        flags |= getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags, 0o644)
        return os.fdopen(fd, mode)
    return open(path, mode)
