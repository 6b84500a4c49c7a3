"""Atomic file writes: a file the project writes is either complete or absent, never truncated.

Every writer (checkpoints, configs, results, lists, caches, pictures, the toy set) goes through
:func:`write_atomic`: write a temporary in the same directory (a rename is atomic only within one
file system), then ``os.replace`` it onto the target. The temporary's name carries the process id
and a random tag, so concurrent writers of the same file never share one; a write that fails or
is interrupted removes its temporary and re-raises.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def temporary_name(path: Path, suffix: str = ".tmp") -> Path:
    """A per-process, per-call temporary beside ``path``: ``.<name>.<pid>.<tag><suffix>``."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{suffix}")


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object], *, suffix: str = ".tmp") -> Path:
    """Create ``path`` through ``write(temporary_path)`` and a rename; returns ``path``.

    ``write`` must write the whole file to the path it is given (a writer that picks the format
    from the file name must be told the format: the temporary ends in ``suffix``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
