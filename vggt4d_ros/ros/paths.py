"""Confine file paths from parameters and service calls to one output directory.

``confine("maps/run1.ply", root)`` returns an absolute path inside ``root`` or raises
:class:`PathEscapeError`: ``..`` components, absolute paths outside the root, and symlinks
(anywhere along the path, existing ones resolved) that lead outside are all rejected.
``open_confined`` / ``write_confined`` then open what was checked without following any
symlink (directory by directory from the root's fd), so a path swapped after the check cannot
redirect the write.
"""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator


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


_DIR_FD_OK = {os.open, os.mkdir, os.rename, os.unlink} <= os.supports_dir_fd


def _open_parent_dir(requested: str | os.PathLike, root: str | os.PathLike) -> tuple[int, str]:
    """(fd of the confined path's parent directory, final name). Every directory below the
    root is created if missing and entered with ``openat(..., O_NOFOLLOW)`` relative to its
    parent's fd, so a component swapped for a symlink after the check is refused (ELOOP /
    ENOTDIR) instead of followed: the check and the use cannot disagree."""
    path = confine(requested, root)
    root_resolved = Path(root).expanduser().resolve()
    root_resolved.mkdir(parents=True, exist_ok=True)
    parts = path.relative_to(root_resolved).parts
    if not parts:
        raise PathEscapeError(f"path {os.fspath(requested)!r} is the output directory itself")
    nofollow = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(root_resolved, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            child = os.open(part, nofollow, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def open_confined(requested: str | os.PathLike, root: str | os.PathLike, mode: str = "wb"):
    """Open the confined path, creating its parent directories inside ``root``.

    Directories are walked from the root with ``O_NOFOLLOW`` (see ``_open_parent_dir``) and the
    file itself is opened with ``O_NOFOLLOW``: no symlink is followed after the check, even one
    created in between. (Platforms without ``dir_fd`` support: the check is repeated after the
    directories exist and only the final component is protected.)
    """
    writing = "w" in mode or "a" in mode
    flags = (os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
             if writing else os.O_RDONLY) | getattr(os, "O_NOFOLLOW", 0)
    if not _DIR_FD_OK:
        path = confine(requested, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.fdopen(os.open(confine(path, root), flags, 0o644), mode)
    dir_fd, name = _open_parent_dir(requested, root)
    try:
        return os.fdopen(os.open(name, flags, 0o644, dir_fd=dir_fd), mode)
    finally:
        os.close(dir_fd)


@contextmanager
def write_confined(requested: str | os.PathLike, root: str | os.PathLike,
                   mode: str = "wb") -> Iterator[IO]:
    """Write a file inside ``root`` whole or not at all: the content goes to a fresh hidden
    temporary file (``O_EXCL | O_NOFOLLOW``) in the confined directory, which replaces the
    target by ``rename`` only when the block succeeds (a reader never sees half a map; a
    symlink planted at the target name is replaced, never followed). On error the temporary
    file is removed and the target is left as it was."""
    if mode not in ("w", "wb"):
        raise ValueError(f"write_confined: mode must be 'w' or 'wb', got {mode!r}")
    if not _DIR_FD_OK:
        with open_confined(requested, root, mode) as fh:
            yield fh
        return
    dir_fd, name = _open_parent_dir(requested, root)
    tmp = f".{name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                     0o644, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, mode) as fh:
                yield fh
            # POSIX rename replaces the target atomically (a symlink there is not followed)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        os.close(dir_fd)
