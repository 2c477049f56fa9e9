"""Running the app with uvicorn: in the foreground (``unmask serve``) or in a background thread
(tests, benchmarks, the page's screenshot), on a socket bound here so that port 0 (any free port)
works and a port in use is a clear error."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from unmask.errors import OptionError


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host`` and ``port``; an :class:`~unmask.errors.OptionError` naming ``port``
    where nothing can listen there (a port in use, an address not of this machine)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OptionError("port", "{host} {_host} {port} {_port}: cannot listen there ({_why}); pick another {port}",
                          _host=host, _port=port, _why=exc.strerror) from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _server(app):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))


def serve_forever(app, sock: socket.socket) -> None:
    """Serve until interrupted (Ctrl-C)."""
    _server(app).run(sockets=[sock])


@contextmanager
def serve_in_background(app, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` from a thread while the block runs; yields the base URL."""
    sock = bind(host, port)
    server = _server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="unmask-http")
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting")
            time.sleep(0.01)
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
