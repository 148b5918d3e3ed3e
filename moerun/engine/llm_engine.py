"""add_request / abort / step: the engine loop around scheduler, model runner and sampler."""

import codecs
import itertools
import os
import sys
from dataclasses import dataclass, field

import torch

from moerun.config import EngineConfig
from moerun.engine.block_manager import BlockManager
from moerun.engine.kv_cache import KVCache, kv_cache_bytes, placement_report, plan_blocks
from moerun.engine.model_runner import ModelOutput, ModelRunner
from moerun.engine.sampler import TokenLogprobs, compute_logprobs, sample
from moerun.engine.scheduler import Scheduler
from moerun.engine.sequence import Sequence
from moerun.model.checkpoint import load_checkpoint
from moerun.model.gpt_oss import Transformer
from moerun.sampling import SamplingParams

# <|return|>, <|endoftext|>, <|call|>: the ids generation_config.json lists as end of sequence
MODEL_STOP_IDS = (200002, 199999, 200012)


@dataclass
class RequestOutput:
    """What a request produced. From `step()` and `LLM.stream` these are deltas since the last
    output of that request; from `LLM.generate` the whole result."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    logprobs: list[TokenLogprobs] | None = None  # when SamplingParams.logprobs is set
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # first delta only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class LLMEngine:
    def __init__(self, cfg: EngineConfig, model: Transformer | None = None) -> None:
        """Loads cfg.model, or runs `model` when one is given (built in memory: no tokenizer)."""
        dtype = getattr(torch, cfg.dtype)
        tokenizer_dir = None
        if model is None:
            ckpt = load_checkpoint(cfg.model)
            model = Transformer.from_checkpoint(ckpt, dtype, cfg.kernels, cfg.device)
            # tokenizer.json sits at the repo root: next to HF weights, one level above original/
            tokenizer_dir = ckpt.directory.parent if ckpt.layout == "original" else ckpt.directory
        self.cfg, self.model_cfg, self.model = cfg, model.cfg, model
        mcfg = model.cfg
        self.max_model_len = min(cfg.max_model_len, mcfg.max_position_embeddings)
        paged = model.kernels == "triton"  # K/V written before attention reads them
        memory = kv_cache_bytes(cfg, model.device)
        full, window = plan_blocks(mcfg, cfg, dtype, write_all=paged, memory=memory)
        kv = KVCache(mcfg, full, window, cfg.block_size, dtype, cfg.device)
        self.blocks = BlockManager(full, window, cfg.block_size, mcfg.sliding_window, paged)
        self.scheduler = Scheduler(cfg, self.blocks, self.max_model_len)
        graph_batch = 0 if cfg.enforce_eager else cfg.max_num_seqs
        self.runner = ModelRunner(self.model, kv, graph_batch, self.max_model_len)
        if cfg.device == "cuda":
            print(placement_report(model, kv), file=sys.stderr, flush=True)
        self.stop_ids = frozenset(t for t in MODEL_STOP_IDS if t < mcfg.vocab_size)
        self.requests: dict[str, Sequence] = {}
        self._decoders: dict[str, codecs.IncrementalDecoder] = {}
        self._counter = itertools.count()
        self._tokenizer = None
        self._tokenizer_dir = tokenizer_dir

    @property
    def tokenizer(self):  # loaded on first use: token-id prompts and scoring never need it
        if self._tokenizer is None:
            from moerun.harmony.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self._tokenizer_dir)
        return self._tokenizer

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> str:
        ids = self.tokenizer.encode_ordinary(prompt) if isinstance(prompt, str) else list(prompt)
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
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip
        self.requests[request_id] = seq
        self._decoders[request_id] = codecs.getincrementaldecoder("utf-8")(errors="replace")
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
        self._decoders.pop(request_id, None)
        return RequestOutput(request_id, seq.prompt_token_ids, finish_reason="abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        out = self.runner.run(plan.scheduled)
        for seq, n in plan.scheduled:
            seq.num_computed_tokens += n
        return self._postprocess(out)

    def _postprocess(self, out: ModelOutput) -> list[RequestOutput]:
        sampling = [s for s in out.per_seq if s.sample_row is not None]
        logits = out.logits[[s.sample_row for s in sampling]]
        params, gens = [s.seq.params for s in sampling], [s.seq.generator for s in sampling]
        new_ids = sample(logits, params, gens, self.model_cfg.vocab_size)
        new_of = {id(s.seq): (t, s.sample_row) for s, t in zip(sampling, new_ids, strict=True)}
        deltas = []
        for item in out.per_seq:
            seq = item.seq
            delta = RequestOutput(seq.request_id, seq.prompt_token_ids)
            if item.prompt_targets:
                self._add_prompt_logprobs(seq, out.logits[list(item.prompt_rows)], item, delta)
            if id(seq) in new_of:
                token, row = new_of[id(seq)]
                self._append(seq, token, out.logits[row : row + 1], delta)
            if not seq.is_finished:
                self.blocks.release_stale(seq)
            if delta.token_ids or delta.prompt_logprobs or delta.finished:
                deltas.append(delta)
        return deltas

    def _add_prompt_logprobs(self, seq, logits, item, delta: RequestOutput) -> None:
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)  # nothing predicts the first prompt token
        targets = torch.tensor(item.prompt_targets, dtype=torch.long)
        seq.prompt_logprobs += compute_logprobs(logits, targets, seq.params.prompt_logprobs)
        if len(seq.prompt_logprobs) == seq.num_prompt_tokens:
            delta.prompt_logprobs = list(seq.prompt_logprobs)

    def _append(self, seq: Sequence, token: int, logits: torch.Tensor, delta) -> None:
        delta.token_ids.append(token)
        if seq.params.logprobs is not None:
            delta.logprobs = compute_logprobs(logits, torch.tensor([token]), seq.params.logprobs)
            seq.logprobs += delta.logprobs
        decoder = self._decoders[seq.request_id]
        if token not in seq.stop_token_ids:  # a stop token ends the text, it is not part of it
            delta.text = decoder.decode(self.tokenizer.decode_single_token_bytes(token))
        reason = self.scheduler.append_token(seq, token)
        if reason is not None:
            delta.text += decoder.decode(b"", final=True)
            delta.finish_reason = reason
            del self.requests[seq.request_id], self._decoders[seq.request_id]
