"""Continuous batching: many requests share the model, joining and leaving between decode steps."""
