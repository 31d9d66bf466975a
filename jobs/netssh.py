"""How a process enters one host of a jobs/netcluster.py cluster: the cluster's ssh stand-in.

The stand-in is an executable in the cluster's folder that calls :func:`standin` with the
cluster's description (cluster.json). Hydra runs it as it would run ssh,
``STANDIN [ssh options] HOST command words...``: the words are joined by spaces and run by
``/bin/sh -c`` inside HOST, in HOST's home, with stdin, stdout, stderr and the exit status passed
through (the stand-in execs). An unknown HOST gets ssh's message and exit status 255.
``STANDIN --netcluster-exec HOST -- argv...`` runs argv inside HOST without a shell.

Entering a host (:func:`enter`, in a single-threaded process, before exec): join its network
namespace; a UTS namespace of its own named after the host; a private mount namespace (``/``
made private before anything is mounted, so nothing reaches the real system) in which the
cluster's hosts file covers /etc/hosts, a fresh sysfs shows the host's interfaces (UCX lists
/sys/class/net) with the cgroup file systems kept, and the host's home covers the common HOME.
Python 3.11 has no os.setns or os.unshare, hence ctypes.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

EXEC = "--netcluster-exec"  # the stand-in's own mode: run argv in a host without a shell
SSH_VALUE_OPTIONS = set("BbcDEeFIiJLlmOopQRSWw")  # ssh options that take a value
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWNET = 0x00020000, 0x04000000, 0x40000000
_MS_BIND, _MS_MOVE, _MS_REC, _MS_PRIVATE, _MNT_DETACH = 4096, 8192, 16384, 1 << 18, 2


def libc() -> ctypes.CDLL:
    """The C library, with errno kept and mount's argument types declared."""
    c = ctypes.CDLL(None, use_errno=True)
    c.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    c.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return c


def _call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def enter(config: dict[str, Any], host: str) -> None:
    """Move this process (single-threaded: unshare refuses otherwise) into ``host``: its network,
    a UTS namespace with its name, a private mount namespace with the cluster's /etc/hosts, the
    host's own /sys and the host's home over the common HOME path."""
    c = libc()
    fd = os.open(config["hosts"][host]["netns"], os.O_RDONLY)
    try:
        _call(c.setns(fd, _CLONE_NEWNET), "setns(net)")
    finally:
        os.close(fd)
    _call(c.unshare(_CLONE_NEWUTS | _CLONE_NEWNS), "unshare(uts, mount)")
    socket.sethostname(host)
    _call(c.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "make / private")  # before any mount
    stash, cgroup = config["stash"].encode(), b"/sys/fs/cgroup"
    keep = os.path.ismount(cgroup)
    if keep:  # a fresh sysfs would hide the cgroup file systems (jobs/slowdown.py needs them)
        _call(c.mount(cgroup, stash, None, _MS_BIND | _MS_REC, None), "keep /sys/fs/cgroup")
    _call(c.umount2(b"/sys", _MNT_DETACH), "umount /sys")
    _call(c.mount(b"sysfs", b"/sys", b"sysfs", 0, None), "mount sysfs")  # UCX lists /sys/class/net
    if keep:
        _call(c.mount(stash, cgroup, None, _MS_MOVE, None), "restore /sys/fs/cgroup")
    _call(c.mount(config["hosts_file"].encode(), b"/etc/hosts", None, _MS_BIND, None), "bind /etc/hosts")
    if not config.get("own_homes"):
        home = config["hosts"][host]["home"].encode()
        _call(c.mount(home, config["home"].encode(), None, _MS_BIND, None), "bind the host's home")


def _ssh_split(args: list[str]) -> tuple[str, list[str]] | None:
    """ssh's command line without its options: (host, command words); None when no host."""
    i = 0
    while i < len(args) and args[i].startswith("-") and len(args[i]) > 1:
        if args[i] == "--":
            i += 1
            break
        letters = args[i][1:]
        for j, letter in enumerate(letters):
            if letter in SSH_VALUE_OPTIONS:
                i += j == len(letters) - 1  # the value is the next word
                break
        i += 1
    return (args[i].rpartition("@")[2], args[i + 1:]) if i < len(args) else None


def standin(args: list[str], config_path: str) -> int:
    """The ssh stand-in: ``[options] HOST words...`` runs ``/bin/sh -c 'words'`` inside HOST with
    HOST's HOME, as ssh would; ``--netcluster-exec HOST -- argv...`` runs argv there directly."""
    config = json.loads(Path(config_path).read_text())
    direct = bool(args) and args[0] == EXEC
    if direct:
        host, argv = args[1], args[3:] if args[2:3] == ["--"] else args[2:]
    else:
        split = _ssh_split(args)
        if split is None:
            print("usage: ssh [options] destination [command]", file=sys.stderr)
            return 255
        host, words = split
        if host in ("localhost", "127.0.0.1") and socket.gethostname() in config["hosts"]:
            host = socket.gethostname()  # ssh to localhost from inside a host stays there
        host = config["aliases"].get(host, host)
        argv = ["/bin/sh", "-c", " ".join(words)] if words else ["/bin/sh"]
    if host not in config["hosts"]:
        print(f"ssh: Could not resolve hostname {host}: Name or service not known", file=sys.stderr)
        return 255
    try:
        enter(config, host)
    except OSError as e:
        print(f"ssh: connect to host {host} port 22: {e}", file=sys.stderr)
        return 255
    if not direct:
        home = config["hosts"][host]["home"] if config.get("own_homes") else config["home"]
        os.environ.update(HOME=home, PWD=home)
        os.chdir(home)
    try:
        os.execvp(argv[0], argv)
    except OSError as e:
        print(f"{argv[0]}: {e.strerror}", file=sys.stderr)
        return 127


