"""o200k_harmony: known ids from the spec, openai-harmony as oracle, tokenizer.json loading."""

import hashlib
import json
from importlib import resources

import pytest

from moerun.errors import MoerunError
from moerun.harmony.tokenizer import RANKS_SHA256, SPECIAL_TOKENS, load_tokenizer

TEXTS = [
    "hello world",
    "Grüße aus Köln — naïve café, Ελληνικά, русский, 日本語のテキスト, 中文, العربية, हिन्दी",
    "emoji: 🎉👩‍👩‍👧‍👦🇫🇷 and math ∑∫√ and tabs\tand\r\nnewlines\n\n  spaces   ",
    "code: def f(x):\n    return x ** 2  # 12345678901234567890",
    "user text spelling <|start|> and <|return|> and <|channel|>final",
]


@pytest.fixture(scope="module")
def harmony():
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def test_packaged_rank_file_is_the_spec_file():
    data = (resources.files("moerun") / "data" / "o200k_base.tiktoken").read_bytes()
    assert hashlib.sha256(data).hexdigest() == RANKS_SHA256
    assert RANKS_SHA256.startswith("446a9538") and RANKS_SHA256.endswith("1a2d")


def test_known_ids_from_the_spec():
    tok = load_tokenizer()
    assert tok.encode_ordinary("hello world") == [24912, 2375]
    assert tok.encode_ordinary("2 + 2 = 4.") == [17, 659, 220, 17, 314, 220, 19, 13]
    assert tok.encode_ordinary("<|start|>") == [27, 91, 5236, 91, 29]  # plain text, not 200006
    expected = {"<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|return|>": 200002,
                "<|constrain|>": 200003, "<|channel|>": 200005, "<|start|>": 200006,
                "<|end|>": 200007, "<|message|>": 200008, "<|call|>": 200012,
                "<|endofprompt|>": 200018}  # fmt: skip
    for text, token in expected.items():
        assert tok.encode_single_token(text) == token
        assert SPECIAL_TOKENS[text] == token
    assert tok.decode([200013]) == "<|reserved_200013|>"
    assert tok.n_vocab == 201088  # ids 0..201087: the model's embedding rows


@pytest.mark.parametrize("text", TEXTS)
def test_text_matches_harmony_and_round_trips(harmony, text):
    tok = load_tokenizer()
    ids = tok.encode_ordinary(text)
    assert ids == harmony.encode(text, disallowed_special=())
    assert tok.decode(ids) == text
    assert not set(ids) & set(SPECIAL_TOKENS.values())


def test_reads_a_model_folders_tokenizer_json(tmp_path):
    """A tokenizer.json as Hugging Face writes it (vocab + merges from transformers' converter,
    added tokens with gpt-oss's ids) gives the same tokenizer; the `tokenizers` library is the
    oracle for its BPE."""
    from tokenizers import Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    packaged = load_tokenizer()
    rank_file = resources.files("moerun") / "data" / "o200k_base.tiktoken"
    converted = TikTokenConverter(vocab_file=str(rank_file), pattern=packaged._pat_str).converted()
    data = json.loads(converted.to_str())
    # the Hub file names the specials up to 200018 with their real ids (spec §4)
    named = {**{f"<|reserved_{i}|>": i for i in range(200000, 200019)}, **SPECIAL_TOKENS}
    data["added_tokens"] = [
        {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for s, i in sorted(named.items(), key=lambda kv: kv[1])
        if not (s.startswith("<|reserved_") and i in SPECIAL_TOKENS.values())
    ]  # fmt: skip
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")

    ours = load_tokenizer(tmp_path)
    assert ours._mergeable_ranks == packaged._mergeable_ranks
    assert ours._special_tokens == packaged._special_tokens
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS[:4]:
        assert ours.encode_ordinary(text) == hf.encode(text, add_special_tokens=False).ids
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')
    with pytest.raises(MoerunError, match="not BPE"):
        load_tokenizer(tmp_path)
