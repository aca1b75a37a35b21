"""The driver's data checks at start (lns_megatron.data.datasets.check_data_paths, run before the model
is built): the tokenizer, the EOD, damaged files, --split and blend weights; then the per-batch id
guard, and the EOD and tokenizer carried through a real run into its checkpoint, export and report."""

import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from datafiles import TEXTS, hf_args, write_dataset, write_jsonl
from dist_launch import ROOT
from lns_megatron.config import ConfigError, parse_args, validate
from lns_megatron.data import datasets
from lns_megatron.data.preprocess import main as preprocess
from lns_megatron.data.tokenizer import build_tokenizer

EOD = 5  # prepared with --eod-id 5, not the tokenizer's own <|endoftext|> (id 0)


@pytest.fixture(scope="module")
def prepared(tokenizer_dir, tmp_path_factory):
    """A dataset with metadata: 400 documents, each ending in EOD."""
    d = tmp_path_factory.mktemp("prepared")
    write_jsonl(d / "a.jsonl", [f"{t} number {i}" for i in range(200) for t in TEXTS[:2]])
    assert preprocess(["--input", str(d / "a.jsonl"), "--output-prefix", str(d / "c"), "--append-eod",
                       "--eod-id", str(EOD), *hf_args(tokenizer_dir)]) == 0
    return str(d / "c_text_document")


def config(prefix, tokenizer_dir, *extra):
    return parse_args(["--preset", "tiny", "--data-path", *([prefix] if isinstance(prefix, str) else prefix),
                       "--split", "90,10,0", *hf_args(tokenizer_dir), *map(str, extra)])


def copy_dataset(prefix, dst, with_metadata=True):
    for ext in (".bin", ".idx") + ((".json",) if with_metadata else ()):
        shutil.copyfile(prefix + ext, str(dst) + ext)
    return str(dst)


def vocab(tokenizer_dir):
    return build_tokenizer("HuggingFaceTokenizer", tokenizer_dir, eod_id=EOD).vocab_size


def refused(c):
    with pytest.raises(ConfigError) as e:
        datasets.check_data_paths(c)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_matching_tokenizer_passes_and_the_eod_comes_from_the_metadata(prepared, tokenizer_dir, variants):
    c = config(prepared, tokenizer_dir)
    assert c.eod_id is None
    datasets.check_data_paths(c)
    assert c.eod_id == EOD and datasets.build_tokenizer_from_config(c).eod == EOD
    # The same vocabulary saved again (other bytes, other file hash) still matches: ids mean the same tokens.
    c = config(prepared, variants["resaved"])
    datasets.check_data_paths(c)
    assert c.eod_id == EOD


def test_another_tokenizer_is_refused_naming_the_prefix(prepared, tokenizer_dir, variants):
    error = refused(config(prepared, variants["swapped"]))
    assert error.startswith(f"--data-path {prepared}: prepared with HuggingFaceTokenizer (tokenizer.json sha256 ")
    assert "same size, different tokens" in error and "prepare it with this tokenizer" in error
    error = refused(config(prepared, variants["smaller"]))
    sizes = f"vocabulary {vocab(tokenizer_dir)} vs {vocab(variants['smaller'])}"
    assert f"--data-path {prepared}: prepared with" in error and sizes in error
    assert f"--eod-id 3: --data-path {prepared} was prepared with EOD {EOD}" in refused(
        config(prepared, tokenizer_dir, "--eod-id", 3))


def test_without_metadata_ids_are_checked_on_a_sample(prepared, tokenizer_dir, tmp_path):
    bare = copy_dataset(prepared, tmp_path / "bare", with_metadata=False)
    c = config(bare, tokenizer_dir, "--eod-id", EOD)
    datasets.check_data_paths(c)  # Megatron-LM's outputs (no .json) load
    big = write_dataset(str(tmp_path / "big"), [[1, 2, 900 + i] for i in range(100)])  # another, larger vocabulary
    error = refused(config(big, tokenizer_dir))
    assert error.startswith(f"--data-path {big}: a sample of its .bin holds token id 999, outside this run's "
                            f"HuggingFaceTokenizer vocabulary of {vocab(tokenizer_dir)}")


