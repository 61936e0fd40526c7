"""The serving scheduler alone (no HTTP, no model): LoRA affinity, the max-wait bound, batching, the
bounded queue, cancellation and timeouts, with a fake clock."""

from __future__ import annotations

import threading

import pytest

from aotpack.serve.errors import InvalidRequestError, QueueFullError, RequestTimeoutError
from aotpack.serve.scheduler import Job, Scheduler

A, B, C = (("a", 1.0),), (("b", 1.0),), (("c", 0.5),)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def job(clock, adapter_set, shape="64x64", items=1, timeout=1e9):
    return Job(adapter_set=adapter_set, key=(adapter_set, shape), items=items, created=clock(), timeout_s=timeout)


def make(policy="affinity", max_batch=1, max_wait=30.0, max_queue=100):
    clock = Clock()
    return Scheduler(max_queue=max_queue, max_batch=max_batch, max_wait_s=max_wait, policy=policy,
                     clock=clock), clock


def drain(scheduler, clock, active=(), step=1.0):
    """Run the queue dry like the worker; returns the adapter set of each batch and the switch count."""
    order, switches = [], 0
    while scheduler.depth:
        batch = scheduler.next_batch(active, timeout=0)
        assert batch
        if batch[0].adapter_set != active:
            switches += 1
            active = batch[0].adapter_set
        order.append([j.adapter_set for j in batch])
        for j in batch:
            j.future.set_result(None)
        clock.now += step
    return order, switches


def test_affinity_prefers_the_active_set_and_cuts_switches():
    sets = [A, B, A, C, A, B, A, C]
    results = {}
    for policy in ("affinity", "fifo"):
        scheduler, clock = make(policy)
        for s in sets:
            scheduler.submit(job(clock, s))
            clock.now += 0.01
        order, switches = drain(scheduler, clock, active=A)
        results[policy] = switches
        if policy == "affinity":
            assert [b[0] for b in order] == [A, A, A, A, B, B, C, C]
        else:
            assert [b[0] for b in order] == sets
    assert results == {"affinity": 2, "fifo": 7}


def test_max_wait_bounds_starvation():
    scheduler, clock = make(max_wait=5.0)
    scheduler.submit(job(clock, B))  # waits while A keeps arriving
    served = []
    for _ in range(10):
        clock.now += 1.0
        scheduler.submit(job(clock, A))
        batch = scheduler.next_batch(A, timeout=0)
        served.append((clock.now, batch[0].adapter_set))
        batch[0].future.set_result(None)
    b_time = next(t for t, s in served if s == B)
    assert b_time - 1000.0 <= 5.0 + 1.0  # served at the first pick after max_wait, not after all A's
    assert [s for _, s in served[:4]] == [A, A, A, A]


def test_batches_same_key_up_to_max_batch():
    scheduler, clock = make(max_batch=4)
    for s, items in [(A, 1), (B, 1), (A, 2), (A, 1), (A, 1), ((A), 1)]:
        scheduler.submit(job(clock, s, items=items))
    scheduler.submit(job(clock, A, shape="128x128"))  # another shape: never in the same batch
    first = scheduler.next_batch(A, timeout=0)
    assert [j.items for j in first] == [1, 2, 1] and all(j.adapter_set == A for j in first)
    second = scheduler.next_batch(A, timeout=0)
    assert len(second) == 2 and {j.key for j in second} == {(A, "64x64")}
    third = scheduler.next_batch(A, timeout=0)
    assert [j.key for j in third] == [(A, "128x128")]
    assert scheduler.next_batch(A, timeout=0)[0].adapter_set == B
    with pytest.raises(InvalidRequestError, match="largest batch, 4"):
        scheduler.submit(job(clock, A, items=5))


def test_fifo_batches_only_the_head_run():
    scheduler, clock = make("fifo", max_batch=4)
    for s in [A, A, B, A]:
        scheduler.submit(job(clock, s))
    assert len(scheduler.next_batch(A, timeout=0)) == 2
    assert scheduler.next_batch(A, timeout=0)[0].adapter_set == B


def test_queue_bound_cancellation_and_timeout():
    scheduler, clock = make(max_queue=3)
    jobs = [scheduler.submit(job(clock, s, timeout=10.0)) for s in (A, B, C)]
    with pytest.raises(QueueFullError) as err:
        scheduler.submit(job(clock, A))
    assert err.value.retry_after >= 1
    assert jobs[0].cancel()  # the client left while it waited
    clock.now += 11.0  # B and C are past their timeout
    assert scheduler.next_batch(A, timeout=0) == []
    assert scheduler.depth == 0 and scheduler.cancelled == 1 and scheduler.timed_out == 2
    with pytest.raises(RequestTimeoutError):
        jobs[1].future.result(0)
    running = scheduler.submit(job(clock, A))
    assert scheduler.next_batch(A, timeout=0) == [running]
    assert not running.cancel()  # a running job cannot be withdrawn


