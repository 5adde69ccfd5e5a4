"""Safe output and checked input, shared by every command.

Three promises of the README live here, in one place each:

- **Nothing half-written.** :func:`atomic_write` writes a temporary file next to the
  destination, fsyncs it and renames it over the destination. Any ``OSError`` (a full disk,
  a read-only or foreign file system, a path through a file) removes the temporary file and
  becomes one :class:`HaschedError` line naming the path and the reason.
- **Nothing of the user's overwritten.** An output folder is new, empty, or *ours and
  compatible*: it holds our ``config.json`` with the same settings (:func:`check_out_dir`,
  a read-only check to run before anything is created, then :func:`claim_out_dir`). An
  output file is new or one we wrote (:func:`check_out_file`).
- **One writer per folder.** :func:`claim_out_dir` takes a lock file holding the writer's
  PID; a live second writer is refused and a lock left by a dead process is recovered.

For input files, :mod:`hasched.schema` (re-exported here) gives errors that name the file
and the field, e.g. ``schedule s.json: permutations.c0[3] must be an integer, got 0.9``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from hasched.errors import HaschedError
from hasched.schema import check_fields, check_type, read_json, require

# The input side (schema-checked JSON) lives in hasched.schema; it is re-exported here so
# that ``from hasched.io import require`` works for every file a command reads or writes.

__all__ = [
    "CONFIG_NAME",
    "LOCK_NAME",
    "atomic_write",
    "os_error",
    "make_dirs",
    "check_out_dir",
    "claim_out_dir",
    "check_out_file",
    "read_json",
    "require",
    "check_type",
    "check_fields",
]

CONFIG_NAME = "config.json"
LOCK_NAME = ".hasched.lock"

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EEXIST: "it exists already",
    errno.ENOENT: "its folder does not exist",
    errno.EISDIR: "it is a folder",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EIO: "input/output error",
}

Payload = str | bytes | Callable[[BinaryIO], object]


def os_error(path: str | Path, err: OSError, action: str = "write") -> HaschedError:
    """The one-line error for an ``OSError`` met while acting on ``path``."""
    reason = _REASONS.get(err.errno or 0) or err.strerror or str(err)
    return HaschedError(f"cannot {action} {path}: {reason}")


def _payload_bytes(data: Payload) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8")
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    buf = io.BytesIO()  # the writer runs first, so a failing writer touches no file
    data(buf)
    return buf.getvalue()


def atomic_write(path: str | Path, data: Payload) -> Path:
    """Replaces ``path`` with ``data`` atomically: readers see the old file or the new one.

    Args:
        path: Destination; its folder must exist.
        data: Text (UTF-8), bytes, or a callable writing to a binary file object (e.g.
            ``lambda fh: torch.save(state, fh)``).

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        HaschedError: On any ``OSError`` (ENOSPC, EROFS, EACCES, ENOTDIR, EISDIR, ...),
            after removing the temporary file; ``path`` is then as it was before.
    """
    path = Path(path)
    payload = _payload_bytes(data)
    # A unique name beside the destination (same file system, so the rename is atomic).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        _write_new(tmp, payload)
        try:
            os.replace(tmp, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as err:
        raise os_error(path, err) from None
    return path


def _write_new(path: Path, payload: bytes) -> None:
    """Creates ``path`` (which must not exist) with ``payload``, fsynced; on failure removes
    it again and re-raises the ``OSError``."""
    # 0o666: the umask decides the mode, as for any file the user's tools create.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def _first_existing(path: Path) -> Path | None:
    """``path`` or its nearest ancestor that exists (as anything), or None."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return None


def _check_not_under_file(path: Path, option: str, *, file_ok: bool = False) -> None:
    """Refuses ``path`` when an ancestor (or, unless ``file_ok``, itself) is not a folder."""
    found = _first_existing(path)
    if found is None or found.is_dir():
        return
    if found == path:
        if file_ok:
            return
        raise HaschedError(f"{option} {path} is a file, not a folder; use another {option}")
    raise HaschedError(f"{option} {path} lies under {found}, which is a file, not a folder; "
                       f"use another {option}")


def make_dirs(path: str | Path) -> list[Path]:
    """Creates ``path`` and missing parents; returns the folders created, outermost first.

    Raises:
        HaschedError: On any ``OSError`` (e.g. a read-only file system), naming the folder.
    """
    path = Path(path)
    missing = [p for p in (path, *path.parents) if not p.is_dir()][::-1]
    created = []
    for p in missing:
        try:
            os.mkdir(p)
        except FileExistsError:
            if not p.is_dir():
                raise HaschedError(f"cannot create folder {p}: a file of that name exists") \
                    from None
            continue
        except OSError as err:
            _remove_empty(created)
            raise os_error(p, err, "create folder") from None
        created.append(p)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            os.rmdir(p)


def _listdir(path: Path, option: str) -> list[str]:
    try:
        # The lock (and a lock being created) says nothing about what the folder holds.
        return sorted(n for n in os.listdir(path) if not n.startswith(LOCK_NAME))
    except OSError as err:
        raise os_error(path, err, f"read the {option} folder") from None


