"""Parser events -> one whole assistant message: reasoning, answer text, tool calls, finish reason.

Shared by `moerun chat` and non-streaming Chat Completions, which both need the finished message
(to show it, to send it back next turn); streaming output goes on event by event instead.
"""

from dataclasses import dataclass, field

from moerun.harmony import parser as events


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)  # fragments, joined once at the end


@dataclass
class MessageAccumulator:
    """Text is kept as fragments: appending to a str would copy it at every token."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)  # the answer and commentary preambles
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None  # from Done: "stop" | "length" | "tool_calls"

    def feed(self, event: events.Event) -> None:
        if isinstance(event, events.ReasoningDelta):
            self.reasoning.append(event.text)
        elif isinstance(event, events.ContentDelta):
            self.content.append(event.text)
        elif isinstance(event, events.ToolCallStart):
            self.tool_calls.append(ToolCall(event.id, event.name))
        elif isinstance(event, events.ToolCallDelta):
            self.tool_calls[event.index].arguments.append(event.arguments)  # starts come first
        elif isinstance(event, events.Done):
            self.finish_reason = event.finish_reason

    def message(self) -> dict:
        """The OpenAI chat form, which render_prompt also reads back; a part the model did not
        write is None."""
        calls = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": "".join(call.arguments)},
            }
            for call in self.tool_calls
        ]
        return {
            "role": "assistant",
            "content": "".join(self.content) or None,
            "reasoning_content": "".join(self.reasoning) or None,
            "tool_calls": calls or None,
        }
