"""An LRU of parsed adapters, kept compact (rank-r factors) on the serving device, within a byte budget.

Switching to a cached adapter set reads no file and makes no network call: it copies these factors
into the slot tensors on the device.

Thread-safe: lookups and inserts hold a lock; a file is parsed outside it, once, however many threads
ask for it at the same time (they all get the same parse).

Pins: the entries of the set being resolved and of the live set are never evicted (`get(..., pin=owner)`,
`pin`, `unpin`; the pipeline sets them). Without them a budget below one set's size evicted that set's own
adapters while it was resolved, and every request repeating the set parsed its files again. The pinned set
alone may exceed the budget; that is logged once per budget (when a set is pinned whole), with the fix.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import numbers
import threading

import torch

from ..errors import RequestError
from .parse import Adapter, parse_adapter
from .sources import AdapterSource, adapter_source

logger = logging.getLogger(__name__)

DEFAULT_BUDGET_BYTES = 4 << 30


def _checked_budget(budget_bytes) -> int:
    """A byte count >= 0 (0: only the newest entry stays). NaN made the cache unbounded (no size compares above
    it), a string failed only at the first insert, after the parse, and True meant 1 byte."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Real) or \
            not math.isfinite(budget_bytes) or budget_bytes < 0:
        raise RequestError(f"adapter cache budget_bytes = {budget_bytes!r} is not a number of bytes >= 0",
                           "pass a byte count, e.g. cache_budget_bytes=4 << 30 (4 GiB); the newest adapter always "
                           "stays cached, even above it")
    return int(budget_bytes)


def _own_memory(tensors: dict) -> dict:
    """`tensors` with each one that is a view of a larger buffer (the file's bytes: a CPU parse keeps the CLIP parts
    as views of the whole file) copied into its own memory, so the cache holds and counts only what it keeps."""
    return {k: t.clone() if torch.is_tensor(t) and t.untyped_storage().nbytes() > t.numel() * t.element_size()
            else t for k, t in tensors.items()}


def _compacted(adapter: Adapter) -> Adapter:
    """`adapter` itself when all its tensors own their memory; else a copy (same uid) whose tensors do."""
    layers = {}
    for name, delta in adapter.layers.items():
        own = _own_memory({"A": delta.A, "B": delta.B})
        layers[name] = delta if own["A"] is delta.A and own["B"] is delta.B else dataclasses.replace(delta, **own)
    text_encoder, alphas = _own_memory(adapter.text_encoder), _own_memory(adapter.text_encoder_alphas)
    if all(layers[k] is d for k, d in adapter.layers.items()) and \
            all(text_encoder[k] is t for k, t in adapter.text_encoder.items()) and \
            all(alphas[k] is t for k, t in adapter.text_encoder_alphas.items()):
        return adapter
    return dataclasses.replace(adapter, layers=layers, text_encoder=text_encoder, text_encoder_alphas=alphas)


