"""moerun: inference engine and OpenAI-compatible server for gpt-oss."""

__version__ = "0.1.0"
