"""Raw text to megatron-core indexed datasets (``{prefix}_{key}_document.bin/.idx``).

Command-line compatible with Megatron-LM's ``tools/preprocess_data.py``, with batched tokenization
spread over ``--workers`` processes, a bounded number of chunks in flight (memory stays flat as the
input grows), and outputs written under temporary names and renamed only on success.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import itertools
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, List, Tuple

import numpy as np

from lns_megatron.data.tokenizer import TOKENIZER_TYPES, build_tokenizer

CHUNK_DOCS = 1024
SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".parquet", ".txt")


class PreprocessError(ValueError):
    """Bad input: the message names the input, the place and the fix."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="preprocess_data.py", description=__doc__.splitlines()[0])
    g = p.add_argument_group("input")
    g.add_argument("--input", help="a file, a glob or a directory of .jsonl/.json(.gz/.zst), .parquet or .txt files")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="keys to extract (one output per key)")
    g.add_argument("--keep-newlines", action="store_true", help="accepted for compatibility; newlines are always kept")
    g.add_argument("--txt-blank-line-docs", action="store_true",
                   help=".txt: one document per blank-line-separated block (default: one per file)")
    g.add_argument("--hf-dataset", help="a Hugging Face dataset name or a local save_to_disk directory")
    g.add_argument("--hf-config", default=None)
    g.add_argument("--hf-split", default="train")
    g.add_argument("--hf-streaming", action="store_true")
    g.add_argument("--skip-invalid", action="store_true", help="skip malformed lines, count and report them")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    g.add_argument("--eod-id", type=int, default=None, help="end-of-document id when the tokenizer has none")
    g.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True)
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1)
    g.add_argument("--log-interval", type=int, default=1000, help="progress refresh, in documents")
    return p


# ---- reading: (location, record) pairs, streamed --------------------------------------------

def input_files(pattern: str) -> List[str]:
    if os.path.isdir(pattern):
        files = [os.path.join(root, f) for root, _, names in os.walk(pattern) for f in names]
    else:
        files = glob.glob(pattern)
    files = sorted(f for f in files if f.endswith(SUFFIXES))
    if not files:
        raise PreprocessError(f"--input {pattern}: no input files (expected {', '.join(SUFFIXES)})")
    return files


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if path.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def read_records(args) -> Iterator[Tuple[str, object]]:
    """Yields (location, raw) where raw is a JSON line (str) or an already-parsed dict."""
    if args.hf_dataset:
        yield from _hf_records(args)
        return
    for path in input_files(args.input):
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            row = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_DOCS):
                for record in batch.to_pylist():
                    row += 1
                    yield f"{path}:row {row}", record
        elif path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                if not args.txt_blank_line_docs:
                    yield f"{path}:1", {key: f.read() for key in args.json_keys}
                    continue
                block, start = [], 1
                for number, line in enumerate(f, 1):
                    if line.strip():
                        if not block:
                            start = number
                        block.append(line)
                    elif block:
                        yield f"{path}:{start}", {key: "".join(block) for key in args.json_keys}
                        block = []
                if block:
                    yield f"{path}:{start}", {key: "".join(block) for key in args.json_keys}
        else:
            with _open_text(path) as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield f"{path}:{number}", line


def _hf_records(args):
    import datasets

    if os.path.isdir(args.hf_dataset) and os.path.exists(os.path.join(args.hf_dataset, "dataset_dict.json")):
        data = datasets.load_from_disk(args.hf_dataset)[args.hf_split]
    elif os.path.isdir(args.hf_dataset) and os.path.exists(os.path.join(args.hf_dataset, "state.json")):
        data = datasets.load_from_disk(args.hf_dataset)
    else:
        data = datasets.load_dataset(args.hf_dataset, args.hf_config, split=args.hf_split, streaming=args.hf_streaming)
    for row, record in enumerate(data, 1):
        yield f"{args.hf_dataset}[{args.hf_split}] row {row}", record


# ---- workers: parse and tokenize a chunk --------------------------------------------------

_tokenizer = None


def _init_worker(tokenizer_args):
    global _tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it terminates the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # so that pool.terminate() stops a worker
    _tokenizer = build_tokenizer(*tokenizer_args)


@dataclass
class ChunkResult:
    docs: dict  # key -> (all tokens as one int32 array, per-document lengths); cheap to pickle
    bytes: int = 0
    empty: int = 0
    invalid: List[str] = field(default_factory=list)