def test_metadata_of_other_files_is_refused(prepared, tokenizer_dir, tmp_path):
    stale = copy_dataset(prepared, tmp_path / "stale")
    write_dataset(stale, [[1, 2, 3]] * 10)  # new .bin/.idx under the old metadata
    error = refused(config(stale, tokenizer_dir))
    assert "describes 400 documents, the .bin/.idx hold 10" in error and "the files were replaced" in error
    with open(stale + ".json", "w") as f:
        f.write("{not json")
    assert f"{stale}.json is not valid JSON" in refused(config(stale, tokenizer_dir))


def _damage(path, kind):
    """Damages a copied .bin/.idx the way disks, copies and crashes do."""
    idx, binary = path + ".idx", path + ".bin"
    data = bytearray(open(idx, "rb").read())
    sequences = struct.unpack("<Q", data[18:26])[0]
    if kind == "magic":
        data[:9] = b"NOTANIDX\x00"
    elif kind == "version":
        data[9:17] = struct.pack("<Q", 7)
    elif kind == "idx-cut":
        data = data[: len(data) - 100]
    elif kind == "idx-header-only":
        data = data[:20]
    elif kind == "pointers":
        offset = 34 + 4 * sequences + 8  # the second sequence's pointer
        data[offset:offset + 8] = struct.pack("<q", 12345)
    if kind in ("bin-cut", "bin-long"):
        with open(binary, "r+b") as f:
            f.truncate(os.path.getsize(binary) + (-6 if kind == "bin-cut" else 2))
    else:
        open(idx, "wb").write(bytes(data))


@pytest.mark.parametrize("kind, message", [
    ("magic", "is not a megatron-core index (it starts with b'NOTANIDX'"),
    ("version", "is damaged: header version 7"),
    ("idx-cut", "is damaged: "),
    ("idx-header-only", "is damaged: 20 bytes, shorter than megatron's 34-byte header"),
    ("pointers", "is damaged: its sequence pointers do not follow the lengths"),
    ("bin-cut", ".bin holds"),
    ("bin-long", "(longer: written by another run)"),
])
def test_damaged_files_fail_at_start_in_one_line(prepared, tokenizer_dir, tmp_path, kind, message):
    """Megatron-core's reader raises a raw AssertionError on a bad .idx and, on a truncated .bin, a numpy
    ValueError only when training reaches the missing part; here each is one line before the model."""
    damaged = copy_dataset(prepared, tmp_path / "damaged")
    _damage(damaged, kind)
    error = refused(config(damaged, tokenizer_dir))
    assert error.startswith(f"--data-path {damaged}: {damaged}.") and message in error, error
    assert "re-run tools/preprocess_data.py" in error


@pytest.mark.parametrize("extra, message", [
    (["--split", "90,a,0"], "--split 90,a,0: give up to three non-negative train,valid,test weights"),
    (["--split=-1,2,3"], "--split -1,2,3: give up to three non-negative"),
    (["--split", "1,2,3,4"], "--split 1,2,3,4: give up to three"),
    (["--split", "0,0,0"], "--split 0,0,0: the weights sum to 0"),
    (["--split", "0,100,0"], "--split 0,100,0 gives training no data"),
    (["--split", "100,0,0", "--train-iters", "20", "--eval-interval", "10"],
     "--split 100,0,0 leaves no validation data, but --eval-interval 10 validates during the run"),
    (["--split", "969,30,1"], "--split 969,30,1: the test split of --data-path"),
], ids=["letter", "negative", "four", "zeros", "no-train", "no-valid", "empty-test"])
def test_malformed_or_empty_split_is_refused(prepared, tokenizer_dir, extra, message):
    assert message in refused(config(prepared, tokenizer_dir, *extra))


def test_split_without_validation_is_fine_when_nothing_validates(prepared, tokenizer_dir):
    datasets.check_data_paths(config(prepared, tokenizer_dir, "--split", "100,0,0", "--eval-iters", "0"))


def test_blend_weights(prepared, tokenizer_dir, tmp_path):
    other = copy_dataset(prepared, tmp_path / "other")
    datasets.check_data_paths(config(["0.7", prepared, "0.3", other], tokenizer_dir))
    for values, message in [
        (["-0.5", prepared, "1", other], f"--data-path: weight -0.5 of {prepared} must be a positive number"),
        (["0", prepared, "1", other], f"--data-path: weight 0 of {prepared} must be a positive number"),
        (["0.7", prepared, other], "weights and prefixes must alternate"),
        ([prepared, "0.7", other, "0.3"], "weights and prefixes must alternate"),
    ]:
        assert message in refused(config(values, tokenizer_dir))


