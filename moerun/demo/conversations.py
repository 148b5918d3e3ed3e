"""Synthetic harmony conversations for the demo model: the turns it learns and is evaluated on.

A turn is a conversation rendered exactly as the server renders it (system message with the
reasoning effort and a date, developer message with instructions, tools as TypeScript and a
response format) plus the completion the model should write: an analysis message, then either a
final answer or one function call with arguments copied from the user's words. A tool request
yields two turns: the call, and (after the tool's result) the answer that quotes it.
"""

import datetime
import json
import random
from dataclasses import dataclass, field

from moerun.demo import templates as tx
from moerun.demo.tools import TOOLS, Args, DemoTool
from moerun.harmony.render import EFFORTS, RenderOptions, ResponseFormat, render_prompt
from moerun.harmony.tokenizer import SPECIAL_TOKENS, load_tokenizer

CHANNEL, MESSAGE, END, START, CONSTRAIN, CALL, RETURN = (
    SPECIAL_TOKENS[t] for t in ("<|channel|>", "<|message|>", "<|end|>", "<|start|>",
                                "<|constrain|>", "<|call|>", "<|return|>")
)  # fmt: skip
SCHEMA_STYLES = ("plain", "described", "sdk", "sdk-bare")
FIRST_DAY = datetime.date(2025, 1, 1)
# tools whose arguments hold two values of one kind (two numbers, two currency codes): the calls
# a small model gets wrong by copying one value twice, so training asks for them twice as often
TWO_OF_A_KIND = ("calculate", "convert_currency")
HELDOUT_SEED = 1_000_003  # training draws from small seeds; evaluation from this one


@dataclass(frozen=True)
class Turn:
    """One assistant turn: the conversation so far and the message(s) the model should write."""

    kind: str  # call | answer (after a tool result) | direct | refuse (no fitting tool)
    messages: list[dict]  # OpenAI-style chat messages before this turn
    tools: list[dict]
    effort: str
    analysis: str
    call: tuple[str, Args] | None = None  # the function call this turn makes ...
    final: str | None = None  # ... or its final answer
    date: str | None = None
    response_format: ResponseFormat | None = None
    quote: str | None = None  # text the final answer must contain (a tool's result)

    def prompt(self) -> list[int]:
        options = RenderOptions(reasoning_effort=self.effort, current_date=self.date)
        return render_prompt(self.messages, self.tools, options, self.response_format)

    def completion(self) -> list[int]:
        """`<|channel|>analysis…<|end|><|start|>assistant` then the final message or the call,
        header pieces tokenized one by one as harmony does."""
        enc = load_tokenizer()
        ids = [CHANNEL, *enc.encode_ordinary("analysis"), MESSAGE]
        ids += [*enc.encode_ordinary(self.analysis), END, START, *enc.encode_ordinary("assistant")]
        if self.call is not None:
            name, args = self.call
            ids += [CHANNEL, *enc.encode_ordinary(f"commentary to=functions.{name}")]
            ids += [*enc.encode_ordinary(" "), CONSTRAIN, *enc.encode_ordinary("json"), MESSAGE]
            return ids + [*enc.encode_ordinary(arguments_json(args)), CALL]
        assert self.final is not None
        return ids + [CHANNEL, *enc.encode_ordinary("final"), MESSAGE,
                      *enc.encode_ordinary(self.final), RETURN]  # fmt: skip


@dataclass
class _Setting:
    """What every turn of one conversation shares."""

    effort: str
    date: str | None
    head: list[dict]  # instructions and an earlier exchange
    tools: list[dict] = field(default_factory=list)


def arguments_json(args: Args) -> str:
    return json.dumps(args, separators=(",", ":"), ensure_ascii=False)


def _pick(rng: random.Random, options: tuple[str, ...], split: str) -> str:
    """Training sees all but the last two phrasings; `heldout` only those two; `all` any."""
    pool = {"train": options[:-2], "heldout": options[-2:], "all": options}[split]
    return rng.choice(pool)


def _dress(rng: random.Random, user: str, split: str) -> str:
    """In training, a greeting before a request and thanks after it, now and then."""
    if split != "train":  # held-out draws stay as they were
        return user
    if rng.random() < 0.3:
        user = rng.choice(tx.ASK_PREFIXES) + user
    if rng.random() < 0.3:
        user += rng.choice(tx.ASK_SUFFIXES)
    return user


def _reason(rng: random.Random, table: dict[str, tuple[str, ...]], effort: str, **slots) -> str:
    return rng.choice(table[effort]).format(**slots)


def _direct(rng: random.Random, split: str) -> tuple[str, str, str, str, dict | None]:
    """(user text, need, plan, final answer, structured version of the answer or None)."""
    kind = rng.random()
    if kind < 0.3:
        country, capital = rng.choice(tx.CAPITALS)
        user = _pick(rng, tx.CAPITAL_ASKS, split).format(country=country)
        final = rng.choice(tx.CAPITAL_ANSWERS).format(country=country, capital=capital)
        need = f"the capital of {country}"
        return (
            user,
            need,
            f"answer that it is {capital}",
            final,
            {"country": country, "capital": capital},
        )
    if kind < 0.6:
        phrase = " ".join(_word_or_number(rng) for _ in range(rng.randint(2, 6)))
        user = _pick(rng, tx.REPEAT_ASKS, split).format(phrase=phrase)
        return user, "a repetition of their words", "repeat the words exactly", phrase, None
    asks, need, plan, answers = rng.choice(tx.SMALL_TALK)
    return _pick(rng, asks, split), need, plan, rng.choice(answers), None


