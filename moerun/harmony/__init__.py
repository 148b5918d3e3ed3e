"""The harmony chat format and the o200k_harmony tokenizer (no torch, no HTTP)."""
