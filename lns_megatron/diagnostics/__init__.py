"""Depth diagnostics of trained checkpoints."""
