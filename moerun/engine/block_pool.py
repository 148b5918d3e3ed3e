"""Physical KV blocks of one layer kind: reference counts, and a cache of released blocks whose
content is still valid, found by key and evicted least recently used first.

A key names the content of one or more blocks: for full-attention layers the chained hash of a
block's tokens (one block), for sliding-window layers a checkpoint, the window blocks that hold
the W - 1 positions before a block boundary (several blocks). A block whose last reference goes
keeps its content while any key names it; it is reallocated only when no plain free block is
left, and then every key naming it is forgotten.
"""

from collections import OrderedDict, deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))  # no content worth keeping
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, cached, oldest first
        self.ref_counts = [0] * num_blocks
        self.blocks_of_key: dict[int, tuple[int, ...]] = {}
        self.keys_of_block: dict[int, set[int]] = {}

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: plain free ones, then cached ones (evicting them)."""
        return len(self.free) + len(self.evictable)

    @property
    def num_cached(self) -> int:
        return len(self.keys_of_block)

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)  # least recently used
            self._forget(block)
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def touch(self, block: int) -> None:
        """Take a reference on a cached block (a prefix-cache hit)."""
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        self.ref_counts[block] += 1

    def release(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} released twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self.keys_of_block:
                self.evictable[block] = None  # most recently used end
            else:
                self.free.append(block)

    def register(self, key: int, blocks: tuple[int, ...]) -> None:
        """Blocks whose content is final, findable by key. The first registration of a key
        wins: an equal block computed again elsewhere stays uncached."""
        if key in self.blocks_of_key:
            return
        self.blocks_of_key[key] = blocks
        for block in blocks:
            self.keys_of_block.setdefault(block, set()).add(key)

    def lookup(self, key: int) -> tuple[int, ...] | None:
        return self.blocks_of_key.get(key)

    def _forget(self, block: int) -> None:
        """The block is being reused: every key naming it is gone, and blocks left with no key
        and no reference become plain free blocks."""
        for key in self.keys_of_block.pop(block, set()):
            for other in self.blocks_of_key.pop(key):
                keys = self.keys_of_block.get(other)
                if other == block or keys is None:
                    continue
                keys.discard(key)
                if not keys:
                    del self.keys_of_block[other]
                    if self.ref_counts[other] == 0:
                        del self.evictable[other]
                        self.free.append(other)

    def check(self) -> None:
        """Integrity: every block is free, evictable or held, exactly one of them; the index
        and its reverse agree."""
        assert len(set(self.free)) == len(self.free), "a block is on the free list twice"
        free, evictable = set(self.free), set(self.evictable)
        assert not free & evictable, "a block is both free and evictable"
        for block in range(self.num_blocks):
            held = self.ref_counts[block] > 0
            assert held + (block in free) + (block in evictable) == 1, f"block {block}"
            assert (block in evictable) <= (block in self.keys_of_block), f"block {block}"
        for key, blocks in self.blocks_of_key.items():
            assert all(key in self.keys_of_block[b] for b in blocks), f"key {key}"
        for block, keys in self.keys_of_block.items():
            assert keys and all(block in self.blocks_of_key[k] for k in keys), f"block {block}"