class AdapterCache:
    def __init__(self, device, dtype, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.device, self.dtype = device, dtype
        self._entries: collections.OrderedDict[tuple, Adapter] = collections.OrderedDict()
        self._sizes: dict[tuple, int] = {}
        self._nbytes = 0
        self._lock = threading.RLock()
        self._parsing: dict[tuple, threading.Event] = {}  # keys being parsed now, by one thread
        self._pins: dict[object, frozenset] = {}  # owner -> keys it keeps from eviction
        self.budget_bytes = budget_bytes  # checked; arms the over-budget log
        self.hits = self.misses = self.evictions = 0

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @budget_bytes.setter
    def budget_bytes(self, value) -> None:
        value = _checked_budget(value)
        with self._lock:
            self._budget, self._warned_over_budget = value, False  # a new budget: log again if pins exceed it

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def pinned(self) -> frozenset:
        """The keys no eviction removes now (all owners' pins)."""
        with self._lock:
            return frozenset().union(*self._pins.values())

    def pins_of(self, owner) -> frozenset:
        with self._lock:
            return self._pins.get(owner, frozenset())

    def pin(self, owner, keys) -> None:
        """Make `keys` the entries `owner` keeps from eviction (replacing what it pinned before). Pinning
        evicts nothing; keys not (or no longer) cached are harmless."""
        with self._lock:
            keys = frozenset(keys)
            if keys:
                self._pins[owner] = keys
            else:
                self._pins.pop(owner, None)
            self._warn_if_pins_exceed_budget()

    def unpin(self, owner) -> None:
        """Drop `owner`'s pins: its entries are evicted as any other, at the next insert above the budget."""
        with self._lock:
            self._pins.pop(owner, None)

    def _warn_if_pins_exceed_budget(self) -> None:
        """Log once per budget when the pinned entries alone exceed it (eviction cannot bring the cache within it)."""
        pinned = [k for k in self.pinned if k in self._sizes]
        pinned_bytes = sum(self._sizes[k] for k in pinned)
        if pinned_bytes <= self._budget or self._warned_over_budget:
            return
        self._warned_over_budget = True
        logger.warning(
            "adapter cache: the %d adapters in use take %d bytes (%.1f MiB), above the cache budget of %d bytes "
            "(%.1f MiB); they stay cached (pinned) above it, the cache holds %d bytes. Raise the cache budget to at "
            "least %d bytes (load_package(..., cache_budget_bytes=...), `aotpack serve --cache-gb`) to keep other "
            "adapters cached as well", len(pinned), pinned_bytes, pinned_bytes / 2**20, self._budget,
            self._budget / 2**20, self._nbytes, pinned_bytes)

    def _pin_key(self, owner, key: tuple) -> None:
        if owner is not None:
            self._pins[owner] = self._pins.get(owner, frozenset()) | {key}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, source) -> bool:
        return adapter_source(source).cache_key() in self._entries

    def key_of(self, source, *, weight_name: str | None = None, revision: str | None = None) -> tuple:
        """The cache key of `source` now. Take it before parsing the file elsewhere and hand it to `add`: a key
        taken after the parse could name bytes written during it."""
        return adapter_source(source, weight_name=weight_name, revision=revision).cache_key()

    def get(self, source, *, weight_name: str | None = None, revision: str | None = None,
            pin=None) -> Adapter:
        """The parsed adapter for `source` (path, `owner/repo/file.safetensors`, `AdapterSource`), parsing
        and caching it on a miss. The most recently used entry is always kept, even above the budget.
        Threads asking for one adapter at the same time share one parse. `pin`: an owner whose pins gain
        this entry's key (before an insert evicts anything), e.g. the set being resolved."""
        where: AdapterSource = adapter_source(source, weight_name=weight_name, revision=revision)
        key = where.cache_key()  # before the parse: bytes written meanwhile get a new key, never this one
        while True:
            with self._lock:
                if key in self._entries:
                    self.hits += 1
                    self._entries.move_to_end(key)
                    self._pin_key(pin, key)
                    return self._entries[key]
                pending = self._parsing.get(key)
                if pending is None:
                    self._parsing[key] = threading.Event()
                    self.misses += 1
                    break
            pending.wait()  # another thread parses it; then a hit (or, if that parse failed, this one tries)
        try:
            adapter = _compacted(parse_adapter(where, device=self.device, dtype=self.dtype))  # checked, parsed there
            with self._lock:
                self._pin_key(pin, key)
                self._insert(key, adapter)
            return adapter
        finally:
            with self._lock:
                self._parsing.pop(key).set()

    def add(self, source, adapter: Adapter, *, key: tuple | None = None) -> Adapter:
        """Insert `adapter`, parsed for `source` elsewhere (the serve prefetcher parses and copies outside
        the lock that guards this cache); an entry already there wins. Counted as a miss. Pass the `key`
        that `key_of(source)` gave before the parse (without it the key is taken now, after the parse)."""
        key = key if key is not None else adapter_source(source).cache_key()
        with self._lock:
            if key in self._entries:
                return self._entries[key]
            self.misses += 1
            adapter = _compacted(adapter)
            self._insert(key, adapter)
            return adapter

    def _insert(self, key: tuple, adapter: Adapter) -> None:
        self._entries[key] = adapter
        self._sizes[key] = adapter.nbytes
        self._nbytes += self._sizes[key]
        self._evict(keep=key)

    def _evict(self, keep: tuple) -> None:
        """Drop the least recently used entries until within the budget; never `keep` (the newest) nor a pinned one."""
        if self._nbytes <= self._budget:
            return
        pinned = self.pinned
        for key in [k for k in self._entries if k != keep and k not in pinned]:  # oldest first
            if self._nbytes <= self._budget:
                break
            del self._entries[key]
            self._nbytes -= self._sizes.pop(key)
            self.evictions += 1
