"""Hostfiles: one line per host (or device slot), in MPICH's or Open MPI's syntax, each line
optionally carrying environment settings for that host's ranks.

    gaming-pc slots=2                              # Open MPI syntax: two ranks
    laptop:1 CMATRIX_CACHE_DIR=/data/cm UCX_NET_DEVICES=wlan0   # MPICH syntax, with settings
    office-desktop                                 # one rank
    # a comment; '#' also ends a line

A line is a host (a name, an IPv4 address, an IPv6 address, or ``[IPv6]:k``), its slot count
as ``host:k`` or ``slots=k`` (default 1; Open MPI's ``max_slots=k`` is accepted and
ignored), then any number of ``NAME=value`` words: ``NAME`` an environment variable name
(letters, digits and ``_``, not starting with a digit), ``value`` anything without spaces
or ``#`` (no quoting). ``cmatrix launch`` sets them for that line's ranks only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYNTAX = ("a line is 'host', 'host:k' (MPICH) or 'host slots=k' (Open MPI) with k a positive "
           "integer, then optionally NAME=value settings for that host's ranks")


@dataclass(frozen=True)
class HostLine:
    """One hostfile line: the host, its device slots (ranks), and environment settings for
    the ranks it gets (``NAME=value`` words, in the order written)."""

    host: str
    slots: int = 1
    env: dict[str, str] = field(default_factory=dict)


def read_hostfile(path: str) -> list[HostLine]:
    """One :class:`HostLine` per line of a hostfile (see the module's docstring for the
    syntax); ``#`` starts a comment. A host listed on several lines keeps them all (each
    line's slots are ranks on that host). A bad line raises :class:`InputError` naming the
    file, the line number and what is wrong."""
    try:
        text = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InputError(f"--hostfile: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise InputError(f"--hostfile: {path} is not a text file") from None
    entries = []
    for number, raw in enumerate(text, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            entries.append(parse_line(line))
        except ValueError as exc:
            raise InputError(f"--hostfile: {path}, line {number}: {raw.strip()!r}: {exc}; "
                             f"{_SYNTAX}") from None
    if not entries:
        raise InputError(f"--hostfile: {path} lists no host; write one line per device slot, "
                         "e.g. 'localhost'")
    return entries


def parse_line(line: str) -> HostLine:
    """One hostfile line (without its comment) as a :class:`HostLine`; ValueError says what
    is wrong. An IPv6 address has several colons: it takes slots as ``[addr]:k`` or with
    ``slots=k``."""
    host, *words = line.split()
    count: str | None = None
    env: dict[str, str] = {}
    for word in words:
        key, equals, value = word.partition("=")
        if not equals:
            raise ValueError(f"{word!r} is neither slots=k nor NAME=value")
        if key == "slots":
            if count is not None:
                raise ValueError("slots given twice")
            count = value
        elif key == "max_slots":
            continue
        elif not _NAME.fullmatch(key):
            raise ValueError(f"{key!r} in {word!r} is not an environment variable name "
                             "(letters, digits and '_', not starting with a digit)")
        elif key in env:
            raise ValueError(f"{key} is set twice")
        else:
            env[key] = value
    if host.startswith("["):  # [::1] or [::1]:2
        address, _, tail = host[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                raise ValueError(f"{host!r} is not '[address]' or '[address]:k'")
            count = _one_count(count, tail[1:])
        host = address
    elif host.count(":") == 1:
        host, count_here = host.split(":")
        count = _one_count(count, count_here)
    count = "1" if count is None else count
    if not host:
        raise ValueError("no host name")
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"the slot count {count!r} is not a positive integer")
    return HostLine(host, int(count), env)


def _one_count(already: str | None, count: str) -> str:
    if already is not None:
        raise ValueError("the slot count is given twice (host:k and slots=k)")
    return count
