"""Independent reference implementations, run on the same checkpoint files as moerun.

- OpenAI's `gpt_oss.torch.model.Transformer` reads the original/ layout (bf16; `.float()` for fp32).
- Hugging Face `GptOssForCausalLM.from_pretrained` reads the HF layout, dequantizing MXFP4 itself.
Both return log-softmax over the vocabulary in float32, [T, V].
"""

import time
from functools import cache
from pathlib import Path

import torch


@torch.inference_mode()
def reference_logprobs(
    original_dir: Path, tokens: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    from gpt_oss.torch.model import Transformer

    model = Transformer.from_checkpoint(str(original_dir), device="cpu")
    if dtype == torch.float32:
        model = model.float()
    return model(tokens).float().log_softmax(-1)


@torch.inference_mode()
def hf_logprobs(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    """float32; transformers dequantizes the experts to bf16 (exact), then we upcast."""
    import transformers
    from transformers import GptOssForCausalLM, Mxfp4Config

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = GptOssForCausalLM.from_pretrained(
        hf_dir,
        quantization_config=Mxfp4Config(dequantize=True),
        dtype=torch.float32,
        device_map="cpu",
    ).float()
    model.eval()
    return model(tokens[None]).logits[0].float().log_softmax(-1)


@torch.inference_mode()
def moerun_logprobs(
    path: Path, tokens: torch.Tensor, dtype: torch.dtype, kernels: str = "torch"
) -> torch.Tensor:
    from moerun.model.checkpoint import load_checkpoint
    from moerun.model.gpt_oss import Transformer

    model = Transformer.from_checkpoint(load_checkpoint(path), dtype, kernels)
    return model(tokens).float().log_softmax(-1)


# ---- openai-harmony: the chat-format oracle ----------------------------------------------------
@cache
def harmony_encoding():
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def today() -> str:
    return time.strftime("%Y-%m-%d")  # what the CLI and the server put in the system message


def harmony_prompt(
    msgs: list,
    effort: str = "medium",
    instructions: str | None = None,
    tools: list[dict] | None = None,
    date: str | None = None,
) -> list[int]:
    """The conversation built with openai-harmony and rendered for completion. Tools may be in
    the Chat Completions form ({"type", "function": {...}}) or the Responses flat form."""
    from openai_harmony import (
        Conversation,
        DeveloperContent,
        Message,
        ReasoningEffort,
        Role,
        SystemContent,
        ToolDescription,
    )

    system = SystemContent.new().with_reasoning_effort(ReasoningEffort[effort.upper()])
    if date:
        system = system.with_conversation_start_date(date)
    head = [Message.from_role_and_content(Role.SYSTEM, system)]
    if instructions or tools:
        dev = DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions(instructions)
        if tools:
            fns = [t.get("function", t) for t in tools]
            descs = [ToolDescription.new(f["name"], f["description"], f.get("parameters"))
                     for f in fns]  # fmt: skip
            dev = dev.with_function_tools(descs)
        head.append(Message.from_role_and_content(Role.DEVELOPER, dev))
    convo = Conversation.from_messages(head + msgs)
    return harmony_encoding().render_conversation_for_completion(convo, Role.ASSISTANT)


def h_user(text: str):
    from openai_harmony import Message, Role

    return Message.from_role_and_content(Role.USER, text)


def h_assistant(text: str, channel: str):
    from openai_harmony import Message, Role

    return Message.from_role_and_content(Role.ASSISTANT, text).with_channel(channel)


def h_call(name: str, args: str):
    msg = h_assistant(args, "commentary").with_recipient(f"functions.{name}")
    return msg.with_content_type("<|constrain|>json")


def h_result(name: str, text: str):
    from openai_harmony import Author, Message, Role

    msg = Message.from_author_and_content(Author.new(Role.TOOL, f"functions.{name}"), text)
    return msg.with_channel("commentary").with_recipient("assistant")
