"""cmatrix launch on real mpiexec jobs, all on this machine.

Per-line hostfile settings reach their own ranks, numbered in hostfile order. ``127.0.0.2``
and ``127.0.0.3`` stand for other hosts: both launchers reach them through ssh (they are not
this machine by hydra's or Open MPI's rule), here a stand-in ssh (``HYDRA_LAUNCHER_EXEC``,
``PRTE_MCA_plm_ssh_agent``) that runs the command locally in a login-like environment, with a
HOME of its own. Through it: only the allowed variables travel, each rank's cache folder
defaults on its own "host", the preflight passes, and one that fails names each host.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import JOBS, ROOT, run_cmd

from cmatrix.engine import launch
from cmatrix.engine.hostfile import read_hostfile

pytestmark = pytest.mark.mpi

#: what ssh does with "ssh [options] host command...": run the words as one shell command
#: line there, in that host's login environment (HOME of its own, a short PATH), and here
#: under a host name of its own where a UTS namespace can be had (Open MPI's same-host
#: split hangs when two "hosts" share one name)
STAND_IN = """#!{python}
import os, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args = args[2:] if args[0] in ("-o", "-p", "-l", "-i", "-F", "-J") else args[1:]
host, words = args[0], args[1:]
if {fail!r}:
    sys.stderr.write("ssh: connect to host %s port 22: Connection refused\\n" % host)
    sys.exit(255)
login = {{"HOME": {home!r}, "PATH": "/usr/bin:/bin", "USER": "remote"}}
if {uts!r}:
    named = 'hostname "$0" && exec sh -c "$1"'
    os.execve({unshare!r}, ["unshare", "--uts", "sh", "-c", named, "host-" + host.replace(".", "-"),
                            " ".join(words)], login)
os.execve("/bin/sh", ["sh", "-c", " ".join(words)], login)
"""


@functools.cache
def unshare() -> str | None:
    """unshare, where it can give a process a host name of its own (root, or user namespaces)."""
    found = shutil.which("unshare")
    if not found:
        return None
    try:
        done = subprocess.run([found, "--uts", "hostname", "x"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return found if done.returncode == 0 else None


def stand_in(tmp_path: Path, fail: bool = False) -> tuple[dict, Path]:
    """The launcher settings that use a stand-in ssh, and the HOME it gives "other hosts"."""
    home = tmp_path / "remote-home"
    home.mkdir(exist_ok=True)
    path = tmp_path / ("ssh-fails" if fail else "ssh")
    path.write_text(STAND_IN.format(python=sys.executable, home=str(home), fail=fail, uts=bool(unshare()),
                                    unshare=unshare()))
    path.chmod(0o755)
    return {"HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": str(path),
            "PRTE_MCA_plm_ssh_agent": str(path)}, home


def need_host_names() -> None:
    """Open MPI jobs over 'hosts' that share this machine's host name hang (see STAND_IN)."""
    if launch.implementation() == "openmpi" and not unshare():
        pytest.skip("Open MPI needs a host name per 'host': unshare --uts is not allowed here")


def several_hosts_env(tmp_path: Path, **extra: str) -> dict:
    """This machine's side of a job over several hosts: one thread per rank, no loopback-only
    transport settings (ranks on 127.0.0.2 are on another "node"), HOME of its own."""
    env = launch.environment(threads=1, single_host=False)
    for name in ("CMATRIX_FAULT", "CMATRIX_CACHE_DIR", "XDG_CACHE_HOME", "UCX_NET_DEVICES", "OMPI_MCA_btl"):
        env.pop(name, None)
    home = tmp_path / "driver-home"
    home.mkdir(exist_ok=True)
    return {**env, "HOME": str(home), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), **extra}


def hostfile(tmp_path: Path, text: str) -> str:
    path = tmp_path / "hosts"
    path.write_text(text)
    return str(path)


def ranks(stdout: str) -> list[dict]:
    return sorted((json.loads(found) for found in re.findall(r"ENV (\{[^}]*\})", stdout)),
                  key=lambda row: row["rank"])


