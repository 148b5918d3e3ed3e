"""add_request / abort / step / stats: the engine loop around scheduler, model runner and sampler.

The engine speaks token ids: prompts come in as ids and outputs go out as ids. Text belongs to
its callers (moerun.llm.LLM, the server's harmony parser), which decode each token once.
"""

import itertools
import os
import sys
from dataclasses import dataclass, field

import torch

from moerun.config import EngineConfig
from moerun.engine.block_manager import BlockManager
from moerun.engine.kv_cache import KVCache, kv_cache_bytes, placement_report, plan_blocks
from moerun.engine.model_runner import ModelOutput, ModelRunner, SeqLogits
from moerun.engine.sampler import TokenLogprobs, compute_logprobs, sample
from moerun.engine.scheduler import Scheduler
from moerun.engine.sequence import Sequence
from moerun.errors import ConfigError
from moerun.model.checkpoint import load_checkpoint
from moerun.model.config import ModelConfig
from moerun.model.gpt_oss import Transformer
from moerun.parallel.shard import WHOLE, Shard
from moerun.sampling import SamplingParams


@dataclass
class RequestOutput:
    """What a request produced. From `step()` and `LLM.stream` these are deltas since the last
    output of that request; from `LLM.generate` the whole result."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # filled by moerun.llm.LLM; the engine itself never decodes
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprobs] | None = None  # when SamplingParams.logprobs is set
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first delta only
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and health: requests and KV blocks."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_preemptions: int = 0
    prefix_queried_tokens: int = 0  # tokens of admitted requests
    prefix_hit_tokens: int = 0  # of those, taken from the prefix cache
    cached_blocks: int = 0  # blocks whose content the prefix cache can find


def _check_context(cfg: EngineConfig, model_cfg: ModelConfig) -> None:
    """max_model_len past the model's context is refused, never quietly shortened."""
    if cfg.max_model_len > model_cfg.max_position_embeddings:
        raise ConfigError(f"max_model_len {cfg.max_model_len} is above the model's context "
                          f"length of {model_cfg.max_position_embeddings} tokens")  # fmt: skip


