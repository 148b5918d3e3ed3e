"""BoundedStore: the stored responses, within a byte budget (serve --response-store-bytes).

A count of entries alone bounds nothing: one entry can hold a 30 MB conversation. Each entry is
weighed once, when stored, as the length of its JSON (a cheap, conservative stand-in for its
memory: a response chain counts its whole conversation in every entry, though the entries share
the strings); the oldest go first until the total fits. A mapping, so the code that stores and
reads entries (responses_store.py) treats it as the dict it was.
"""

import dataclasses
import json
import logging
from collections.abc import Iterator, MutableMapping
from typing import Any

from moerun.server.options import RESPONSE_STORE_BYTES

log = logging.getLogger("moerun.server")


def weigh(entry: Any) -> int:
    """About how many bytes an entry holds: the length of its JSON."""
    value = vars(entry) if dataclasses.is_dataclass(entry) else entry  # asdict would copy it
    return len(json.dumps(value, ensure_ascii=False, default=str))


class BoundedStore(MutableMapping):
    """Insertion-ordered; past `max_bytes` the oldest entries are dropped. An entry larger than
    the whole budget is not kept (logged): it would evict everything else."""

    def __init__(self, max_bytes: int = RESPONSE_STORE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"the response store's budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: dict[str, tuple[Any, int]] = {}  # key -> (entry, its weight)

    def __setitem__(self, key: str, entry: Any) -> None:
        size = weigh(entry)
        self.pop(key, None)
        if size > self.max_bytes:
            log.warning("not storing %s: %d bytes, over the whole budget of %d (serve "
                        "--response-store-bytes)", key, size, self.max_bytes)  # fmt: skip
            return
        while self._entries and self.nbytes + size > self.max_bytes:
            del self[next(iter(self._entries))]  # dicts keep insertion order: the oldest first
        self._entries[key] = (entry, size)
        self.nbytes += size

    def __getitem__(self, key: str) -> Any:
        return self._entries[key][0]

    def __delitem__(self, key: str) -> None:
        _, size = self._entries.pop(key)
        self.nbytes -= size

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
