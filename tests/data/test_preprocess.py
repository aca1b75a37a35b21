"""tools/preprocess_data.py: real megatron-core IndexedDataset output, every input kind, bad input."""

import gzip
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer

from dist_launch import ROOT
from lns_megatron.data.preprocess import main
from lns_megatron.data.tokenizer import build_tokenizer

TEXTS = ["The curse of depth.", "Deep layers drift toward identity maps.", "", "LayerNorm Scaling: 1/sqrt(l)!",
         "ünïcödé and\nnewlines\n\nkept"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A byte-level BPE trained here with `tokenizers`, saved as tokenizer.json."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [t for t in TEXTS if t] * 20 + ["the quick brown fox jumps over the lazy dog"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    return str(path)


def hf_args(tokenizer_dir):
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir]


def read_documents(prefix):
    dataset = IndexedDataset(prefix)
    docs = [dataset[i].tolist() for i in range(len(dataset))]
    assert dataset.index.dtype == np.uint16  # smallest dtype for a 300-token vocabulary
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


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_jsonl(tmp_path, tokenizer_dir, workers):
    write_jsonl(tmp_path / "a.jsonl", TEXTS * 300)
    prefix = str(tmp_path / "out" / "corpus")
    assert main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", prefix, "--append-eod",
                 "--workers", str(workers), *hf_args(tokenizer_dir)]) == 0
    assert read_documents(prefix + "_text_document") == expected(tokenizer_dir, TEXTS * 300)


def test_every_input_kind_and_multiple_files(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path / "in"
    d.mkdir()
    write_jsonl(d / "1.jsonl", TEXTS[:2])
    with gzip.open(d / "2.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": TEXTS[3]}) + "\n")
    with open(d / "3.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress((json.dumps({"text": TEXTS[4]}) + "\n").encode()))
    pq.write_table(pa.table({"text": ["parquet one", "parquet two"]}), d / "4.parquet")
    (d / "5.txt").write_text("a whole file\n\nis one document")
    write_jsonl(d / "6.json", ["json lines too"])
    (d / "ignored.csv").write_text("x")
    prefix = str(tmp_path / "all")
    assert main(["--input", str(d), "--output-prefix", prefix, *hf_args(tokenizer_dir)]) == 0
    order = TEXTS[:2] + [TEXTS[3], TEXTS[4], "parquet one", "parquet two", "a whole file\n\nis one document",
                         "json lines too"]
    assert read_documents(prefix + "_text_document") == expected(tokenizer_dir, order, eod=False)
    prefix = str(tmp_path / "blocks")
    assert main(["--input", str(d / "5.txt"), "--txt-blank-line-docs", "--output-prefix", prefix,
                 *hf_args(tokenizer_dir)]) == 0
    assert read_documents(prefix + "_text_document") == expected(tokenizer_dir, ["a whole file\n", "is one document"], eod=False)


def test_hf_dataset_saved_to_disk(tmp_path, tokenizer_dir):
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(tmp_path / "ds"))
    prefix = str(tmp_path / "hf")
    assert main(["--hf-dataset", str(tmp_path / "ds"), "--output-prefix", prefix, "--append-eod",
                 *hf_args(tokenizer_dir)]) == 0
    assert read_documents(prefix + "_text_document") == expected(tokenizer_dir, TEXTS)


def run_tool(*args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.parametrize("line, reason", [
    ('{"text": "ok"}\n{"text": broken}\n', "a.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', "a.jsonl:2: no key 'text'"),
    ('{"text": 5}\n', "a.jsonl:1: 'text' is a int, not a string"),
])
def test_bad_lines_stop_with_location_and_leave_nothing(tmp_path, tokenizer_dir, line, reason):
    (tmp_path / "a.jsonl").write_text(line)
    code, out = run_tool("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o", *hf_args(tokenizer_dir))
    assert code != 0 and reason in out and "--skip-invalid" in out, out
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]


def test_skip_invalid_counts_and_reports(tmp_path, tokenizer_dir):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n{"text": "fine"}\n{"x": 1}\n')
    code, out = run_tool("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o", "--skip-invalid",
                         *hf_args(tokenizer_dir))
    assert code == 0 and "invalid skipped: 2" in out and "a.jsonl:2" in out and "a.jsonl:4" in out, out
    assert read_documents(str(tmp_path / "o_text_document")) == expected(tokenizer_dir, ["ok", "fine"], eod=False)


def test_empty_documents_skipped_and_no_tokens_is_an_error(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "a.jsonl", ["", "", ""])
    code, out = run_tool("--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o", *hf_args(tokenizer_dir))
    assert code != 0 and "no tokens at all (3 empty documents)" in out, out
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]


def test_refuses_to_overwrite(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "a.jsonl", ["hello"])
    args = ["--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o", *hf_args(tokenizer_dir)]
    assert run_tool(*args)[0] == 0
    code, out = run_tool(*args)
    assert code != 0 and "exists; pass --overwrite" in out
    assert run_tool(*args, "--overwrite")[0] == 0


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_leaves_no_final_files(tmp_path, tokenizer_dir, signum, workers):
    """Ctrl-C or a scheduler's SIGTERM mid-run: no .bin/.idx under the final names, no temporaries left."""
    import time

    write_jsonl(tmp_path / "big.jsonl", TEXTS * 40000)
    # A job started in the background by a script inherits SIGINT ignored; Ctrl-C at a terminal does not.
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                             str(tmp_path / "big.jsonl"), "--output-prefix", str(tmp_path / "o"),
                             "--workers", str(workers), *hf_args(tokenizer_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not any(".tmp-" in n for n in os.listdir(tmp_path)) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "interrupted; no output was written" in out, out
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl"], out


def test_missing_tokenizer_and_input(tmp_path):
    code, out = run_tool("--input", tmp_path / "none.jsonl", "--output-prefix", tmp_path / "o",
                         "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tmp_path / "nope")
    assert code != 0 and f"--tokenizer-model {tmp_path / 'nope'}: no such file" in out
    code, out = run_tool("--input", tmp_path / "none.jsonl", "--output-prefix", tmp_path / "o",
                         "--tokenizer-type", "NullTokenizer", "--vocab-size", "10")
    assert code != 0 and "--input" in out and "no input files" in out


def test_output_trains_in_the_driver(tmp_path, tokenizer_dir):
    write_jsonl(tmp_path / "a.jsonl", [f"{t} number {i}" for i in range(400) for t in TEXTS[:2]])
    assert main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "c"), "--append-eod",
                 *hf_args(tokenizer_dir)]) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lns_megatron.pretrain", "--preset", "tiny", "--seq-length", "32",
                           "--max-position-embeddings", "32", "--data-path", str(tmp_path / "c_text_document"),
                           "--split", "90,10,0", *hf_args(tokenizer_dir), "--train-iters", "3", "--log-interval", "1",
                           "--num-workers", "0", "--eval-iters", "1", "--eval-interval", "3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    assert f"vocab {tok.vocab_size} (padded 384)" in out and "iteration        3/       3" in out
    assert "validation loss at iteration 3" in out
