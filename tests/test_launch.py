"""cmatrix launch without MPI: hostfiles with per-host settings, the MPMD commands for MPICH
and Open MPI, what travels to other hosts, and the host probe."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cmatrix.engine import hostprobe, launch
from cmatrix.engine.hostfile import HostLine, read_hostfile
from cmatrix.errors import InputError

PY = sys.executable


@pytest.mark.parametrize("text", ["a\nb:2\n# note\nc max_slots=4 slots=3\n", "a:1\nb slots=2\nc:3\n",
                                  "a\nb slots=2 # two\n[c]:3\n"])
def test_hostfiles_in_either_syntax_are_written_for_the_mpi_in_use(text, tmp_path, monkeypatch):
    path = tmp_path / "hosts"
    path.write_text(text)
    assert read_hostfile(str(path)) == [HostLine("a", 1), HostLine("b", 2), HostLine("c", 3)]
    for impl, expected in (("mpich", "a:1\nb:2\nc:3\n"), ("openmpi", "a slots=1\nb slots=2\nc slots=3\n")):
        monkeypatch.setattr(launch, "implementation", lambda *_, impl=impl: impl)
        with launch.hostfile_for(str(path)) as translated, open(translated) as f:
            assert f.read() == expected
    with launch.hostfile_for(None) as nothing:
        assert nothing is None


def test_ipv6_hosts_keep_their_colons(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("::1\nfe80::1 slots=2\n[fd00::5]:3 X=1\n")
    assert read_hostfile(str(path)) == [HostLine("::1", 1), HostLine("fe80::1", 2),
                                        HostLine("fd00::5", 3, {"X": "1"})]


def test_a_line_carries_settings_for_its_ranks(tmp_path, monkeypatch):
    path = tmp_path / "hosts"
    path.write_text("laptop slots=1 CMATRIX_CACHE_DIR=/data/cm CMATRIX_THREADS=4 UCX_NET_DEVICES=wlan0\n"
                    "gaming-pc:2 OMP_NUM_THREADS=8  # two GPUs\n"
                    "office EMPTY= A_B=x=y\n")
    lines = read_hostfile(str(path))
    assert lines == [
        HostLine("laptop", 1, {"CMATRIX_CACHE_DIR": "/data/cm", "CMATRIX_THREADS": "4",
                               "UCX_NET_DEVICES": "wlan0"}),
        HostLine("gaming-pc", 2, {"OMP_NUM_THREADS": "8"}),
        HostLine("office", 1, {"EMPTY": "", "A_B": "x=y"}),
    ]
    assert list(lines[0].env) == ["CMATRIX_CACHE_DIR", "CMATRIX_THREADS", "UCX_NET_DEVICES"]
    monkeypatch.setattr(launch, "implementation", lambda *_: "mpich")
    with launch.hostfile_for(str(path)) as translated:  # the launcher's file has no settings
        assert Path(translated).read_text() == "laptop:1\ngaming-pc:2\noffice:1\n"


@pytest.mark.parametrize("line, why", [
    ("a slots=0", "not a positive integer"), ("a slots=x", "not a positive integer"),
    ("a b", "'b' is neither"), ("host:", "not a positive integer"), (":2", "no host name"),
    ("bad:x", "not a positive integer"), ("a:2 slots=3", "given twice"), ("[::1]x", "is not '\\[address\\]"),
    ("a 1X=2", "'1X' .* is not an environment variable name"), ("a X-Y=1", "not an environment variable"),
    ("a X=1 X=2", "X is set twice"), ("a slots=1 slots=2", "slots given twice"), ("a =1", "'' in"),
])
def test_a_bad_hostfile_line_is_named(line, why, tmp_path):
    path = tmp_path / "hosts"
    path.write_text(f"ok\n{line}\n")
    with pytest.raises(InputError, match=f"line 2: .*{why}.*NAME=value settings"):
        read_hostfile(str(path))


def test_an_empty_hostfile_and_a_missing_one_are_refused(tmp_path):
    (tmp_path / "hosts").write_text("# nothing\n\n")
    with pytest.raises(InputError, match="lists no host"):
        read_hostfile(str(tmp_path / "hosts"))
    with pytest.raises(InputError, match="cannot read"):
        read_hostfile(str(tmp_path / "none"))


def test_blocks_follow_the_lines_and_go_round_for_more_ranks():
    a, b = HostLine("a", 2), HostLine("b", 1)
    assert launch.blocks([a, b]) == [(a, 2), (b, 1)]
    assert launch.blocks([a, b], 2) == [(a, 2)]
    assert launch.blocks([a, b], 1) == [(a, 1)]
    assert launch.blocks([a, b], 5) == [(a, 2), (b, 1), (a, 2)]
    with pytest.raises(ValueError):
        launch.blocks([])


@pytest.fixture
def fake_mpi(monkeypatch):
    """launch's MPI named as the test says, with mpiexec at /mpi/mpiexec."""
    def use(impl: str) -> None:
        monkeypatch.setattr(launch, "implementation", lambda *_: impl)
        monkeypatch.setattr(launch, "mpiexec", lambda: "/mpi/mpiexec")
    return use


