"""One request: its tokens, the integer counters the scheduler advances, its KV block tables."""

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from moerun.engine.sampler import TokenLogprobs
from moerun.sampling import SamplingParams, TokenConstraint


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class BlockCopy(NamedTuple):
    """Copy a cached block's K/V into a block of the sequence's own, before the step computes."""

    full: bool  # the full-attention layers' pool, else the sliding layers'
    src: int
    dst: int


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order; the newest running request is preempted first
    stop_token_ids: frozenset[int] = frozenset()  # params' plus the model's end tokens
    generator: torch.Generator | None = None
    constraint: TokenConstraint | None = None  # params.constraint's instance for this request
    output_token_ids: list[int] = field(default_factory=list)
    # truth of progress: tokens [0, num_computed_tokens) have K/V in the cache
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    # full-attention layers: logical block j -> physical block, every block of the sequence
    full_blocks: list[int] = field(default_factory=list)
    # sliding layers: only the blocks the window can still see (older ones are released)
    window_blocks: dict[int, int] = field(default_factory=dict)
    pending_copies: list[BlockCopy] = field(default_factory=list)  # for the next step
    num_hashed_blocks: int = 0  # leading blocks whose chained content hash is known
    last_block_hash: int | None = None
    cache_salt: str | None = None  # requests with different salts never share cached blocks
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache at admission
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.prompt_token_ids, "a request needs at least one prompt token"

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens at positions [start, end) of prompt + output."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:  # a decode step: no copy of the whole history
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED
