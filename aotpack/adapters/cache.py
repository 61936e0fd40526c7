"""An LRU of parsed adapters, kept compact (rank-r factors) on the serving device, within a byte budget.

Switching to a cached adapter set reads no file and makes no network call: it copies these factors
into the slot tensors on the device.
"""

from __future__ import annotations

import collections

from .parse import Adapter, parse_adapter
from .sources import AdapterSource, adapter_source

DEFAULT_BUDGET_BYTES = 4 << 30


class AdapterCache:
    def __init__(self, device, dtype, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.device, self.dtype, self.budget_bytes = device, dtype, budget_bytes
        self._entries: collections.OrderedDict[tuple, Adapter] = collections.OrderedDict()
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, source) -> bool:
        return adapter_source(source).cache_key() in self._entries

    def get(self, source, *, weight_name: str | None = None, revision: str | None = None) -> Adapter:
        """The parsed adapter for `source` (path, `owner/repo/file.safetensors`, `AdapterSource`), parsing
        and caching it on a miss. The most recently used entry is always kept, even above the budget."""
        where: AdapterSource = adapter_source(source, weight_name=weight_name, revision=revision)
        key = where.cache_key()
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        adapter = parse_adapter(where, device=self.device, dtype=self.dtype)  # checked and parsed there
        self._entries[key] = adapter
        self._evict(keep=key)
        return adapter

    def add(self, source, adapter: Adapter) -> Adapter:
        """Insert `adapter`, parsed for `source` elsewhere (the serve prefetcher parses and copies outside
        the lock that guards this cache); an entry already there wins. Counted as a miss."""
        key = adapter_source(source).cache_key()
        if key in self._entries:
            return self._entries[key]
        self.misses += 1
        self._entries[key] = adapter
        self._evict(keep=key)
        return adapter

    def _evict(self, keep: tuple) -> None:
        while self.nbytes > self.budget_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            self._entries.popitem(last=False)
            self.evictions += 1
