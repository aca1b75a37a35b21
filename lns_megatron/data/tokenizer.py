"""Tokenizers from local files, shared by tools/preprocess_data.py and the pretraining driver,
so that vocabulary size and end-of-document id always agree between the two.

Type names are Megatron-LM's. Nothing is downloaded: every tokenizer loads from a path.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import OrderedDict
from typing import Iterable, List, Optional, Sequence, Tuple

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "SentencePieceTokenizer", "TikTokenizer", "GPT2BPETokenizer",
                   "NullTokenizer")
EOD_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[EOS]", "<|im_end|>")


class Tokenizer:
    """What megatron-core's GPTDataset needs (``vocab_size``, ``eod``, ``unique_identifiers``),
    plus batch tokenization for the data tool."""

    def __init__(self, kind: str, source: str, vocab_size: int, eod: int, files: Tuple[str, ...] = ()):
        self.kind, self.source = kind, source
        self.vocab_size = vocab_size
        self.eod = eod
        self.files = files  # what it was loaded from
        # No ``pad``: megatron's GPTDataset masks the loss on pad tokens, and the only spare id would be EOD.

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict(kind=self.kind, source=self.source, vocab_size=self.vocab_size, eod=self.eod)

    def tokenize(self, text: str) -> List[int]:
        return self.tokenize_batch([text])[0]

    def tokenize_batch(self, texts: Sequence[str]) -> List[List[int]]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def vocab_digest(self) -> Optional[str]:
        """sha256 of the id -> token table: equal exactly when ids mean the same tokens, however the
        files were saved (None: a NullTokenizer, whose ids mean whatever the data says)."""
        digest = hashlib.sha256()
        for token_id, token in self._id_table():
            token = token.encode("utf-8", "surrogatepass") if isinstance(token, str) else token
            digest.update(struct.pack("<qI", token_id, len(token)) + token)
        return digest.hexdigest()

    def _id_table(self) -> Iterable[Tuple[int, object]]:
        raise NotImplementedError


class _HuggingFace(Tokenizer):
    def __init__(self, tok, source, eod_id, files):
        self._tok = tok
        eod = eod_id if eod_id is not None else _find_eod(tok.token_to_id, source)
        super().__init__("HuggingFaceTokenizer", source, tok.get_vocab_size(with_added_tokens=True), eod, files)

    def tokenize_batch(self, texts):
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we never use: ~1.5x faster.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def detokenize(self, ids):
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def _id_table(self):
        return sorted((i, token) for token, i in self._tok.get_vocab(with_added_tokens=True).items())


class _SentencePiece(Tokenizer):
    def __init__(self, path, eod_id):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        eod = eod_id if eod_id is not None else self._sp.eos_id()
        if eod is None or eod < 0:
            raise ValueError(f"--tokenizer-model {path}: the SentencePiece model has no end-of-sentence token; "
                             "pass --eod-id N")
        super().__init__("SentencePieceTokenizer", path, self._sp.get_piece_size(), eod, (path,))

    def tokenize_batch(self, texts):
        return self._sp.encode(list(texts))

    def detokenize(self, ids):
        return self._sp.decode(list(ids))

    def _id_table(self):
        return ((i, self._sp.id_to_piece(i)) for i in range(self.vocab_size))


class _TikToken(Tokenizer):
    PATTERN = r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

    def __init__(self, path, eod_id):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        self._ranks = ranks = load_tiktoken_bpe(path)
        eod = eod_id if eod_id is not None else len(ranks)  # <|endoftext|> right after the merges
        self._enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=self.PATTERN, mergeable_ranks=ranks,
                                      special_tokens={"<|endoftext|>": eod} if eod >= len(ranks) else {})
        super().__init__("TikTokenizer", path, max(len(ranks), eod + 1), eod, (path,))

    def tokenize_batch(self, texts):
        return self._enc.encode_ordinary_batch(list(texts))

    def detokenize(self, ids):
        return self._enc.decode(list(ids))

    def _id_table(self):
        return sorted((rank, token) for token, rank in self._ranks.items())


class _Null(Tokenizer):
    """Pre-tokenized input: a document is space-separated integer ids."""

    def __init__(self, vocab_size, eod_id):
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size N (ids 0..N-1; EOD is N)")
        eod = eod_id if eod_id is not None else vocab_size
        super().__init__("NullTokenizer", "", max(vocab_size, eod + 1), eod)

    def tokenize_batch(self, texts):
        return [[int(t) for t in text.split()] for text in texts]

    def detokenize(self, ids):
        return " ".join(str(i) for i in ids)

    def vocab_digest(self):
        return None


def _find_eod(token_to_id, source):
    for token in EOD_TOKENS:
        token_id = token_to_id(token)
        if token_id is not None:
            return token_id
    raise ValueError(f"--tokenizer-model {source}: no end-of-text token ({', '.join(EOD_TOKENS[:3])}, ...) in the "
                     "vocabulary; add one to the tokenizer or pass --eod-id N")


def _need_file(flag, path):
    if not path:
        raise ValueError(f"{flag} is required for this --tokenizer-type; give the tokenizer's local file")
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path}: no such file or directory; give a local tokenizer file (nothing is downloaded)")


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None, vocab_file: Optional[str] = None,
                    merge_file: Optional[str] = None, vocab_size: Optional[int] = None,
                    eod_id: Optional[int] = None) -> Tokenizer:
    """A tokenizer from local files. Bad input raises ValueError naming the flag and the fix."""
    if tokenizer_type == "NullTokenizer":
        return _Null(vocab_size, eod_id)
    if tokenizer_type == "HuggingFaceTokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        _need_file("--tokenizer-model", tokenizer_model)
        path = os.path.join(tokenizer_model, "tokenizer.json") if os.path.isdir(tokenizer_model) else tokenizer_model
        if not os.path.isfile(path):
            raise ValueError(f"--tokenizer-model {tokenizer_model}: no tokenizer.json in this directory; "
                             "save the tokenizer with save_pretrained() or tokenizer.save()")
        try:
            tok = HFTokenizer.from_file(path)
        except Exception as e:
            raise ValueError(f"--tokenizer-model {path}: not a Hugging Face tokenizer.json ({e})") from None
        return _HuggingFace(tok, path, eod_id, (path,))
    if tokenizer_type == "SentencePieceTokenizer":
        _need_file("--tokenizer-model", tokenizer_model)
        return _SentencePiece(tokenizer_model, eod_id)
    if tokenizer_type == "TikTokenizer":
        _need_file("--tokenizer-model", tokenizer_model)
        return _TikToken(tokenizer_model, eod_id)
    if tokenizer_type == "GPT2BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        _need_file("--vocab-file", vocab_file)
        _need_file("--merge-file", merge_file)
        tok = HFTokenizer(models.BPE.from_file(vocab_file, merge_file))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return _HuggingFace(tok, vocab_file, eod_id, (vocab_file, merge_file))
    raise ValueError(f"--tokenizer-type {tokenizer_type}: unknown; choose one of {', '.join(TOKENIZER_TYPES)}")
