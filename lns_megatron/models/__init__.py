"""Layer specs and GPTModel building."""
