"""An LRU of parsed adapters, kept compact (rank-r factors) on the serving device, within a byte budget.

Switching to a cached adapter set reads no file: it copies these factors into the slot tensors.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

from .parse import Adapter, parse_adapter

DEFAULT_BUDGET_BYTES = 4 << 30


def _file_key(source: str) -> tuple:
    """Identity of an adapter source: a local file changes key when it is rewritten."""
    path = Path(source).expanduser()
    if path.is_file():
        stat = path.stat()
        return (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return (source,)


class AdapterCache:
    def __init__(self, device, dtype, budget_bytes: int = DEFAULT_BUDGET_BYTES):
        self.device, self.dtype, self.budget_bytes = device, dtype, budget_bytes
        self._entries: collections.OrderedDict[tuple, Adapter] = collections.OrderedDict()
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, source) -> bool:
        return _file_key(str(source)) in self._entries

    def get(self, source: str | os.PathLike, **parse_kwargs) -> Adapter:
        """The parsed adapter for `source`, parsing (and caching) it on a miss."""
        key = _file_key(str(source))
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        adapter = parse_adapter(source, **parse_kwargs).to(device=self.device, dtype=self.dtype)
        self._entries[key] = adapter
        self._evict(keep=key)
        return adapter

    def _evict(self, keep: tuple) -> None:
        while self.nbytes > self.budget_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            self._entries.popitem(last=False)
