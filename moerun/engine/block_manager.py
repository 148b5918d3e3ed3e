"""KV blocks per sequence for both layer kinds, and the prefix cache over them.

Full-attention layers keep every block of a sequence. Sliding-window layers (spec §2.9) keep,
between steps, only the blocks holding the last `window - 1` positions, which is all the next
query can see besides itself. A step writes every new position's K/V before attention reads
them back from the cache (moerun.ops.paged), so a prompt chunk holds window blocks for all its
positions during the step; after it the ones no later query sees are released.

Prefix cache: a completed full block is registered under the chained hash of its tokens (and the
request's cache salt), and stays findable after its sequence lets go of it, until its memory is
needed (block_pool.py). Resuming at a block boundary p also needs the sliding layers' K/V of the
W - 1 positions before p, which sequences release as they go: so at the points later requests
resume from (the end of a prompt, the end of a finished or preempted request) the window blocks
before the last boundary are registered as a checkpoint under the prefix hash at p. A request
resumes at the longest prefix whose full blocks are all cached and that has a checkpoint.

Those points rarely fall on a block boundary, so each is also registered exactly: the partial
last block (full layers) and the window blocks up to it (sliding layers), under a key of the
prefix hash and the tail's tokens. A request resuming there shares the blocks before the tail
and gets its own copy of each partial block (the model runner copies them before the step),
because it writes its own tokens after the tail; the cached originals are held until copied.

Blocks are only released between steps or by preempting a request that the same plan then does
not run, so no block is read by one sequence while another writes it; cached blocks are never
written again (a sequence writes only past its computed prefix, into blocks it allocated).
"""

from moerun.engine.block_pool import BlockPool
from moerun.engine.sequence import BlockCopy, Sequence


