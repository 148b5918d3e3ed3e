"""The engine: requests, KV blocks, scheduling, model runs and sampling."""
