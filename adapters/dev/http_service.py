"""A local HTTP service on a thread: the lifecycle the sandbox processor and the sandbox bank
share. The socket is bound and listening before ``start()`` returns, so a caller may connect at
once, and a restart gets the same port back; ``stop()`` refuses new connections and wakes every
``pause`` (answers held back by latency or a timeout are released: their clients gave up)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Self

import uvicorn

START_TIMEOUT_S = 10.0
# How long stop() lets in-flight requests finish before uvicorn closes their connections.
STOP_GRACE_S = 2


class ThreadedHttpService:
    """Subclasses give ``_app()`` (the ASGI app) and ``_thread_name``."""

    _thread_name = "sandbox-service"

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._stopping = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    def _app(self) -> Any:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> str:
        """Listen (on the port it had before, when restarted) and return the base URL."""
        if self._server is not None:
            return self.url
        self._stopping.clear()
        # SO_REUSEADDR so a restart gets the same port back while old connections are in
        # TIME_WAIT; IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says TCP.
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM,
                             socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(
            self._app(), log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=STOP_GRACE_S,
        ))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=self._thread_name, daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise RuntimeError(f"{self._thread_name} did not start on {self.url}")
            time.sleep(0.005)
        self._server, self._thread, self._socket = server, thread, sock
        return self.url

    def stop(self) -> None:
        """Stop listening: new connections are refused; every ``pause`` wakes."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=STOP_GRACE_S + 3)
            self._thread = None
        if self._socket is not None:
            self._socket.close()  # uvicorn closed it already, unless its thread died
            self._socket = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def pause(self, seconds: float) -> None:
        """Sleep, but wake up when the service stops."""
        if seconds > 0:
            self._stopping.wait(seconds)
