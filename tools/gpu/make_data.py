"""Step ``data``: a real-text training set made on the machine itself, for the FP8 and depth comparisons.

The GPU machine is offline and holds no corpus, but it holds Python's standard library: its ``.py`` files
(sorted, capped at ``--max-mib``, cut into documents of about 4 KB) become JSON lines, a byte-level BPE is trained on them with
``tokenizers``, and ``tools/preprocess_data.py``'s code writes the megatron indexed dataset.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from results import md_table, step_args, write_json, write_text  # noqa: E402

EOD = "<|endoftext|>"


def corpus(max_bytes: int, doc_bytes: int = 4096):
    """Documents of about doc_bytes, cut at blank lines of the stdlib's sorted .py files."""
    stdlib = sysconfig.get_paths()["stdlib"]
    total = 0
    for path in sorted(glob.glob(os.path.join(stdlib, "**", "*.py"), recursive=True)):
        if "site-packages" in path:
            continue
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        doc = ""
        for block in text.split("\n\n"):
            doc += block + "\n\n"
            if len(doc) >= doc_bytes:
                yield doc
                total += len(doc.encode())
                doc = ""
                if total >= max_bytes:
                    return
        if len(doc) >= 200:
            yield doc
            total += len(doc.encode())


def main():
    ap = step_args(__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--max-mib", type=float, default=24.0)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    a = ap.parse_args()
    start = time.perf_counter()
    os.makedirs(os.path.join(a.data_dir, "tokenizer"), exist_ok=True)
    docs = list(corpus(int(a.max_mib * 2**20)))
    jsonl = os.path.join(a.data_dir, "stdlib.jsonl")
    with open(jsonl + ".tmp", "w") as f:
        for text in docs:
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(jsonl + ".tmp", jsonl)

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=a.vocab_size, special_tokens=[EOD],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(a.data_dir, "tokenizer", "tokenizer.json"))
    trained = time.perf_counter()

    from lns_megatron.data.preprocess import main as preprocess
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = os.path.join(a.data_dir, "stdlib")
    rc = preprocess(["--input", jsonl, "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
                     "--tokenizer-model", os.path.join(a.data_dir, "tokenizer"), "--append-eod",
                     "--workers", str(a.workers), "--overwrite"])
    if rc:
        sys.exit(f"make_data: tools/preprocess_data.py's code exited with {rc}")
    prefix += "_text_document"
    dataset = IndexedDataset(prefix)  # keep it alive: sequence_lengths is a view of its memory map
    tokens = int(dataset.sequence_lengths.sum())
    result = dict(
        status="ok", source=sysconfig.get_paths()["stdlib"], documents=len(docs),
        mib=round(sum(len(d.encode()) for d in docs) / 2**20, 2), tokens=tokens, vocab_size=tok.get_vocab_size(),
        data_path=prefix, tokenizer_model=os.path.join(a.data_dir, "tokenizer"),
        tokenizer_s=round(trained - start, 1), preprocess_s=round(time.perf_counter() - trained, 1),
    )
    write_json(a.json, result)
    write_text(a.md, "### Data for the loss comparisons\n\n" + md_table(
        ["source", "documents", "MiB", "tokens", "BPE vocabulary", "tokenizer s", "preprocess s"],
        [[result["source"] + "/**/*.py", len(docs), result["mib"], tokens, result["vocab_size"],
          result["tokenizer_s"], result["preprocess_s"]]]))


if __name__ == "__main__":
    main()