def test_peek_predicts_the_next_set_and_next_batch_blocks_until_a_job_arrives():
    scheduler, clock = make()
    assert scheduler.peek_adapter_set(A) is None
    got = []
    thread = threading.Thread(target=lambda: got.append(scheduler.next_batch(A, timeout=5)))
    thread.start()
    scheduler.submit(job(clock, B))
    thread.join(5)
    assert got and got[0][0].adapter_set == B
    scheduler.submit(job(clock, C))
    scheduler.submit(job(clock, A))
    assert scheduler.peek_adapter_set(A) == A and scheduler.peek_adapter_set(B) == C
    assert scheduler.depth == 2  # peeking removes nothing


# -- the worker's adapter prefetch (no model: a stand-in pipeline with a real adapter cache)
class _Served:
    """What the prefetcher uses of a loaded pipeline: its adapter cache and device."""

    def __init__(self):
        import torch

        from aotpack.adapters.cache import AdapterCache

        self.device = torch.device("cpu")
        self.cache = AdapterCache(self.device, torch.float32)


@pytest.fixture()
def lora_file(tmp_path):
    import lora_formats as formats

    from aotpack.demo import random_lora_state_dict
    from aotpack.models.tiny import make_transformer

    state = random_lora_state_dict(make_transformer(), 4, ["*attn.to_*"], seed=3)
    return formats.write(state, tmp_path / "style.safetensors")


def _worker(monkeypatch, gate):
    """A worker whose adapter parse blocks on `gate` (to catch it mid-parse)."""
    from aotpack.serve import worker as worker_module

    parsing = threading.Event()
    real_parse = worker_module.parse_adapter

    def slow_parse(source, **kwargs):
        parsing.set()
        assert gate.wait(10)
        return real_parse(source, **kwargs)

    monkeypatch.setattr(worker_module, "parse_adapter", slow_parse)
    worker = worker_module.Worker(lambda: None, registry=None, scheduler=None, metrics=None)
    worker.served = _Served()
    return worker, parsing


def test_prefetch_parses_outside_the_cache_lock_and_stages_the_same_adapter(monkeypatch, lora_file):
    from aotpack.adapters import AdapterSource, parse_adapter

    gate = threading.Event()
    worker, parsing = _worker(monkeypatch, gate)
    source = AdapterSource(str(lora_file))
    staging = threading.Thread(target=worker.stage, args=(source,))
    staging.start()
    assert parsing.wait(10)
    # mid-parse: a switch can take the cache lock at once (it used to wait for the whole file)
    assert worker.cache_lock.acquire(timeout=1)
    assert source not in worker.cache
    worker.cache_lock.release()
    gate.set()
    staging.join(10)
    assert source in worker.cache and worker.stats["prefetched"] == 1
    assert source.cache_key() in worker._prefetched
    staged, expected = worker.cache.get(source), parse_adapter(source)
    assert staged.layers.keys() == expected.layers.keys()
    for name, delta in expected.layers.items():
        assert torch_equal(staged.layers[name].A, delta.A) and torch_equal(staged.layers[name].B, delta.B)
    assert worker.stage(source) is False  # staged once


def test_prefetch_waits_while_a_switch_runs(monkeypatch, lora_file):
    from aotpack.adapters import AdapterSource

    gate = threading.Event()
    gate.set()
    worker, parsing = _worker(monkeypatch, gate)
    worker._no_switch.clear()  # what `_switch` does for its duration
    staging = threading.Thread(target=worker.stage, args=(AdapterSource(str(lora_file)),))
    staging.start()
    assert not parsing.wait(0.5)  # no file work while the switch holds the model
    worker._no_switch.set()
    assert parsing.wait(10)
    staging.join(10)
    assert worker.stats["prefetched"] == 1


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_peek_several_sets_follows_the_policy():
    scheduler, clock = make(max_batch=1)
    for adapter_set in (A, B, A, C, B):
        scheduler.submit(job(clock, adapter_set))
        clock.now += 1
    # affinity from A: both A's first, then B's, then C's (what drain() would run)
    assert scheduler.peek_adapter_sets(A, 3) == [A, A, B]
    assert scheduler.peek_adapter_sets(C, 5) == [C, A, A, B, B]
    assert scheduler.peek_adapter_set(B) == B and scheduler.depth == 5  # peeking takes nothing
    fifo, clock = make(policy="fifo", max_batch=1)
    for adapter_set in (A, B, A):
        fifo.submit(job(clock, adapter_set))
    assert fifo.peek_adapter_sets(A, 3) == [A, B, A]
