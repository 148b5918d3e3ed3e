"""o200k_harmony: tiktoken's o200k_base ranks plus gpt-oss's special tokens (spec §4).

Read from a model folder's `tokenizer.json` (Hugging Face format) when it has one; otherwise from
the rank file that ships inside the package, checked by its sha256, so no download is ever needed.
"""

import json
from functools import cache
from importlib import resources
from pathlib import Path

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from moerun.errors import MoerunError

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


def load_tokenizer(model_dir: str | Path | None = None) -> tiktoken.Encoding:
    """The model folder's tokenizer.json if present, else the packaged o200k_base ranks."""
    path = Path(model_dir or ".") / "tokenizer.json"
    if model_dir is not None and path.is_file():
        stat = path.stat()  # part of the cache key: a rewritten file is read again
        return _from_tokenizer_json(path.resolve(), stat.st_mtime_ns, stat.st_size)
    return _packaged()


@cache
def _packaged() -> tiktoken.Encoding:
    path = resources.files("moerun") / "data" / "o200k_base.tiktoken"
    with resources.as_file(path) as file:
        ranks = load_tiktoken_bpe(str(file), expected_hash=RANKS_SHA256)
    return _encoding(ranks, PATTERN, SPECIAL_TOKENS)


def _encoding(ranks: dict[bytes, int], pattern: str, specials: dict[str, int]) -> tiktoken.Encoding:
    taken = set(specials.values())
    reserved = {f"<|reserved_{i}|>": i for i in range(200000, VOCAB_SIZE) if i not in taken}
    return tiktoken.Encoding("o200k_harmony", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={**specials, **reserved})  # fmt: skip


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE spells byte b as one printable character; this maps it back (GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@cache
def _from_tokenizer_json(path: Path, mtime_ns: int, size: int) -> tiktoken.Encoding:
    """A byte-level BPE tokenizer.json whose vocabulary ids are its merge ranks (true of every
    tokenizer converted from tiktoken, gpt-oss's included)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        model = data["model"]
        if model.get("type") != "BPE":
            raise ValueError(f"model type {model.get('type')!r} is not BPE")
        to_byte = _byte_decoder()
        ranks = {bytes(to_byte[c] for c in token): i for token, i in model["vocab"].items()}
        specials = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise MoerunError(f"cannot read {path} as a byte-level BPE tokenizer: {e}") from None
    pattern = _split_pattern(data.get("pre_tokenizer")) or PATTERN
    return _encoding(ranks, pattern, {k: v for k, v in specials.items() if v not in ranks.values()})


def _split_pattern(pre: dict | None) -> str | None:
    """The regex of the first Split pre-tokenizer, if any."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "Split":
        return pre.get("pattern", {}).get("Regex")
    for inner in pre.get("pretokenizers", []):
        found = _split_pattern(inner)
        if found:
            return found
    return None
