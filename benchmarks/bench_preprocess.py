"""Our tools/preprocess_data.py against Megatron-LM's, on the same JSONL, tokenizer and workers.

    python benchmarks/bench_preprocess.py --megatron-lm /path/to/Megatron-LM [--docs 50000] [--workers 2]
        [--tokenizer-type HuggingFaceTokenizer|GPT2BPETokenizer] [--memory]

Writes a synthetic JSONL corpus (or takes --corpus FILE.jsonl) and trains a byte-level BPE tokenizer, saved both as a Hugging Face
directory and as GPT-2 style vocab.json + merges.txt, which both tools load. Runs the two tools
alternately as subprocesses, checks that the outputs are identical token for token, and prints
documents per second and the ratio: of wall times, and without the start-up (each tool's wall time on
a one-document corpus, subtracted), which is what a large corpus sees. Megatron-LM's GPT2BPETokenizer
runs with --legacy-tokenizer: its default path fetches the "gpt2" files from the Hugging Face Hub.

--memory also runs our tool on the corpus and on a corpus 4 times larger and prints the peak resident
memory of its main process and of its largest worker for both: memory stays flat as the input grows.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_corpus(path, docs, seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    with open(path, "w") as f:
        for i in range(docs):
            text = " ".join(rng.choice(words) for _ in range(rng.randint(50, 400)))
            f.write(json.dumps({"id": i, "text": text}) + "\n")


def make_tokenizer(directory, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with open(corpus) as f:
        texts = [json.loads(line)["text"] for line, _ in zip(f, range(2000))]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)
    tok.model.save(directory)  # vocab.json + merges.txt, for GPT2BPETokenizer


def timed(cmd, env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.perf_counter() - start, proc.stdout


# Runs a tool in this wrapper process and prints its peak RSS and that of its largest (reaped) worker.
PEAK_RSS = """
import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    if e.code:
        raise
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mib(cmd, env):
    _, out = timed([sys.executable, "-c", PEAK_RSS, *cmd[1:]], env)
    main_kib, worker_kib = next(line.split()[1:] for line in out.splitlines() if line.startswith("peak_rss_kib"))
    return int(main_kib) / 1024, int(worker_kib) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--megatron-lm", required=True, help="a Megatron-LM checkout (its tools/preprocess_data.py)")
    ap.add_argument("--docs", type=int, default=50000)
    ap.add_argument("--corpus", help="a JSONL file with a 'text' key to use (its first --docs lines) instead of "
                                     "the synthetic one, whose 5,000-word vocabulary flatters per-word caches")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tokenizer-type", default="HuggingFaceTokenizer", choices=["HuggingFaceTokenizer", "GPT2BPETokenizer"])
    ap.add_argument("--memory", action="store_true", help="also measure our peak memory at 1x and 4x the corpus")
    args = ap.parse_args()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    work = tempfile.mkdtemp(prefix="bench_preprocess_")
    corpus, tok_dir = os.path.join(work, "corpus.jsonl"), os.path.join(work, "tokenizer")
    if args.corpus:
        with open(args.corpus) as f, open(corpus, "w") as out:
            out.writelines(line for line, _ in zip(f, range(args.docs)))
        with open(corpus) as f:
            args.docs = sum(1 for _ in f)
    else:
        make_corpus(corpus, args.docs)
    make_tokenizer(tok_dir, corpus)
    size_mb = os.path.getsize(corpus) / 1e6
    if args.tokenizer_type == "HuggingFaceTokenizer":
        tokenizer_flags, megatron_flags = ["--tokenizer-model", tok_dir], []
    else:
        tokenizer_flags = ["--vocab-file", os.path.join(tok_dir, "vocab.json"),
                           "--merge-file", os.path.join(tok_dir, "merges.txt")]
        megatron_flags = ["--legacy-tokenizer"]
    common = ["--tokenizer-type", args.tokenizer_type, *tokenizer_flags, "--append-eod",
              "--workers", str(args.workers)]
    one_doc = os.path.join(work, "one_doc.jsonl")
    with open(corpus) as f, open(one_doc, "w") as out:
        out.write(next(f))
    ours = lambda out, data=corpus: [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), *common,
                                     "--input", data, "--output-prefix", out, "--overwrite"]
    megatron = lambda out, data=corpus: [sys.executable, os.path.join(args.megatron_lm, "tools", "preprocess_data.py"),
                                         *common, *megatron_flags, "--input", data, "--output-prefix", out]
    runs = {"ours": (ours, dict(os.environ, PYTHONPATH=ROOT)),
            "megatron-lm": (megatron, dict(os.environ, PYTHONPATH=args.megatron_lm))}
    # Wall time of the whole command, and of the same command on one document: the difference is the
    # time spent on the corpus itself, without the start-up (imports, tokenizer, pool) both tools pay.
    times = {name: [] for name in runs}
    startup = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, (command, env) in runs.items():
            times[name].append(timed(command(os.path.join(work, name)), env)[0])
            startup[name].append(timed(command(os.path.join(work, name + "_one"), one_doc), env)[0])
            os.remove(os.path.join(work, name + "_one_text_document.bin"))
            os.remove(os.path.join(work, name + "_one_text_document.idx"))
    docs = {}
    for name in runs:
        dataset = IndexedDataset(os.path.join(work, f"{name}_text_document"))
        docs[name] = [dataset[i].tolist() for i in range(len(dataset))]
        del dataset
    identical = docs["ours"] == docs["megatron-lm"]
    print(f"corpus: {args.docs} documents, {size_mb:.1f} MB JSONL | {args.tokenizer_type} | "
          f"workers {args.workers} | cpus {os.cpu_count()}")
    rate = {}
    for name in runs:
        wall, start = min(times[name]), min(startup[name])
        rate[name] = (args.docs - 1) / (wall - start)
        print(f"{name:>12}: {wall:6.2f} s wall (best of {len(times[name])}), {args.docs / wall:6.0f} docs/s | "
              f"start-up {start:5.2f} s | without start-up {rate[name]:6.0f} docs/s, "
              f"{rate[name] * size_mb / args.docs:5.2f} MB/s")
    print(f"speed ratio ours/megatron-lm (docs/s): {min(times['megatron-lm']) / min(times['ours']):.2f}x wall, "
          f"{rate['ours'] / rate['megatron-lm']:.2f}x without start-up | outputs identical token for token: {identical}")
    if args.memory:
        big = os.path.join(work, "corpus_x4.jsonl")
        with open(big, "w") as out:
            for _ in range(4):
                with open(corpus) as f:
                    out.writelines(f)
        env = dict(os.environ, PYTHONPATH=ROOT)
        small_rss = peak_rss_mib(ours(os.path.join(work, "mem1")), env)
        big_rss = peak_rss_mib(ours(os.path.join(work, "mem4"), big), env)
        for label, (main_mib, worker_mib) in (("1x", small_rss), ("4x", big_rss)):
            print(f"ours, {label} corpus: peak RSS main {main_mib:7.1f} MiB | largest worker {worker_mib:7.1f} MiB")
        print(f"peak RSS ratio 4x/1x: main {big_rss[0] / small_rss[0]:.3f} | worker {big_rss[1] / small_rss[1]:.3f}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
