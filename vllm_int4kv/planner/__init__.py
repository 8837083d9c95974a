"""Capacity planning: bytes per token, tokens and sequences that fit, decode traffic (pure arithmetic)."""