def _texts(location, raw, keys):
    """The texts of one record, or an error string naming the location and the reason."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            return f"{location}: malformed JSON ({e.msg} at column {e.colno})"
    if not isinstance(raw, dict):
        return f"{location}: a JSON object was expected, got {type(raw).__name__}"
    texts = []
    for key in keys:
        if key not in raw:
            return f"{location}: no key {key!r} (keys: {', '.join(map(str, raw)) or 'none'}); fix --json-keys"
        if not isinstance(raw[key], str):
            return f"{location}: {key!r} is a {type(raw[key]).__name__}, not a string"
        texts.append(raw[key])
    return texts


def process_chunk(chunk, keys, append_eod) -> ChunkResult:
    result = ChunkResult(docs={})
    parsed = []
    for location, raw in chunk:
        texts = _texts(location, raw, keys)
        if isinstance(texts, str):
            result.invalid.append(texts)
        else:
            parsed.append(texts)
            result.bytes += sum(len(t.encode("utf-8")) for t in texts)
    for i, key in enumerate(keys):
        docs = [ids for ids in _tokenizer.tokenize_batch([texts[i] for texts in parsed]) if ids]
        result.empty += len(parsed) - len(docs)
        if append_eod:
            docs = [ids + [_tokenizer.eod] for ids in docs]
        lengths = np.array([len(ids) for ids in docs], dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int32, count=int(lengths.sum()))
        result.docs[key] = (flat, lengths)
    return result


def _chunks(records, size):
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- the run ------------------------------------------------------------------------------

@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    empty: int = 0
    invalid: int = 0
    first_invalid: List[str] = field(default_factory=list)
    seconds: float = 0.0
    outputs: List[str] = field(default_factory=list)


def output_paths(prefix, key):
    base = f"{prefix}_{key}_document"
    return base + ".bin", base + ".idx"


def run(args) -> Summary:
    global _tokenizer
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    if bool(args.input) == bool(args.hf_dataset):
        raise PreprocessError("give exactly one of --input FILES and --hf-dataset NAME_OR_DIR")
    tokenizer_args = (args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size,
                      args.eod_id)
    tokenizer = build_tokenizer(*tokenizer_args)  # fail fast on a bad tokenizer, in this process
    finals = {key: output_paths(args.output_prefix, key) for key in args.json_keys}
    existing = [p for paths in finals.values() for p in paths if os.path.exists(p)]
    if existing and not args.overwrite:
        raise PreprocessError(f"--output-prefix {args.output_prefix}: {existing[0]} exists; pass --overwrite to replace it")
    if args.input:
        input_files(args.input)  # a clear error before anything is written
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    temps = {key: (bin_path + tag, idx_path + tag) for key, (bin_path, idx_path) in finals.items()}
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builders = {key: IndexedDatasetBuilder(temps[key][0], dtype=dtype) for key in args.json_keys}
    summary = Summary()
    start = time.perf_counter()
    pool = None
    try:
        if args.workers > 1:
            pool = multiprocessing.get_context("fork").Pool(args.workers, _init_worker, (tokenizer_args,))
            submit = lambda chunk: pool.apply_async(process_chunk, (chunk, args.json_keys, args.append_eod))
        else:
            _tokenizer = tokenizer
            submit = lambda chunk: _Done(process_chunk(chunk, args.json_keys, args.append_eod))
        in_flight = deque()
        bar = tqdm(unit="doc", desc="tokenizing", mininterval=1.0, file=sys.stderr, disable=None)

        def drain_one():
            result = in_flight.popleft().get()
            if result.invalid:
                summary.invalid += len(result.invalid)
                summary.first_invalid.extend(result.invalid[: 5 - len(summary.first_invalid)])
                if not args.skip_invalid:
                    raise PreprocessError(f"{result.invalid[0]} (pass --skip-invalid to skip such lines)")
            for key, (flat, lengths) in result.docs.items():
                tokens = torch.from_numpy(flat)
                for begin, end in zip(np.cumsum(lengths) - lengths, np.cumsum(lengths)):
                    builders[key].add_document(tokens[begin:end], [int(end - begin)])
                summary.tokens += len(flat)
                summary.documents += len(lengths)
            summary.empty += result.empty
            summary.bytes += result.bytes
            bar.update(sum(len(lengths) for _, lengths in result.docs.values()))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{summary.bytes / elapsed / 1e6:.1f} MB/s", refresh=False)

        for chunk in _chunks(read_records(args), CHUNK_DOCS):
            if _interrupted:  # one raised inside an at-fork hook or a finalizer is swallowed there
                raise KeyboardInterrupt
            in_flight.append(submit(chunk))
            if len(in_flight) >= 2 * max(args.workers, 1):  # bounded: memory stays flat
                drain_one()
        while in_flight:
            drain_one()
        if _interrupted:
            raise KeyboardInterrupt
        bar.close()
        if summary.tokens == 0:
            raise PreprocessError(f"--input {args.input or args.hf_dataset}: no tokens at all "
                                  f"({summary.empty} empty documents); nothing was written")
        for key, builder in builders.items():
            builder.finalize(temps[key][1])
        for key in args.json_keys:  # .bin first: a lone .bin never looks like a dataset
            for temp, final in zip(temps[key], finals[key]):
                os.replace(temp, final)
            summary.outputs.extend(finals[key])
    finally:
        if pool is not None:
            pool.terminate()
        for key in args.json_keys:
            for temp in temps[key]:
                if os.path.exists(temp):
                    os.remove(temp)
    summary.seconds = time.perf_counter() - start
    return summary


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


_interrupted = False


def _interrupt(signum, frame):
    global _interrupted
    _interrupted = True  # remembered: the exception below can land where Python swallows it
    raise KeyboardInterrupt


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    args = build_parser().parse_args(argv)
    global _interrupted
    _interrupted = False
    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's SIGTERM cleans up like Ctrl-C
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where a parent chose to ignore it
        signal.signal(signal.SIGINT, _interrupt)
    try:
        s = run(args)
    except (PreprocessError, ValueError) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preprocess_data.py: interrupted; no output was written", file=sys.stderr)
        return 130
    rate = s.documents / max(s.seconds, 1e-9)
    print(f"documents: {s.documents} | tokens: {s.tokens} | bytes: {s.bytes} | seconds: {s.seconds:.2f} | "
          f"{rate:.0f} docs/s, {s.bytes / max(s.seconds, 1e-9) / 1e6:.2f} MB/s | empty skipped: {s.empty} | "
          f"invalid skipped: {s.invalid}")
    for location in s.first_invalid:
        print(f"  skipped: {location}")
    for path in s.outputs:
        print(f"wrote {path}")
    return 0
