"""The adapter cache never evicts the adapters of the live set, nor those of a set while it is being resolved:
with a budget below one set's size, switching to that set again reads no file (it used to parse every file on
every switch), a set's later entries do not evict its earlier ones, and a refused set keeps the live set's pins."""

from __future__ import annotations

import collections
import logging
import shutil

import pytest
import torch
from reference import latents

from aotpack.adapters import cache as cache_module
from aotpack.adapters import parse_adapter
from aotpack.adapters.cache import AdapterCache
from aotpack.errors import AdapterFileError, AdapterRankError


@pytest.fixture
def parses(monkeypatch):
    """Counts of the cache's file parses, by source."""
    counts, real = collections.Counter(), cache_module.parse_adapter

    def counting(source, **kwargs):
        counts[source.describe()] += 1
        return real(source, **kwargs)

    monkeypatch.setattr(cache_module, "parse_adapter", counting)
    return counts


@pytest.fixture
def swap_cache(served_tiny):
    """Give the shared pipeline a fresh cache of a chosen budget; the old cache (and no active set) come back after."""
    old = served_tiny.cache
    served_tiny.set_loras([])  # no pins of an earlier test's set left on the old cache

    def swap(budget_bytes: int) -> AdapterCache:
        served_tiny.cache = AdapterCache(old.device, old.dtype, budget_bytes=budget_bytes)
        return served_tiny.cache

    yield swap
    try:
        served_tiny.set_loras([])
    finally:
        served_tiny.cache = old


def _size(served, path) -> int:
    return AdapterCache(served.cache.device, served.cache.dtype).get(path).nbytes


def _key(cache, path) -> tuple:
    return cache.key_of(path)


def test_a_set_above_the_budget_is_parsed_once_however_often_it_comes_back(served_tiny, demo_loras, swap_cache,
                                                                            parses):
    attn, mlp = demo_loras["tiny-style-attn"], demo_loras["tiny-style-mlp"]
    sizes = [_size(served_tiny, attn), _size(served_tiny, mlp)]
    parses.clear()
    # the unpinned path: parsed adapters handed over directly, never cached
    device, dtype = served_tiny.cache.device, served_tiny.cache.dtype
    served_tiny.set_loras([(parse_adapter(attn, device=device, dtype=dtype), 1.0),
                           (parse_adapter(mlp, device=device, dtype=dtype), 0.7)], merge=False)
    expected = latents(served_tiny)
    cache = swap_cache(max(sizes))  # room for either adapter, not for both
    assert max(sizes) < sum(sizes)
    results = []
    for _ in range(4):
        results.append(served_tiny.set_loras([(attn, 1.0), (mlp, 0.7)], merge=False))
        assert torch.equal(latents(served_tiny), expected)
        results.append(served_tiny.set_loras([(attn, 1.0), (mlp, 0.7)], merge=False))  # the live set again
        served_tiny.set_loras([])  # switched away: unpinned, but nothing new comes in to evict it
    assert dict(parses) == {str(attn): 1, str(mlp): 1}
    assert [r.parsed for r in results] == [2] + [0] * 7
    assert cache.evictions == 0 and len(cache) == 2 and cache.pinned == frozenset()


def test_resolving_a_set_keeps_its_earlier_entries_and_the_live_set_stays_pinned(served_tiny, demo_loras, swap_cache,
                                                                                 parses, tmp_path, caplog):
    names = ("tiny-style-attn", "tiny-style-mlp", "tiny-style-all")
    paths = [demo_loras[n] for n in names]
    other = shutil.copy(demo_loras["tiny-style-mlp"], tmp_path / "other.safetensors")
    pinned_bytes = sum(_size(served_tiny, p) for p in paths)
    parses.clear()
    cache = swap_cache(1)  # below any adapter: only pins (and the newest entry) keep anything
    with caplog.at_level(logging.WARNING, logger=cache_module.__name__):
        result = served_tiny.set_loras([(p, 0.5) for p in paths], merge=False)
        assert result.parsed == 3 and all(p in cache for p in paths) and cache.evictions == 0
        assert cache.pinned == {_key(cache, p) for p in paths}
        cache.get(other)  # e.g. the serve prefetcher staging the next set: the live set stays
        cache.get(demo_loras["tiny-style-attn"])  # a hit makes `other` the oldest entry
        served_tiny.set_loras([(p, 0.5) for p in paths], merge=False)
    assert all(p in cache for p in paths) and other in cache and cache.evictions == 0
    assert sum(parses.values()) == 4
    warnings = [r.getMessage() for r in caplog.records if r.name == cache_module.__name__]
    assert len(warnings) == 1 and "Raise the cache budget" in warnings[0]  # once, with the numbers
    assert f"take {pinned_bytes} bytes" in warnings[0] and "budget of 1 bytes" in warnings[0]
    served_tiny.set_loras([(paths[0], 0.5)], merge=False)  # switched away: the others are evicted as any entry
    newest = cache.get(shutil.copy(other, tmp_path / "newest.safetensors"))
    assert cache.pinned == {_key(cache, paths[0])} and paths[0] in cache and newest is not None
    assert not any(p in cache for p in (paths[1], paths[2], other)) and len(cache) == 2


@pytest.mark.parametrize("refusal", ["rank", "file"])
def test_a_refused_set_keeps_the_live_sets_pins(served_tiny, demo_loras, swap_cache, parses, tmp_path, refusal):
    attn, mlp = demo_loras["tiny-style-attn"], demo_loras["tiny-style-mlp"]
    budget = max(_size(served_tiny, attn), _size(served_tiny, mlp))
    copies = [shutil.copy(demo_loras[n], tmp_path / f"c{i}.safetensors")
              for i, n in enumerate(("tiny-style-all", "tiny-style-all", "tiny-style-attn"))]
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    parses.clear()
    cache = swap_cache(budget)
    served_tiny.set_loras([(attn, 1.0), (mlp, 0.7)], merge=False)
    before, active = latents(served_tiny), list(served_tiny.active)
    if refusal == "rank":  # ranks 16 + 16 + 4 above max_rank 32: refused after every entry is resolved
        with pytest.raises(AdapterRankError):
            served_tiny.set_loras([(c, 1.0) for c in copies], merge=False)
        assert all(c in cache for c in copies)  # each kept while the set was resolved
    else:  # the second file cannot be parsed
        with pytest.raises(AdapterFileError):
            served_tiny.set_loras([(copies[0], 1.0), (broken, 1.0)], merge=False)
    assert attn in cache and mlp in cache and cache.evictions == 0
    assert served_tiny.active == active and cache.pinned == {_key(cache, attn), _key(cache, mlp)}
    cache.get(shutil.copy(mlp, tmp_path / "next.safetensors"))  # the refused set's adapters go, the live set stays
    assert attn in cache and mlp in cache and not any(c in cache for c in copies)
    result = served_tiny.set_loras([(attn, 1.0), (mlp, 0.7)], merge=False)
    assert result.parsed == 0 and parses[str(attn)] == 1 and parses[str(mlp)] == 1
    assert torch.equal(latents(served_tiny), before)
