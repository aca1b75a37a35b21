"""Tokenizers, data preparation and the training datasets."""