class LLMEngine:
    def __init__(
        self, cfg: EngineConfig, model: Transformer | None = None, shard: Shard = WHOLE
    ) -> None:
        """Loads cfg.model (this rank's `shard` of it, moerun.parallel), or runs `model` when
        one is given (built in memory)."""
        dtype = getattr(torch, cfg.dtype)
        self.model_dir = None  # where tokenizer.json would be, for callers that need text
        if model is None:
            ckpt = load_checkpoint(cfg.model)
            _check_context(cfg, ckpt.config)  # before the weights load: a bad flag fails at once
            model = Transformer.from_checkpoint(ckpt, dtype, cfg.kernels, cfg.device,
                                                cfg.dense_weights, cfg.mmap_weights,
                                                shard=shard)  # fmt: skip
            self.model_dir, stop_ids = ckpt.repo_root, ckpt.stop_ids
        else:
            _check_context(cfg, model.cfg)
            stop_ids = model.cfg.stop_ids()
        self.cfg, self.model_cfg, self.model = cfg, model.cfg, model
        self.stop_ids = frozenset(stop_ids)  # the model's end-of-generation ids
        mcfg = model.cfg
        self.max_model_len = cfg.max_model_len
        memory = kv_cache_bytes(cfg, model.device)
        full, window = plan_blocks(mcfg, cfg, dtype, memory=memory)
        kv = KVCache(mcfg, full, window, cfg.block_size, dtype, cfg.device)
        self.blocks = BlockManager(full, window, cfg.block_size, mcfg.sliding_window,
                                   cfg.enable_prefix_caching)  # fmt: skip
        self.scheduler = Scheduler(cfg, self.blocks, self.max_model_len)
        # decode steps replay CUDA graphs on the Triton path, which reads only device tensors
        graphs = model.ops.name == "triton" and not cfg.enforce_eager
        self.runner = ModelRunner(model, kv, cfg.max_num_seqs if graphs else 0,
                                  self.max_model_len)  # fmt: skip
        if cfg.device == "cuda":
            print(placement_report(model, kv), file=sys.stderr, flush=True)
        self.requests: dict[str, Sequence] = {}
        self._counter = itertools.count()

    def add_request(
        self, prompt: list[int], params: SamplingParams, request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> str:  # fmt: skip
        """Queue a request; cache_salt: requests share cached K/V only with equal salts."""
        ids = list(prompt)
        self._check_prompt(ids)
        n = next(self._counter)
        request_id = request_id or f"req-{n}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
        seq = Sequence(
            request_id, ids, params, arrival=n,
            stop_token_ids=frozenset(params.stop_token_ids)
            | (frozenset() if params.ignore_eos else self.stop_ids),
            generator=torch.Generator().manual_seed(seed), cache_salt=cache_salt,
            constraint=params.constraint() if params.constraint else None,
        )  # fmt: skip
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def _check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_cfg.vocab_size
        bad = [
            t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab
        ]
        if bad:
            raise ValueError(f"prompt token {bad[0]!r} is not an id in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; max_model_len {self.max_model_len} leaves no room"
            )

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return RequestOutput(request_id, seq.prompt_token_ids, finish_reason="abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        pools = (self.blocks.full, self.blocks.windowed)
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_used=sum(p.num_blocks - p.num_free for p in pools),
            kv_blocks_total=sum(p.num_blocks for p in pools),
            num_preemptions=self.scheduler.num_preemptions,
            prefix_queried_tokens=self.scheduler.prefix_queried_tokens,
            prefix_hit_tokens=self.scheduler.prefix_hit_tokens,
            cached_blocks=sum(p.num_cached for p in pools),
        )

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        out = self.runner.run(plan.scheduled, plan.copies)
        sampled = self._sample(out)
        deltas = [self._delta(item, token, out.logits)
                  for item, token in zip(out.per_seq, sampled, strict=True)]  # fmt: skip
        self.scheduler.postprocess(plan.scheduled, sampled)
        for delta, item in zip(deltas, out.per_seq, strict=True):
            delta.finish_reason = item.seq.finish_reason
            if delta.finished:
                del self.requests[item.seq.request_id]
        return [d for d in deltas if d.token_ids or d.prompt_logprobs or d.finished]

    def _sample(self, out: ModelOutput) -> list[int | None]:
        """One token per sequence that caught up with its tokens; None for a prompt chunk."""
        sampling = [s for s in out.per_seq if s.sample_row is not None]
        logits = out.logits[[s.sample_row for s in sampling]]  # a copy: logprobs stay raw
        for row, s in enumerate(sampling):
            if s.seq.constraint is not None:
                s.seq.constraint.mask(logits[row, : self.model_cfg.vocab_size])
        params, gens = [s.seq.params for s in sampling], [s.seq.generator for s in sampling]
        tokens = iter(sample(logits, params, gens, self.model_cfg.vocab_size))
        return [next(tokens) if s.sample_row is not None else None for s in out.per_seq]

    def _delta(self, item: SeqLogits, token: int | None, logits: torch.Tensor) -> RequestOutput:
        seq = item.seq
        delta = RequestOutput(seq.request_id, seq.prompt_token_ids,
                              num_cached_tokens=seq.num_cached_tokens)  # fmt: skip
        if item.prompt_targets:
            if not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)  # nothing predicts the first prompt token
            targets = torch.tensor(item.prompt_targets, dtype=torch.long)
            rows = logits[list(item.prompt_rows)]
            seq.prompt_logprobs += compute_logprobs(rows, targets, seq.params.prompt_logprobs)
            if len(seq.prompt_logprobs) == seq.num_prompt_tokens:
                delta.prompt_logprobs = list(seq.prompt_logprobs)
        if token is not None:
            delta.token_ids.append(token)
            if seq.params.logprobs is not None:
                row = logits[item.sample_row : item.sample_row + 1]
                delta.logprobs = compute_logprobs(row, torch.tensor([token]), seq.params.logprobs)
                seq.logprobs += delta.logprobs
        return delta
