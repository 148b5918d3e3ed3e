"""An agent on the demo model: starts `moerun serve` (no --model: the packaged demo), then runs
an OpenAI Agents SDK agent with real Python tools against it and prints each step.

    .venv/bin/python scripts/agent_demo.py ["What's the weather in Lisbon?" ...]
"""

import re
import subprocess
import sys
import threading
from pathlib import Path

from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

from moerun.demo.tools import TOOLS_BY_NAME

PROMPTS = (
    "What's the weather in Lisbon?",
    "Convert 250 USD to EUR.",
    "What is 37 * 12?",
    "What is the capital of Japan?",
)


def _run(name: str, **args) -> str:
    result = TOOLS_BY_NAME[name].run(args)
    print(f"  [tool] {name}({args}) -> {result}")
    return result


@function_tool
def get_weather(city: str) -> str:
    """Get the current weather for a city."""
    return _run("get_weather", city=city)


@function_tool
def get_time(city: str) -> str:
    """Get the current local time in a city."""
    return _run("get_time", city=city)


@function_tool
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression."""
    return _run("calculate", expression=expression)


@function_tool
def convert_currency(amount: int, from_currency: str, to_currency: str) -> str:
    """Convert an amount of money from one currency to another."""
    return _run("convert_currency", amount=amount, from_currency=from_currency,
                to_currency=to_currency)  # fmt: skip


def serve() -> tuple[subprocess.Popen, str]:
    """`moerun serve --port 0` (the demo model); returns it and its base URL once it listens."""
    moerun = Path(sys.executable).with_name("moerun")
    proc = subprocess.Popen(
        [str(moerun), "serve", "--port", "0"], stderr=subprocess.PIPE, text=True
    )
    for line in proc.stderr:
        if m := re.search(r"serving \S+ on (\S+)", line):  # then keep its log from filling the pipe
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, m[1]
    raise RuntimeError("moerun serve exited before listening")


def main() -> None:
    set_tracing_disabled(True)  # nothing leaves this machine
    proc, url = serve()
    try:
        client = AsyncOpenAI(base_url=url, api_key="none")
        agent = Agent(
            name="assistant",
            instructions="You are a helpful assistant.",
            tools=[get_weather, get_time, calculate, convert_currency],
            model=OpenAIChatCompletionsModel(model="demo", openai_client=client),
            model_settings=ModelSettings(temperature=0),
        )
        for prompt in sys.argv[1:] or PROMPTS:
            print(f"> {prompt}")
            print(f"  {Runner.run_sync(agent, prompt, max_turns=3).final_output}")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
