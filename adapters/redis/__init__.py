"""Redis: per-key request rate limits."""
