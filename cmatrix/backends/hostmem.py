"""How much host memory this process may still use: the kernel's MemAvailable, capped by
the memory cgroup (v1 or v2) the process runs in, when that sets a limit.

A pool names where the memory comes from, so ranks that share it (several ranks on one
host, in the same cgroup) are checked together.
"""

from __future__ import annotations

import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


def available() -> tuple[int | None, str]:
    """(bytes this process can still allocate, or None if unknown; the pool's name)."""
    free = _mem_available()
    pool = "ram"
    for limit_file, usage_file, group in _cgroups():
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is None or usage is None or limit >= _NO_LIMIT:
            continue
        usage -= _inactive_file(usage_file.parent)  # page cache the kernel gives back at need
        room = max(limit - usage, 0)
        if free is None or room < free:
            free, pool = room, f"cgroup {group}"
    return free, pool


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroups() -> list[tuple[Path, Path, str]]:
    """(limit file, usage file, group) for this process's memory cgroup and its ancestors."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            base, limit, usage = CGROUP_ROOT, "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base, limit, usage = CGROUP_ROOT / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        group = Path(path)
        while True:
            folder = base / str(group).lstrip("/")
            if (folder / limit).exists():
                found.append((folder / limit, folder / usage, str(group)))
            if group == group.parent:
                break
            group = group.parent
    return found


def _inactive_file(folder: Path) -> int:
    """Reclaimable file cache charged to a cgroup (v2 ``inactive_file``, v1 ``total_inactive_file``)."""
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file") and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return _NO_LIMIT if text == "max" else int(text) if text.isdigit() else None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``). A load's
    large temporaries (a block before it is quantised) are freed into the heap, where glibc
    keeps them once its threshold for mapping large blocks has grown: without this a rank's
    resident memory stays tens of MB above what it holds. Does nothing elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols: libc is loaded already
    except (OSError, AttributeError):  # a libc without it (musl)
        pass
