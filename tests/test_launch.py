"""cmatrix launch without MPI: hostfiles with per-host settings, the MPMD commands for MPICH
and Open MPI, what travels to other hosts, and the preflight's verdicts on probe results
(the launcher outputs below are what MPICH 5.0 and Open MPI 5.0 print)."""

from __future__ import annotations

import ast
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cmatrix.cli import preflight
from cmatrix.cli.preflight import Outcome
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
    ast.parse(text, feature_version=(3, 8))  # an older Python at the same path still reports its version
    imported = [n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(ast.parse(text))
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names]
    assert not [m for m in imported if (m or "").startswith("cmatrix")]  # it works where cmatrix is missing


# --- the preflight's verdicts ---------------------------------------------------------------

HYDRA = "/mpich-5.0.2/src/pm/hydra"
HYDRA_NO_NAME = f"""ssh: Could not resolve hostname laptop: Name or service not known
[mpiexec@vm] ui_cmd_cb ({HYDRA}/mpiexec/pmiserv_pmci.c:51): Launch proxy failed.
[mpiexec@vm] main ({HYDRA}/mpiexec/mpiexec.c:270): process manager error waiting for completion
"""
HYDRA_NO_SSH = f"""[mpiexec@vm] HYDU_create_process ({HYDRA}/lib/utils/launch.c:73): execvp error \
on file ssh (No such file or directory)
[mpiexec@vm] ui_cmd_cb ({HYDRA}/mpiexec/pmiserv_pmci.c:51): Launch proxy failed.
"""
HYDRA_NO_PYTHON = f"""[proxy:0@laptop] HYDU_create_process ({HYDRA}/lib/utils/launch.c:73): \
execvp error on file {PY} (No such file or directory)
"""
SSH_FIX = "set up ssh keys: ssh-copy-id laptop, and check `ssh laptop true` works without a password"
VENV_FIX = ("create the same virtual environment at the same absolute path on laptop (cmatrix launch starts "
            "sys.executable on every host)")
def refused(host: str) -> str:
    return f"""ssh: connect to host {host} port 22: Connection refused
------------------------------------------------------------
A daemon failed to report back after being spawned. This could
be due to several factors, including inability to find the
"""


OMPI_REFUSED = refused("laptop")
OMPI_NO_PYTHON = f"""prterun was unable to launch the specified application as it could not
access an executable:

   Executable: {PY}
   Node: laptop
"""
OMPI_NO_SSH = "No available launching agents were found.\n"


@pytest.mark.parametrize("impl, output, rc, expected", [
    ("mpich", HYDRA_NO_NAME, 255, "laptop: the launcher cannot reach it (ssh: Could not resolve hostname "
     f"laptop: Name or service not known); {SSH_FIX}"),
    ("openmpi", OMPI_REFUSED, 255, "laptop: the launcher cannot reach it (ssh: connect to host laptop "
     f"port 22: Connection refused); {SSH_FIX}"),
    ("mpich", HYDRA_NO_SSH, 255, "laptop: the launcher cannot start ssh on this machine ([mpiexec@vm] "
     "HYDU_create_process"),
    ("mpich", HYDRA_NO_SSH, 255, "install an ssh client here (e.g. apt-get install openssh-client) or "
     "name one in HYDRA_LAUNCHER_EXEC"),
    ("openmpi", OMPI_NO_SSH, 250, "or name one in PRTE_MCA_plm_ssh_agent"),
    ("mpich", HYDRA_NO_PYTHON, 255, f"laptop: {PY} does not exist there; {VENV_FIX}"),
    ("openmpi", OMPI_NO_PYTHON, 183, f"laptop: {PY} does not exist there; {VENV_FIX}"),
    ("mpich", "[proxy:0@laptop] unable to change wdir to /w (No such file or directory)\n", 255,
     "laptop: the working folder"),
    ("mpich", "", None, f"laptop: no answer through the launcher within 30 s; {SSH_FIX} (and that laptop "
     "is on)"),
    ("mpich", "Traceback\nSyntaxError: invalid syntax\n", 1, "laptop: the probe did not report (exit status "
     "1: SyntaxError: invalid syntax)"),
])
def test_a_host_the_probe_did_not_report_from_is_named_with_the_fix(impl, output, rc, expected):
    assert expected in preflight.failure("laptop", Outcome("laptop", None, output, rc), impl)


def facts(host="laptop", **over):
    base = {"python": "3.11.7", "executable": PY, "cmatrix": "0.1.0",
            "mpi": {"mpi4py": "4.1.2", "mpich": "5.0.2"}, "hostname": host, "cwd": "/work",
            "resolved": {"driver": ["10.0.0.1"], "laptop": ["10.0.0.2"], "pc": ["10.0.0.3"]},
            "interfaces": {"lo": "127.0.0.1", "eth0": "10.0.0.2"},
            "route": {"to": "10.0.0.1", "from": "10.0.0.2", "iface": "eth0"}}
    return {**base, **over}


