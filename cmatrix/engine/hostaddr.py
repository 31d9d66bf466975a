"""This host's names and addresses, for matching a seed-style ``node_IP_list``
against the ranks MPI actually started.

Nothing here opens a connection or listens: names come from the resolver,
IPv4 addresses of the interfaces from an ``SIOCGIFADDR`` query per interface,
IPv6 ones from ``/proc/net/if_inet6`` where Linux provides it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket

from .hostprobe import interfaces


def _interface_ipv4() -> set[str]:
    return set(interfaces().values())


def _interface_ipv6() -> set[str]:
    found: set[str] = set()
    with contextlib.suppress(OSError, ValueError), open("/proc/net/if_inet6") as f:
        for line in f:
            raw = line.split()[0]
            found.add(str(ipaddress.IPv6Address(bytes.fromhex(raw))))
    return found


def _resolved(name: str) -> set[str]:
    with contextlib.suppress(OSError, UnicodeError):
        return {info[4][0] for info in socket.getaddrinfo(name, None)}
    return set()


def local_identity(processor_name: str) -> list[str]:
    """Every name and address by which this host may be listed (lower-case, sorted)."""
    names = {processor_name, socket.gethostname()}
    with contextlib.suppress(OSError):
        names.add(socket.getfqdn())
    addresses = _interface_ipv4() | _interface_ipv6()
    for name in list(names):
        addresses |= _resolved(name)
    return sorted({n.lower() for n in names if n} | {normalise(a) for a in addresses})


def normalise(entry: str) -> str:
    """An address in canonical form (``::ffff:10.0.0.1`` and ``010.0.0.1``-free), a name lower-case."""
    text = str(entry).strip().lower()
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(text.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return str(ip)
    return text


def is_loopback(entry: str) -> bool:
    text = normalise(entry)
    if text in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(text).is_loopback
    return False