LINES = [HostLine("driver", 1, {"CMATRIX_THREADS": "2"}), HostLine("laptop", 2, {"UCX_NET_DEVICES": "wlan0"}),
         HostLine("pc", 1)]
JOB = ["py", "-m", "cmatrix", "run", "job.py"]


def test_mpich_gets_one_block_per_line_with_its_settings(fake_mpi):
    fake_mpi("mpich")
    cmd = launch.cluster_command(LINES, JOB, hostfile="/tmp/h", forward=["CMATRIX_X", "PATH"],
                                 extra={"laptop": {"UCX_NET_DEVICES": "eth0", "FI_TCP_IFACE": "eth0"}},
                                 options=["-localhost", "10.0.0.1"])
    assert cmd == ["/mpi/mpiexec", "-localhost", "10.0.0.1", "-f", "/tmp/h", "-genvlist", "CMATRIX_X,PATH",
                   "-n", "1", "-env", "CMATRIX_THREADS", "2", *JOB, ":",
                   "-n", "2", "-env", "UCX_NET_DEVICES", "wlan0", "-env", "FI_TCP_IFACE", "eth0", *JOB, ":",
                   "-n", "1", *JOB]
    assert "-genvnone" in launch.cluster_command(LINES, JOB, hostfile="/tmp/h", forward=[])
    plain = launch.cluster_command(LINES, JOB, 2, hostfile="/tmp/h")  # all here: hydra passes everything
    assert plain == ["/mpi/mpiexec", "-f", "/tmp/h", "-n", "1", "-env", "CMATRIX_THREADS", "2", *JOB, ":",
                     "-n", "1", "-env", "UCX_NET_DEVICES", "wlan0", *JOB]
    with pytest.raises(ValueError, match="hostfile"):
        launch.cluster_command(LINES, JOB)


def test_open_mpi_blocks_undo_the_first_blocks_settings(fake_mpi):
    """Open MPI applies the first block's -x to every block: later blocks restore or unset."""
    fake_mpi("openmpi")
    env = {"CMATRIX_THREADS": "1", "PATH": "/bin"}
    lines = [HostLine("driver", 1, {"CMATRIX_THREADS": "2", "UCX_NET_DEVICES": "eth0"}), *LINES[1:]]
    cmd = launch.cluster_command(lines, JOB, env=env, forward=["CMATRIX_THREADS", "PATH"])
    assert cmd == ["/mpi/mpiexec", "--bind-to", "none", "-x", "CMATRIX_THREADS", "-x", "PATH",
                   "-n", "1", "--host", "driver:1", "-x", "CMATRIX_THREADS=2", "-x", "UCX_NET_DEVICES=eth0",
                   *JOB, ":",
                   "-n", "2", "--host", "laptop:2", "-x", "UCX_NET_DEVICES=wlan0", "-x", "CMATRIX_THREADS",
                   *JOB, ":",
                   "-n", "1", "--host", "pc:1", "-x", "CMATRIX_THREADS", "--unset-env", "UCX_NET_DEVICES",
                   *JOB]
    # all hosts here (nothing forwarded by name): a variable of this environment is restored
    again = launch.cluster_command([lines[0], HostLine("b")], JOB, env={"UCX_NET_DEVICES": "lo"})
    assert again[again.index("b:1") + 1:] == ["--unset-env", "CMATRIX_THREADS", "-x", "UCX_NET_DEVICES", *JOB]


