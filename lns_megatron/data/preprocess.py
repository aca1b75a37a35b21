"""Raw text to megatron-core indexed datasets (``{prefix}_{key}_document.bin/.idx`` and ``.json``).

Command-line compatible with Megatron-LM's ``tools/preprocess_data.py``, with batched tokenization
spread over ``--workers`` processes, a bounded number of chunks in flight (memory stays flat as the
input grows), and outputs written under temporary names and renamed only on success. ``--shard I/N``
processes the I-th of N contiguous ranges of the sorted input files, so N machines split a corpus
with no coordination; tools/merge_datasets.py joins their outputs into what one run would write.
Beside each dataset goes its metadata (``lns_megatron.data.metadata``): the tokenizer, the counts,
the inputs, which the training driver checks at start.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import glob
import gzip
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import signal
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from lns_megatron.data import metadata
from lns_megatron.data.tokenizer import TOKENIZER_TYPES, build_tokenizer
from lns_megatron.files import atomic_files
from lns_megatron.signals import Interrupted, StopSignals

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
    g.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed lines (bad JSON, invalid UTF-8, a missing key), count and report them")
    g.add_argument("--shard", metavar="I/N", help="process only the I-th (0-based) of N contiguous ranges of the sorted "
                   "input files, about equal in bytes (or of the rows of --hf-dataset); merge the N outputs with "
                   "tools/merge_datasets.py")
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

class TextDocument(NamedTuple):
    """A .txt document (a file or a block of it), still bytes: decoded in the workers, like JSON lines."""
    path: str
    line: int
    data: bytes


def input_files(pattern: str) -> List[str]:
    if os.path.isdir(pattern):
        files = [os.path.join(root, f) for root, _, names in os.walk(pattern) for f in names]
    else:
        files = glob.glob(pattern)
    files = sorted(f for f in files if f.endswith(SUFFIXES))
    if not files:
        raise PreprocessError(f"--input {pattern}: no input files (expected {', '.join(SUFFIXES)})")
    return files


def parse_shard(text: Optional[str]) -> Optional[Tuple[int, int]]:
    if text is None:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise PreprocessError(f"--shard {text}: give I/N with 0 <= I < N, e.g. --shard $SLURM_ARRAY_TASK_ID/"
                              "$SLURM_ARRAY_TASK_COUNT with --array=0-(N-1)")
    return int(match.group(1)), int(match.group(2))


def shard_files(files: List[str], shard: Optional[Tuple[int, int]]) -> List[str]:
    """The shard's contiguous range of the sorted files, the N ranges as equal in bytes as whole files
    allow (at least one file each): shards 0..N-1 in order are all of them. Every shard computes the
    same cuts from the same list and sizes, so N jobs need no coordination."""
    if shard is None:
        return files
    index, count = shard
    if len(files) < count:
        raise PreprocessError(f"--shard {index}/{count}: only {len(files)} input files, fewer than the {count} shards "
                              f"(sharding splits the sorted file list); use at most {len(files)} shards")
    before = np.cumsum([0] + [max(os.path.getsize(f), 1) for f in files])  # bytes before file j
    cuts = [0]
    for k in range(1, count):
        target = k * before[-1] / count
        j = int(np.searchsorted(before, target))  # the first cut at or after the target...
        if j > 0 and target - before[j - 1] < before[j] - target:  # ...or the one before, if nearer
            j -= 1
        cuts.append(min(max(j, cuts[-1] + 1), len(files) - (count - k)))
    cuts.append(len(files))
    return files[cuts[index]:cuts[index + 1]]


class _TruncatedZstd(EOFError):
    pass


def _zstd_lines(path: str) -> Iterator[bytes]:
    """Lines of a .zst file, frame by frame. (zstandard's stream_reader returns a truncated frame's
    data, or none of it, without an error: seen here. Its decompressobj knows where a frame ends.)"""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    rest = b""
    with open(path, "rb") as f:
        frame, fed = decompressor.decompressobj(), False
        for data in iter(lambda: f.read(1 << 20), b""):
            while data:
                out, fed = frame.decompress(data), True
                if out:
                    lines = (rest + out).split(b"\n")
                    rest = lines.pop()
                    yield from lines
                if frame.eof:  # the rest may be another frame
                    data, frame, fed = frame.unused_data, decompressor.decompressobj(), False
                else:
                    data = b""
    if fed:
        raise _TruncatedZstd("the last zstd frame has no end: the file is cut short")
    if rest:
        yield rest


def _lines(path: str) -> Iterator[Tuple[int, bytes]]:
    """(line number, bytes) of a JSON-lines file, plain, .gz or .zst; a UTF-8 BOM at the start is dropped.
    A truncated or corrupt compressed stream stops the run with the file and the line it reached."""
    import zstandard

    number = 0
    try:
        if path.endswith(".zst"):
            lines = _zstd_lines(path)
        else:
            lines = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
        with contextlib.closing(lines):
            for number, line in enumerate(lines, 1):
                if number == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8):]
                yield number, line
    except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as e:
        kind = "gzip" if path.endswith(".gz") else "zstd"
        raise PreprocessError(f"{path}:{number + 1}: the {kind} stream is truncated or corrupt ({e}); nothing was written: "
                              "re-download or re-compress the file, or leave it out of --input") from None


def _parquet_records(path: str) -> Iterator[Tuple[str, object]]:
    import pyarrow
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=CHUNK_DOCS):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", record
    except pyarrow.ArrowException as e:
        raise PreprocessError(f"{path}: not a readable Parquet file after row {row} ({e}); nothing was written: "
                              "re-download or re-write the file, or leave it out of --input") from None


def _txt_records(path: str, blank_line_docs: bool) -> Iterator[Tuple[str, object]]:
    with open(path, "rb") as f:
        if not blank_line_docs:
            data = f.read()
            yield f"{path}:1", TextDocument(path, 1, data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data)
            return
        block, start = [], 1
        for number, line in enumerate(f, 1):
            if number == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if line.strip():
                if not block:
                    start = number
                block.append(line)
            elif block:
                yield f"{path}:{start}", TextDocument(path, start, b"".join(block))
                block = []
        if block:
            yield f"{path}:{start}", TextDocument(path, start, b"".join(block))


def read_records(args, files: List[str]) -> Iterator[Tuple[str, object]]:
    """Yields (location, raw): raw is a JSON line (bytes), a TextDocument or an already-parsed dict."""
    if args.hf_dataset:
        yield from _hf_records(args)
        return
    for path in files:
        if path.endswith(".parquet"):
            yield from _parquet_records(path)
        elif path.endswith(".txt"):
            yield from _txt_records(path, args.txt_blank_line_docs)
        else:
            for number, line in _lines(path):
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
    first = 0
    shard = parse_shard(args.shard)
    if shard is not None:  # contiguous rows, so that shards 0..N-1 in order are the whole split
        index, count = shard
        first = index * len(data) // count
        data = data.select(range(first, (index + 1) * len(data) // count))
    for row, record in enumerate(data, first + 1):
        yield f"{args.hf_dataset}[{args.hf_split}] row {row}", record


# ---- workers: parse and tokenize a chunk --------------------------------------------------

_tokenizer = None


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _init_worker(tokenizer_args):
    global _tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it terminates the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # so that pool.terminate() stops a worker
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # forked while the parent held them
    _tokenizer = build_tokenizer(*tokenizer_args)


@dataclass
class ChunkResult:
    docs: dict  # key -> (all tokens as one int32 array, per-document lengths); cheap to pickle
    bytes: int = 0
    empty: int = 0
    invalid: List[str] = field(default_factory=list)


class _Invalid(Exception):
    pass


NEWLINE = b"\n"


def _decode(data: bytes, where) -> str:
    """UTF-8 text; else _Invalid naming the place (``where(byte offset)`` gives it) and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Invalid(f"{where(e.start)}: invalid UTF-8 (byte 0x{data[e.start]:02x}); convert the file to UTF-8 "
                       "(e.g. iconv -f latin1 -t utf-8)") from None