class BlockManager:
    def __init__(
        self, full_blocks: int, window_blocks: int, block_size: int, window: int,
        prefix_caching: bool = False,
    ) -> None:  # fmt: skip
        self.full, self.windowed = BlockPool(full_blocks), BlockPool(window_blocks)
        self.block_size, self.window, self.prefix_caching = block_size, window, prefix_caching
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

    # ---- prefix cache ---------------------------------------------------------------------
    def _first_window_block(self, boundary: int) -> int:
        """Logical block of the earliest position a query at `boundary` can see."""
        return max(0, boundary - self.window + 1) // self.block_size

    @staticmethod
    def _chain(prev: int | None, seq: Sequence) -> int:
        """The hash a block's key chains on: the previous block's, or for the first block the
        salt, so requests with different salts share nothing."""
        return hash(("moerun-salt", seq.cache_salt)) if prev is None else prev

    def _next_hash(self, prev: int | None, seq: Sequence, j: int) -> int:
        bs = self.block_size
        return hash((self._chain(prev, seq), tuple(seq.token_ids(j * bs, (j + 1) * bs))))

    def _tail_key(self, prev: int | None, seq: Sequence, j: int, end: int) -> int:
        """Key of an exact hit point inside logical block j: the tokens [j*bs, end) after it."""
        tail = tuple(seq.token_ids(j * self.block_size, end))
        return hash((self._chain(prev, seq), "tail", tail))

    def _find_tail(self, seq: Sequence, hashes: list[int]) -> tuple[int, int] | None:
        """(end, key) of the longest exact hit point inside the block after the `len(hashes)`
        cached ones, or None."""
        j, bs = len(hashes), self.block_size
        prev = hashes[-1] if hashes else None
        for end in range(min((j + 1) * bs - 1, seq.num_tokens - 1), j * bs, -1):
            key = self._tail_key(prev, seq, j, end)
            if self.full.lookup(key) is not None and self.windowed.lookup(key) is not None:
                return end, key
        return None

    def adopt_prefix(self, seq: Sequence) -> int:
        """A request about to start: take the longest cached prefix it can resume from (at
        least one token is left to compute, for its logits). Returns the cached tokens."""
        assert seq.num_computed_tokens == 0 and not seq.full_blocks and not seq.window_blocks
        if not self.prefix_caching or seq.params.prompt_logprobs is not None:
            return 0  # prompt_logprobs needs the logits of every prompt position
        h, hashes, full, best = None, [], [], 0
        for j in range((seq.num_tokens - 1) // self.block_size):
            h = self._next_hash(h, seq, j)
            if self.has_full:
                found = self.full.lookup(h)
                if found is None:
                    break
                full.append(found[0])
            hashes.append(h)
            if not self.has_window or self.windowed.lookup(h) is not None:
                best = j + 1  # resumable here: full blocks and (if any) a window checkpoint
        tail = self._find_tail(seq, hashes) if self.has_full and self.has_window else None
        if tail is not None:
            end, key = tail
            if self._room(self.full, full + [self.full.lookup(key)[0]]) and self._room(
                self.windowed, list(self.windowed.lookup(key))):  # fmt: skip
                self._adopt(seq, full, key, end)
                seq.num_hashed_blocks = len(hashes)
                seq.last_block_hash = hashes[-1] if hashes else None
                return end
        if best:
            self._adopt(seq, full[:best], hashes[best - 1], best * self.block_size)
            seq.num_hashed_blocks, seq.last_block_hash = best, hashes[best - 1]
        return seq.num_computed_tokens

    @staticmethod
    def _room(pool: BlockPool, shared: list[int]) -> bool:
        """A block is left to copy a partial block into once `shared` are taken (a cached
        block taken off the evictable list is no longer free)."""
        return pool.num_free - sum(b in pool.evictable for b in set(shared)) >= 1

    def _adopt(self, seq: Sequence, full: list[int], key: int, end: int) -> None:
        """Resume `seq` at position `end`: share the cached blocks; a partial last block (end
        inside a block) is copied into a block of its own, its original held until then."""
        for block in full:
            self.full.touch(block)
        seq.full_blocks = list(full)
        if self.has_window:
            first = self._first_window_block(end)
            for i, block in enumerate(self.windowed.lookup(key)):
                self.windowed.touch(block)
                seq.window_blocks[first + i] = block
        if end % self.block_size:
            # touched above (window), or now (full): the sources stay put until the copy
            src = self.full.lookup(key)[0]
            self.full.touch(src)
            j = end // self.block_size
            window_src = seq.window_blocks[j]
            seq.full_blocks.append(self.full.allocate())
            seq.window_blocks[j] = self.windowed.allocate()
            seq.pending_copies = [BlockCopy(True, src, seq.full_blocks[j]),
                                  BlockCopy(False, window_src, seq.window_blocks[j])]  # fmt: skip
        seq.num_computed_tokens = seq.num_cached_tokens = end

    def copies_done(self, seq: Sequence) -> None:
        """The step that copied `seq`'s partial blocks ran: let go of the originals."""
        for copy in seq.pending_copies:
            (self.full if copy.full else self.windowed).release(copy.src)
        seq.pending_copies = []

    def _hash_completed(self, seq: Sequence) -> None:
        """Hash the sequence's newly completed blocks; register the full-layer ones."""
        n, bs = seq.num_computed_tokens, self.block_size
        while (seq.num_hashed_blocks + 1) * bs <= n:
            j = seq.num_hashed_blocks
            h = self._next_hash(seq.last_block_hash, seq, j)
            if self.has_full and self.prefix_caching:
                self.full.register(h, (seq.full_blocks[j],))
            seq.num_hashed_blocks, seq.last_block_hash = j + 1, h

    def checkpoint(self, seq: Sequence) -> None:
        """Register the window blocks a request resuming at the last block boundary of `seq`'s
        computed tokens needs (skipped where the sequence no longer holds them all)."""
        if not self.prefix_caching:
            return
        self._hash_completed(seq)
        k = seq.num_hashed_blocks
        if not self.has_window or k == 0:
            return
        self._register_window(seq.last_block_hash, seq, k * self.block_size, k)
        n = seq.num_computed_tokens
        if n % self.block_size and self.has_full:  # the exact point, inside block k
            key = self._tail_key(seq.last_block_hash, seq, k, n)
            if self._register_window(key, seq, n, k + 1):
                self.full.register(key, (seq.full_blocks[k],))

    def _register_window(self, key: int, seq: Sequence, boundary: int, stop: int) -> bool:
        """Register the window blocks a query at `boundary` sees (logical blocks up to `stop`),
        if the sequence still holds them all."""
        logical = range(self._first_window_block(boundary), stop)
        if not all(j in seq.window_blocks for j in logical):
            return False
        self.windowed.register(key, tuple(seq.window_blocks[j] for j in logical))
        return True

    # ---- after a step, and at the end -----------------------------------------------------
    def release_stale(self, seq: Sequence) -> None:
        """After a step: hash completed blocks, drop window blocks no query can see any more."""
        self._hash_completed(seq)
        keep_from = self._first_window_block(seq.num_computed_tokens)
        for j in [j for j in seq.window_blocks if j < keep_from]:
            self.windowed.release(seq.window_blocks.pop(j))

    def free(self, seq: Sequence) -> None:
        self.copies_done(seq)  # never run (not admitted after all): the originals go back
        for block in seq.full_blocks:
            self.full.release(block)
        for block in seq.window_blocks.values():
            self.windowed.release(block)
        seq.full_blocks, seq.window_blocks = [], {}
        seq.num_hashed_blocks, seq.last_block_hash = 0, None

    def check(self) -> None:
        self.full.check()
        self.windowed.check()
