"""A learning Ethernet switch in user space that holds every frame back for a fixed time.

jobs/netcluster.py runs it inside a cluster's switch namespace for ``link="wifi"``: the kernel
has no ``sch_netem`` here, so the one-way delay of a slow network is made by this relay instead
of a bridge. Each switch-side veth end (a port) gets an ``AF_PACKET`` raw socket; a frame read
from one port is sent ``delay`` seconds later to the port its destination MAC was last seen on,
or to every other port when the destination is unknown, broadcast or multicast.

``PACKET_VNET_HDR`` is on, so each frame comes with the kernel's 10-byte ``virtio_net_hdr``
and is sent back with it unchanged: TCP's 64 KB GSO super-frames and partially checksummed
frames cross the relay whole, which is what lets plain Python keep up with 100 Mbit/s.

    python jobs/netrelay.py --delay 0.002 p1 p2 p3

It prints ``ready`` once every port is open, and stops when its standard input reaches end of
file (the harness that started it closed the pipe, or died) or on SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import os
import select
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_IGNORE_OUTGOING = 23
PACKET_OUTGOING = 4
VNET_HDR = 10  # struct virtio_net_hdr, before the Ethernet header
FRAME_MAX = 1 << 18  # a GSO super-frame is at most 64 KB (256 KB leaves room for BIG TCP)
SOCKET_BUFFER = 8 << 20


def open_port(name: str) -> socket.socket:
    """A raw, non-blocking socket on interface ``name`` that carries virtio headers."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    with contextlib.suppress(OSError):  # older kernels: outgoing frames are skipped by packet type
        sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    for option in (33, 32):  # SO_RCVBUFFORCE / SO_SNDBUFFORCE (root), else the capped ordinary sizes
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF if option == 33 else socket.SO_SNDBUF,
                            SOCKET_BUFFER)
    sock.bind((name, ETH_P_ALL))
    sock.setblocking(False)
    return sock


class Relay:
    """The switch: ports, the MAC table, and the frames waiting for their time."""

    def __init__(self, ports: list[str], delay: float) -> None:
        self.delay = delay
        self.socks = [open_port(name) for name in ports]
        self.by_fd = {s.fileno(): i for i, s in enumerate(self.socks)}
        self.table: dict[bytes, int] = {}  # source MAC -> port it was seen on
        self.waiting: collections.deque[tuple[float, int, bytes]] = collections.deque()
        self.buffer = bytearray(FRAME_MAX)
        self.dropped = 0

    def receive(self, port: int) -> None:
        """Read every frame waiting on ``port`` and queue it with its due time."""
        sock, view = self.socks[port], memoryview(self.buffer)
        while True:
            try:
                size, address = sock.recvfrom_into(self.buffer, FRAME_MAX, socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            if address[2] == PACKET_OUTGOING:
                continue
            if size > FRAME_MAX or size < VNET_HDR + 14:
                self.dropped += 1
                continue
            frame = bytes(view[:size])
            self.table[frame[VNET_HDR + 6:VNET_HDR + 12]] = port
            self.waiting.append((time.monotonic() + self.delay, port, frame))

    def send_due(self) -> float | None:
        """Send the frames whose time has come; the seconds until the next one (None: none left)."""
        now = time.monotonic()
        while self.waiting:
            due, source, frame = self.waiting[0]
            if due > now:
                return due - now
            self.waiting.popleft()
            dest = frame[VNET_HDR:VNET_HDR + 6]
            port = None if dest[0] & 1 else self.table.get(dest)
            targets = range(len(self.socks)) if port is None else (port,)
            for target in targets:
                if target != source:
                    self.send(target, frame)
        return None

    def send(self, port: int, frame: bytes) -> None:
        """Send one frame; a full queue or a vanished port drops it, as a switch would."""
        try:
            self.socks[port].send(frame)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ENETDOWN, errno.ENXIO, errno.EMSGSIZE):
                raise
            self.dropped += 1

    def serve(self, stop_fd: int) -> None:
        """Forward frames until ``stop_fd`` becomes readable at end of file."""
        fds = [*self.by_fd, stop_fd]
        wait: float | None = None
        while True:
            readable, _, _ = select.select(fds, [], [], wait)  # select: microsecond timeouts
            for fd in readable:
                if fd == stop_fd:
                    if not os.read(stop_fd, 4096):
                        return
                else:
                    self.receive(self.by_fd[fd])
            wait = self.send_due()


def main(argv: list[str] | None = None) -> int:
    """Command line: open the ports, say ``ready``, relay until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay", type=float, default=0.002, help="one-way delay in seconds")
    parser.add_argument("ports", nargs="+", help="interface names of the switch's ports")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    relay = Relay(args.ports, args.delay)
    print("ready", flush=True)
    relay.serve(sys.stdin.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