def report(path: str, env: dict, names: list[str], forward: list[str] | None = None) -> list[dict]:
    """Run the env_report job over the hostfile's blocks; each rank's values of ``names``."""
    with launch.hostfile_for(path) as translated:
        job = [sys.executable, str(JOBS / "env_report.py"), *names]
        cmd = launch.cluster_command(read_hostfile(path), job, hostfile=translated, env=env, forward=forward)
        r = run_cmd(cmd, env, timeout=120)
    assert r.returncode == 0, r
    return ranks(r.stdout)


def test_each_lines_settings_reach_its_own_ranks_in_hostfile_order(tmp_path):
    path = hostfile(tmp_path, "localhost CMATRIX_TAG=a\nlocalhost slots=2 CMATRIX_TAG=b OTHER_SETTING=x\n"
                              "localhost\nlocalhost CMATRIX_TAG=d\n")
    env = launch.environment(threads=1)
    env.pop("CMATRIX_TAG", None)
    rows = report(path, env, ["CMATRIX_TAG", "OTHER_SETTING"])
    assert [row["rank"] for row in rows] == [0, 1, 2, 3, 4]
    assert [row["CMATRIX_TAG"] for row in rows] == ["a", "b", "b", None, "d"]  # line 3 sets nothing
    assert [row["OTHER_SETTING"] for row in rows] == [None, "x", "x", None, None]


def test_cmatrix_launch_gives_each_line_its_settings(tmp_path):
    path = hostfile(tmp_path, "localhost CMATRIX_THREADS=1\nlocalhost slots=2 CMATRIX_THREADS=2\n"
                              "localhost CMATRIX_THREADS=3\n")
    env = {**launch.environment(threads=1), "PYTHONUNBUFFERED": "1"}
    r = run_cmd([sys.executable, "-m", "cmatrix", "launch", "--hostfile", path, str(JOBS / "ranks_table.py")],
                env, timeout=180)
    assert r.returncode == 0, r
    rows = [json.loads(line[5:]) for line in r.stdout.splitlines() if line.startswith("RANK ")]
    assert [row["rank"] for row in rows] == [0, 1, 2, 3]
    assert [row["threads"] for row in rows] == [1, 2, 2, 3]
    assert "checked" not in r.stderr  # one machine: no preflight


def test_only_the_allowed_variables_travel_to_other_hosts(tmp_path):
    ssh, remote_home = stand_in(tmp_path)
    env = several_hosts_env(tmp_path, CMATRIX_KEEP="k", SECRET_SETTING="s", XDG_CACHE_HOME="/driver/xdg",
                            **ssh)
    path = hostfile(tmp_path, "localhost CMATRIX_TAG=here\n127.0.0.2 slots=2 CMATRIX_TAG=there\n127.0.0.3\n")
    names = ["HOME", "USER", "CMATRIX_KEEP", "CMATRIX_TAG", "SECRET_SETTING", "XDG_CACHE_HOME",
             "HYDRA_LAUNCHER_EXEC", "PYTHONPATH"]
    rows = report(path, env, names, forward=launch.travelling(env))
    assert [row["rank"] for row in rows] == [0, 1, 2, 3]
    assert [row["HOME"] for row in rows] == [env["HOME"]] + [str(remote_home)] * 3
    assert [row["USER"] for row in rows][1:] == ["remote"] * 3
    assert [row["CMATRIX_TAG"] for row in rows] == ["here", "there", "there", None]
    assert {row["CMATRIX_KEEP"] for row in rows} == {"k"}
    assert {row["PYTHONPATH"] for row in rows} == {str(ROOT)}
    for name in ("SECRET_SETTING", "XDG_CACHE_HOME", "HYDRA_LAUNCHER_EXEC"):  # rank 0 is here: it has all
        assert [row[name] is None for row in rows] == [False, True, True, True], name


