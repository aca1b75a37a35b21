"""``python -m lns_megatron.pretrain`` / ``lns-pretrain``: GPT pretraining with LayerNorm Scaling.

Run it under torchrun for several processes; alone it is a world of one.
"""

from __future__ import annotations

import os
import sys
import warnings


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    from lns_megatron.training import distributed
    from lns_megatron.training.checkpoint import CheckpointError
    from lns_megatron.config import ConfigError, parse_args
    from lns_megatron.data.datasets import TokenIdError
    from lns_megatron.training.train import NonFiniteLossError, pretrain

    config = parse_args(argv)
    try:
        pretrain(config)
    except (ConfigError, CheckpointError, NonFiniteLossError) as e:
        # Start-up errors are the same on every rank; these two are seen by the rank that hit them.
        if int(os.environ.get("RANK", "0")) == 0 or isinstance(e, (NonFiniteLossError, TokenIdError)):
            print(f"lns-pretrain: error: {e}", file=sys.stderr, flush=True)
        return 2 if not isinstance(e, NonFiniteLossError) else 3
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
