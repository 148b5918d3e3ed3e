"""Request bodies of the OpenAI endpoints. Known fields are type-checked (a wrong type is a 400);
unknown fields are ignored, as OpenAI-compatible servers do."""

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
)

from moerun.server.body import bounded_schema

Effort = Literal["low", "medium", "high"]
NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
Schema = Annotated[dict[str, Any], AfterValidator(bounded_schema)]  # MAX_SCHEMA_DEPTH levels


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDef(_Body):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: Schema | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: dict[str, str]


class ToolCallFunction(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class JsonSchemaSpec(_Body):
    """`json_schema` of a chat `response_format`, and (with `type`) a Responses `text.format`."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(default="response", pattern=NAME_PATTERN)
    description: str | None = None
    json_schema: Schema | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class TextFormat(JsonSchemaSpec):
    type: Literal["text", "json_object", "json_schema"]


class ResponseText(_Body):
    format: TextFormat | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    model: str
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    # vLLM's field: requests share cached prompt K/V only with requests of the same salt, so
    # one tenant cannot time another's prompts through cache hits
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)
    # after this many analysis tokens the answer is forced to begin (budget forcing)
    max_reasoning_tokens: int | None = Field(default=None, ge=0)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    reasoning_effort: Effort | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: ResponseFormat | None = None
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    n: int = Field(default=1, ge=1, le=16)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    parallel_tool_calls: bool | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return stop_list(v)


def stop_list(v: str | list[str] | None) -> list[str]:
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ValueError("stop takes up to 4 non-empty strings")
    return stops


class ResponsesTool(_Body):
    type: Literal["function"]
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: Schema | None = None
    strict: bool | None = None


class HostedTool(_Body):
    """A Responses tool this server does not run (web_search, file_search, local_shell, custom,
    namespace, ...): accepted and left out of the prompt, as other local servers do, so that
    clients sending them by default (Codex CLI) work."""

    model_config = ConfigDict(extra="allow")
    type: str


def _tool_kind(tool: Any) -> str:
    kind = tool.get("type") if isinstance(tool, dict) else getattr(tool, "type", None)
    return "hosted" if isinstance(kind, str) and kind != "function" else "function"


# function tools are validated strictly; a tool of any other type is ignored
AnyResponsesTool = Annotated[
    Annotated[ResponsesTool, Tag("function")] | Annotated[HostedTool, Tag("hosted")],
    Discriminator(_tool_kind),
]


class Reasoning(_Body):
    effort: Effort | None = None


class ResponsesRequest(SamplingFields):
    input: str | list[Any]  # items are checked one by one, with errors naming the index
    instructions: str | None = None
    tools: list[AnyResponsesTool] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    text: ResponseText | None = None
    store: bool = True
    previous_response_id: str | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ChatTool] | None = None
    reasoning_effort: Effort | None = None


class CompletionRequest(SamplingFields):
    """The legacy text completions API: raw prompts, no chat format."""

    # text, texts, token ids, or lists of token ids: one prompt each
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # 0: score the prompt (echo), generate none
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    n: int = Field(default=1, ge=1, le=16)
    logprobs: int | None = Field(default=None, ge=0, le=20)  # top alternatives per token
    echo: bool = False  # the prompt comes back before the completion, with its logprobs
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        return stop_list(v)
