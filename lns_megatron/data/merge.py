"""Join indexed datasets into one: Megatron-LM's ``tools/merge_datasets.py``, checked and crash-safe.

Every ``PREFIX.bin/.idx`` pair in ``--input DIR`` is appended, through megatron-core's
``IndexedDatasetBuilder.add_index``, to ``--output-prefix``. Shards written by
``tools/preprocess_data.py --shard I/N`` are taken in shard order, and only when all N are there, cut
from the same list of input files and prepared with the same tokenizer: the merge is then, byte for
byte, the ``.bin/.idx`` that one run over all the files writes. Datasets without shard metadata
(Megatron-LM's, or separate runs) are taken in name order, as Megatron-LM's tool does.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass, field
from typing import List

from lns_megatron.data import metadata
from lns_megatron.data.metadata import DataError
from lns_megatron.files import atomic_files
from lns_megatron.signals import Interrupted, StopSignals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="merge_datasets.py", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="directory holding the .bin/.idx pairs (and .json metadata) to merge")
    p.add_argument("--output-prefix", required=True, help="path of the merged .bin/.idx/.json, without suffix")
    p.add_argument("--multimodal", action="store_true", help="the datasets carry per-sequence modes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


@dataclass
class MergeSummary:
    inputs: List[str] = field(default_factory=list)
    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0
    outputs: List[str] = field(default_factory=list)


def find_prefixes(directory: str) -> List[str]:
    """The ``.bin/.idx`` pairs in ``directory``, by name; a lone half of a pair is an error."""
    halves = {}
    for name in os.listdir(directory):
        if ".tmp-" in name or not os.path.isfile(os.path.join(directory, name)):
            continue  # a run in progress, or the leftovers of one that crashed
        for suffix in (".bin", ".idx"):
            if name.endswith(suffix):
                halves.setdefault(os.path.join(directory, name[: -len(suffix)]), set()).add(suffix)
    for prefix, found in sorted(halves.items()):
        if len(found) == 1:
            (have,) = found
            raise DataError(f"--input {directory}: {prefix + have} has no {'.idx' if have == '.bin' else '.bin'}; "
                            "finish or re-run the job that writes it, or move it out of the directory")
    if not halves:
        raise DataError(f"--input {directory}: no .bin/.idx pairs to merge")
    return sorted(halves)


def _merge_order(prefixes: List[str], metas: List[dict], directory: str) -> List[int]:
    """Positions of ``prefixes`` in merge order: shard order for a complete set of shards, else name order."""
    shards = [m.get("shard") if m else None for m in metas]
    if not any(shards):
        return list(range(len(prefixes)))
    label = f"--input {directory}"
    if not all(shards):
        lone = prefixes[shards.index(None)]
        raise DataError(f"{label}: {lone} is not a --shard output but others are; merge shards of one run alone")
    first = shards[0]
    for prefix, shard in zip(prefixes, shards):
        if (shard["count"], shard["inputs_sha256"]) != (first["count"], first["inputs_sha256"]):
            raise DataError(f"{label}: {prefix} is shard {shard['index']}/{shard['count']} of another input list than "
                            f"{prefixes[0]} ({first['index']}/{first['count']}): the files changed between the runs; "
                            "re-run every shard on the same --input")
    found = sorted(s["index"] for s in shards)
    missing = sorted(set(range(first["count"])) - set(found))
    if missing or len(found) != first["count"]:
        what = (f"shard {missing[0]}/{first['count']} is missing ({len(missing)} of {first['count']} are); run the "
                "missing --shard jobs" if missing else
                f"shard {next(i for i in found if found.count(i) > 1)}/{first['count']} is there twice; remove one")
        raise DataError(f"{label}: {what} and merge again")
    return sorted(range(len(prefixes)), key=lambda i: shards[i]["index"])


def _check_same_kind(prefixes: List[str], metas: List[dict], directory: str) -> None:
    label = f"--input {directory}"
    first = metas[0]
    for prefix, meta in zip(prefixes[1:], metas[1:]):
        mismatch = metadata.tokenizer_mismatch(first["tokenizer"], meta["tokenizer"])
        if mismatch or meta["tokenizer"]["eod"] != first["tokenizer"]["eod"]:
            raise DataError(f"{label}: {prefix} was prepared with {metadata.describe_tokenizer(meta['tokenizer'])}, EOD "
                            f"{meta['tokenizer']['eod']}, {prefixes[0]} with "
                            f"{metadata.describe_tokenizer(first['tokenizer'])}, EOD {first['tokenizer']['eod']}"
                            f"{f' ({mismatch})' if mismatch else ''}; prepare them all with one tokenizer")
        for key in ("json_key", "append_eod"):
            if meta.get(key) != first.get(key):
                raise DataError(f"{label}: {prefix} has {key} {meta.get(key)!r}, {prefixes[0]} has {first.get(key)!r}; "
                                "merge datasets of one kind (put each --json-keys output in its own directory)")


def merge(input_dir: str, output_prefix: str, multimodal: bool = False, overwrite: bool = False,
          stop: StopSignals = None) -> MergeSummary:
    """Raises :class:`Interrupted`, with nothing written, if ``stop`` records a signal before the outputs
    take their final names."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    stop = stop or StopSignals()

    label = f"--input {input_dir}"
    if not os.path.isdir(input_dir):
        raise DataError(f"{label}: not a directory; give the directory that holds the .bin/.idx pairs")
    if not os.path.basename(output_prefix):
        raise DataError(f"--output-prefix {output_prefix!r}: ends in a directory; add a file-name prefix, e.g. "
                        f"--output-prefix {os.path.join(output_prefix, 'corpus_text_document')}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if os.path.isdir(out_dir) and os.path.samefile(out_dir, input_dir):
        raise DataError(f"--output-prefix {output_prefix}: inside --input {input_dir}, where the next merge would take "
                        "it for a shard; write it to another directory")
    finals = [metadata.metadata_path(output_prefix), output_prefix + ".bin", output_prefix + ".idx"]
    existing = [p for p in finals if os.path.exists(p)]
    if existing and not overwrite:
        raise DataError(f"--output-prefix {output_prefix}: {existing[0]} exists; pass --overwrite to replace it")
    prefixes = find_prefixes(input_dir)
    opened = []
    for prefix in prefixes:  # every file whole, before any write
        stop.check()
        opened.append(metadata.open_indexed(prefix, label, multimodal))
    metas = [metadata.read_metadata(p, label) for p in prefixes]
    if any(metas) and not all(metas):
        bare, other = prefixes[metas.index(None)], prefixes[[bool(m) for m in metas].index(True)]
        raise DataError(f"{label}: {bare} has no metadata ({os.path.basename(metadata.metadata_path(bare))}), "
                        f"{other} has: they come from different tools; merge datasets of one origin")
    for dataset, meta in zip(opened, metas):
        if meta:
            metadata.check_metadata_matches(meta, dataset, label)
    dtype = opened[0].index.dtype
    for prefix, dataset in zip(prefixes, opened):
        if dataset.index.dtype != dtype:  # megatron's add_index asserts it
            raise DataError(f"{label}: {prefix} holds {dataset.index.dtype.__name__} tokens, {prefixes[0]} "
                            f"{dtype.__name__}: they were prepared with tokenizers of different sizes; prepare them all "
                            "with one tokenizer")
    if all(metas):
        _check_same_kind(prefixes, metas, input_dir)
    order = _merge_order(prefixes, metas, input_dir)
    summary = MergeSummary(inputs=[prefixes[i] for i in order])
    summary.documents = sum(len(opened[i].document_indices) - 1 for i in order)
    summary.tokens = sum(metadata.num_tokens(opened[i]) for i in order)
    del opened
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    with atomic_files(finals) as (json_temp, bin_temp, idx_temp):
        builder = IndexedDatasetBuilder(bin_temp, dtype=dtype, multimodal=multimodal)
        # add_index runs gc.collect() per input: with torch and megatron-core loaded that is ~0.7 s each here
        # (150 inputs: 111 s). Frozen, the objects that exist now are not scanned again (150 inputs: 0.24 s).
        gc.freeze()
        try:
            for prefix in summary.inputs:
                stop.check()
                builder.add_index(prefix)
        finally:
            gc.unfreeze()
            builder.data_file.close()
        builder.finalize(idx_temp)
        if all(metas):  # Megatron-LM's datasets have none to carry over, and none is made up
            ordered = [metas[i] for i in order]
            metadata.write_metadata(json_temp, metadata.new_metadata(
                "tools/merge_datasets.py", ordered[0]["tokenizer"], ordered[0]["json_key"], ordered[0]["append_eod"],
                dtype, summary.documents, summary.tokens, max(m["max_token_id"] for m in ordered),
                [i for m in ordered for i in m["inputs"]],
                merged_from=[dict(prefix=os.path.abspath(p), documents=m["documents"], tokens=m["tokens"])
                             for p, m in zip(summary.inputs, ordered)]))
        stop.check()  # the last chance: past it the outputs are whole, and take their names
    summary.outputs = [p for p in finals if os.path.exists(p)]
    summary.seconds = time.perf_counter() - start
    return summary


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    args = build_parser().parse_args(argv)
    try:
        with StopSignals() as stop:  # a scheduler's SIGTERM cleans up like Ctrl-C
            s = merge(args.input, args.output_prefix, args.multimodal, args.overwrite, stop)
    except (DataError, ValueError) as e:
        print(f"merge_datasets.py: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"merge_datasets.py: interrupted by {e}; no output was written", file=sys.stderr)
        return 130
    print(f"merged {len(s.inputs)} datasets in order ({os.path.basename(s.inputs[0])} ... "
          f"{os.path.basename(s.inputs[-1])}): documents: {s.documents} | tokens: {s.tokens} | seconds: {s.seconds:.2f}")
    for path in s.outputs:
        print(f"wrote {path}")
    return 0
