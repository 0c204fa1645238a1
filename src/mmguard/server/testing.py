"""Run the app on loopback in a background thread (tests, notebooks, the load bench)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType

import uvicorn

from .app import create_app
from .batcher import GuardLike
from .http_protocol import HeaderDeadlineProtocol
from .settings import ServerSettings

__all__ = ["LiveServer"]


class LiveServer:
    """``with LiveServer(guard, settings) as srv: httpx.get(srv.url + "/healthz")``.

    Binds 127.0.0.1 on a free port chosen by the OS, waits until the app is ready, and shuts down
    cleanly (bounded waits) on exit. ``guard=None`` with a ``loader`` loads the guard in the background
    (as ``mmguard serve`` does); ``wait_ready=False`` returns as soon as the port answers.
    """

    def __init__(
        self,
        guard: GuardLike | None,
        settings: ServerSettings | None = None,
        *,
        startup_timeout: float = 60.0,
        loader: Callable[[], GuardLike] | None = None,
        wait_ready: bool = True,
    ) -> None:
        self.app = create_app(guard, settings or ServerSettings(), loader=loader)
        self.wait_ready = wait_ready
        self.config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=0,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            http=HeaderDeadlineProtocol,  # as mmguard serve runs it
        )
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name="mmguard-live-server", daemon=True)
        self.startup_timeout = startup_timeout
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.server.should_exit = True
                raise RuntimeError("live server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        state = self.app.state.mmguard
        while self.wait_ready and not state.ready:  # warm-up ran in the lifespan: a safety net
            if time.monotonic() > deadline:
                raise RuntimeError("live server did not become ready")
            time.sleep(0.02)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