HERE = facts("driver", interfaces={"lo": "127.0.0.1", "eth0": "10.0.0.1"}, route={"to": None})


def judge(lines, probes, routes=None, impl="mpich", back="driver", env=None, here=HERE):
    routes = routes if routes is not None else {h: "10.0.0.1" for h in probes}
    outcomes = {h: Outcome(h, f, "", 0) if isinstance(f, dict) else f for h, f in probes.items()}
    return preflight.assess(lines, here, routes, outcomes, impl, back, env or {})


@pytest.fixture
def local_driver(monkeypatch):
    monkeypatch.setattr(launch, "is_local", lambda host: host in ("driver", "localhost"))


def test_hosts_that_match_pass_without_problems_or_choices(local_driver):
    v = judge([HostLine("driver"), HostLine("laptop", 2)], {"laptop": facts()})
    assert v.problems == [] and v.warnings == [] and v.env == {} and v.options == []
    assert v.notes == ["checked 1 other host(s) through the launcher: Python 3.11.7, cmatrix 0.1.0, "
                       "mpi4py 4.1.2, mpich 5.0.2 everywhere"]


def test_every_problem_is_reported_at_once_one_line_each(local_driver):
    lines = [HostLine("driver"), HostLine("laptop"), HostLine("pc"), HostLine("gone"), HostLine("far")]
    old = facts(python="3.10.12", cmatrix="0.0.9", mpi={"mpi4py": "4.1.2", "mpich": "4.2.0"})
    bare = facts("pc", cmatrix=None, resolved={"driver": ["10.0.0.1"], "laptop": None, "pc": ["10.0.0.3"]},
                 interfaces={"lo": "127.0.0.1", "eth0": "10.0.0.3"},
                 route={"to": "10.0.0.1", "from": "10.0.0.3", "iface": "eth0"})
    v = judge(lines, {"laptop": old, "pc": bare, "far": Outcome("far", None, refused("far"), 255)},
              routes={"laptop": "10.0.0.1", "pc": "10.0.0.1", "gone": None, "far": "10.0.0.1"})
    assert v.problems == [
        f"laptop: Python 3.10.12 there, 3.11.7 here; recreate the virtual environment {PY} on laptop with "
        "Python 3.11 and install the same cmatrix version (0.1.0)",
        "laptop: cmatrix 0.0.9 there, 0.1.0 here; install the same cmatrix version (0.1.0) on laptop",
        "laptop: MPI packages mpi4py 4.1.2, mpich 4.2.0 there, mpi4py 4.1.2, mpich 5.0.2 here; install the "
        "same on laptop (pip install mpi4py==4.1.2 mpich==5.0.2)",
        f"pc: cmatrix is not installed for {PY} there; install the same cmatrix version (0.1.0) into it",
        "pc: the hostfile name laptop does not resolve there; add laptop to /etc/hosts on pc or use "
        "addresses in the hostfile",
        "gone: the name does not resolve on this machine (driver); add gone to /etc/hosts on driver or "
        "use addresses in the hostfile",
        "far: the launcher cannot reach it (ssh: connect to host far port 22: Connection refused); set up "
        "ssh keys: ssh-copy-id far, and check `ssh far true` works without a password",
    ]
    assert v.notes == []  # no "checked ... everywhere" while something differs


def test_a_host_with_several_interfaces_is_pinned_to_the_one_that_reaches_here(local_driver):
    two = {"lo": "127.0.0.1", "docker0": "172.17.0.1", "wlan0": "10.0.0.2"}
    laptop = facts(interfaces=two, route={"to": "10.0.0.1", "from": "10.0.0.2", "iface": "wlan0"})
    pc = facts("pc", interfaces={"lo": "127.0.0.1", "docker0": "172.17.0.1", "eth1": "10.0.0.3"},
               route={"to": "10.0.0.1", "from": "10.0.0.3", "iface": "eth1"})
    lines = [HostLine("driver"), HostLine("laptop"), HostLine("pc", 1, {"UCX_NET_DEVICES": "eth1"})]
    v = judge(lines, {"laptop": laptop, "pc": pc})
    assert v.problems == []
    assert v.env == {"laptop": {"UCX_NET_DEVICES": "wlan0", "FI_TCP_IFACE": "wlan0"},
                     "pc": {"FI_TCP_IFACE": "eth1"}}  # the hostfile's own setting stays
    assert v.warnings == ["172.17.0.1 is an address of several hosts (docker0 on laptop, docker0 on pc), "
                          "as container bridges are: excluded; ranks use the interface that reaches this "
                          "machine"]
    assert ("laptop: ranks use wlan0 (10.0.0.2), the interface that reaches this machine: "
            "UCX_NET_DEVICES=wlan0 FI_TCP_IFACE=wlan0") in v.notes
    ompi = judge(lines, {"laptop": laptop, "pc": pc}, impl="openmpi",
                 env={"OMPI_MCA_btl_tcp_if_include": "x"})
    assert ompi.env == {}  # set in this environment: it travels and wins
    ompi = judge(lines, {"laptop": laptop, "pc": pc}, impl="openmpi")
    assert ompi.env["laptop"] == {"OMPI_MCA_btl_tcp_if_include": "wlan0"} and ompi.options == []


