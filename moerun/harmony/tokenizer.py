"""o200k_harmony: tiktoken's o200k_base ranks plus gpt-oss's special tokens (spec §4).

The rank file ships inside the package and is checked by its sha256, so no download is needed.
"""

from functools import cache
from importlib import resources

import tiktoken
from tiktoken.load import load_tiktoken_bpe

RANKS_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_SIZE = 201088  # embedding rows; ids 200013.. are reserved
SPECIAL_TOKENS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}
_NAMED = set(SPECIAL_TOKENS.values())
_RESERVED = {f"<|reserved_{i}|>": i for i in range(200000, VOCAB_SIZE) if i not in _NAMED}
PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)  # fmt: skip


@cache
def load_tokenizer() -> tiktoken.Encoding:
    path = resources.files("moerun") / "data" / "o200k_base.tiktoken"
    with resources.as_file(path) as file:
        ranks = load_tiktoken_bpe(str(file), expected_hash=RANKS_SHA256)
    return tiktoken.Encoding(
        name="o200k_harmony",
        pat_str=PATTERN,
        mergeable_ranks=ranks,
        special_tokens={**SPECIAL_TOKENS, **_RESERVED},
    )
