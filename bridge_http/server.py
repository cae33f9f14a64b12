"""uvicorn in a thread of the appliance process, next to the MQTT link, on the same engine."""

from __future__ import annotations

import contextlib
import logging
import threading

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)


class HttpServerError(RuntimeError):
    pass


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
            timeout_graceful_shutdown=3, server_header=False,
        )
        self.server = uvicorn.Server(config)
        self.host, self.port = host, port
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Serve in a daemon thread; raise ``HttpServerError`` if it cannot listen (port taken)."""
        self._thread = threading.Thread(target=self._serve, name="http-bridge", daemon=True)
        self._thread.start()
        waited = 0.0
        while not self.server.started:
            if not self._thread.is_alive():
                raise HttpServerError(f"the HTTP bridge could not listen on {self.host}:{self.port}")
            if waited >= timeout:
                raise HttpServerError(f"the HTTP bridge did not start within {timeout:g} s")
            self._thread.join(0.02)
            waited += 0.02
        logger.info("HTTP bridge on http://%s:%d/v1", self.host, self.bound_port)

    def _serve(self) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind; start() reports it
            self.server.run()

    @property
    def bound_port(self) -> int:
        """The port actually listened on (useful with port 0)."""
        for server in getattr(self.server, "servers", []):  # set once uvicorn has started
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        return self.port

    def stop(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