def test_a_batch_with_an_id_outside_the_vocabulary_is_one_error(tmp_path, megatron_tp1):
    """What the start-up sample may miss is caught per batch, before the embedding sees it."""
    prefix = write_dataset(str(tmp_path / "ids"), [list(range(30)) + [70] for _ in range(40)])
    c = parse_args(["--preset", "tiny", "--seq-length", "16", "--data-path", prefix, "--split", "1,0,0",
                    "--tokenizer-type", "NullTokenizer", "--vocab-size", "63", "--train-iters", "2",
                    "--micro-batch-size", "2", "--num-workers", "0", "--eval-iters", "0"])
    validate(c, cuda_available=False, have_te=False)
    tokenizer = datasets.build_tokenizer_from_config(c)
    train, _, _ = datasets.build_datasets(c, tokenizer)
    batches = datasets.data_iterators(train, c, 0, 1)[0]
    with pytest.raises(datasets.TokenIdError, match=f"--data-path {prefix}: a batch holds token id 70, outside the "
                                                    "tokenizer's vocabulary of 64"):
        for _ in range(len(train)):
            next(batches)


def driver(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lns_megatron.pretrain", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_run_carries_its_eod_and_tokenizer_to_export_and_report(prepared, tokenizer_dir, variants, tmp_path):
    """The driver takes EOD 5 from the metadata, trains, and saves it with the tokenizer's identity; the
    export writes eos_token_id 5, and the tools refuse a smaller tokenizer instead of trimming the model."""
    from lns_megatron.diagnostics.report import ReportError, _indexed_windows
    from lns_megatron.hf.export import export
    from lns_megatron.training import distributed
    from lns_megatron.training.checkpoint import CheckpointError, load_model

    code, out = driver("--preset", "tiny", "--seq-length", "32", "--max-position-embeddings", "32", "--data-path",
                       prepared, "--split", "90,10,0", *hf_args(tokenizer_dir), "--train-iters", "3", "--log-interval",
                       "1", "--num-workers", "0", "--eval-iters", "1", "--eval-interval", "3", "--depth-log-interval",
                       "0", "--save", tmp_path / "ckpt")
    assert code == 0, out[-3000:]
    size = vocab(tokenizer_dir)
    assert f"vocab {size} (padded 384)" in out and "validation loss at iteration 3" in out
    saved = json.load(open(tmp_path / "ckpt" / "iter_0000003" / "pretrain_config.json"))
    assert saved["eod_id"] == EOD and saved["tokenizer_identity"]["vocab_size"] == size
    try:
        loaded = load_model(str(tmp_path / "ckpt"), device="cpu")
        assert loaded.tokenizer.eod == EOD
        export(loaded, str(tmp_path / "hf"))
        hf_config = json.load(open(tmp_path / "hf" / "config.json"))
        assert hf_config["eos_token_id"] == EOD and hf_config["vocab_size"] == size
        windows = _indexed_windows(prepared, "90,10,0", 8, 2, loaded.tokenizer, 384, seed=0)
        assert windows.shape == (2, 9)
        with pytest.raises(ReportError, match=f"prepared with EOD {EOD}, the run was trained with EOD 0"):
            _indexed_windows(prepared, "90,10,0", 8, 2, build_tokenizer("HuggingFaceTokenizer", tokenizer_dir), 384,
                             seed=0)
        with pytest.raises(ReportError, match="same size, different tokens"):  # the depth report's data check
            _indexed_windows(prepared, "90,10,0", 8, 2, build_tokenizer("HuggingFaceTokenizer", variants["swapped"],
                                                                        eod_id=EOD), 384, seed=0)
        with pytest.raises(CheckpointError, match=f"trained with HuggingFaceTokenizer .*vocabulary {size} vs {size - 20}.*"
                                                  "pass --tokenizer-model the tokenizer the run was trained with"):
            load_model(str(tmp_path / "ckpt"), tokenizer_model=variants["smaller"], device="cpu")
    finally:
        distributed.destroy()
    # At start, a mismatch is one line naming the prefix, before the model is built.
    code, out = driver("--preset", "tiny", "--data-path", prepared, "--split", "90,10,0", *hf_args(variants["swapped"]),
                       "--num-workers", "0")
    errors = [line for line in out.splitlines() if line.startswith("lns-pretrain: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    assert errors[0].startswith(f"lns-pretrain: error: --data-path {prepared}: prepared with HuggingFaceTokenizer")
