#!/usr/bin/env python
"""Megatron-LM compatible merge of indexed datasets, e.g. the shards of tools/preprocess_data.py --shard I/N.

    python tools/merge_datasets.py --input shards/ --output-prefix data/corpus_text_document
"""

import os
import sys
import warnings

# megatron-core's import-time notes about Apex and Transformer Engine concern training, not data.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
try:
    from lns_megatron.data.merge import main
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from lns_megatron.data.merge import main

if __name__ == "__main__":
    sys.exit(main())
