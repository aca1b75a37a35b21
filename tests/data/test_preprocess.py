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

from datafiles import TEXTS, deliver_signal_inside, error_line, expected, hf_args, read_documents, write_jsonl
from dist_launch import ROOT
from lns_megatron.data.preprocess import main
from lns_megatron.data.tokenizer import build_tokenizer


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_jsonl(tmp_path, tokenizer_dir, workers):
    write_jsonl(tmp_path / "a.jsonl", TEXTS * 300)
    prefix = str(tmp_path / "out" / "corpus")
    assert main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", prefix, "--append-eod",
                 "--workers", str(workers), *hf_args(tokenizer_dir)]) == 0
    assert read_documents(prefix + "_text_document") == expected(tokenizer_dir, TEXTS * 300)
    dataset = IndexedDataset(prefix + "_text_document")
    assert dataset.index.dtype == np.uint16  # smallest dtype for a 300-token vocabulary
    del dataset


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
    """The command-line tool in a process of its own (for signals); in-process main() everywhere else."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def refused(capsys, tmp_path, *args):
    """Runs the tool in-process; asserts exit code 2 with one error line and no output files; returns the line."""
    before = sorted(os.listdir(tmp_path))
    assert main([*map(str, args)]) == 2
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporaries left
    return error_line(capsys, "preprocess_data.py")


@pytest.mark.parametrize("line, reason", [
    ('{"text": "ok"}\n{"text": broken}\n', "a.jsonl:2: malformed JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', "a.jsonl:2: no key 'text'"),
    ('{"text": 5}\n', "a.jsonl:1: 'text' is a int, not a string"),
    ('{"text": "ok"}\n{"text": "half a pair \\ud800"}\n', "a.jsonl:2: 'text' holds a lone surrogate U+D800"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "a.jsonl:2 (column 14): invalid UTF-8 (byte 0xe9)"),
], ids=["json", "key", "type", "surrogate", "utf8"])
def test_bad_lines_stop_with_location_and_leave_nothing(tmp_path, tokenizer_dir, capsys, line, reason):
    (tmp_path / "a.jsonl").write_bytes(line if isinstance(line, bytes) else line.encode())
    error = refused(capsys, tmp_path, "--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o",
                    *hf_args(tokenizer_dir))
    assert reason in error and "--skip-invalid" in error, error


def test_skip_invalid_counts_and_reports(tmp_path, tokenizer_dir, capsys):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": broken}\n{"text": "fine"}\n{"x": 1}\n'
                                       b'{"text": "latin1 caf\xe9"}\n{"text": "last"}\n')
    assert main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "o"), "--skip-invalid",
                 *hf_args(tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    assert "invalid skipped: 3" in out and "a.jsonl:2" in out and "a.jsonl:4" in out and "a.jsonl:5" in out, out
    assert read_documents(str(tmp_path / "o_text_document")) == expected(tokenizer_dir, ["ok", "fine", "last"], eod=False)


def test_byte_order_mark_is_stripped(tmp_path, tokenizer_dir):
    """Windows tools start UTF-8 files with a BOM: accepted, and not part of the first document."""
    bom = b"\xef\xbb\xbf"
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(bom + b'{"text": "first"}\n{"text": "second"}\n')
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wb") as f:
        f.write(bom + b'{"text": "gzipped"}\n')
    (tmp_path / "in" / "c.txt").write_bytes(bom + "a text file".encode())
    assert main(["--input", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "o"), *hf_args(tokenizer_dir)]) == 0
    assert read_documents(str(tmp_path / "o_text_document")) == expected(
        tokenizer_dir, ["first", "second", "gzipped", "a text file"], eod=False)


def _compressed_inputs(tmp_path):
    """(name, bytes, expected error) of damaged files made here: cut short, or with a corrupted middle."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = b"".join(json.dumps({"text": f"document {i} " * 30}).encode() + b"\n" for i in range(3000))
    gz = gzip.compress(lines)
    zst = zstandard.ZstdCompressor().compress(lines)
    corrupt_zst = bytearray(zst)
    corrupt_zst[len(zst) // 2:len(zst) // 2 + 64] = bytes(64)
    corrupt_gz = bytearray(gz)
    corrupt_gz[len(gz) // 2:len(gz) // 2 + 64] = bytes(64)
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(100)]}), tmp_path / "whole.parquet")
    parquet = (tmp_path / "whole.parquet").read_bytes()
    os.remove(tmp_path / "whole.parquet")
    return [
        ("cut.jsonl.gz", gz[: len(gz) // 2], "cut.jsonl.gz:", "the gzip stream is truncated or corrupt"),
        ("corrupt.jsonl.gz", bytes(corrupt_gz), "corrupt.jsonl.gz:", "the gzip stream is truncated or corrupt"),
        ("not.jsonl.gz", lines[:100], "not.jsonl.gz:1: the gzip stream", "Not a gzipped file"),
        ("cut.jsonl.zst", zst[: len(zst) // 2], "cut.jsonl.zst:", "the last zstd frame has no end"),
        ("corrupt.jsonl.zst", bytes(corrupt_zst), "corrupt.jsonl.zst:", "the zstd stream is truncated or corrupt"),
        ("cut.parquet", parquet[: len(parquet) // 2], "cut.parquet: not a readable Parquet file", ""),
    ]


def test_damaged_compressed_and_parquet_files_are_named(tmp_path, tokenizer_dir, capsys):
    """Each damaged file stops the run with its name (and the line reached), and nothing is written.
    (zstandard's own stream reader returns a cut-short file's data, or none of it, without an error.)"""
    for name, data, where, what in _compressed_inputs(tmp_path):
        (tmp_path / name).write_bytes(data)
        error = refused(capsys, tmp_path, "--input", tmp_path / name, "--output-prefix", tmp_path / "o",
                        *hf_args(tokenizer_dir))
        assert where in error and what in error and "re-download" in error, (name, error)
        os.remove(tmp_path / name)


def test_flags_refused_before_any_work(tmp_path, tokenizer_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", ["hello"])
    common = ["--input", tmp_path / "a.jsonl", *hf_args(tokenizer_dir)]
    error = refused(capsys, tmp_path, *common, "--output-prefix", f"{tmp_path}/data/")
    assert f"--output-prefix '{tmp_path}/data/': ends in a directory" in error and "data/corpus" in error
    error = refused(capsys, tmp_path, *common, "--output-prefix", tmp_path / "o", "--json-keys", "text", "text")
    assert "--json-keys text text: 'text' is given twice" in error
    for shard in ("2/2", "1-2", "-1/2"):
        assert f"--shard {shard}: give I/N with 0 <= I < N" in refused(
            capsys, tmp_path, *common, "--output-prefix", tmp_path / "o", f"--shard={shard}")
    assert "only 1 input files, fewer than the 2 shards" in refused(
        capsys, tmp_path, *common, "--output-prefix", tmp_path / "o", "--shard", "0/2")


def test_metadata_describes_the_dataset(tmp_path, tokenizer_dir):
    from lns_megatron.data import metadata

    write_jsonl(tmp_path / "a.jsonl", TEXTS * 10)
    write_jsonl(tmp_path / "b.jsonl", TEXTS[:2])
    prefix = str(tmp_path / "out" / "c")
    assert main(["--input", str(tmp_path / "*.jsonl"), "--output-prefix", prefix, "--append-eod",
                 "--eod-id", "7", *hf_args(tokenizer_dir)]) == 0
    meta = json.load(open(prefix + "_text_document.json"))
    docs = read_documents(prefix + "_text_document")
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir, eod_id=7)
    assert meta["tokenizer"] == metadata.tokenizer_identity(tok) and meta["tokenizer"]["eod"] == 7
    assert meta["tokenizer"]["files"]["tokenizer.json"] == metadata._sha256_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    assert (meta["documents"], meta["tokens"]) == (len(docs), sum(map(len, docs)))
    assert meta["max_token_id"] == max(max(d) for d in docs) and all(d[-1] == 7 for d in docs)
    assert [i["path"] for i in meta["inputs"]] == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert (meta["json_key"], meta["append_eod"], meta["dtype"], meta["shard"]) == ("text", True, "uint16", None)
    assert meta["tool"].startswith("lns_megatron ") and meta["tool"].endswith("tools/preprocess_data.py")


def test_empty_documents_skipped_and_no_tokens_is_an_error(tmp_path, tokenizer_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", ["", "", ""])
    error = refused(capsys, tmp_path, "--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o",
                    *hf_args(tokenizer_dir))
    assert "no tokens at all (3 empty documents)" in error, error


def test_refuses_to_overwrite(tmp_path, tokenizer_dir, capsys):
    write_jsonl(tmp_path / "a.jsonl", ["hello"])
    args = ["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "o"), *hf_args(tokenizer_dir)]
    assert main(args) == 0
    assert "exists; pass --overwrite" in refused(capsys, tmp_path, *args)
    write_jsonl(tmp_path / "a.jsonl", ["hello again"])
    assert main([*args, "--overwrite"]) == 0
    assert read_documents(str(tmp_path / "o_text_document")) == expected(tokenizer_dir, ["hello again"], eod=False)


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
    proc.send_signal(signum)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and f"interrupted by {signal.Signals(signum).name}; no output was written" in out, out
    assert sorted(os.listdir(tmp_path)) == ["big.jsonl"], out


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_inside_megatron_is_acted_on_at_a_safe_point(tmp_path, tokenizer_dir, capsys, signum):
    """The signal lands inside megatron-core's IndexedDatasetBuilder.add_document: the handler only records
    it, the run stops at its next check with exit code 130 and nothing written, and the previous handlers
    come back."""
    write_jsonl(tmp_path / "a.jsonl", TEXTS * 400)
    tracer, sent = deliver_signal_inside(signum, "add_document", "indexed_dataset")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    sys.settrace(tracer)
    try:
        code = main(["--input", str(tmp_path / "a.jsonl"), "--output-prefix", str(tmp_path / "o"),
                     *hf_args(tokenizer_dir)])
    finally:
        sys.settrace(None)
    err = capsys.readouterr().err
    assert sent == ["IndexedDatasetBuilder.add_document"], sent
    assert code == 130 and f"interrupted by {signal.Signals(signum).name}; no output was written" in err, err
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_missing_tokenizer_and_input(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", ["hello"])
    error = refused(capsys, tmp_path, "--input", tmp_path / "a.jsonl", "--output-prefix", tmp_path / "o",
                    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tmp_path / "nope")
    assert f"--tokenizer-model {tmp_path / 'nope'}: no such file" in error
    error = refused(capsys, tmp_path, "--input", tmp_path / "none.jsonl", "--output-prefix", tmp_path / "o",
                    "--tokenizer-type", "NullTokenizer", "--vocab-size", "10")
    assert "--input" in error and "no input files" in error
