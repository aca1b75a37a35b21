"""Helpers shared by the data tests: tokenizers trained here, real files, real megatron-core readers."""

import json
import os

import numpy as np
import torch
from tokenizers import Tokenizer

TEXTS = ["The curse of depth.", "Deep layers drift toward identity maps.", "", "LayerNorm Scaling: 1/sqrt(l)!",
         "ünïcödé and\nnewlines\n\nkept"]


def train_bpe(directory, corpus, vocab_size=300):
    """A byte-level BPE trained with `tokenizers` on ``corpus``, saved as ``directory``/tokenizer.json."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    os.makedirs(directory, exist_ok=True)
    tok.save(os.path.join(directory, "tokenizer.json"))
    return str(directory)


def hf_args(tokenizer_dir):
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]


def read_documents(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    docs = [dataset[i].tolist() for i in range(len(dataset))]
    del dataset
    return docs


def expected(tokenizer_dir, texts, eod=True):
    """The ids from the tokenizers library's plain one-text encode, independent of our batched path."""
    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    eod_id = tok.token_to_id("<|endoftext|>")
    return [tok.encode(t, add_special_tokens=False).ids + ([eod_id] if eod else []) for t in texts if t]


def write_jsonl(path, texts, key="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({key: t, "id": 1}) + "\n")


def write_dataset(prefix, documents, dtype=np.uint16):
    """An indexed dataset written by megatron-core's own builder, as Megatron-LM's tools do (no metadata)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def error_line(capsys, tool):
    """The one error line a tool printed (and that there was exactly one, without a traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{tool}: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def deliver_signal_inside(signum, function, module):
    """A tracer (for sys.settrace) that sends ``signum`` to this process from inside the first call of
    ``function`` defined in a file whose path contains ``module``: a landing made certain. Returns it and a
    list that gets the qualified name of the function the signal landed in."""
    sent = []

    def local(frame, event, arg):
        if event == "line" and not sent:
            sent.append(frame.f_code.co_qualname)
            os.kill(os.getpid(), signum)
        return local

    def tracer(frame, event, arg):
        code = frame.f_code
        if not sent and event == "call" and code.co_name == function and module in code.co_filename:
            return local
        return None

    return tracer, sent
