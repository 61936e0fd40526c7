"""Stage-by-stage progress on stderr (stdout stays free for results such as `--json`)."""

from __future__ import annotations

import contextlib
import sys
import time


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.timings: dict[str, float] = {}

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, label: str):
        """Print `label ...` now and its duration when done; timings are kept by label."""
        self.info(f"==> {label} ...")
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.timings[label] = seconds
        self.info(f"    {label}: {seconds:.1f} s")
