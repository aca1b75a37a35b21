"""Hugging Face interoperability."""
