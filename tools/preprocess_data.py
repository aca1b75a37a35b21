#!/usr/bin/env python
"""Megatron-LM compatible data preparation: JSON lines (and more) to megatron indexed datasets.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer/ --append-eod --workers 8
"""

import os
import sys
import warnings

# megatron-core's import-time notes about Apex and Transformer Engine concern training, not data.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
try:
    from lns_megatron.data.preprocess import main
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lns_megatron.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
