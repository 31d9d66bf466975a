"""Where the ranks of a one-host job listen: every listening TCP socket the driver and its
sibling ranks (the launcher's children) opened themselves, read from /proc; the launcher's
own control socket, which the ranks inherit, is left out (MPICH's mpiexec binds it to every
address and has no setting for that). Prints "LISTEN addr:port" per socket and
"listeners: N on RANKS ranks"."""

import os

import cmatrix as cm

cl = cm.init()


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def socket_inodes(pid):
    found = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                found.add(target[8:-1])
    except OSError:
        pass
    return found


def address(hex_addr):
    host, port = hex_addr.split(":")
    if len(host) == 8:
        host = ".".join(str(int(host[i:i + 2], 16)) for i in (6, 4, 2, 0))
    else:
        host = "::1" if host == "00000000000000000000000001000000" else f"ipv6:{host}"
    return f"{host}:{int(port, 16)}"


def parent(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


launcher = {os.getppid(), parent(os.getppid())}
ranks = children(os.getppid()) or [os.getpid()]
inodes = set().union(*(socket_inodes(p) for p in ranks)) - set().union(*(socket_inodes(p) for p in launcher))
count = 0
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN, one of our ranks' sockets
                print("LISTEN", address(fields[1]))
                count += 1
print(f"listeners: {count} on {len(ranks)} ranks", flush=True)
