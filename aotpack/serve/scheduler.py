"""The queue in front of the single model worker: bounded, LoRA-affinity with a max-wait bound, batching.

Plain Python (no HTTP, no torch). A `Job` carries a `concurrent.futures.Future`: the client side
cancels it (disconnect, timeout), the worker claims it with `set_running_or_notify_cancel()`, so a
cancelled job is never run.

Policies:
- "affinity": among waiting jobs prefer those of the active adapter set (no switch); a job that has
  waited `max_wait_s` or more is served first (oldest first), so no request starves.
- "fifo": arrival order.
Both batch jobs with the same key (adapter set + shape + sampling options) up to `max_batch` images:
affinity takes them from anywhere in the queue, fifo only the run of equal keys at the head.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import math
import threading
import time
from collections.abc import Hashable
from typing import Any

from .errors import InvalidRequestError, QueueFullError, RequestTimeoutError

POLICIES = ("affinity", "fifo")
_ids = itertools.count(1)


@dataclasses.dataclass(eq=False)
class Job:
    adapter_set: tuple  # ((name, scale), ...): what the model's slots must hold
    key: Hashable  # batch key: jobs with equal keys can run in one batch
    items: int = 1  # images this job asks for
    payload: Any = None
    timeout_s: float = math.inf
    created: float = dataclasses.field(default_factory=time.monotonic)
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    id: int = dataclasses.field(default_factory=lambda: next(_ids))

    @property
    def deadline(self) -> float:
        return self.created + self.timeout_s

    def cancel(self) -> bool:
        """Withdraw a queued job (True), or False when it is already running or done."""
        return self.future.cancel()


class Scheduler:
    def __init__(self, *, max_queue: int = 64, max_batch: int = 1, max_wait_s: float = 30.0,
                 policy: str = "affinity", clock=time.monotonic):
        if policy not in POLICIES:
            raise InvalidRequestError(f"scheduling policy {policy!r} is unknown", f"use one of {POLICIES}")
        self.max_queue, self.max_batch, self.max_wait_s, self.policy = max_queue, max_batch, max_wait_s, policy
        self.clock = clock
        self._jobs: list[Job] = []  # arrival order
        self._cond = threading.Condition()
        self.batch_seconds_ema: float | None = None  # for Retry-After
        self.timed_out = self.cancelled = 0

    # -- client side
    def submit(self, job: Job) -> Job:
        if job.items > self.max_batch:
            raise InvalidRequestError(f"n={job.items} is above this package's largest batch, {self.max_batch}",
                                      f"ask for at most {self.max_batch} images per request")
        with self._cond:
            self._purge(self.clock())
            if len(self._jobs) >= self.max_queue:
                raise QueueFullError(f"the queue is full ({self.max_queue} requests waiting)",
                                     "retry after the Retry-After seconds", self.retry_after())
            self._jobs.append(job)
            self._cond.notify_all()
        return job

    def retry_after(self) -> int:
        per_batch = self.batch_seconds_ema or 1.0
        return max(1, math.ceil(len(self._jobs) * per_batch / max(1, self.max_batch)))

    @property
    def depth(self) -> int:
        """Requests waiting; a withdrawn one (its client left) stops counting at once, before the next purge."""
        return sum(not job.future.cancelled() for job in list(self._jobs))

    # -- worker side
    def next_batch(self, active_set: tuple | None, timeout: float | None = None) -> list[Job]:
        """Remove and return the next batch (claimed: running), or [] when none came within `timeout`."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                self._purge(self.clock())
                batch = self._choose(active_set, self.clock())
                claimed = []
                for job in batch:
                    self._jobs.remove(job)
                    if job.future.set_running_or_notify_cancel():
                        claimed.append(job)
                if claimed:
                    return claimed
                if batch:
                    continue  # all chosen jobs were cancelled meanwhile: choose again
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return []
                self._cond.wait(left if left is not None else 1.0)

    def peek_adapter_set(self, active_set: tuple | None) -> tuple | None:
        """The adapter set the next batch would use if the active set were `active_set` (for prefetch)."""
        upcoming = self.peek_adapter_sets(active_set, 1)
        return upcoming[0] if upcoming else None

    def peek_adapter_sets(self, active_set: tuple | None, count: int) -> list[tuple]:
        """The adapter sets of the next `count` batches, in order, if nothing new arrived (for prefetch)."""
        with self._cond:
            jobs, now, sets = list(self._jobs), self.clock(), []
            while jobs and len(sets) < count:
                batch = self._choose(active_set, now, jobs)
                if not batch:
                    break
                jobs = [j for j in jobs if not any(j is b for b in batch)]
                active_set = batch[0].adapter_set
                sets.append(active_set)
            return sets

    def record_batch_seconds(self, seconds: float) -> None:
        self.batch_seconds_ema = seconds if self.batch_seconds_ema is None else (
            0.8 * self.batch_seconds_ema + 0.2 * seconds)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- policy
    def _purge(self, now: float) -> None:
        keep = []
        for job in self._jobs:
            if job.future.cancelled():
                self.cancelled += 1
            elif now >= job.deadline:
                self.timed_out += 1
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(RequestTimeoutError(
                        f"request waited {now - job.created:.1f} s in the queue, past its {job.timeout_s:g} s "
                        "timeout", "retry later, or start the server with a longer --request-timeout"))
            else:
                keep.append(job)
        self._jobs[:] = keep

    def _choose(self, active_set: tuple | None, now: float, jobs: list[Job] | None = None) -> list[Job]:
        jobs = [j for j in (self._jobs if jobs is None else jobs) if not j.future.cancelled()]
        if not jobs:
            return []
        overdue = [j for j in jobs if now - j.created >= self.max_wait_s]
        if self.policy == "fifo":
            head = jobs[0]
        elif overdue:
            head = overdue[0]
        else:
            head = next((j for j in jobs if j.adapter_set == active_set), jobs[0])
        if self.policy == "fifo":
            run = list(itertools.takewhile(lambda j: j.key == head.key, jobs))
        else:
            run = [j for j in jobs if j.key == head.key and j.created >= head.created]
            run = [head] + [j for j in run if j is not head]
        batch, items = [], 0
        for job in run:
            if items + job.items > self.max_batch:
                break
            batch.append(job)
            items += job.items
        return batch
