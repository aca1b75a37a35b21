"""The layer specs under their public path, for Megatron-LM's
``pretrain_gpt.py --spec lns_megatron.specs lns_local_spec`` (or ``lns_te_spec``); the code is in
:mod:`lns_megatron.models.specs`."""

from lns_megatron.models import specs as _specs
from lns_megatron.models.specs import get_gpt_lns_layer_spec, lns_local_spec  # noqa: F401

if hasattr(_specs, "lns_te_spec"):
    lns_te_spec = _specs.lns_te_spec