def _word_or_number(rng: random.Random) -> str:
    """Repeating numbers is the copying that tool calls and answers need most: o200k has ~1,100
    number tokens, each rare in the conversations."""
    return rng.choice(tx.WORDS) if rng.random() < 0.5 else str(rng.randint(0, 9999))


def _setting(rng: random.Random, split: str) -> _Setting:
    effort = rng.choice(EFFORTS)
    day = FIRST_DAY + datetime.timedelta(days=rng.randrange(6 * 365))
    date = day.isoformat() if rng.random() < 0.9 else None
    head = (
        [{"role": "system", "content": rng.choice(tx.INSTRUCTIONS)}] if rng.random() < 0.3 else []
    )
    if rng.random() < 0.2:  # an earlier exchange; its reasoning was dropped, as harmony does
        user, _, _, final, _ = _direct(rng, split)
        head += [{"role": "user", "content": user}, {"role": "assistant", "content": final}]
    return _Setting(effort, date, head)


def _tool_list(rng: random.Random, include: DemoTool | None, exclude: DemoTool | None) -> list:
    others = [t for t in TOOLS if t is not include and t is not exclude]
    most = len(others) if rng.random() < 0.2 else min(2, len(others))  # short prompts train faster
    chosen = rng.sample(others, rng.randint(0 if include else 1, most))
    chosen = chosen + [include] if include else chosen
    rng.shuffle(chosen)
    style = rng.choice(SCHEMA_STYLES)
    return [t.openai(style) for t in chosen]


def direct_turn(rng: random.Random, split: str = "train") -> Turn:
    """A request the model answers itself, tools or not; sometimes as JSON of a given schema."""
    s = _setting(rng, split)
    user, need, plan, final, structured = _direct(rng, split)
    tools = _tool_list(rng, None, None) if rng.random() < 0.5 else []
    fmt = None
    if rng.random() < 0.15:
        if structured is not None:
            fmt = ResponseFormat("capital_info", tx.CAPITAL_FORMAT)
        else:
            fmt, structured = ResponseFormat("reply", tx.REPLY_FORMAT), {"answer": final}
        final = arguments_json(structured)
    analysis = _reason(rng, tx.DIRECT_REASONING, s.effort, need=need, plan=plan)
    messages = [*s.head, {"role": "user", "content": user}]
    return Turn("direct", messages, tools, s.effort, analysis, final=final, date=s.date,
                response_format=fmt)  # fmt: skip


def tool_turns(rng: random.Random, split: str = "train", available: bool = True) -> list[Turn]:
    """A request a tool answers: [call, answer] when the tool is declared, else [refuse]."""
    s = _setting(rng, split)
    if split == "train":
        tool = rng.choices(TOOLS, weights=[2 if t.name in TWO_OF_A_KIND else 1 for t in TOOLS])[0]
    else:
        tool = rng.choice(TOOLS)
    args = tool.sample(rng)
    user = _dress(rng, _pick(rng, tool.asks, split).format(**args), split)
    need = tool.what.format(**args)
    messages = [*s.head, {"role": "user", "content": user}]
    if not available:
        tools = _tool_list(rng, None, tool) if rng.random() < 0.7 else []
        analysis = _reason(rng, tx.DIRECT_REASONING, s.effort, need=need, plan=tx.REFUSE_PLAN)
        final = rng.choice(tx.REFUSE_ANSWERS).format(need=need)
        return [Turn("refuse", messages, tools, s.effort, analysis, final=final, date=s.date)]
    tools = _tool_list(rng, tool, None)
    shown = ", ".join(f"{k}={v}" for k, v in args.items())
    analysis = _reason(rng, tx.CALL_REASONING, s.effort, need=need, tool=tool.name, args=shown)
    call = Turn("call", messages, tools, s.effort, analysis, call=(tool.name, args), date=s.date)
    result = tool.result(args, rng)
    fn = {"name": tool.name, "arguments": arguments_json(args)}
    said = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": fn}]}  # fmt: skip
    if rng.random() < 0.5:  # a Responses client sends the reasoning back; chat clients do not
        said["reasoning_content"] = analysis
    after = [*messages, said, {"role": "tool", "tool_call_id": "call_1", "content": result}]
    answer_analysis = _reason(rng, tx.ANSWER_REASONING, s.effort, need=need, tool=tool.name,
                              result=result)  # fmt: skip
    final = rng.choice(tool.answers).format(result=result, **args)
    answer = Turn("answer", after, tools, s.effort, answer_analysis, final=final, date=s.date,
                  quote=result)  # fmt: skip
    return [call, answer]


def sample_turns(rng: random.Random, split: str = "train") -> list[Turn]:
    """One conversation's turns: a tool request 65% of the time (its tool declared 95% of
    those), a request the model answers itself otherwise."""
    if rng.random() < 0.65:
        return tool_turns(rng, split, available=rng.random() < 0.95)
    return [direct_turn(rng, split)]


def heldout_turns(
    conversations: int, split: str = "heldout", seed: int = HELDOUT_SEED
) -> list[Turn]:
    """Turns of conversations training never saw: another seed (new combinations of cities,
    numbers, tool sets and dates) and, with split `heldout`, user phrasings it never saw."""
    rng = random.Random(seed)
    return [t for _ in range(conversations) for t in sample_turns(rng, split)]
