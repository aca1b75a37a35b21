"""What an indexed dataset on disk says about itself, checked before anything trusts it.

Two sources. The ``.idx`` header that megatron-core writes, validated here (header, sizes, the
``.bin`` length it implies) so that a damaged or truncated file is one clear error at start instead
of megatron's raw ``AssertionError``, or a numpy ``ValueError`` hours into training; everything
after the check is read through megatron-core's own ``IndexedDataset``. And ``{prefix}.json``, which
tools/preprocess_data.py and tools/merge_datasets.py write beside ``{prefix}.bin/.idx``: the tokenizer
(type, sha256 of its files and of its id -> token table, vocabulary size, EOD), the counts, the
largest token id, the inputs and the tool version. Megatron-LM's outputs have no such file and still
load; for them the token ids are checked on a bounded sample of the ``.bin``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
from typing import List, Optional

import numpy as np

from lns_megatron.config import ConfigError

FORMAT = "lns_megatron.indexed_dataset/1"
SUFFIX = ".json"
# megatron-core's .idx header: magic, version, dtype code, sequence count, document-index entries
# (documents + 1); then int32 lengths and int64 pointers per sequence, int64 document indices.
_HEADER = struct.Struct("<9sQBQQ")
_MAGIC = b"MMIDIDX\x00\x00"
SAMPLE_WINDOWS, SAMPLE_WIDTH = 64, 4096  # tokens read to check ids without metadata: 256k, any dataset size


class DataError(ConfigError):
    """A dataset that cannot be used: the message names the prefix, the problem and the fix."""


def metadata_path(prefix: str) -> str:
    return prefix + SUFFIX


# ---- the tokenizer's identity ---------------------------------------------------------------

def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_identity(tokenizer) -> dict:
    """Type, files (name -> sha256), sha256 of the id -> token table, vocabulary size and EOD."""
    return dict(type=tokenizer.kind, files={os.path.basename(p): _sha256_file(p) for p in tokenizer.files},
                vocab_sha256=tokenizer.vocab_digest(), vocab_size=tokenizer.vocab_size, eod=tokenizer.eod)


def describe_tokenizer(identity: dict) -> str:
    files = ", ".join(f"{name} sha256 {digest[:12]}" for name, digest in identity["files"].items())
    return f"{identity['type']}{f' ({files})' if files else ''}, vocabulary {identity['vocab_size']}"


def tokenizer_mismatch(expected: dict, actual: dict) -> Optional[str]:
    """Why ids made by ``expected`` do not mean the same tokens under ``actual``; None when they do.

    Compares the id -> token tables, not the files: a tokenizer saved again (other bytes, same
    vocabulary) still matches. A NullTokenizer has no table, so only the sizes can be compared."""
    if expected["vocab_size"] != actual["vocab_size"]:
        return f"vocabulary {expected['vocab_size']} vs {actual['vocab_size']}"
    if expected.get("vocab_sha256") and actual.get("vocab_sha256") and expected["vocab_sha256"] != actual["vocab_sha256"]:
        return (f"same size, different tokens (id -> token table sha256 {expected['vocab_sha256'][:12]} vs "
                f"{actual['vocab_sha256'][:12]})")
    return None


# ---- the .bin/.idx pair -----------------------------------------------------------------------

def open_indexed(prefix: str, label: str, multimodal: bool = False):
    """megatron-core's ``IndexedDataset`` of ``prefix``, after checking what its reader trusts blindly.
    ``label`` starts every error (e.g. ``--data-path data/corpus_text_document``)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise DataError(f"{label}: {path} not found; give the --output-prefix of tools/preprocess_data.py plus "
                            "_text_document (e.g. data/corpus_text_document)")
    rerun = "re-run tools/preprocess_data.py (or copy the dataset again)"
    idx_size = os.path.getsize(idx_path)
    if idx_size < _HEADER.size:
        raise DataError(f"{label}: {idx_path} is damaged: {idx_size} bytes, shorter than megatron's "
                        f"{_HEADER.size}-byte header; {rerun}")
    with open(idx_path, "rb") as f:
        magic, version, code, sequences, doc_entries = _HEADER.unpack(f.read(_HEADER.size))
        if magic != _MAGIC:
            raise DataError(f"{label}: {idx_path} is not a megatron-core index (it starts with {magic[:8]!r}, not "
                            f"{_MAGIC[:7]!r}); {rerun}")
        if version != 1 or code not in {d.value for d in DType}:
            raise DataError(f"{label}: {idx_path} is damaged: header version {version}, token type code {code} "
                            f"(megatron-core writes version 1 and codes 1-8); {rerun}")
        expected = _HEADER.size + sequences * (4 + 8) + doc_entries * 8
        if doc_entries == 0 or idx_size not in (expected, expected + sequences * multimodal):
            raise DataError(f"{label}: {idx_path} is damaged: {idx_size} bytes where its header describes {expected} "
                            f"({sequences} sequences, {max(doc_entries - 1, 0)} documents); {rerun}")
        f.seek(_HEADER.size + sequences * 12)
        first_doc = struct.unpack("<q", f.read(8))[0]
        f.seek(_HEADER.size + sequences * 12 + (doc_entries - 1) * 8)
        last_doc = struct.unpack("<q", f.read(8))[0]
        implied = 0  # the .bin size the last sequence's pointer and length imply
        if sequences:
            f.seek(_HEADER.size + (sequences - 1) * 4)
            last_length = struct.unpack("<i", f.read(4))[0]
            f.seek(_HEADER.size + sequences * 4 + (sequences - 1) * 8)
            implied = struct.unpack("<q", f.read(8))[0] + last_length * DType.size(code)
    if first_doc != 0 or last_doc != sequences:
        raise DataError(f"{label}: {idx_path} is damaged: its document index runs {first_doc}..{last_doc}, not "
                        f"0..{sequences}; {rerun}")
    bin_size = os.path.getsize(bin_path)
    if bin_size != implied:
        raise DataError(f"{label}: {bin_path} holds {bin_size} bytes, its .idx describes {implied} "
                        f"({'truncated' if bin_size < implied else 'longer: written by another run'}); {rerun}")
    if bin_size == 0:  # megatron's reader cannot memory-map an empty file
        raise DataError(f"{label}: the dataset holds no tokens; re-run tools/preprocess_data.py on non-empty text")
    dataset = IndexedDataset(prefix, multimodal=multimodal, mmap=True)
    index = dataset.index
    itemsize = index.dtype_size
    # The pointers must step by the lengths; checked at evenly spaced places (bounded work).
    at = np.unique(np.linspace(0, max(sequences - 2, 0), min(sequences - 1, 256)).astype(np.int64)) if sequences > 1 \
        else np.zeros(0, np.int64)
    steps = index.sequence_pointers[at + 1] - index.sequence_pointers[at]
    if int(index.sequence_pointers[0] if sequences else 0) != 0 or (index.sequence_lengths[at] < 0).any() or \
            (steps != index.sequence_lengths[at].astype(np.int64) * itemsize).any():
        raise DataError(f"{label}: {idx_path} is damaged: its sequence pointers do not follow the lengths; {rerun}")
    return dataset


