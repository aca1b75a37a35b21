"""tools/preprocess_data.py against the bare tokenizer engine and Megatron-LM's tool, and --shard scaling.

    python benchmarks/bench_preprocess.py [--megatron-lm /path/to/Megatron-LM] [--text-corpus-mb 110 | --docs 50000 |
        --corpus FILE.jsonl] [--workers 2] [--shards 1,2,4] [--tokenizer-type HuggingFaceTokenizer|GPT2BPETokenizer]
        [--memory]

The corpus: --text-corpus-mb N assembles real text on this machine (every .py, .md, .rst and .txt file
of the Python installation's site-packages, in sorted path order, one document per file, until N MB:
rebuilt the same from the same installed packages); --docs N writes a synthetic one; --corpus takes a
JSONL file with a 'text' key. A byte-level BPE tokenizer (8k) is trained on its first 5 MB and saved
both as a Hugging Face directory and as GPT-2 style vocab.json + merges.txt, which all tools load.

In one script, alternating, on the same input, tokenizer and worker count:
- ours: tools/preprocess_data.py; its own "seconds" (the processing, after imports and tokenizer);
- the engine: a bare loop of Hugging Face `encode_batch_fast` over the same JSON lines, in as many
  processes (json.loads + encode, nothing written): the floor for this tokenizer. Printed: our
  throughput as a fraction of the engine's (goal >= 0.9);
- Megatron-LM's tools/preprocess_data.py (with --megatron-lm: a checkout, e.g. core_v0.16.1), outputs
  checked identical to ours token for token; the ratio of wall times and of rates without start-up
  (each tool's wall time on a one-document corpus subtracted). Its GPT2BPETokenizer runs with
  --legacy-tokenizer (the default fetches "gpt2" from the Hugging Face Hub). Megatron-LM's tool imports
  `triton` through megatron.training; where triton is not installed, the run stubs the one module that
  needs it (GPU kernels the data tool never calls), in memory, and changes no file.
- --shards 1,2,4: the corpus cut into 32 files of as many lines (uneven in bytes, as real dumps are);
  for each N, the N shards run one after another, each with --workers (what each of N machines would
  do), then tools/merge_datasets.py. Printed per N: the slowest shard, the merge, their sum (the wall
  time on N such machines), and the sum over shards (the work, start-ups included); the merged output
  is checked byte-identical to N=1.

--memory also runs our tool on the corpus and on a corpus 4 times larger and prints the peak resident
memory of its main process and of its largest worker for both: memory stays flat as the input grows.
"""

import argparse
import filecmp
import json
import os
import random
import re
import resource
import subprocess
import sys
import sysconfig
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


def make_text_corpus(path, megabytes):
    """Real text: the site-packages .py/.md/.rst/.txt files, sorted by path, one document each."""
    root = sysconfig.get_paths()["purelib"]
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                   if f.endswith((".py", ".md", ".rst", ".txt")))
    written = docs = 0
    with open(path, "w") as out:
        for name in files:
            try:
                with open(name, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip() and len(text) < 1_000_000:
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                written, docs = written + len(line.encode()), docs + 1
                if written >= megabytes * 1e6:
                    break
    return docs


def make_tokenizer(directory, corpus):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts, size = [], 0
    with open(corpus) as f:
        for line in f:  # the first 5 MB
            texts.append(json.loads(line)["text"])
            size += len(line)
            if size > 5e6:
                break
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=8000, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(directory)
    tok.model.save(directory)  # vocab.json + merges.txt, for GPT2BPETokenizer


def timed_cpu(cmd, env):
    """(wall seconds, CPU seconds of the command and all its processes, stdout). On a machine shared with
    other work the CPU seconds are the steadier measure of what a tool costs."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, proc.stdout


def timed(cmd, env):
    wall, _, stdout = timed_cpu(cmd, env)
    return wall, stdout


# The bare engine: JSON lines -> encode_batch_fast in `workers` processes, chunks of 1,024 as ours.
ENGINE = """
import json, multiprocessing, sys, time
from tokenizers import Tokenizer
path, tokenizer_file, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])

def init():
    global tok
    tok = Tokenizer.from_file(tokenizer_file)

def encode(lines):
    texts = [json.loads(line)["text"] for line in lines]
    return sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))

def chunks():
    with open(path, "rb") as f:
        chunk = []
        for line in f:
            chunk.append(line)
            if len(chunk) == 1024:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

start = time.perf_counter()
if workers > 1:
    with multiprocessing.get_context("fork").Pool(workers, init) as pool:
        tokens = sum(pool.imap(encode, chunks()))
else:
    init()
    tokens = sum(map(encode, chunks()))
print("engine_seconds", time.perf_counter() - start, "tokens", tokens)
"""

# Megatron-LM's tool imports triton (megatron.training -> batch-invariant GPU kernels) only to define
# kernels its data tool never runs; without triton, that one module is stubbed here, in memory.
MEGATRON_LM = """
import runpy, sys, types
try:
    import triton  # noqa: F401
