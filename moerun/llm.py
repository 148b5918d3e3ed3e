"""The offline Python API, in the shape vLLM users know: LLM(...).generate / .stream. Text lives
here: prompts are tokenized and outputs decoded (once per token) around the engine, which
speaks token ids."""

import codecs
import dataclasses
import functools
from collections.abc import Iterator, Sequence

from moerun.config import EngineConfig
from moerun.engine.llm_engine import LLMEngine, RequestOutput
from moerun.sampling import SamplingParams

Prompt = str | list[int]


def _merge(total: RequestOutput, delta: RequestOutput) -> None:
    total.token_ids += delta.token_ids
    total.text += delta.text
    total.finish_reason = delta.finish_reason or total.finish_reason
    total.num_cached_tokens = delta.num_cached_tokens
    if delta.logprobs is not None:
        total.logprobs = (total.logprobs or []) + delta.logprobs
    if delta.prompt_logprobs is not None:
        total.prompt_logprobs = delta.prompt_logprobs


class _Detokenizer:
    """One request's token ids -> UTF-8 text, incrementally (a character split across tokens
    appears once complete). Its stop token ends the text and is not part of it."""

    def __init__(self, tokenizer, stop_ids: frozenset[int]) -> None:
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, delta: RequestOutput) -> RequestOutput:
        raw = b"".join(self.tokenizer.decode_single_token_bytes(t)
                       for t in delta.token_ids if t not in self.stop_ids)  # fmt: skip
        delta.text = self.decoder.decode(raw, final=delta.finished)
        return delta


def make_engine(cfg: EngineConfig) -> "LLMEngine":
    """One process's engine, or rank 0's face of one over cfg.tensor_parallel_size ranks, the
    others spawned here (ParallelEngine.close() stops them)."""
    if cfg.tensor_parallel_size == 1:
        return LLMEngine(cfg)
    from moerun.parallel.engine import ParallelEngine

    return ParallelEngine(cfg)


def _constrained(params: SamplingParams) -> SamplingParams:
    """structured_output -> a grammar constraint; ValueError naming the problem if llguidance
    cannot compile it."""
    from moerun.harmony.structured import GrammarConstraint, check_grammar, output_grammar

    lark = output_grammar(params.structured_output)
    check_grammar(lark)
    return dataclasses.replace(params, structured_output=None,
                               constraint=functools.partial(GrammarConstraint, lark))  # fmt: skip


class LLM:
    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "bfloat16",
        max_model_len: int = 8192,
        kv_cache_memory: str | int = "auto",  # 2 GiB on a CPU, most of the free memory on CUDA
        # block_size, max_num_seqs, max_num_batched_tokens, kernels, enable_prefix_caching
        **engine_options: int | str | bool,
    ) -> None:
        from moerun.demo.weights import resolve_model

        cfg = EngineConfig(resolve_model(str(model)), device, dtype, max_model_len, kv_cache_memory,
                           **engine_options)  # fmt: skip
        self.engine = make_engine(cfg)
        self._tokenizer = None

    @property
    def tokenizer(self):  # loaded on first use: token-id prompts never need it
        if self._tokenizer is None:
            from moerun.harmony.tokenizer import load_tokenizer

            self._tokenizer = load_tokenizer(self.engine.model_dir)
        return self._tokenizer

    def _add(self, prompt: Prompt, params: SamplingParams) -> tuple[str, _Detokenizer]:
        if params.structured_output is not None:
            params = _constrained(params)
        ids = self.tokenizer.encode_ordinary(prompt) if isinstance(prompt, str) else prompt
        request_id = self.engine.add_request(ids, params)
        stops = self.engine.requests[request_id].stop_token_ids
        return request_id, _Detokenizer(self.tokenizer, stops)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """All prompts run together (continuous batching); results in prompt order. `params`
        is one SamplingParams for all prompts or a list with one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or as token ids
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        added = dict(self._add(p, sp) for p, sp in zip(prompts, params, strict=True))
        results = {i: RequestOutput(i, self.engine.requests[i].prompt_token_ids) for i in added}
        while any(not r.finished for r in results.values()):
            for delta in self.engine.step():
                if delta.request_id in results:
                    _merge(results[delta.request_id], added[delta.request_id](delta))
        return list(results.values())

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield this request's deltas as they are produced; closing the iterator aborts it."""
        request_id, detokenize = self._add(prompt, params or SamplingParams())
        finished = False
        try:
            while not finished:
                for delta in self.engine.step():
                    if delta.request_id == request_id:
                        finished = delta.finished
                        yield detokenize(delta)
        finally:
            if not finished:
                self.engine.abort(request_id)
