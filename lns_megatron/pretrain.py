"""``python -m lns_megatron.pretrain`` / ``lns-pretrain``: GPT pretraining with LayerNorm Scaling.

Run it under torchrun for several processes; alone it is a world of one. Every refusal and every
failure the job can explain is one line ``lns-pretrain: error: ...`` on stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Import-time notes of megatron-core that concern other setups (Apex and TE fallbacks, deprecations).
QUIET = (".*(Transformer Engine|Apex).*", ".*full scope is deprecated.*", ".*MimoModelConfig is experimental.*",
         ".*Could not determine rank from torch.distributed.*")
# Log records about megatron-core's own roadmap (0.19), and torch's note that its CUDA build found no GPU.
QUIET_LOGS = {"megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
              "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
              "torch.utils.cpp_extension": "No CUDA runtime is found"}


def main(argv=None) -> int:
    for pattern in QUIET:
        warnings.filterwarnings("ignore", message=pattern)
    for name, prefix in QUIET_LOGS.items():
        logging.getLogger(name).addFilter(lambda record, prefix=prefix: not record.getMessage().startswith(prefix))
    from lns_megatron.training import reaper

    reaper.start()  # before torch: the watchdog stays small
    from lns_megatron.config import ConfigError, parse_args
    from lns_megatron.data.datasets import TokenIdError
    from lns_megatron.training import distributed
    from lns_megatron.training.checkpoint import CheckpointError
    from lns_megatron.training.safety import CollectiveError, NonFiniteError
    from lns_megatron.training.train import pretrain

    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        pretrain(parse_args(argv))
    except (ConfigError, CheckpointError) as e:  # the same on every rank: said once; a bad token id where met
        if rank0 or isinstance(e, TokenIdError):
            print(f"lns-pretrain: error: {e}", file=sys.stderr, flush=True)
        return 2
    except (NonFiniteError, CollectiveError) as e:
        if rank0 or isinstance(e, CollectiveError):  # a failed collective: each rank says what it saw
            print(f"lns-pretrain: error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
