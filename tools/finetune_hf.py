#!/usr/bin/env python
"""Command-line entry point; the code is in lns_megatron/hf/finetune.py (run with --help).

    deepspeed --num_gpus 8 tools/finetune_hf.py --model hf/lns-1b --data sft.jsonl --output-dir runs/sft \\
        --norm-scheme lns --deepspeed examples/ds_zero2.json
"""

import os
import sys

try:
    import lns_megatron  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lns_megatron.hf.finetune import main

if __name__ == "__main__":
    sys.exit(main())