def check_out_dir(
    out: str | Path,
    *,
    what: str,
    compatible: Callable[[dict, Path], None],
    option: str = "--out",
    legacy: Callable[[list[str]], bool] | None = None,
) -> bool:
    """The output-folder policy; reads only, so run it before creating anything.

    Args:
        out: The output folder.
        what: What the folder holds, for messages (``"search"``).
        compatible: ``(config, path)`` raising :class:`HaschedError` (with what differs)
            when our ``config.json`` holds other settings, or is not ours at all.
        option: The option that named ``out``, for messages.
        legacy: Accepts, by its file names, a folder of an older hasched without
            ``config.json``.

    Returns:
        True when ``out`` holds an earlier compatible run to resume; False when it is new
        or empty.

    Raises:
        HaschedError: ``out`` is or lies under a file, holds a foreign or malformed
            ``config.json``, or is a non-empty folder that is not ours.
    """
    out = Path(out)
    _check_not_under_file(out, option)
    if not out.is_dir():
        return False
    names = _listdir(out, option)
    if not names:
        return False
    cfg_path = out / CONFIG_NAME
    if CONFIG_NAME in names:
        try:
            cfg = read_json(cfg_path, what=f"{what} config")
        except HaschedError as err:
            raise HaschedError(f"{err}; {out} is not a hasched {what} folder, use another "
                               f"{option}") from None
        if not isinstance(cfg, dict):
            raise HaschedError(f"{cfg_path} is not a hasched {what} config (a JSON "
                               f"{type(cfg).__name__}, not an object); use another {option}")
        compatible(cfg, cfg_path)
        return True
    if legacy is not None and legacy(names):
        return True
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise HaschedError(f"{out} exists, is not empty ({shown}) and is not a hasched {what} "
                       f"folder; use another {option} (an empty or new folder)")


@contextlib.contextmanager
def claim_out_dir(
    out: str | Path,
    config: dict | None,
    *,
    lock: bool = True,
    log: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Creates ``out``, takes its lock and writes ``config.json`` unless there is one.

    Run :func:`check_out_dir` (and every other check) first. If the claim fails, the
    folders it created are removed again; the lock is released when the block ends.

    Args:
        out: The output folder.
        config: Written as ``config.json`` when the folder has none (None: nothing).
        lock: Take the PID lock (for folders a long job writes).
        log: Receives a line when a stale lock is recovered.
    """
    out = Path(out)
    created = make_dirs(out)
    token = None
    try:
        if lock:
            token = _acquire_lock(out, log)
        if config is not None and not (out / CONFIG_NAME).exists():
            atomic_write(out / CONFIG_NAME, json.dumps(config, indent=1) + "\n")
    except BaseException:
        if token is not None:
            _release_lock(out, token)
        _remove_empty(created)
        raise
    try:
        yield out
    finally:
        if token is not None:
            _release_lock(out, token)


def _lock_holder(lock: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file, or None when it is unreadable or garbage."""
    try:
        parts = lock.read_text(encoding="utf-8").split()
        pid = int(parts[0])
    except (OSError, UnicodeDecodeError, ValueError, IndexError):
        return None
    return (pid, parts[1] if len(parts) > 1 else "") if pid > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _acquire_lock(out: Path, log: Callable[[str], None] | None) -> str:
    """Creates ``out/.hasched.lock`` with our PID; returns the lock's content (our token)."""
    lock = out / LOCK_NAME
    host = socket.gethostname()
    token = f"{os.getpid()} {host} {secrets.token_hex(8)}\n"
    for _ in range(3):
        # Written whole under a temporary name, then linked: the lock never exists empty,
        # and link() fails if another writer's lock is there.
        tmp = out / f"{LOCK_NAME}.{secrets.token_hex(4)}"
        try:
            _write_new(tmp, token.encode())
            try:
                os.link(tmp, lock)
                return token
            except FileExistsError:
                pass
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        except OSError as err:
            raise os_error(lock, err, "create the lock file") from None
        holder = _lock_holder(lock)
        if holder is not None and (holder[1] not in ("", host) or _alive(holder[0])):
            where = f" on {holder[1]}" if holder[1] else ""
            raise HaschedError(f"{out} is being written by another hasched run (pid "
                               f"{holder[0]}{where}, lock file {lock}); wait for it to "
                               "finish, or delete the lock file if no run is active")
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass  # another run recovered it first; the next link() decides
        except OSError as err:
            raise os_error(lock, err, "remove the stale lock file") from None
        if log is not None:
            what = f"of pid {holder[0]}, which has ended" if holder else "that was unreadable"
            log(f"{out}: recovered a stale lock {what}")
    raise HaschedError(f"cannot take the lock {lock}: other runs keep replacing it")


def _release_lock(out: Path, token: str) -> None:
    lock = out / LOCK_NAME
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if lock.read_text(encoding="utf-8") == token:  # never remove another run's lock
            os.unlink(lock)


def check_out_file(
    path: str | Path,
    *,
    option: str,
    ours: Callable[[bytes], bool] | None = None,
) -> Path:
    """The output-file policy: ``path`` is new, or a file we wrote (``ours(content)``).

    Reads only; the caller creates missing parent folders (:func:`make_dirs`) when it
    writes.

    Raises:
        HaschedError: ``path`` is a folder, lies under a file, or exists and is not ours.
    """
    path = Path(path)
    _check_not_under_file(path, option, file_ok=True)
    if not os.path.lexists(path):
        return path
    if path.is_dir():
        raise HaschedError(f"{option} {path} is a folder, not a file; use another {option}")
    try:
        content = path.read_bytes()
    except OSError as err:
        raise os_error(path, err, "read") from None
    if ours is None or not ours(content):
        raise HaschedError(f"{option} {path} exists and was not written by this command; "
                           f"not overwriting it, use another {option}")
    return path
