"""Every tokenizer type from local files, with the EOD rules shared by the data tool and the driver."""

import base64

import pytest

from lns_megatron.data.tokenizer import build_tokenizer

CORPUS = ["the curse of depth in large language models", "layernorm scaling keeps deep layers useful"] * 50


def train_bpe(special_tokens):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=special_tokens,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_huggingface_directory_and_file(tmp_path):
    train_bpe(["<|endoftext|>"]).save(str(tmp_path / "tokenizer.json"))
    for source in (tmp_path, tmp_path / "tokenizer.json"):
        tok = build_tokenizer("HuggingFaceTokenizer", str(source))
        assert tok.eod == 0 and tok.vocab_size == 300
        ids = tok.tokenize("the curse of depth")
        assert tok.tokenize_batch(["the curse of depth", "x"])[0] == ids
        assert tok.detokenize(ids) == "the curse of depth"


def test_missing_eod_is_an_error_unless_given(tmp_path):
    train_bpe([]).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no end-of-text token.*--eod-id"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    assert build_tokenizer("HuggingFaceTokenizer", str(tmp_path), eod_id=7).eod == 7


def test_gpt2_bpe_vocab_and_merges(tmp_path):
    train_bpe(["<|endoftext|>"]).model.save(str(tmp_path))
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
                          merge_file=str(tmp_path / "merges.txt"))
    assert tok.eod == 0 and tok.detokenize(tok.tokenize("deep layers")) == "deep layers"


def test_sentencepiece(tmp_path):
    import sentencepiece

    (tmp_path / "corpus.txt").write_text("\n".join(CORPUS))
    sentencepiece.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=60, model_type="bpe")
    tok = build_tokenizer("SentencePieceTokenizer", str(tmp_path / "sp.model"))
    assert tok.vocab_size == 60 and tok.eod == 2  # </s>
    assert tok.detokenize(tok.tokenize("deep layers")) == "deep layers"
    from lns_megatron.data.metadata import tokenizer_identity

    identity = tokenizer_identity(tok)
    assert identity["files"].keys() == {"sp.model"} and len(identity["vocab_sha256"]) == 64


def test_tiktoken_ranks_file(tmp_path):
    ranks = tmp_path / "bytes.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tok = build_tokenizer("TikTokenizer", str(ranks))
    assert tok.eod == 256 and tok.vocab_size == 257
    assert tok.tokenize("hi") == [ord("h"), ord("i")] and tok.detokenize([104, 105]) == "hi"


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=100)
    assert (tok.vocab_size, tok.eod, tok.tokenize("5 6 7")) == (101, 100, [5, 6, 7])
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")


@pytest.mark.parametrize("args, message", [
    (("HuggingFaceTokenizer", "/nonexistent"), "--tokenizer-model /nonexistent: no such file"),
    (("SentencePieceTokenizer", None), "--tokenizer-model is required"),
    (("GPT2BPETokenizer",), "--vocab-file is required"),
    (("WordPiece",), "--tokenizer-type WordPiece: unknown"),
])
def test_bad_tokenizer_input(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        build_tokenizer(*args)


def test_identity_compares_vocabularies_not_files(tmp_path):
    """The same BPE as tokenizer.json and as GPT-2 vocab.json + merges.txt: other files, the same ids."""
    from lns_megatron.data.metadata import tokenizer_identity, tokenizer_mismatch

    bpe = train_bpe(["<|endoftext|>"])
    bpe.save(str(tmp_path / "tokenizer.json"))
    bpe.model.save(str(tmp_path))
    hf = tokenizer_identity(build_tokenizer("HuggingFaceTokenizer", str(tmp_path)))
    gpt2 = tokenizer_identity(build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"),
                                              merge_file=str(tmp_path / "merges.txt")))
    assert set(gpt2["files"]) == {"vocab.json", "merges.txt"} and hf["files"].keys() == {"tokenizer.json"}
    assert tokenizer_mismatch(hf, gpt2) is None and hf["vocab_sha256"] == gpt2["vocab_sha256"]
    ranks = tmp_path / "bytes.tiktoken"
    ranks.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tik = tokenizer_identity(build_tokenizer("TikTokenizer", str(ranks)))
    assert tik["vocab_size"] == 257 and tokenizer_mismatch(hf, tik) == "vocabulary 300 vs 257"
    null = tokenizer_identity(build_tokenizer("NullTokenizer", vocab_size=299))
    assert null["vocab_sha256"] is None and tokenizer_mismatch(hf, null) is None  # ids alone: only sizes compare
