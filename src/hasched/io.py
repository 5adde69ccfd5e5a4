"""File output in one place: atomic writes that never leave partial or temporary files."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hasched.errors import HaschedError

__all__ = ["atomic_write"]


def atomic_write(path: str | Path, data: str | bytes | Callable[[IO[bytes]], None]) -> Path:
    """Writes ``data`` to ``path`` via a temporary file in the same folder and a rename.

    Args:
        path: Destination; its folder must exist.
        data: Text (UTF-8), bytes, or a function writing to a binary file object.

    Raises:
        HaschedError: one line naming the path when the OS refuses (full or read-only disk,
            missing folder, ...); no temporary file is left behind.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise HaschedError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path
