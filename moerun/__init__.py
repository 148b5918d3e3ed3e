"""moerun: inference engine and OpenAI-compatible server for gpt-oss."""

from moerun.engine.llm_engine import RequestOutput
from moerun.llm import LLM
from moerun.sampling import SamplingParams, StructuredOutput

__all__ = ["LLM", "RequestOutput", "SamplingParams", "StructuredOutput"]
__version__ = "0.1.0"
