"""Atomic file writes: a file appears under its final name complete, or not at all.

Data goes to a hidden temporary file in the destination's directory, is
flushed to disk, then renamed over the final name (a rename within one
filesystem is atomic). A process killed mid-write leaves only the temporary
file, named ``.NAME.HOST.PID.RANDOM.tmp``; :func:`sweep_orphans` removes
those whose writer, on this host, is gone (a cache folder may be shared by
several hosts over a network filesystem). The temporary file is created
exclusively, so a file or link planted under its name is never written through.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

#: bytes written between calls of the ``on_chunk`` hook (and progress updates)
CHUNK_BYTES = 64 << 20


_HOST = socket.gethostname().replace(".", "_") or "host"


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final``.

    On an exception the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_array(f, data: np.ndarray, on_chunk: Callable[[int], None] | None = None) -> None:
    """Write ``data``'s bytes (C order) to the open binary file ``f`` in chunks.

    ``on_chunk(nbytes)`` runs after each chunk (progress, fault injection).
    """
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    for start in range(0, flat.size, CHUNK_BYTES):
        piece = flat[start : start + CHUNK_BYTES]
        f.write(memoryview(piece))
        if on_chunk is not None:
            on_chunk(piece.size)


def sweep_orphans(directory: Path) -> None:
    """Remove temporary files left by writers that no longer run on this host."""
    if not directory.is_dir():
        return
    for tmp in directory.glob(f".*.{_HOST}.*.tmp"):
        pid = tmp.name.rsplit(".", 3)[-3]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