def num_tokens(dataset) -> int:
    return os.path.getsize(dataset.path_prefix + ".bin") // dataset.index.dtype_size


def tokens_in_documents(dataset, first: int, last: int) -> int:
    """Tokens of documents [first, last), from the pointers alone (no pass over the lengths)."""
    sequences = dataset.document_indices[[first, last]]
    pointers = [int(dataset.index.sequence_pointers[s]) if s < len(dataset) else
                os.path.getsize(dataset.path_prefix + ".bin") for s in sequences]
    return (pointers[1] - pointers[0]) // dataset.index.dtype_size


def sampled_token_range(dataset):
    """(min, max) token id over SAMPLE_WINDOWS evenly spaced windows of the .bin, via megatron's reader."""
    total, dtype, itemsize = num_tokens(dataset), dataset.index.dtype, dataset.index.dtype_size
    if total == 0:
        return 0, -1
    width = min(SAMPLE_WIDTH, total)
    starts = np.unique(np.linspace(0, total - width, SAMPLE_WINDOWS).astype(np.int64))
    windows = [dataset.bin_reader.read(dtype=dtype, count=width, offset=int(s) * itemsize) for s in starts]
    return min(int(w.min()) for w in windows), max(int(w.max()) for w in windows)


# ---- {prefix}.json ----------------------------------------------------------------------------