def test_this_machine_is_pinned_to_the_interface_that_reaches_the_others(local_driver):
    here = {**HERE, "interfaces": {"lo": "127.0.0.1", "eth0": "10.0.0.1", "virbr0": "192.168.122.1"}}
    v = judge([HostLine("driver", 2), HostLine("laptop")], {"laptop": facts()}, here=here)
    assert v.env == {"driver": {"UCX_NET_DEVICES": "eth0", "FI_TCP_IFACE": "eth0"}}
    assert v.problems == [] and v.warnings == []


def test_a_shared_address_on_the_route_is_a_problem(local_driver):
    laptop = facts(interfaces={"lo": "127.0.0.1", "eth0": "10.0.0.2"})
    pc = facts("pc", interfaces={"lo": "127.0.0.1", "eth0": "10.0.0.2"})  # cloned machine
    v = judge([HostLine("driver"), HostLine("laptop"), HostLine("pc")], {"laptop": laptop, "pc": pc})
    assert ("laptop: it reaches this machine from 10.0.0.2, an address other hosts have too; give each "
            "host its own address on the network it shares with this machine") in v.problems


def test_hydra_is_told_this_machines_address_where_its_name_would_not_reach_it(local_driver):
    lines = [HostLine("localhost"), HostLine("laptop")]
    v = judge(lines, {"laptop": facts()}, back="localhost")  # 'localhost' on laptop is laptop itself
    assert v.options == ["-localhost", "10.0.0.1"] and v.problems == []
    assert ("the hosts reach this machine at 10.0.0.1, not by the name localhost (laptop): "
            "mpiexec -localhost 10.0.0.1") in v.notes
    unknown = facts(resolved={"laptop": ["10.0.0.2"], "vm": None})  # the driver is not in the hostfile
    assert judge([HostLine("laptop")], {"laptop": unknown}, back="vm").options == ["-localhost", "10.0.0.1"]
    assert judge([HostLine("laptop")], {"laptop": unknown}, back="vm", impl="openmpi").options == []
    split = judge([HostLine("laptop"), HostLine("pc")], {"laptop": unknown, "pc": facts("pc", resolved={})},
                  routes={"laptop": "10.0.0.1", "pc": "192.168.1.5"}, back="vm")
    assert split.options == []
    assert ("pc: this machine's name vm does not resolve there to 192.168.1.5, the address pc reaches it "
            "at; add '192.168.1.5 vm' to /etc/hosts on pc") in split.problems


def test_a_hung_probe_is_killed_at_its_time_limit(tmp_path):
    start = time.monotonic()
    out = preflight._run("laptop", [PY, "-c", "import time; print('late', flush=True); time.sleep(60)"],
                         {}, timeout=1.0)
    assert time.monotonic() - start < 20
    assert out.returncode is None and out.facts is None and "late" in out.output


def test_probes_started_together_get_a_control_port_each():
    from cmatrix.cli.preflight import _own_port

    env = {"MPIEXEC_PORT_RANGE": "50000:50099", "OTHER": "x"}
    assert [_own_port(env, k)["MPIEXEC_PORT_RANGE"] for k in range(3)] == ["50000:50000", "50001:50001",
                                                                          "50002:50002"]
    assert _own_port(env, 100)["MPIEXEC_PORT_RANGE"] == "50000:50099"  # more probes than ports: shared
    assert _own_port({"OTHER": "x"}, 1) == {"OTHER": "x"}


def test_ports_split_into_the_launchers_and_the_ranks_halves():
    from cmatrix.engine.launch import port_ranges

    got = port_ranges("50000-50199")
    assert got["MPIEXEC_PORT_RANGE"] == "50000:50099" and got["UCX_TCP_PORT_RANGE"] == "50100-50199"
    assert port_ranges("any") == {}
    for bad in ("80-90", "50000", "50010-50000", "a-b"):
        with pytest.raises(InputError, match="--ports"):
            port_ranges(bad)
