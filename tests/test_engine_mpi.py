"""The engine on real mpiexec jobs with 1-4 ranks (oversubscribed, one thread each)."""

import json
import socket
import sys
import time

import pytest
from backend_cases import MIXED, need
from conftest import JOBS, ROOT, job_env, mpirun, run_cmd

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("n, weights", [
    (1, None),
    (2, [0.7, 0.3]),
    (3, [0.0, 0.25, 0.75]),
    (4, [0.5, 0.3, 0.2, 0.0]),
    (4, None),
])
def test_results_match_numpy(n, weights):
    args = [json.dumps(weights)] if weights else []
    r = mpirun(n, JOBS / "correctness.py", *args, timeout=240)
    assert r.returncode == 0, r
    assert "correctness: " in r.stdout and f" 0 failures on {n} ranks" in r.stdout, r


@pytest.mark.parametrize("weights, names", [
    ([0.4, 0.3, 0.2, 0.1], MIXED),
    ([0.25, 0.0, 0.5, 0.25], MIXED[::-1]),  # a zero share on the opencl rank
])
def test_four_backends_in_one_cluster_give_one_result(weights, names):
    need(*names)
    r = mpirun(4, JOBS / "correctness.py", json.dumps(weights), json.dumps(names), timeout=300)
    assert r.returncode == 0, r
    assert " 0 failures on 4 ranks" in r.stdout, r
    for name in names:
        assert f" {name} " in r.stdout, r  # the rank table names every backend


def test_hostfile_lines_are_device_slots():
    r = mpirun(4, JOBS / "ranks_table.py", "[0.4, 0.3, 0.2, 0.1]",
               hostfile=str(ROOT / "hostfiles" / "localhost4"))
    assert r.returncode == 0, r
    rows = [json.loads(line[5:]) for line in r.stdout.splitlines() if line.startswith("RANK ")]
    assert [row["rank"] for row in rows] == [0, 1, 2, 3]
    assert [row["local_rank"] for row in rows] == [0, 1, 2, 3]
    assert {row["local_size"] for row in rows} == {4}
    assert len({row["host"] for row in rows}) == 1
    assert [row["weight"] for row in rows] == [0.4, 0.3, 0.2, 0.1]
    assert {row["threads"] for row in rows} == {1}


def test_plain_script_init_serves_on_workers_and_exits_cleanly():
    r = mpirun(3, JOBS / "plain_init.py", plain=True)
    assert r.returncode == 0, r
    assert r.stdout.count("DRIVER-ONLY size=3") == 1, r
    assert "PLAIN-OK" in r.stdout, r


def test_script_without_mpirun_is_a_one_rank_cluster():
    r = run_cmd([sys.executable, str(JOBS / "plain_init.py")], env=job_env(), timeout=60)
    assert r.returncode == 0, r
    assert "DRIVER-ONLY size=1" in r.stdout and "PLAIN-OK" in r.stdout, r


@pytest.mark.parametrize("op, phase, rank", [
    ("matmul", "compute", 2),
    ("matmul", "prepare", 3),
    ("shard", "upload", 1),
])
def test_worker_failure_reaches_the_driver_and_cluster_recovers(op, phase, rank):
    r = mpirun(4, JOBS / "fault_caught.py", op, phase, str(rank),
               env={"CMATRIX_FAULT": f"{op}:{phase}:{rank}"}, timeout=90)
    assert r.returncode == 0, r
    assert f"CAUGHT rank {rank} on host {socket.gethostname()}" in r.stdout, r
    assert "RECOVERED" in r.stdout, r


def test_uncaught_worker_failure_ends_the_job_nonzero():
    r = mpirun(4, JOBS / "fault_uncaught.py", env={"CMATRIX_FAULT": "matmul:compute:2"}, timeout=90)
    assert r.returncode != 0, r
    assert "rank 2 on host" in r.stderr and "injected fault" in r.stderr, r
    assert "UNREACHABLE" not in r.stdout


def test_driver_failure_in_the_compute_step_is_reported_too():
    r = mpirun(2, JOBS / "fault_uncaught.py", env={"CMATRIX_FAULT": "matmul:compute:0"}, timeout=90)
    assert r.returncode != 0, r
    assert "rank 0 on host" in r.stderr, r


def test_crashed_rank_ends_the_job_instead_of_hanging():
    r = mpirun(3, JOBS / "fault_uncaught.py", env={"CMATRIX_FAULT": "matmul:compute:1:exit"},
               timeout=90)
    assert r.returncode != 0, r
    assert "UNREACHABLE" not in r.stdout


def test_unhandled_driver_error_ends_the_job_nonzero():
    r = mpirun(3, JOBS / "driver_raises.py", timeout=90)
    assert r.returncode != 0, r
    assert "the job itself is broken" in r.stderr, r


def test_bad_input_is_refused_before_data_moves_on_many_ranks():
    r = mpirun(3, JOBS / "validation.py", timeout=90)
    assert r.returncode == 0, r
    assert "VALIDATION-OK" in r.stdout, r


def test_failing_backend_setup_is_reported_by_init():
    script = JOBS / "ranks_table.py"
    r = mpirun(2, script, env={"CMATRIX_FAULT": "configure:setup:1"}, timeout=60)
    assert r.returncode != 0, r
    assert "rank 1 on host" in r.stderr and "configure/setup" in r.stderr, r


@pytest.mark.parametrize("uncaught", [False, True])
def test_refused_init_in_a_plain_script_ends_the_job(uncaught):
    args = ["raise"] if uncaught else []
    r = mpirun(3, JOBS / "init_fails.py", *args, plain=True, timeout=60)
    assert "REFUSED weights: needs one share per rank (3 ranks)" in r.stdout, r
    assert (r.returncode != 0) == uncaught, r


