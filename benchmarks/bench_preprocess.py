"""Our tools/preprocess_data.py against Megatron-LM's, on the same JSONL, tokenizer and workers.

    python benchmarks/bench_preprocess.py --megatron-lm /path/to/Megatron-LM [--docs 50000] [--workers 2]

Writes a synthetic JSONL corpus and trains a byte-level BPE tokenizer (saved as a Hugging Face
directory both tools load), runs the two tools alternately, checks that the outputs are identical
token for token, and prints documents per second and the ratio.
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
        texts = [json.loads(next(f))["text"] for _ in range(2000)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)


def timed(cmd, env):
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--megatron-lm", required=True, help="a Megatron-LM checkout (its tools/preprocess_data.py)")
    ap.add_argument("--docs", type=int, default=50000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    work = tempfile.mkdtemp(prefix="bench_preprocess_")
    corpus, tok_dir = os.path.join(work, "corpus.jsonl"), os.path.join(work, "tokenizer")
    make_corpus(corpus, args.docs)
    make_tokenizer(tok_dir, corpus)
    size_mb = os.path.getsize(corpus) / 1e6
    common = ["--input", corpus, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tok_dir,
              "--append-eod", "--workers", str(args.workers)]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    runs = {
        "ours": lambda out: ([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), *common,
                              "--output-prefix", out, "--overwrite"], dict(env, PYTHONPATH=ROOT)),
        "megatron-lm": lambda out: ([sys.executable, os.path.join(args.megatron_lm, "tools", "preprocess_data.py"),
                                     *common, "--output-prefix", out], dict(env, PYTHONPATH=args.megatron_lm)),
    }
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, make in runs.items():
            cmd, run_env = make(os.path.join(work, name))
            times[name].append(timed(cmd, run_env))
    docs = {}
    for name in runs:
        dataset = IndexedDataset(os.path.join(work, f"{name}_text_document"))
        docs[name] = [dataset[i].tolist() for i in range(len(dataset))]
        del dataset
    identical = docs["ours"] == docs["megatron-lm"]
    print(f"corpus: {args.docs} documents, {size_mb:.1f} MB JSONL | workers {args.workers} | cpus {os.cpu_count()}")
    for name, t in times.items():
        best = min(t)
        print(f"{name:>12}: {best:6.2f} s (best of {len(t)}) | {args.docs / best:8.0f} docs/s | {size_mb / best:6.2f} MB/s")
    ratio = min(times["megatron-lm"]) / min(times["ours"])
    print(f"speed ratio ours/megatron-lm (docs/s): {ratio:.2f}x | outputs identical token for token: {identical}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
