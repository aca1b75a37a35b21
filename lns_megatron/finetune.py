"""``python -m lns_megatron.finetune``: fine-tuning on Hugging Face + DeepSpeed (lns_megatron/hf/finetune.py)."""

import sys

from lns_megatron.hf.finetune import main

if __name__ == "__main__":
    sys.exit(main())