def test_each_rank_caches_on_its_own_host_after_the_preflight(tmp_path):
    need_host_names()
    ssh, remote_home = stand_in(tmp_path)
    env = several_hosts_env(tmp_path, **ssh)
    path = hostfile(tmp_path, "localhost\n127.0.0.2 slots=2\n")
    r = run_cmd([sys.executable, "-m", "cmatrix", "launch", "--hostfile", path, str(JOBS / "cache_where.py")],
                env, timeout=180)
    assert r.returncode == 0 and "SAVED 3" in r.stdout, r
    assert "cmatrix launch: checked 1 other host(s) through the launcher" in r.stderr, r
    shards = Path(env["HOME"], ".cache", "cmatrix", "shards", "launch.where")
    theirs = remote_home / ".cache" / "cmatrix" / "shards" / "launch.where"
    assert (shards / "rank0.cmshard").exists() and not (shards / "rank1.cmshard").exists(), r
    assert (theirs / "rank1.cmshard").exists() and (theirs / "rank2.cmshard").exists(), r
    assert not (theirs / "rank0.cmshard").exists()


def test_the_preflight_names_every_host_it_cannot_use_and_starts_nothing(tmp_path):
    ssh, _ = stand_in(tmp_path, fail=True)
    env = several_hosts_env(tmp_path, **ssh)
    path = hostfile(tmp_path, "localhost\nno-such-host.invalid\n127.0.0.2 slots=2\n")
    start = time.monotonic()
    r = run_cmd([sys.executable, "-m", "cmatrix", "launch", "--hostfile", path, str(JOBS / "cache_where.py")],
                env, timeout=120)
    assert time.monotonic() - start < 60, "the preflight waited for its time limit"
    assert r.returncode == 2, r
    assert "cmatrix launch: 2 problem(s) with the hosts; the job was not started" in r.stderr, r
    problems = [line.strip() for line in r.stderr.splitlines() if line.startswith("  ")]
    assert problems[0].startswith("no-such-host.invalid: the name does not resolve on this machine"), r
    assert "add no-such-host.invalid to /etc/hosts on" in problems[0], r
    assert problems[1] == ("127.0.0.2: the launcher cannot reach it (ssh: connect to host 127.0.0.2 port 22: "
                           "Connection refused); set up ssh keys: ssh-copy-id 127.0.0.2, and check "
                           "`ssh 127.0.0.2 true` works without a password"), r
    assert "SAVED" not in r.stdout and not (Path(env["HOME"]) / ".cache").exists()


def test_without_ssh_on_this_machine_the_preflight_says_so(tmp_path):
    env = several_hosts_env(tmp_path, PATH=str(tmp_path / "no-ssh-here"))
    for name in ("HYDRA_LAUNCHER", "HYDRA_LAUNCHER_EXEC", "PRTE_MCA_plm_ssh_agent"):
        env.pop(name, None)
    path = hostfile(tmp_path, "localhost\n127.0.0.2\n")
    r = run_cmd([sys.executable, "-m", "cmatrix", "launch", "--hostfile", path, str(JOBS / "cache_where.py")],
                env, timeout=120)
    assert r.returncode == 2, r
    assert "127.0.0.2: the launcher cannot start ssh on this machine (" in r.stderr, r
    assert "install an ssh client here (e.g. apt-get install openssh-client)" in r.stderr, r


def test_no_check_skips_the_preflight(tmp_path):
    need_host_names()
    ssh, _ = stand_in(tmp_path)
    env = several_hosts_env(tmp_path, **ssh)
    path = hostfile(tmp_path, "localhost\n127.0.0.2\n")
    r = run_cmd([sys.executable, "-m", "cmatrix", "launch", "--no-check", "--hostfile", path,
                 str(JOBS / "cache_where.py")], env, timeout=180)
    assert r.returncode == 0 and "SAVED 2" in r.stdout, r
    assert "checked" not in r.stderr, r
    assert os.path.exists(tmp_path / "remote-home" / ".cache" / "cmatrix" / "shards" / "launch.where" /
                          "rank1.cmshard")
