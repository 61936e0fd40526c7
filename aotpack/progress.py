"""Stage-by-stage progress through `logging` (logger "aotpack.progress"; stdout stays free for results
such as `--json`). The CLI shows it on stderr (`--quiet` hides it); a library caller that asked for
progress but configured no logging still sees it on stderr."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

logger = logging.getLogger("aotpack.progress")


class Progress:
    def __init__(self, enabled: bool = True, stream=None):
        self.enabled = enabled
        self.stream = stream  # an explicit stream bypasses logging (e.g. a log file of a benchmark)
        self.timings: dict[str, float] = {}

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        if self.stream is None and logger.hasHandlers():
            logger.info(message)
        else:
            print(message, file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, label: str):
        """Report `label ...` now and its duration when done; timings are kept by label."""
        self.info(f"==> {label} ...")
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.timings[label] = seconds
        self.info(f"    {label}: {seconds:.1f} s")
