"""KV blocks: a free list with reference counts, and per-sequence block tables for both layer kinds.

Full-attention layers keep every block of a sequence. Sliding-window layers (spec §2.9) keep,
between steps, only the blocks holding the last `window - 1` positions, which is all the next
query can see besides itself. A step writes every new position's K/V before attention reads
them back from the cache (moerun.ops.paged), so a prompt chunk holds window blocks for all its
positions during the step; release_stale drops the ones no later query sees.

Blocks are only released between steps (release_stale) or by preempting a request that the same
plan then does not run, so no block is read by one sequence while another writes it.
"""

from collections import deque

from moerun.engine.sequence import Sequence


class BlockPool:
    """Physical blocks of one layer kind. Completed full blocks record a chained hash of their
    tokens (the hook the prefix cache will look blocks up by; nothing does yet)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_of_hash: dict[int, int] = {}
        self.hash_of_block: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        block = self.free.popleft()
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def release(self, block: int) -> None:
        assert self.ref_counts[block] > 0, f"block {block} released twice"
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            h = self.hash_of_block.pop(block, None)
            if h is not None and self.block_of_hash.get(h) == block:
                del self.block_of_hash[h]
            self.free.append(block)

    def register(self, block: int, block_hash: int) -> None:
        """A full block's content is final: record its hash."""
        self.hash_of_block[block] = block_hash
        self.block_of_hash.setdefault(block_hash, block)

    def check(self) -> None:
        """Integrity: every block is either free (count 0, listed once) or held."""
        assert len(set(self.free)) == len(self.free), "a block is on the free list twice"
        for block in range(self.num_blocks):
            assert (self.ref_counts[block] == 0) == (block in self.free), f"block {block}"


class BlockManager:
    def __init__(
        self, full_blocks: int, window_blocks: int, block_size: int, window: int
    ) -> None:
        self.full, self.windowed = BlockPool(full_blocks), BlockPool(window_blocks)
        self.block_size, self.window = block_size, window
        self.has_full, self.has_window = full_blocks > 0, window_blocks > 0

    # ---- planning -------------------------------------------------------------------------
    def _window_needed(self, seq: Sequence, start: int, end: int) -> list[int]:
        bs = self.block_size
        return [j for j in range(start // bs, (end - 1) // bs + 1) if j not in seq.window_blocks]

    def blocks_needed(self, seq: Sequence, num_new: int) -> tuple[int, int]:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
        full = max(0, -(-end // self.block_size) - len(seq.full_blocks)) if self.has_full else 0
        window = len(self._window_needed(seq, start, end)) if self.has_window else 0
        return full, window

    def can_allocate(self, seq: Sequence, num_new: int) -> bool:
        full, window = self.blocks_needed(seq, num_new)
        return full <= self.full.num_free and window <= self.windowed.num_free

    def allocate(self, seq: Sequence, num_new: int) -> None:
        """Give `seq` the blocks for computing its next `num_new` tokens."""
        assert self.can_allocate(seq, num_new)
        full, _ = self.blocks_needed(seq, num_new)
        seq.full_blocks += [self.full.allocate() for _ in range(full)]
        if self.has_window:
            start = seq.num_computed_tokens
            for j in self._window_needed(seq, start, start + num_new):
                seq.window_blocks[j] = self.windowed.allocate()

    # ---- after a step, and at the end -----------------------------------------------------
    def release_stale(self, seq: Sequence) -> None:
        """After a step: drop window blocks no query can see any more, hash completed blocks."""
        n, bs = seq.num_computed_tokens, self.block_size
        keep_from = max(0, n - self.window + 1) // bs
        for j in [j for j in seq.window_blocks if j < keep_from]:
            self.windowed.release(seq.window_blocks.pop(j))
        while self.has_full and (seq.num_hashed_blocks + 1) * bs <= n:
            j = seq.num_hashed_blocks
            h = hash((seq.last_block_hash, tuple(seq.token_ids(j * bs, (j + 1) * bs))))
            self.full.register(seq.full_blocks[j], h)
            seq.num_hashed_blocks, seq.last_block_hash = j + 1, h

    def free(self, seq: Sequence) -> None:
        for block in seq.full_blocks:
            self.full.release(block)
        for block in seq.window_blocks.values():
            self.windowed.release(block)
        seq.full_blocks, seq.window_blocks = [], {}
        seq.num_hashed_blocks, seq.last_block_hash = 0, None

    def check(self) -> None:
        self.full.check()
        self.windowed.check()