except ImportError:
    stub = types.ModuleType("megatron.core.transformer.custom_layers.batch_invariant_kernels")
    stub.enable_batch_invariant_mode = None
    sys.modules[stub.__name__] = stub
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def internal_seconds(stdout):
    return float(re.search(r"\| seconds: ([0-9.]+) \|", stdout).group(1))


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


def split_corpus(corpus, directory, parts):
    """The corpus as `parts` files of contiguous lines (in name order, they are the corpus)."""
    os.makedirs(directory)
    with open(corpus) as f:
        lines = f.readlines()
    for i in range(parts):
        with open(os.path.join(directory, f"part_{i:02d}.jsonl"), "w") as out:
            out.writelines(lines[i * len(lines) // parts:(i + 1) * len(lines) // parts])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--megatron-lm", help="a Megatron-LM checkout (its tools/preprocess_data.py), e.g. core_v0.16.1")
    ap.add_argument("--docs", type=int, default=50000, help="synthetic documents (without --corpus/--text-corpus-mb)")
    ap.add_argument("--corpus", help="a JSONL file with a 'text' key to use (its first --docs lines) instead of "
                                     "the synthetic one, whose 5,000-word vocabulary flatters per-word caches")
    ap.add_argument("--text-corpus-mb", type=float, help="assemble this many MB of real text from site-packages")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shards", default="", help="comma-separated shard counts to time, e.g. 1,2,4")
    ap.add_argument("--tokenizer-type", default="HuggingFaceTokenizer", choices=["HuggingFaceTokenizer", "GPT2BPETokenizer"])
    ap.add_argument("--memory", action="store_true", help="also measure our peak memory at 1x and 4x the corpus")
    return ap


def main():
    args = build_parser().parse_args()
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    work = tempfile.mkdtemp(prefix="bench_preprocess_")
    corpus, tok_dir = os.path.join(work, "corpus.jsonl"), os.path.join(work, "tokenizer")
    if args.text_corpus_mb:
        args.docs = make_text_corpus(corpus, args.text_corpus_mb)
        kind = "site-packages text"
    elif args.corpus:
        with open(args.corpus) as f, open(corpus, "w") as out:
            out.writelines(line for line, _ in zip(f, range(args.docs)))
        with open(corpus) as f:
            args.docs = sum(1 for _ in f)
        kind = os.path.basename(args.corpus)
    else:
        make_corpus(corpus, args.docs)
        kind = "synthetic"
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
    ours_env = dict(os.environ, PYTHONPATH=ROOT)
    ours = lambda out, data=corpus, *extra: [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), *common,
                                             "--input", data, "--output-prefix", out, "--overwrite", *extra]
    engine = [sys.executable, "-c", ENGINE, corpus, os.path.join(tok_dir, "tokenizer.json"), str(args.workers)]
    runs = {"ours": (ours, ours_env)}
    if args.megatron_lm:
        megatron = lambda out, data=corpus: [sys.executable, "-c", MEGATRON_LM,
                                             os.path.join(args.megatron_lm, "tools", "preprocess_data.py"),
                                             *common, *megatron_flags, "--input", data, "--output-prefix", out]
        runs["megatron-lm"] = (megatron, dict(os.environ, PYTHONPATH=args.megatron_lm))
    # Wall time of the whole command, and of the same command on one document: the difference is the
    # time spent on the corpus itself, without the start-up (imports, tokenizer, pool) both tools pay.
    times = {name: [] for name in runs}
    startup = {name: [] for name in runs}
    cpu = {name: [] for name in [*runs, "engine"]}
    startup_cpu = {name: [] for name in runs}
    ours_seconds, engine_seconds, engine_wall = [], [], []
    for _ in range(args.repeats):
        for name, (command, env) in runs.items():
            wall, seconds, out = timed_cpu(command(os.path.join(work, name)), env)
            times[name].append(wall)
            cpu[name].append(seconds)
            if name == "ours":
                ours_seconds.append(internal_seconds(out))
                wall, seconds, out = timed_cpu(engine, os.environ)
                engine_wall.append(wall)
                cpu["engine"].append(seconds)
                engine_seconds.append(float(out.split()[1]))
                engine_tokens = int(out.split()[3])
            wall, seconds, _ = timed_cpu(command(os.path.join(work, name + "_one"), one_doc), env)
            startup[name].append(wall)
            startup_cpu[name].append(seconds)
            os.remove(os.path.join(work, name + "_one_text_document.bin"))
            os.remove(os.path.join(work, name + "_one_text_document.idx"))
    docs = {}
    for name in runs:
        dataset = IndexedDataset(os.path.join(work, f"{name}_text_document"))
        docs[name] = [dataset[i].tolist() for i in range(len(dataset))]
        del dataset
    print(f"corpus: {kind}, {args.docs} documents, {size_mb:.1f} MB JSONL | {args.tokenizer_type} | "
          f"workers {args.workers} | cpus {os.cpu_count()} | repeats {args.repeats} (best taken), run alternately")
    rate = {}
    for name in runs:
        wall, start = min(times[name]), min(startup[name])
        rate[name] = (args.docs - 1) / (wall - start)
        print(f"{name:>12}: {wall:6.2f} s wall, {args.docs / wall:6.0f} docs/s | start-up {start:5.2f} s | "
              f"without start-up {rate[name]:6.0f} docs/s, {rate[name] * size_mb / args.docs:5.2f} MB/s")
    ours_tokens = sum(map(len, docs["ours"])) - len(docs["ours"])  # without the appended EOD
    print(f"{'engine':>12}: {min(engine_wall):6.2f} s wall, {min(engine_seconds):6.2f} s encoding "
          f"(bare encode_batch_fast, {args.workers} processes) | same tokens as ours: {engine_tokens == ours_tokens}")
    print(f"ours / engine throughput: {min(engine_seconds) / min(ours_seconds):.3f} (ours {min(ours_seconds):.2f} s "
          f"processing vs the engine's {min(engine_seconds):.2f} s; goal >= 0.9)")
    work_cpu = {name: min(cpu[name]) - (min(startup_cpu[name]) if name in startup_cpu else 0) for name in cpu}
    print("CPU seconds, all processes (without start-up): "
          + " | ".join(f"{name} {min(cpu[name]):.1f} ({work_cpu[name]:.1f})" for name in cpu)
          + f" | ours / engine throughput by CPU: {work_cpu['engine'] / work_cpu['ours']:.3f}"
          + (f" | ours / megatron-lm by CPU: {work_cpu['megatron-lm'] / work_cpu['ours']:.2f}x" if args.megatron_lm else ""))
    identical = True
    if args.megatron_lm:
        identical = docs["ours"] == docs["megatron-lm"]
        print(f"speed ratio ours/megatron-lm (docs/s): {min(times['megatron-lm']) / min(times['ours']):.2f}x wall, "
              f"{rate['ours'] / rate['megatron-lm']:.2f}x without start-up | outputs identical token for token: "
              f"{identical}")
    if args.shards:
        split = os.path.join(work, "split")
        split_corpus(corpus, split, 32)
        reference = None
        for count in map(int, args.shards.split(",")):
            shard_dir = os.path.join(work, f"shards_{count}")
            runs_out = [timed_cpu(ours(os.path.join(shard_dir, f"s{i:03d}"), split, "--shard", f"{i}/{count}"),
                                  ours_env) for i in range(count)]
            walls, cpus = [wall for wall, _, _ in runs_out], [c for _, c, _ in runs_out]
            shard_mb = [int(re.search(r"\| bytes: (\d+) \|", out).group(1)) / 1e6 for _, _, out in runs_out]
            merged = os.path.join(work, f"merged_{count}")
            merge_wall, merge_cpu, _ = timed_cpu([sys.executable, os.path.join(ROOT, "tools", "merge_datasets.py"),
                                                  "--input", shard_dir, "--output-prefix", merged], ours_env)
            same = reference is None or all(filecmp.cmp(merged + e, reference + e, shallow=False) for e in (".bin", ".idx"))
            reference = reference or merged
            identical &= same
            print(f"shards {count:>2}: slowest shard {max(walls):6.2f} s + merge {merge_wall:5.2f} s = "
                  f"{max(walls) + merge_wall:6.2f} s on {count} machine(s) | sum over shards {sum(walls):6.2f} s | "
                  f"CPU seconds: largest shard {max(cpus):6.1f}, merge {merge_cpu:4.1f}, all shards {sum(cpus):6.1f} | "
                  f"merged output identical to 1 shard: {same} | text per shard "
                  f"{', '.join(f'{mb:.0f}' for mb in shard_mb)} MB")
    if args.memory:
        big = os.path.join(work, "corpus_x4.jsonl")
        with open(big, "w") as out:
            for _ in range(4):
                with open(corpus) as f:
                    out.writelines(f)
        small_rss = peak_rss_mib(ours(os.path.join(work, "mem1")), ours_env)
        big_rss = peak_rss_mib(ours(os.path.join(work, "mem4"), big), ours_env)
        for label, (main_mib, worker_mib) in (("1x", small_rss), ("4x", big_rss)):
            print(f"ours, {label} corpus: peak RSS main {main_mib:7.1f} MiB | largest worker {worker_mib:7.1f} MiB")
        print(f"peak RSS ratio 4x/1x: main {big_rss[0] / small_rss[0]:.3f} | worker {big_rss[1] / small_rss[1]:.3f}")
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
