"""One engine over N ranks (SPMD): every rank runs the same LLMEngine on its shard of the model
and takes the same scheduling decisions, because rank 0 hands every rank the same commands
(add a request, abort one) before each step and the gathered logits, hence the sampled tokens,
are the same everywhere. Rank 0's ParallelEngine looks like an LLMEngine to LLM, the server's
AsyncEngine and the bench; the other ranks run `worker_loop`.
"""

import dataclasses
import os
from typing import Any

import torch.distributed as dist

from moerun.config import EngineConfig
from moerun.engine.llm_engine import LLMEngine, RequestOutput
from moerun.parallel.launch import spawn_ranks
from moerun.parallel.shard import Shard
from moerun.sampling import SamplingParams

Command = tuple  # ("add", prompt, params, request_id, cache_salt) | ("abort", id) | ("stop",)


def _exchange(commands: list[Command] | None) -> list[Command]:
    """Rank 0's commands of this step, on every rank."""
    box = [commands]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _apply(engine: LLMEngine, commands: list[Command]) -> bool:
    """Apply rank 0's commands; False once told to stop."""
    for command in commands:
        if command[0] == "add":
            engine.add_request(*command[1:])
        elif command[0] == "abort":
            engine.abort(command[1])
        else:
            return False
    return True


def worker_loop(rank: int, size: int, cfg: EngineConfig) -> None:
    """Ranks 1..N-1: rank 0's commands, then the same step, until rank 0 stops."""
    engine = LLMEngine(cfg, shard=Shard(rank, size, cfg.expert_parallel))
    while _apply(engine, _exchange(None)):
        engine.step()


class ParallelEngine:
    """Rank 0: an LLMEngine whose adds and aborts reach every rank before the next step."""

    def __init__(self, cfg: EngineConfig, rank: int = 0, size: int | None = None) -> None:
        """Spawns ranks 1..N-1 on this machine, unless this process already joined a group
        (torchrun: pass its size)."""
        size = size or cfg.tensor_parallel_size
        if not dist.is_initialized():
            self.workers = spawn_ranks(size, worker_loop, cfg, device=cfg.device)
        self.engine = LLMEngine(cfg, shard=Shard(rank, size, cfg.expert_parallel))
        self.pending: list[Command] = []
        self.max_model_len, self.model_dir = self.engine.max_model_len, self.engine.model_dir
        self.stop_ids, self.model_cfg = self.engine.stop_ids, self.engine.model_cfg

    @property
    def requests(self) -> dict:
        return self.engine.requests

    def add_request(self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
                    cache_salt: str | None = None) -> str:  # fmt: skip
        if params.seed is None:  # every rank must draw the same tokens
            params = dataclasses.replace(params, seed=int.from_bytes(os.urandom(7), "little"))
        request_id = self.engine.add_request(prompt, params, request_id, cache_salt)
        self.pending.append(("add", list(prompt), params, request_id, cache_salt))
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        out = self.engine.abort(request_id)
        if out is not None:
            self.pending.append(("abort", request_id))
        return out

    def step(self) -> list[RequestOutput]:
        _exchange(self.pending)
        self.pending = []
        return self.engine.step()

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def stats(self) -> Any:
        return self.engine.stats()

    def close(self) -> None:
        """Stops the other ranks (they leave their loop) and waits for them."""
        _exchange([("stop",)])
        dist.barrier()  # the other ranks' last barrier (launch._rank_main, leave_torchrun)
        if hasattr(self, "workers"):  # spawned here: they leave first (this rank holds the store)
            self.workers.join(timeout=30)
        dist.destroy_process_group()
