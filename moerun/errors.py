"""Errors caused by user input (files, flags, requests); each carries a one-line message."""


class MoerunError(Exception):
    """Base class: the CLI prints these as one line, the server maps them to 4xx."""


class ConfigError(MoerunError):
    """A model or engine configuration value is missing or inconsistent."""


class CheckpointError(MoerunError):
    """A checkpoint is missing, truncated, or does not match its config."""
