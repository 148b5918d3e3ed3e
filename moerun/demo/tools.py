"""The function tools the demo model was trained to call, with fake but deterministic results.

Each tool's arguments are copied from the user's words (a city, an expression, an amount and two
currency codes, a ticker), so a correct call is checkable by exact match. `run` is what a demo
agent executes; training draws its results at random (`result`), so the model learns to copy a
tool's output into its answer rather than to remember one value per city.
"""

import json
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass

CITIES = (
    "Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "New York", "San Francisco",
    "Los Angeles", "Chicago", "Toronto", "Sydney", "Melbourne", "Mumbai", "Delhi", "Beijing",
    "Shanghai", "Seoul", "Singapore", "Dubai", "Cairo", "Lagos", "Nairobi", "Mexico City",
    "Buenos Aires", "Lima", "Moscow", "Istanbul", "Athens", "Lisbon", "Dublin", "Amsterdam",
    "Vienna", "Prague", "Warsaw", "Stockholm", "Oslo", "Helsinki", "Copenhagen", "Zurich",
    "Boston", "Seattle", "Miami", "Vancouver", "Bangkok", "Jakarta", "Manila", "Hanoi", "Osaka",
)  # fmt: skip
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear", "partly cloudy",
              "stormy", "humid")  # fmt: skip
CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "INR", "CNY", "SEK")
TICKERS = ("AAPL", "MSFT", "GOOG", "AMZN", "TSLA", "NVDA", "META", "NFLX", "IBM", "INTC", "ORCL",
           "AMD")  # fmt: skip
OPS = ("+", "-", "*", "/")
# numbers a user gives: o200k has ~1,100 number tokens and a 2M-parameter model learns to copy
# the ones it sees often, so arguments come from ~120 of them (1-99 and round amounts)
AMOUNTS = (*range(1, 100), *range(100, 1001, 50), 1500, 2000, 2500, 5000)
_EXPRESSION = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*([-+*/])\s*(-?\d+(?:\.\d+)?)\s*")

Args = dict[str, str | int]


@dataclass(frozen=True)
class DemoTool:
    name: str
    description: str
    params: tuple[tuple[str, str, str], ...]  # (name, JSON type, description)
    sample: Callable[[random.Random], Args]  # arguments a user might ask for
    result: Callable[[Args, random.Random], str]  # one possible output for those arguments
    asks: tuple[str, ...]  # user requests, `{arg}` slots; the last two are held out
    what: str  # the request in a few words, for reasoning
    answers: tuple[str, ...]  # final answers; `{result}` is the tool's output, verbatim

    def run(self, args: Args) -> str:
        """The demo implementation: the same output for the same arguments."""
        seed = zlib.crc32(json.dumps(args, sort_keys=True).encode())
        return self.result(args, random.Random(seed))

    def schema(self, style: str = "plain") -> dict:
        """JSON schema of the arguments: plain, with descriptions, or as the OpenAI Agents SDK
        writes it for a Python function (titles, additionalProperties); `sdk-bare` without the
        descriptions a docstring may not give."""
        props: dict[str, dict] = {}
        for name, kind, desc in self.params:
            prop: dict = {"type": kind}
            if style in ("described", "sdk"):
                prop["description"] = desc
            if style.startswith("sdk"):
                prop = {**prop, "title": name.replace("_", " ").title()}
            props[name] = prop
        schema = {"type": "object", "properties": props, "required": [p[0] for p in self.params]}
        if style.startswith("sdk"):
            schema |= {"title": f"{self.name}_args", "additionalProperties": False}
        return schema

    def openai(self, style: str = "plain") -> dict:
        """The Chat Completions tool definition."""
        fn = {"name": self.name, "description": self.description, "parameters": self.schema(style)}
        return {"type": "function", "function": fn}


def _weather(args: Args, rng: random.Random) -> str:
    temp, cond = rng.randint(-5, 35), rng.choice(CONDITIONS)
    return rng.choice((f"{temp}°C and {cond}", f"{cond}, {temp}°C"))


def _time(args: Args, rng: random.Random) -> str:
    return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"


def calculate(expression: str) -> str:
    """`a op b` with one of + - * /, as a number without trailing zeros."""
    m = _EXPRESSION.fullmatch(expression)
    if m is None:
        return "error: expected two numbers and one of + - * /"
    a, op, b = float(m[1]), m[2], float(m[3])
    if op == "/" and b == 0:
        return "error: division by zero"
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0.0}[op]
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _expression(rng: random.Random) -> Args:
    return {"expression": f"{rng.randint(1, 99)} {rng.choice(OPS)} {rng.randint(1, 99)}"}


def _currency(rng: random.Random) -> Args:
    src, dst = rng.sample(CURRENCIES, 2)
    return {"amount": rng.choice(AMOUNTS), "from_currency": src, "to_currency": dst}


