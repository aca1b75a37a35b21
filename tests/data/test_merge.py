"""--shard I/N and tools/merge_datasets.py: N shards merged in order are byte for byte one run over
all the files; an incomplete, mixed or damaged set is refused with one line and nothing written."""

import filecmp
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from datafiles import TEXTS, deliver_signal_inside, error_line, expected, hf_args, read_documents, write_dataset, write_jsonl
from dist_launch import ROOT, script_env
from lns_megatron.data.merge import main as merge
from lns_megatron.data.preprocess import main as preprocess

SHARDS = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Seven files of every kind, in one directory."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    d = tmp_path_factory.mktemp("corpus")
    texts = [f"{t} ({i})" for i in range(60) for t in TEXTS if t]
    write_jsonl(d / "a.jsonl", texts[:50])
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[50:90])
    with open(d / "c.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress("".join(json.dumps({"text": t}) + "\n" for t in texts[90:130]).encode()))
    pq.write_table(pa.table({"text": texts[130:170]}), d / "d.parquet")
    write_jsonl(d / "e.jsonl", texts[170:200])
    write_jsonl(d / "f.jsonl", texts[200:220])
    (d / "g.txt").write_text("a text file is one document")
    return d


@pytest.fixture(scope="module")
def single_and_shards(corpus, tokenizer_dir, tmp_path_factory):
    """(prefix of one run over the corpus, directory of its SHARDS shards)."""
    out = tmp_path_factory.mktemp("outputs")
    common = ["--input", str(corpus), "--append-eod", *hf_args(tokenizer_dir)]
    assert preprocess([*common, "--output-prefix", str(out / "single" / "corpus")]) == 0
    for i in range(SHARDS):
        assert preprocess([*common, "--shard", f"{i}/{SHARDS}", "--output-prefix", str(out / "shards" / f"part{i}")]) == 0
    return str(out / "single" / "corpus_text_document"), out / "shards"


def test_shards_merged_are_byte_identical_to_one_run(single_and_shards, tmp_path, capsys):
    single, shards = single_and_shards
    sizes = [len(read_documents(str(shards / f"part{i}_text_document"))) for i in range(SHARDS)]
    assert all(sizes) and sum(sizes) == len(read_documents(single))
    # Rename the shards so that name order is not shard order: the merge follows the metadata.
    work = tmp_path / "shards"
    work.mkdir()
    for i, name in enumerate(["zz", "aa", "mm"]):
        for ext in (".bin", ".idx", ".json"):
            shutil.copy(shards / f"part{i}_text_document{ext}", work / f"{name}_text_document{ext}")
    merged = str(tmp_path / "merged" / "corpus_text_document")
    assert merge(["--input", str(work), "--output-prefix", merged]) == 0
    assert f"merged {SHARDS} datasets in order (zz_text_document ... mm_text_document)" in capsys.readouterr().out
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(merged + ext, single + ext, shallow=False), ext
    ours, theirs = json.load(open(merged + ".json")), json.load(open(single + ".json"))
    for key in ("tokenizer", "json_key", "append_eod", "dtype", "documents", "tokens", "max_token_id", "inputs"):
        assert ours[key] == theirs[key], key
    assert [m["prefix"] for m in ours["merged_from"]] == [str(work / f"{n}_text_document") for n in ("zz", "aa", "mm")]
    assert sorted(os.listdir(tmp_path / "merged")) == ["corpus_text_document" + e for e in (".bin", ".idx", ".json")]


def test_shards_are_contiguous_and_balanced_in_bytes(tmp_path):
    from lns_megatron.data.preprocess import shard_files

    files = []
    for name, size in zip("abcdefg", [100, 100, 100, 1000, 50, 50, 3000]):
        (tmp_path / name).write_bytes(b"x" * size)
        files.append(str(tmp_path / name))
    cut = lambda n: [[os.path.basename(f) for f in shard_files(files, (i, n))] for i in range(n)]
    assert cut(2) == [list("abcdef"), ["g"]]  # by count it would be abcd | efg: 1,300 bytes against 3,100
    for n in range(1, 8):
        shards = cut(n)
        assert sum(shards, []) == list("abcdefg") and all(shards)  # in order, all of them, none empty
    assert cut(7) == [[n] for n in "abcdefg"]


def test_hf_dataset_rows_shard_and_merge(tmp_path, tokenizer_dir):
    import datasets

    texts = [f"row {i}: {TEXTS[i % 5]}" for i in range(50)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    common = ["--hf-dataset", str(tmp_path / "ds"), *hf_args(tokenizer_dir)]
    for i in range(4):
        assert preprocess([*common, "--shard", f"{i}/4", "--output-prefix", str(tmp_path / "shards" / f"p{i}")]) == 0
    assert merge(["--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "all")]) == 0
    assert read_documents(str(tmp_path / "all")) == expected(tokenizer_dir, texts, eod=False)


def test_megatron_lm_datasets_merge_in_name_order(tmp_path):
    """Datasets without metadata (Megatron-LM's tools write none) merge like Megatron-LM's tool: by name."""
    docs = [[i, i + 1, i + 2] for i in range(30)]
    (tmp_path / "in").mkdir()
    for n, name in enumerate(["b", "c", "a"]):
        write_dataset(str(tmp_path / "in" / name), docs[n * 10:(n + 1) * 10])
    assert merge(["--input", str(tmp_path / "in"), "--output-prefix", str(tmp_path / "out" / "m")]) == 0
    assert read_documents(str(tmp_path / "out" / "m")) == docs[20:] + docs[:20]
    assert sorted(os.listdir(tmp_path / "out")) == ["m.bin", "m.idx"]  # no metadata made up


def _copy_shards(shards, dst, skip=()):
    dst.mkdir()
    for name in os.listdir(shards):
        if not any(name.startswith(s) for s in skip):
            shutil.copy(shards / name, dst / name)
    return dst


def _refused(capsys, tmp_path, *args):
    before = sorted(os.listdir(tmp_path))
    assert merge([*map(str, args)]) == 2
    assert sorted(os.listdir(tmp_path)) == before
    return error_line(capsys, "merge_datasets.py")


def test_incomplete_or_mixed_shards_are_refused(single_and_shards, corpus, tokenizer_dir, variants, tmp_path, capsys):
    single, shards = single_and_shards
    out = tmp_path / "merged"

    d = _copy_shards(shards, tmp_path / "missing", skip=["part1"])
    assert f"shard 1/{SHARDS} is missing" in _refused(capsys, tmp_path, "--input", d, "--output-prefix", out)

    d = _copy_shards(shards, tmp_path / "lone_bin")
    os.remove(d / "part2_text_document.idx")
    assert f"{d / 'part2_text_document.bin'} has no .idx" in _refused(capsys, tmp_path, "--input", d, "--output-prefix", out)

    d = _copy_shards(shards, tmp_path / "other_files", skip=["part0"])  # shard 0 cut from another file list
    write_jsonl(tmp_path / "extra.jsonl", ["one more file"])
    shutil.copytree(corpus, tmp_path / "corpus2")
    shutil.copy(tmp_path / "extra.jsonl", tmp_path / "corpus2" / "extra.jsonl")
    assert preprocess(["--input", str(tmp_path / "corpus2"), "--append-eod", *hf_args(tokenizer_dir), "--shard",
                       f"0/{SHARDS}", "--output-prefix", str(d / "part0")]) == 0
    capsys.readouterr()
    assert "of another input list" in _refused(capsys, tmp_path, "--input", d, "--output-prefix", out)

    d = _copy_shards(shards, tmp_path / "other_tokenizer", skip=["part0"])
    assert preprocess(["--input", str(corpus), "--append-eod", *hf_args(variants["swapped"]), "--shard",
                       f"0/{SHARDS}", "--output-prefix", str(d / "part0")]) == 0
    capsys.readouterr()
    error = _refused(capsys, tmp_path, "--input", d, "--output-prefix", out)
    assert "was prepared with HuggingFaceTokenizer" in error and "same size, different tokens" in error

    d = _copy_shards(shards, tmp_path / "bare")
    os.remove(d / "part1_text_document.json")
    assert "part1_text_document has no metadata" in _refused(capsys, tmp_path, "--input", d, "--output-prefix", out)

    d = _copy_shards(shards, tmp_path / "cut")
    with open(d / "part1_text_document.bin", "r+b") as f:
        f.truncate(os.path.getsize(d / "part1_text_document.bin") - 2)
    error = _refused(capsys, tmp_path, "--input", d, "--output-prefix", out)
    assert f"{d / 'part1_text_document.bin'} holds" in error and "truncated" in error

    assert "inside --input" in _refused(capsys, tmp_path, "--input", shards, "--output-prefix", shards / "all")
    assert "not a directory" in _refused(capsys, tmp_path, "--input", tmp_path / "nowhere", "--output-prefix", out)
    assert merge(["--input", str(shards), "--output-prefix", str(out)]) == 0
    assert "exists; pass --overwrite" in _refused(capsys, tmp_path, "--input", shards, "--output-prefix", out)
    assert merge(["--input", str(shards), "--output-prefix", str(out), "--overwrite"]) == 0


def many_inputs(tmp_path, count):
    """``count`` one-document datasets in tmp_path/in: a merge of them takes most of a second per 2000."""
    (tmp_path / "in").mkdir()
    one = write_dataset(str(tmp_path / "one"), [[1, 2, 3]])
    for i in range(count):
        for ext in (".bin", ".idx"):
            shutil.copyfile(one + ext, tmp_path / "in" / f"s{i:04d}{ext}")
    return tmp_path / "in"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_inside_a_destructor_is_not_lost(tmp_path, capsys, signum):
    """The signal lands inside megatron's _IndexReader.__del__ (where a raised KeyboardInterrupt is dropped):
    the merge still stops, with exit code 130 and nothing written, and the previous handlers come back."""
    inputs = many_inputs(tmp_path, 3)
    tracer, sent = deliver_signal_inside(signum, "__del__", "indexed_dataset")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    sys.settrace(tracer)
    try:
        code = merge(["--input", str(inputs), "--output-prefix", str(tmp_path / "out" / "m")])
    finally:
        sys.settrace(None)
    err = capsys.readouterr().err
    assert sent and sent[0].endswith("__del__"), sent
    assert code == 130 and f"interrupted by {signal.Signals(signum).name}; no output was written" in err, err
    assert os.listdir(tmp_path / "out") == []
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_interrupted_merge_leaves_no_final_files(tmp_path):
    """SIGTERM mid-merge (a scheduler's preemption) to a real process: nothing under the final names, no
    temporaries left. The landing is made certain: the merge is stopped (SIGSTOP) while its .bin is being
    written and before its .idx exists (so before its last check), sent SIGTERM, and continued."""
    inputs = many_inputs(tmp_path, 2000)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for attempt in range(5):  # a merge that got past its .bin before the stop landed is run again
        out = tmp_path / f"out{attempt}"
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "merge_datasets.py"), "--input",
                                 str(inputs), "--output-prefix", str(out / "m")],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        deadline = time.time() + 120
        while not (out / "m.bin.tmp-" f"{proc.pid}").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
            time.sleep(0.001)
        proc.send_signal(signal.SIGSTOP)
        caught = not (out / f"m.idx.tmp-{proc.pid}").exists() and not (out / "m.bin").exists()
        if caught:
            proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGCONT)
        output = proc.communicate(timeout=120)[0]
        if caught:
            break
    assert caught, "the merge was never stopped while writing its .bin"
    assert proc.returncode == 130 and "interrupted by SIGTERM; no output was written" in output, output
    assert os.listdir(out) == [], output


def test_slurm_array_script_local_mode(corpus, tokenizer_dir, single_and_shards, tmp_path):
    """examples/preprocess_slurm_array.sh, its steps run here: N shards then the merge, byte for byte one
    run; run again, it redoes only what is missing."""
    single, _ = single_and_shards
    env = script_env(dict(os.environ, INPUT=str(corpus), OUTPUT=str(tmp_path / "corpus"), TOKENIZER_MODEL=tokenizer_dir,
                          SHARDS=str(SHARDS), WORKERS="1"))
    script = os.path.join(ROOT, "examples", "preprocess_slurm_array.sh")
    proc = subprocess.run(["bash", script, "local"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = str(tmp_path / "corpus_text_document")
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(merged + ext, single + ext, shallow=False), ext
    for ext in (".bin", ".idx", ".json"):  # a task that was preempted (it leaves nothing final)
        os.remove(tmp_path / "corpus_shards" / f"00001_text_document{ext}")
    proc = subprocess.run(["bash", script, "local"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"shard 0/{SHARDS}: done before" in out and f"shard 2/{SHARDS}: done before" in out
    assert f"shard 1/{SHARDS}: done before" not in out
    for ext in (".bin", ".idx"):
        assert filecmp.cmp(merged + ext, single + ext, shallow=False), ext
