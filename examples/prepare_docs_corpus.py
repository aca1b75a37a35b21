#!/usr/bin/env python
"""A real-text corpus from a package registry, tokenized for the CPU comparisons.

The text is the Python 3.11 documentation in reStructuredText (Debian's ``python3.11-doc``:
``apt-get install python3.11-doc`` puts 497 files, 12 MB of English prose and code, under
/usr/share/doc/python3.11/html/_sources). Each file is cut at blank lines into documents of about
``--doc-chars`` characters; a byte-level BPE of ``--vocab-size`` is trained on them with ``tokenizers``
(nothing is downloaded); ``tools/preprocess_data.py`` writes the indexed dataset.

    python examples/prepare_docs_corpus.py --output data/pydocs
    # -> data/pydocs/docs.jsonl, tokenizer.json, docs_text_document.{bin,idx}
"""

import argparse
import glob
import json
import os
import subprocess
import sys

SOURCES = "/usr/share/doc/python3.11/html/_sources"


def documents(root: str, doc_chars: int):
    for path in sorted(glob.glob(os.path.join(root, "**", "*.rst.txt"), recursive=True)):
        chunk = []
        for paragraph in open(path, encoding="utf-8", errors="replace").read().split("\n\n"):
            chunk.append(paragraph)
            if sum(len(p) for p in chunk) >= doc_chars:
                yield "\n\n".join(chunk)
                chunk = []
        if chunk:
            yield "\n\n".join(chunk)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sources", default=SOURCES)
    p.add_argument("--output", default="data/pydocs")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--doc-chars", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    return p


def main() -> int:
    args = build_parser().parse_args()
    if not os.path.isdir(args.sources):
        print(f"prepare_docs_corpus: {args.sources} not found; install it with `apt-get install python3.11-doc` "
              "or pass --sources DIR", file=sys.stderr)
        return 2
    os.makedirs(args.output, exist_ok=True)
    jsonl = os.path.join(args.output, "docs.jsonl")
    texts = list(documents(args.sources, args.doc_chars))
    with open(jsonl, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(os.path.join(args.output, "tokenizer.json"))

    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "preprocess_data.py")
    subprocess.run([sys.executable, tool, "--input", jsonl, "--output-prefix", os.path.join(args.output, "docs"),
                    "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                    os.path.join(args.output, "tokenizer.json"), "--append-eod", "--workers", str(args.workers),
                    "--overwrite"], check=True)
    print(f"prepare_docs_corpus: {len(texts)} documents from {args.sources} -> "
          f"{os.path.join(args.output, 'docs_text_document')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