def test_only_what_ranks_need_travels_to_other_hosts():
    env = {"CMATRIX_CACHE_DIR": "/c", "CMATRIX_JOB_DIR": "/j", "OMP_NUM_THREADS": "1", "OPENBLAS_X": "1",
           "MKL_X": "1", "UCX_NET_DEVICES": "eth0", "FI_PROVIDER": "tcp", "MPIR_CVAR_X": "1", "PATH": "/bin",
           "LD_LIBRARY_PATH": "/l", "VIRTUAL_ENV": "/v", "PYTHONPATH": "/p", "PYTHONUNBUFFERED": "1",
           "HOME": "/root", "USER": "me", "XDG_CACHE_HOME": "/x", "TMPDIR": "/t", "PWD": "/w",
           "HYDRA_LAUNCHER": "ssh", "HYDRA_LAUNCHER_EXEC": "/stand-in", "PRTE_MCA_plm_ssh_agent": "/s",
           "DISPLAY": ":0", "SSH_AUTH_SOCK": "/s", "LANG": "C"}
    assert launch.travelling(env) == sorted(
        ["CMATRIX_CACHE_DIR", "CMATRIX_JOB_DIR", "OMP_NUM_THREADS", "OPENBLAS_X", "MKL_X", "UCX_NET_DEVICES",
         "FI_PROVIDER", "MPIR_CVAR_X", "PATH", "LD_LIBRARY_PATH", "VIRTUAL_ENV", "PYTHONPATH",
         "PYTHONUNBUFFERED"])


def test_this_machine_is_local_by_the_launchers_rule():
    assert launch.is_local("localhost") and launch.is_local("127.0.0.1")
    assert launch.is_local(socket.gethostname())
    assert not launch.is_local("127.0.0.2")  # hydra and Open MPI ssh to it
    assert not launch.is_local("no-such-host.invalid")
    assert launch.local_hosts(["localhost", "127.0.0.1"])
    assert not launch.local_hosts(["localhost", "no-such-host.invalid"])


def test_the_probe_reports_as_one_json_line(tmp_path):
    text = Path(hostprobe.__file__).read_text()
    r = subprocess.run([PY, "-c", text, "--driver", "127.0.0.1", "localhost", "no-such-host.invalid"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    [line] = [ln for ln in r.stdout.splitlines() if ln.startswith(hostprobe.MARK)]
    facts = json.loads(line[len(hostprobe.MARK):])
    assert facts["python"] == ".".join(map(str, sys.version_info[:3]))
    from cmatrix._version import __version__

    assert facts["cmatrix"] == __version__
    assert facts["hostname"] == socket.gethostname() and facts["cwd"] == str(tmp_path)
    assert "127.0.0.1" in facts["resolved"]["localhost"]
    assert facts["resolved"]["no-such-host.invalid"] is None
    assert facts["route"] == {"to": "127.0.0.1", "from": "127.0.0.1", "iface": facts["route"]["iface"]}
    if sys.platform.startswith("linux"):
        assert facts["interfaces"].get(facts["route"]["iface"]) == "127.0.0.1"
    assert "mpi4py" in facts["mpi"]
    imported = [n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(ast.parse(text))
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
    assert not [m for m in imported if (m or "").startswith("cmatrix")]  # it works where cmatrix is missing
