"""``cmatrix serve``: the model behind an OpenAI-compatible HTTP API and a web page.

    cmatrix launch --hostfile hostfiles/localhost2 serve --model DIR [--port 8000]
    # then any OpenAI client: base_url="http://127.0.0.1:8000/v1", or the page at http://127.0.0.1:8000/

The server listens on the driver only, on loopback unless told otherwise; any other address
needs an API key (``--api-key`` or ``CMATRIX_API_KEY``), which every request must then carry.
Requests wait in one queue and are answered one at a time (batch size 1); a request that
continues the previous conversation reuses the ranks' K/V caches.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
import threading
from typing import Any

from ..errors import CMatrixError, InputError

API_KEY_VARIABLE = "CMATRIX_API_KEY"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """``cmatrix serve``'s own options (the model's and sampling defaults come from llm.run)."""
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this computer only; any other "
                         "address needs an API key)")
    ap.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    ap.add_argument("--api-key", default=None,
                    help=f"key every request must carry (default: ${API_KEY_VARIABLE}, if set)")
    ap.add_argument("--name", default=None, help="model id in the API (default: the folder's name)")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int, api_key: str | None) -> socket.socket:
    """The server's socket, bound before any weight moves (so a busy port or a missing key is
    said at once)."""
    if not 0 <= port <= 65535:
        raise InputError(f"--port: 0..65535, got {port}")
    if not is_loopback(host) and not api_key:
        raise InputError(f"--host {host} lets other computers in: give an API key (--api-key, or "
                         f"${API_KEY_VARIABLE}) that every request must carry, or keep the default "
                         "127.0.0.1")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                         + (" (another server uses that port: pick another with --port)"
                            if exc.errno in (98, 48) else "")) from None
    sock.setblocking(False)
    return sock


def run(cluster: Any, ns: argparse.Namespace) -> int:
    """Listen, load the model, then answer requests until Ctrl-C."""
    try:
        import uvicorn

        from .app import build
    except ImportError as exc:
        print(f"cmatrix serve: {exc.name or exc} is not installed: pip install 'cmatrix[serve]'",
              file=sys.stderr)
        return 2
    from ..llm.run import load_model
    from .worker import Worker

    api_key = ns.api_key or os.environ.get(API_KEY_VARIABLE) or None
    try:
        sock = listen(ns.host, ns.port, api_key)
    except CMatrixError as exc:
        print(f"cmatrix serve: {exc}", file=sys.stderr)
        return 2
    try:
        model = load_model(cluster, ns)
        model.tokenizer  # noqa: B018 - read now, not in the server's thread
        worker = Worker(model)
    except CMatrixError as exc:
        print(f"cmatrix serve: {exc}", file=sys.stderr)
        sock.close()
        return 2
    name = ns.name or model.path.name
    app = build(worker, name, api_key, extra_hosts=(ns.host,))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           timeout_graceful_shutdown=2))
    stop = threading.Event()
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # said by the main thread, which then ends the job
            failed.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=serve, name="http", daemon=True)
    thread.start()
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"cmatrix serve: {name} at http://{shown}:{port}/ (OpenAI API: http://{shown}:{port}/v1"
          f"{', API key required' if api_key else ''}); Ctrl-C stops", file=sys.stderr, flush=True)
    status = 0
    try:
        worker.run(stop)
    except KeyboardInterrupt:
        print("\ncmatrix serve: stopping", file=sys.stderr, flush=True)
        status = 0
    finally:
        server.should_exit = True
        thread.join(10)
    if failed:
        print(f"cmatrix serve: the HTTP server stopped: {type(failed[0]).__name__}: {failed[0]}",
              file=sys.stderr, flush=True)
        return 1
    return status