def _texts(location, raw, keys):
    """(texts of one record, their UTF-8 bytes), or an error string naming the location and the reason."""
    try:
        if isinstance(raw, TextDocument):
            text = _decode(raw.data, lambda at: f"{raw.path}:{raw.line + raw.data.count(NEWLINE, 0, at)}")
            raw = {key: text for key in keys}
        elif isinstance(raw, bytes):
            raw = _decode(raw, lambda at: f"{location} (column {at + 1})")
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as e:
                return f"{location}: malformed JSON ({e.msg} at column {e.colno})"
    except _Invalid as e:
        return str(e)
    if not isinstance(raw, dict):
        return f"{location}: a JSON object was expected, got {type(raw).__name__}"
    texts, size = [], 0
    for key in keys:
        if key not in raw:
            return f"{location}: no key {key!r} (keys: {', '.join(map(str, raw)) or 'none'}); fix --json-keys"
        if not isinstance(raw[key], str):
            return f"{location}: {key!r} is a {type(raw[key]).__name__}, not a string"
        try:
            size += len(raw[key].encode("utf-8"))
        except UnicodeEncodeError as e:  # JSON can escape half a surrogate pair (\ud800), which is no text
            return f"{location}: {key!r} holds a lone surrogate U+{ord(e.object[e.start]):04X}, which is not text"
        texts.append(raw[key])
    return texts, size