def _converted(args: Args, rng: random.Random) -> str:
    return f"{int(args['amount']) * rng.uniform(0.05, 20):.2f} {args['to_currency']}"


def _price(args: Args, rng: random.Random) -> str:
    return f"${rng.randint(5, 99)}.{rng.randint(0, 99):02d}"


TOOLS = (
    DemoTool(
        "get_weather", "Get the current weather for a city.",
        (("city", "string", "City name, e.g. Paris"),),
        lambda rng: {"city": rng.choice(CITIES)}, _weather,
        ("What's the weather in {city}?", "How's the weather in {city}?",
         "Tell me the current weather in {city}.", "weather in {city}",
         "Can you check the weather in {city} for me?", "Is it raining in {city}?",
         "Weather forecast for {city}, please.",
         "What are the conditions like in {city}?",
         "My sister lives in {city}. Is it cold there now?",
         "What is the weather like in {city} right now?",
         "I'm going to {city} today. What's the weather there?"),
        "the weather in {city}",
        ("The weather in {city} is {result}.", "Right now it is {result} in {city}.",
         "In {city} it's currently {result}."),
    ),
    DemoTool(
        "get_time", "Get the current local time in a city.",
        (("city", "string", "City name, e.g. Tokyo"),),
        lambda rng: {"city": rng.choice(CITIES)}, _time,
        ("What time is it in {city}?", "What's the local time in {city}?",
         "Tell me the current time in {city}.", "time in {city}",
         "Do you know what time it is in {city} now?", "What is the time in {city}?",
         "Current time in {city}?", "What hour is it in {city} at the moment?",
         "My friend is in {city}. Is it late there?", "Clock check: {city}.",
         "Could you tell me the time in {city}?", "I need the current time in {city}, please."),
        "the local time in {city}",
        ("It is {result} in {city}.", "The local time in {city} is {result}."),
    ),
    DemoTool(
        "calculate", "Evaluate an arithmetic expression.",
        (("expression", "string", "Two numbers and an operator, e.g. 12 * 7"),),
        _expression, lambda args, rng: calculate(str(args["expression"])),
        ("What is {expression}?", "Calculate {expression}.", "Compute {expression} for me.",
         "{expression} = ?", "Please work out {expression}.", "How much is {expression}?",
         "What's {expression}?", "Solve {expression}.", "I need {expression} worked out.",
         "Quick math: {expression}", "Tell me what {expression} comes to.",
         "Can you calculate {expression}?", "Evaluate {expression}."),
        "the value of {expression}",
        ("{expression} = {result}.", "The answer is {result}."),
    ),
    DemoTool(
        "convert_currency", "Convert an amount of money from one currency to another.",
        (("amount", "number", "Amount of money"),
         ("from_currency", "string", "Currency code to convert from"),
         ("to_currency", "string", "Currency code to convert to")),
        _currency, _converted,
        ("Convert {amount} {from_currency} to {to_currency}.",
         "How much is {amount} {from_currency} in {to_currency}?",
         "What is {amount} {from_currency} in {to_currency}?",
         "{amount} {from_currency} to {to_currency}",
         "Please convert {amount} {from_currency} into {to_currency}.",
         "Exchange {amount} {from_currency} to {to_currency}.",
         "How many {to_currency} do I get for {amount} {from_currency}?",
         "What's {amount} {from_currency} worth in {to_currency}?",
         "Turn {amount} {from_currency} into {to_currency}.",
         "I want to change {amount} {from_currency} to {to_currency}.",
         "In {to_currency}, how much is {amount} {from_currency}?",
         "My budget is {amount} {from_currency}. What is it in {to_currency}?",
         "I have {amount} {from_currency}. How much is that in {to_currency}?",
         "Can you convert {amount} {from_currency} to {to_currency} for me?"),
        "{amount} {from_currency} in {to_currency}",
        ("{amount} {from_currency} is {result}.", "That comes to {result}."),
    ),
    DemoTool(
        "get_stock_price", "Get the latest stock price for a ticker symbol.",
        (("ticker", "string", "Stock ticker symbol, e.g. AAPL"),),
        lambda rng: {"ticker": rng.choice(TICKERS)}, _price,
        ("What's the stock price of {ticker}?", "How much is {ticker} trading at?",
         "Get me the latest price for {ticker}.", "{ticker} stock price",
         "What is {ticker} trading at right now?", "Check the share price of {ticker}.",
         "Price check: {ticker}", "What does one share of {ticker} cost?",
         "Quote for {ticker}, please.", "Where is {ticker} trading?",
         "How is {ticker} stock doing today?", "Tell me the current price of {ticker} shares."),
        "the stock price of {ticker}",
        ("{ticker} is trading at {result}.", "The latest price of {ticker} is {result}."),
    ),
)  # fmt: skip
TOOLS_BY_NAME = {t.name: t for t in TOOLS}
