"""Reasoning budget (budget forcing): after `limit` tokens of analysis-channel content, the
engine closes the analysis and opens the final channel, `<|end|><|start|>assistant<|channel|>
final<|message|>`, one forced token a step. A TokenConstraint (moerun.sampling): the engine
calls mask() before sampling and accept() with each token it keeps.

The harmony parser tells where the output is (it reads headers the lenient way the server
does), so a budget counts exactly what the API reports as reasoning tokens. Output that never
opens an analysis message is never forced.
"""

import torch

from moerun.harmony.parser import HarmonyParser
from moerun.harmony.tokenizer import SPECIAL_TOKENS, load_tokenizer


def final_header() -> list[int]:
    """The tokens that end an analysis message and open the answer."""
    tok = load_tokenizer()
    s = SPECIAL_TOKENS
    return [s["<|end|>"], s["<|start|>"], *tok.encode_ordinary("assistant"), s["<|channel|>"],
            *tok.encode_ordinary("final"), s["<|message|>"]]  # fmt: skip


class ReasoningBudget:
    def __init__(self, limit: int, in_analysis: bool = False) -> None:
        """limit: analysis tokens allowed. in_analysis: the prompt already opened an analysis
        message (it ends with `<|channel|>analysis<|message|>`)."""
        assert limit >= 0, limit
        self.limit, self.used = limit, 0
        self.parser = HarmonyParser()
        if in_analysis:
            analysis = load_tokenizer().encode_ordinary("analysis")
            for token in [SPECIAL_TOKENS["<|channel|>"], *analysis, SPECIAL_TOKENS["<|message|>"]]:
                self.parser.feed(token)
        self.forced: list[int] = []
        self._check()

    def _check(self) -> None:
        if not self.forced and self.parser.body_kind == "reasoning" and self.used >= self.limit:
            self.forced = final_header()

    def mask(self, logits: torch.Tensor) -> None:
        if self.forced:
            keep = logits[self.forced[0]].clone()
            logits.fill_(-torch.inf)
            logits[self.forced[0]] = keep if torch.isfinite(keep) else 0.0

    def accept(self, token: int) -> None:
        if self.forced and token == self.forced[0]:
            self.forced.pop(0)
        if self.parser.body_kind == "reasoning":
            self.used += 1
        self.parser.feed(token)
        self._check()
