"""The offline Python API, in the shape vLLM users know: LLM(...).generate / .stream."""

from collections.abc import Iterator, Sequence

from moerun.config import EngineConfig
from moerun.engine.llm_engine import LLMEngine, RequestOutput
from moerun.sampling import SamplingParams

Prompt = str | list[int]


def _merge(total: RequestOutput, delta: RequestOutput) -> None:
    total.token_ids += delta.token_ids
    total.text += delta.text
    total.finish_reason = delta.finish_reason or total.finish_reason
    if delta.logprobs is not None:
        total.logprobs = (total.logprobs or []) + delta.logprobs
    if delta.prompt_logprobs is not None:
        total.prompt_logprobs = delta.prompt_logprobs


class LLM:
    def __init__(
        self,
        model: str,
        device: str = "cpu",
        dtype: str = "bfloat16",
        max_model_len: int = 8192,
        kv_cache_memory: str | int = "auto",  # 2 GiB on a CPU, most of the free memory on CUDA
        **engine_options: int | str,  # block_size, max_num_seqs, max_num_batched_tokens, kernels
    ) -> None:
        cfg = EngineConfig(str(model), device, dtype, max_model_len, kv_cache_memory,
                           **engine_options)  # fmt: skip
        self.engine = LLMEngine(cfg)

    def generate(
        self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None
    ) -> list[RequestOutput]:
        """All prompts run together (continuous batching); results in prompt order."""
        params = params or SamplingParams()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt, as text or as token ids
        ids = [self.engine.add_request(p, params) for p in prompts]
        results = {i: RequestOutput(i, self.engine.requests[i].prompt_token_ids) for i in ids}
        while any(not results[i].finished for i in ids):
            for delta in self.engine.step():
                if delta.request_id in results:
                    _merge(results[delta.request_id], delta)
        return [results[i] for i in ids]

    def stream(
        self, prompt: Prompt, params: SamplingParams | None = None
    ) -> Iterator[RequestOutput]:
        """Yield this request's deltas as they are produced; closing the iterator aborts it."""
        request_id = self.engine.add_request(prompt, params or SamplingParams())
        finished = False
        try:
            while not finished:
                for delta in self.engine.step():
                    if delta.request_id == request_id:
                        finished = delta.finished
                        yield delta
        finally:
            if not finished:
                self.engine.abort(request_id)
