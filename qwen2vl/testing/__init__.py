"""Fixture writers for tests and benchmarks: tiny official-format checkpoints, tokenizer files."""
