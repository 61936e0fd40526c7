"""Run the HTTP app with uvicorn: in the foreground (`aotpack serve`) or in a thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time

from .app import create_app
from .registry import AdapterRegistry, parse_adapter_option
from .service import ServeOptions, Service


def build_service(package, model: str, *, revision=None, adapter_dirs=(), adapters=(),
                  options: ServeOptions | None = None) -> Service:
    """A Service with the registry from `--adapters DIR`s and `--adapter NAME=SOURCE`s (not started)."""
    registry = AdapterRegistry()
    for directory in adapter_dirs:
        registry.add_directory(directory)
    for text in adapters:
        name, source = parse_adapter_option(text)
        registry.add(name, source, trusted=True)
    return Service(package, model, revision=revision, registry=registry, options=options)


def run(service: Service, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
        shutdown_timeout_s: float = 30.0) -> None:
    """Serve until SIGINT/SIGTERM; then requests in flight get `shutdown_timeout_s` (a bounded stop, not the
    whole queue: an orchestrator's grace period is typically 30 s)."""
    import uvicorn

    service.start()
    try:
        uvicorn.run(create_app(service), host=host, port=port, log_level=log_level,
                    timeout_graceful_shutdown=shutdown_timeout_s)
    finally:
        service.stop()


class BackgroundServer:
    """uvicorn on a free loopback port in a daemon thread: `with BackgroundServer(service) as url: ...`."""

    def __init__(self, service: Service, host: str = "127.0.0.1", log_level: str = "warning"):
        import uvicorn

        self.service = service
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(service), log_level=log_level, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.service.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self.url

    def wait_ready(self, timeout: float = 300) -> None:
        if not self.service.worker.ready.wait(timeout):
            raise TimeoutError(f"package not loaded within {timeout} s")
        self.service.check_ready()

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.service.stop()
        self.sock.close()
