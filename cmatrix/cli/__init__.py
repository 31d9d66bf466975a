"""The ``cmatrix`` command.

    mpirun -n 4 python -m cmatrix run jobs/matmul.py     # rank 0 runs the job, others serve
    cmatrix launch -n 4 jobs/matmul.py                   # the same, mpiexec chosen for you
    mpirun -n 4 python -m cmatrix doctor                 # each rank's device, memory, fallbacks
    cmatrix launch -n 2 bench                            # each rank's measured speed, suggested shares
    cmatrix convert w.bin w.pt [--dtype float32]         # between .bin .npy .pt .h5 .safetensors
    mpirun -n 2 python -m cmatrix generate --model DIR --prompt "..."   # text from a Llama-family model
    cmatrix launch -n 2 chat --model DIR                 # a conversation in the terminal
    cmatrix launch -n 2 serve --model DIR                # OpenAI-compatible API and a web page

A file path may name one array of a file after '#': weights.h5#/layer0/w.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import traceback


def _run(job: str, job_args: list[str]) -> int:
    """Rank 0 runs the job as a script (``__main__``, its folder first on ``sys.path``, as
    ``python job.py`` would); workers never read it: it need only exist on the driver."""
    from ..api import session

    with session.driving() as cl:
        if not os.path.isfile(job):
            print(f"cmatrix run: job file not found: {job}", file=sys.stderr)
            cl.exit_status = 2
            return 2
        sys.argv = [job, *job_args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(job)))
        try:
            runpy.run_path(job, run_name="__main__")
        except SystemExit as exc:
            cl.exit_status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except KeyboardInterrupt:
            print("\ncmatrix: stopped by the user", file=sys.stderr)
            cl.exit_status = 130
        except BaseException:
            traceback.print_exc()
            cl.exit_status = 1
        sys.stdout.flush()
        return cl.exit_status


def _model_command(ns: argparse.Namespace) -> int:
    """generate, chat and serve: every rank parses the same arguments; rank 0 drives, the
    others serve."""
    from ..api import session
    from ..errors import CMatrixError
    from ..llm.run import parse_list, parse_weights

    if ns.command == "chat":
        from ..llm.chat import run
    elif ns.command == "serve":
        from ..serve import run
    else:
        from ..llm.run import run
    with session.driving() as cl:
        try:
            cl.configure(parse_weights(ns.weights), parse_list(ns.backends, str))
        except CMatrixError as exc:
            print(f"cmatrix {ns.command}: {exc}", file=sys.stderr)
            cl.exit_status = 2
            return 2
        try:
            cl.exit_status = run(cl, ns)
        except KeyboardInterrupt:  # while loading: between commands, the ranks are in step
            print("\ncmatrix: stopped by the user", file=sys.stderr)
            cl.exit_status = 130
        return cl.exit_status


#: what ``cmatrix launch`` starts as a command of its own rather than as a job file
COMMANDS = ("generate", "chat", "serve", "doctor", "bench")
#: the variables ``cmatrix launch`` passes on to other hosts, for --help
_TRAVEL = ("CMATRIX_* OMP_* OPENBLAS_* MKL_* UCX_* FI_* MPIR_CVAR_* PATH LD_LIBRARY_PATH VIRTUAL_ENV "
           "PYTHONPATH PYTHONUNBUFFERED")


def _launch(ns: argparse.Namespace) -> int:
    """``cmatrix launch``: without a hostfile, ``mpiexec -n N`` here; with one, one block per
    line with its settings (:func:`cmatrix.engine.launch.cluster_command`), after checking
    the other hosts (:mod:`cmatrix.cli.preflight`) when there are any."""
    from ..engine import launch
    from ..errors import CMatrixError
    from . import watch

    try:
        lines = launch.read_hostfile(ns.hostfile) if ns.hostfile else []
    except CMatrixError as exc:
        print(f"cmatrix launch: {exc}", file=sys.stderr)
        return 2
    n = ns.ranks if ns.ranks is not None else sum(line.slots for line in lines) or 2
    command = [ns.job] if ns.job in COMMANDS else ["run", ns.job]
    argv = [sys.executable, "-m", "cmatrix", *command, *ns.args]
    here = launch.local_hosts([line.host for line in lines])
    env = launch.environment(single_host=here)
    if _terminal(sys.stderr):  # rank 0's stderr will be a pipe: tell it the user can see bars
        env["CMATRIX_TTY"] = "1"
    if not lines:
        return watch.run(launch.command(n, argv), env)
    if not here:
        try:
            env = {**launch.port_ranges(ns.ports), **env}  # a range already in the environment wins
        except CMatrixError as exc:
            print(f"cmatrix launch: {exc}", file=sys.stderr)
            return 2
    extra: dict = {}
    options: list[str] = []
    if not here and not ns.no_check:
        from . import preflight

        verdict = preflight.check(lines, env)
        for line in verdict.warnings:
            print(f"cmatrix launch: warning: {line}", file=sys.stderr)
        if verdict.problems:
            print(f"cmatrix launch: {len(verdict.problems)} problem(s) with the hosts; the job was not "
                  "started (--no-check skips this check):", file=sys.stderr)
            for line in verdict.problems:
                print(f"  {line}", file=sys.stderr)
            return 2
        for line in verdict.notes:
            print(f"cmatrix launch: {line}", file=sys.stderr)
        extra, options = verdict.env, verdict.options

    with launch.hostfile_for(ns.hostfile) as translated:
        def build(job_env: dict) -> list[str]:
            forward = None if here else launch.travelling(job_env)
            return launch.cluster_command(lines, argv, n, hostfile=translated, env=job_env, extra=extra,
                                          options=options, forward=forward)

        return watch.run(build, env)


def _terminal(stream: object) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _convert(src: str, dst: str, dtype: str | None) -> int:
    from ..errors import CMatrixError
    from ..io import store

    try:
        host = store.load_as(src, dtype, arg="src")
        path = store.save(dst, host)
    except CMatrixError as exc:
        print(f"cmatrix convert: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the destination: a folder that is a file, no permission, a full disk
        print(f"cmatrix convert: cannot write {dst}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    shape = "x".join(str(d) for d in host.shape)
    print(f"wrote {path} ({host.dtype}, {shape}, {host.data.nbytes / 2**20:.1f} MiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..engine.launch import DEFAULT_PORTS

    parser = argparse.ArgumentParser(prog="cmatrix", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job script under mpirun (rank 0 drives)")
    run.add_argument("job")
    run.add_argument("args", nargs=argparse.REMAINDER)
    lau = sub.add_parser("launch", help="start mpiexec from this environment and run a job file or "
                         f"one of the commands {', '.join(COMMANDS)}",
                         description="Start mpiexec from this environment. With a hostfile naming other "
                         "hosts, only these variables travel from here to their ranks: " + _TRAVEL
                         + "; HOME, USER, XDG_*, TMPDIR, PWD and the rest are each host's own.")
    lau.add_argument("-n", "--ranks", type=int, default=None,
                     help="number of ranks (default: lines in the hostfile, else 2)")
    lau.add_argument("--hostfile", default=None, help="one line per device slot, or 'host:k' (MPICH) "
                     "or 'host slots=k' (Open MPI), either translated for the MPI in use; then optionally "
                     "NAME=value settings for that line's ranks, e.g. 'laptop slots=1 CMATRIX_THREADS=4'")
    lau.add_argument("--no-check", action="store_true", help="skip the check of the other hosts (ssh, "
                     "same interpreter path, Python, cmatrix and MPI versions, names, interfaces) that "
                     "runs before the job when the hostfile names hosts other than this one")
    lau.add_argument("--ports", default=DEFAULT_PORTS, metavar="LO-HI",
                     help="with other hosts: the TCP ports MPI listens on, for the firewall (MPICH's "
                          "control port in the lower half, the ranks' sockets in the upper; default "
                          "%(default)s; 'any' leaves them to MPI)")
    lau.add_argument("job", help=f"a job file, or {', '.join(COMMANDS)} followed by its options")
    lau.add_argument("args", nargs=argparse.REMAINDER)
    doc = sub.add_parser("doctor", help="show each rank's host, device, memory and fallbacks "
                         "(alone, or under mpirun for every rank)")
    doc.add_argument("--backends", default=None,
                     help="backend for all ranks, or a comma-separated list with one per rank")
    doc.add_argument("--accel", default=None, help="true/false, for all ranks or one per rank")
    ben = sub.add_parser("bench", help="measure each rank's speed (decode- and prefill-shaped products, "
                         "per weight type) and free memory; print the shares they suggest and save "
                         "the profile for --weights auto")
    ben.add_argument("--backends", default=None,
                     help="backend for all ranks, or a comma-separated list with one per rank")
    ben.add_argument("--accel", default=None, help="true/false, for all ranks or one per rank")
    ben.add_argument("--remeasure", action="store_true", help="measure even where a profile is saved")
    ben.add_argument("--seconds", type=float, default=0.15, help="time per measured product (default 0.15)")
    con = sub.add_parser("convert", help="copy a matrix between file formats (.bin .npy .pt .h5 "
                         ".safetensors), optionally to another dtype")
    con.add_argument("src", help="source file, optionally FILE#KEY")
    con.add_argument("dst", help="destination file, optionally FILE#KEY (.h5, .pt, .safetensors)")
    con.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                     help="element type to write (default: the source's)")
    gen = sub.add_parser("generate", help="generate text with a Llama-family model across the ranks")
    from .. import serve
    from ..llm.run import add_arguments

    add_arguments(gen)
    talk = sub.add_parser("chat", help="talk with a Llama-family model across the ranks (under mpirun "
                          "or cmatrix launch); the K/V cache stays on the ranks between turns")
    add_arguments(talk, command="chat")
    srv = sub.add_parser("serve", help="serve a model with an OpenAI-compatible API and a web page "
                         "(on loopback unless told otherwise)")
    add_arguments(srv, command="serve")
    serve.add_arguments(srv)
    ns = parser.parse_args(argv)
    if ns.command in ("generate", "chat", "serve"):
        return _model_command(ns)
    if ns.command == "convert":
        return _convert(ns.src, ns.dst, ns.dtype)
    if ns.command == "run":
        return _run(ns.job, ns.args)
    if ns.command == "doctor":
        from . import doctor

        return doctor.main(ns.backends, ns.accel)
    if ns.command == "bench":
        from . import bench

        return bench.main(ns.backends, ns.accel, ns.remeasure, ns.seconds)
    return _launch(ns)