def process_chunk(chunk, keys, append_eod) -> ChunkResult:
    result = ChunkResult(docs={})
    parsed = []
    for location, raw in chunk:
        texts = _texts(location, raw, keys)
        if isinstance(texts, str):
            result.invalid.append(texts)
        else:
            parsed.append(texts[0])
            result.bytes += texts[1]
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
    """(.json, .bin, .idx) of one key, in the order they are renamed into place: the .idx, which makes
    a prefix look like a dataset, last."""
    base = f"{prefix}_{key}_document"
    return metadata.metadata_path(base), base + ".bin", base + ".idx"


def check_args(args) -> Tuple[List[str], Optional[Tuple[int, int]]]:
    """Everything that can be refused before any work: (this run's input files, shard)."""
    if bool(args.input) == bool(args.hf_dataset):
        raise PreprocessError("give exactly one of --input FILES and --hf-dataset NAME_OR_DIR")
    duplicates = sorted({key for key in args.json_keys if args.json_keys.count(key) > 1})
    if duplicates:
        raise PreprocessError(f"--json-keys {' '.join(args.json_keys)}: {duplicates[0]!r} is given twice; each key "
                              "becomes one output, so name it once")
    prefix = args.output_prefix
    if not os.path.basename(prefix):
        raise PreprocessError(f"--output-prefix {prefix!r}: ends in a directory, so the outputs would be named "
                              f"'_{args.json_keys[0]}_document.bin'; add a file-name prefix, e.g. --output-prefix "
                              f"{os.path.join(prefix, 'corpus')}")
    if args.workers < 1:
        raise PreprocessError(f"--workers {args.workers}: give at least 1")
    shard = parse_shard(args.shard)
    if shard is not None and args.hf_dataset and args.hf_streaming:
        raise PreprocessError("--shard with --hf-streaming: a streamed dataset has no row count to cut into shards; "
                              "drop --hf-streaming (or shard its files with --input)")
    files = shard_files(input_files(args.input), shard) if args.input else []
    return files, shard


def _shard_record(args, shard) -> Optional[dict]:
    """Which shard this is, and of what: the merge refuses shards cut from different file lists."""
    if shard is None:
        return None
    every = input_files(args.input) if args.input else [args.hf_dataset, args.hf_config, args.hf_split]
    listing = hashlib.sha256("\n".join(f"{os.path.abspath(f)}\t{os.path.getsize(f)}" if args.input else str(f)
                                       for f in every).encode())  # the sizes decide the cuts too
    return dict(index=shard[0], count=shard[1], of_inputs=len(every) if args.input else None,
                inputs_sha256=listing.hexdigest())


