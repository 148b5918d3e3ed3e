"""Independent reference implementations, run on the same checkpoint files as moerun.

- OpenAI's `gpt_oss.torch.model.Transformer` reads the original/ layout (bf16; `.float()` for fp32).
- Hugging Face `GptOssForCausalLM.from_pretrained` reads the HF layout, dequantizing MXFP4 itself.
Both return log-softmax over the vocabulary in float32, [T, V].
"""

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
