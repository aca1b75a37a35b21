"""Session-wide tokenizers for the data tests (trained here, saved as tokenizer.json)."""

import json
import os

import pytest
from tokenizers import Tokenizer

from datafiles import TEXTS, train_bpe


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    corpus = [t for t in TEXTS if t] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    return train_bpe(tmp_path_factory.mktemp("tok"), corpus)


@pytest.fixture(scope="session")
def variants(tokenizer_dir, tmp_path_factory):
    """Tokenizers beside ``tokenizer_dir``: "resaved" (same vocabulary, other bytes), "swapped" (same size, two
    ids trade tokens) and "smaller" (another vocabulary, 20 ids fewer)."""
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        spec = json.load(f)
    out = {}
    resaved = tmp_path_factory.mktemp("resaved")
    with open(resaved / "tokenizer.json", "w") as f:
        json.dump(spec, f, indent=4, sort_keys=True)
    out["resaved"] = str(resaved)
    vocab = spec["model"]["vocab"]
    a, b = [token for token, i in vocab.items() if i in (100, 101)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = tmp_path_factory.mktemp("swapped")
    with open(swapped / "tokenizer.json", "w") as f:
        json.dump(spec, f)
    out["swapped"] = str(swapped)
    corpus = [t for t in TEXTS if t] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    size = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).get_vocab_size()
    out["smaller"] = train_bpe(tmp_path_factory.mktemp("smaller"), corpus, vocab_size=size - 20)
    return out