def test_job_file_needs_to_exist_only_on_the_driver(tmp_path):
    from cmatrix.engine import launch

    driver_dir, worker_dir = tmp_path / "driver", tmp_path / "worker"
    driver_dir.mkdir()
    worker_dir.mkdir()
    (driver_dir / "job.py").write_text((JOBS / "plain_init.py").read_text())
    argv = [sys.executable, "-m", "cmatrix", "run", "job.py"]
    cmd = launch.command(1, ["-wdir", str(driver_dir), *argv])
    cmd += [":", "-n", "2", "-wdir", str(worker_dir), *argv]
    r = run_cmd(cmd, env=job_env(), timeout=60)
    assert r.returncode == 0, r
    assert "PLAIN-OK" in r.stdout, r


def test_missing_job_file_is_reported_without_hanging():
    r = mpirun(2, "no/such/job.py", timeout=60)
    assert r.returncode == 2, r
    assert "job file not found" in r.stderr, r


def test_nothing_runs_after_shutdown():
    r = mpirun(2, JOBS / "after_shutdown.py", timeout=60)
    assert r.returncode == 0, r
    assert "CLOSED matmul the cluster was shut down" in r.stdout, r
    assert "CLOSED init init(): this job's cluster was already shut down" in r.stdout, r


@pytest.mark.parametrize("n", [2, 4])
def test_plain_mpirun_runs_the_prologue_on_the_driver_only(n, tmp_path):
    """Under mpirun -n N python script.py, worker ranks start serving when they import cmatrix,
    so a prologue that writes files never runs on them (it used to race with the driver's)."""
    r = mpirun(n, JOBS / "prologue_race.py", str(tmp_path), plain=True)
    assert r.returncode == 0, r
    assert r.stdout.count("PROLOGUE ") == 1, r
    assert f"race: ok on {n} ranks" in r.stdout, r


def test_every_rank_opt_out_lets_each_rank_run_the_script(tmp_path):
    script = tmp_path / "every.py"
    script.write_text("import cmatrix\nprint('RAN', flush=True)\n")
    r = mpirun(3, script, plain=True, env={"CMATRIX_EVERY_RANK": "1"})
    assert r.returncode == 0, r
    assert r.stdout.count("RAN") == 3, r


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("localhost\nbad:x\n", "line 2: 'bad:x': the slot count 'x' is not a positive integer"),
    ("node slots=zero\n", "line 1"),
    ("# only a comment\n", "lists no host"),
])
def test_launch_refuses_a_bad_hostfile_in_one_line(tmp_path, content, message):
    hostfile = tmp_path / "hosts"
    if content is not None:
        hostfile.write_text(content)
    r = run_cmd([sys.executable, "-m", "cmatrix", "launch", "--hostfile", str(hostfile), "jobs/matmul.py"],
                job_env(), timeout=60)
    assert r.returncode == 2, r
    assert message in r.stderr and "Traceback" not in r.stderr, r


def test_a_one_host_job_listens_on_loopback_only():
    """The environment cmatrix starts local jobs with keeps the ranks' MPI sockets on
    loopback (launch.environment); nothing of theirs listens on the host's other addresses."""
    r = mpirun(2, JOBS / "listeners.py")
    assert r.returncode == 0, r
    addresses = [line.split()[1] for line in r.stdout.splitlines() if line.startswith("LISTEN ")]
    assert all(a.startswith(("127.", "::1:")) for a in addresses), r


def test_a_killed_rank_is_named_in_one_line_by_cmatrix_launch():
    """A worker killed by a signal ends the job, and cmatrix launch says which rank, host,
    backend and signal (from the ranks' cards), not only the MPI launcher's banner."""
    t = time.monotonic()
    r = run_cmd([sys.executable, "-m", "cmatrix", "launch", "-n", "2", str(JOBS / "kill_a_rank.py")],
                job_env(), timeout=120)
    took = time.monotonic() - t
    assert r.returncode != 0, r
    assert "KILLED " in r.stdout, r
    line = [x for x in r.stderr.splitlines() if x.startswith("cmatrix: rank 1 on host")]
    assert line and "(backend numpy" in line[0] and "signal 9 (SIGKILL" in line[0], r
    print(f"killed worker to the job's end: {took:.1f} s")


def test_a_child_process_of_a_rank_imports_cmatrix_without_starting_mpi(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import subprocess, sys\nimport cmatrix as cm\ncl = cm.init()\n"
                      "r = subprocess.run([sys.executable, '-c', 'import cmatrix; print(\"CHILD-OK\")'],"
                      " capture_output=True, text=True)\nprint(r.stdout, r.stderr[-300:])\n")
    r = mpirun(2, script, plain=True)
    assert r.returncode == 0, r
    assert "CHILD-OK" in r.stdout, r


def test_ctrl_c_under_cmatrix_launch_reaches_the_driver_alone():
    """The terminal's Ctrl-C (SIGINT to cmatrix launch's process group) goes to rank 0, which
    handles it and goes on using the cluster: the launcher (Open MPI's would end the job) and
    the workers never see it."""
    import os
    import signal
    import subprocess

    argv = [sys.executable, "-m", "cmatrix", "launch", "-n", "2", str(JOBS / "interrupted.py")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=job_env(),
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(0.5)  # the rank cards are written during start-up, before READY
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err
    assert "CAUGHT, then [[12.0, 15.0, 18.0, 21.0]]" in out, (out, err)
    assert "Traceback" not in err, err