def new_metadata(tool: str, identity: dict, json_key: Optional[str], append_eod: Optional[bool], dtype, documents: int,
                 tokens: int, max_token_id: int, inputs: List[dict], **extra) -> dict:
    from lns_megatron import __version__

    return dict(format=FORMAT, tool=f"lns_megatron {__version__} {tool}",
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                tokenizer=identity, json_key=json_key, append_eod=append_eod, dtype=np.dtype(dtype).name,
                documents=documents, tokens=tokens, max_token_id=max_token_id, inputs=inputs, **extra)


def write_metadata(path: str, metadata: dict) -> None:
    with open(path, "w") as f:
        json.dump(metadata, f, indent=1)
        f.write("\n")


def read_metadata(prefix: str, label: str) -> Optional[dict]:
    """The metadata beside ``prefix``, or None (Megatron-LM's outputs have none)."""
    path = metadata_path(prefix)
    if not os.path.isfile(path):
        return None
    fix = "delete it to use the dataset without its metadata, or re-run tools/preprocess_data.py"
    try:
        with open(path) as f:
            metadata = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{label}: {path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise DataError(f"{label}: {path} is not lns_megatron dataset metadata (format "
                        f"{metadata.get('format') if isinstance(metadata, dict) else None!r}, expected {FORMAT!r}); {fix}")
    return metadata


def check_metadata_matches(metadata: dict, dataset, label: str) -> None:
    """The metadata describes these very .bin/.idx files (not ones copied over them later)."""
    found = dict(documents=len(dataset.document_indices) - 1, tokens=num_tokens(dataset),
                 dtype=np.dtype(dataset.index.dtype).name)
    for key, value in found.items():
        if metadata.get(key) != value:
            raise DataError(f"{label}: {metadata_path(dataset.path_prefix)} describes {metadata.get(key)} {key}, the "
                            f".bin/.idx hold {value}: the files were replaced after it was written; re-run "
                            "tools/preprocess_data.py, or delete the .json to use the files without it")


def check_token_ids(dataset, metadata: Optional[dict], tokenizer, label: str) -> None:
    """Every id is a token of ``tokenizer`` (exact from the metadata, else on a bounded sample), and the
    documents end with its EOD (from the metadata)."""
    fix = "prepare it with this tokenizer (tools/preprocess_data.py), or train with the tokenizer it was prepared with"
    if metadata is not None:
        mismatch = tokenizer_mismatch(metadata["tokenizer"], tokenizer_identity(tokenizer))
        if mismatch:
            raise DataError(f"{label}: prepared with {describe_tokenizer(metadata['tokenizer'])}, this run's tokenizer is "
                            f"{describe_tokenizer(tokenizer_identity(tokenizer))} ({mismatch}); {fix}")
        if metadata["tokenizer"].get("eod") != tokenizer.eod:
            raise DataError(f"{label}: prepared with EOD {metadata['tokenizer'].get('eod')}, the run was trained with "
                            f"EOD {tokenizer.eod}; use data prepared with --eod-id {tokenizer.eod}")
        low, high = 0, metadata["max_token_id"]
        where = "its metadata records"
    else:
        low, high = sampled_token_range(dataset)
        where = "a sample of its .bin holds"
    if low < 0 or high >= tokenizer.vocab_size:
        raise DataError(f"{label}: {where} token id {high if high >= tokenizer.vocab_size else low}, outside this run's "
                        f"{tokenizer.kind} vocabulary of {tokenizer.vocab_size}; {fix}")