def run(args, stop: StopSignals = None) -> Summary:
    """Raises :class:`Interrupted`, with nothing written, if ``stop`` records a signal before the outputs
    take their final names."""
    global _tokenizer
    stop = stop or StopSignals()
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tqdm import tqdm

    files, shard = check_args(args)
    tokenizer_args = (args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file, args.vocab_size,
                      args.eod_id)
    tokenizer = build_tokenizer(*tokenizer_args)  # fail fast on a bad tokenizer, in this process
    finals = {key: output_paths(args.output_prefix, key) for key in args.json_keys}
    existing = [p for paths in finals.values() for p in paths if os.path.exists(p)]
    if existing and not args.overwrite:
        raise PreprocessError(f"--output-prefix {args.output_prefix}: {existing[0]} exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    identity = metadata.tokenizer_identity(tokenizer)
    inputs = ([dict(path=os.path.abspath(f), bytes=os.path.getsize(f)) for f in files] if args.input else
              [dict(hf_dataset=args.hf_dataset, hf_config=args.hf_config, hf_split=args.hf_split)])
    per_key = {key: dict(documents=0, tokens=0, max_token_id=-1) for key in args.json_keys}
    summary = Summary()
    start = time.perf_counter()
    pool = None
    with atomic_files([path for key in args.json_keys for path in finals[key]]) as temp_list:
        temps = dict(zip(args.json_keys, (temp_list[i:i + 3] for i in range(0, len(temp_list), 3))))
        builders = {key: IndexedDatasetBuilder(temps[key][1], dtype=dtype) for key in args.json_keys}
        try:
            if args.workers > 1:
                # Held during the forks: a worker starts with them blocked until _init_worker sets its own handlers.
                signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
                try:
                    pool = multiprocessing.get_context("fork").Pool(args.workers, _init_worker, (tokenizer_args,))
                finally:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
                submit = lambda chunk: pool.apply_async(process_chunk, (chunk, args.json_keys, args.append_eod))
            else:
                _tokenizer = tokenizer
                submit = lambda chunk: _Done(process_chunk(chunk, args.json_keys, args.append_eod))
            in_flight = deque()
            bar = tqdm(unit="doc", desc="tokenizing", mininterval=1.0, file=sys.stderr, disable=None)

            def drain_one():
                pending = in_flight.popleft()
                while not pending.ready():  # the signal handler only records: look at it while waiting
                    pending.wait(0.2)
                    stop.check()
                result = pending.get()
                if result.invalid:
                    summary.invalid += len(result.invalid)
                    summary.first_invalid.extend(result.invalid[: 5 - len(summary.first_invalid)])
                    if not args.skip_invalid:
                        raise PreprocessError(f"{result.invalid[0]} (pass --skip-invalid to skip such lines)")
                for key, (flat, lengths) in result.docs.items():
                    tokens = torch.from_numpy(flat)
                    for begin, end in zip(np.cumsum(lengths) - lengths, np.cumsum(lengths)):
                        builders[key].add_document(tokens[begin:end], [int(end - begin)])
                    stats = per_key[key]
                    stats["documents"] += len(lengths)
                    stats["tokens"] += len(flat)
                    if len(flat):
                        stats["max_token_id"] = max(stats["max_token_id"], int(flat.max()))
                    summary.tokens += len(flat)
                    summary.documents += len(lengths)
                summary.empty += result.empty
                summary.bytes += result.bytes
                bar.update(sum(len(lengths) for _, lengths in result.docs.values()))
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{summary.bytes / elapsed / 1e6:.1f} MB/s", refresh=False)

            for chunk in _chunks(read_records(args, files), CHUNK_DOCS):
                stop.check()
                in_flight.append(submit(chunk))
                if len(in_flight) >= 2 * max(args.workers, 1):  # bounded: memory stays flat
                    drain_one()
            while in_flight:
                drain_one()
            bar.close()
        finally:
            if pool is not None:
                pool.terminate()
            for builder in builders.values():
                builder.data_file.close()
        empty_keys = [key for key, stats in per_key.items() if stats["tokens"] == 0]
        if empty_keys:
            which = f" for --json-keys {empty_keys[0]}" if len(args.json_keys) > 1 else ""
            raise PreprocessError(f"--input {args.input or args.hf_dataset}{f' --shard {args.shard}' if shard else ''}: "
                                  f"no tokens at all ({summary.empty} empty documents){which}; nothing was written")
        shard_record = _shard_record(args, shard)
        for key, builder in builders.items():
            builder.finalize(temps[key][2])
            metadata.write_metadata(temps[key][0], metadata.new_metadata(
                "tools/preprocess_data.py", identity, key, args.append_eod, dtype, inputs=inputs, shard=shard_record,
                **per_key[key]))
        stop.check()  # the last chance: past it the outputs are whole, and take their names
        for key in args.json_keys:
            summary.outputs.extend(finals[key])
    summary.seconds = time.perf_counter() - start
    return summary


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value

    def ready(self):
        return True


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    args = build_parser().parse_args(argv)
    try:
        with StopSignals() as stop:  # a scheduler's SIGTERM cleans up like Ctrl-C
            s = run(args, stop)
    except (PreprocessError, ValueError) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"preprocess_data.py: interrupted by {e}; no output was written", file=sys.stderr)
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
