"""The layer specs under their public path, for Megatron-LM's
``pretrain_gpt.py --spec lns_megatron.specs lns_local_spec`` (or ``lns_te_spec``) and, on megatron-core
0.19+, ``pretrain_hybrid.py --spec lns_megatron.specs lns_hybrid_stack_spec`` (or ``lns_hybrid_te_stack_spec``);
the code is in :mod:`lns_megatron.models.specs` and :mod:`lns_megatron.models.hybrid`."""

from lns_megatron.models import hybrid as _hybrid
from lns_megatron.models import specs as _specs
from lns_megatron.models.specs import get_gpt_lns_layer_spec, lns_local_spec  # noqa: F401

for _name, _module in (("lns_te_spec", _specs), ("lns_hybrid_stack_spec", _hybrid),
                       ("lns_hybrid_te_stack_spec", _hybrid)):
    if hasattr(_module, _name):  # those that this megatron-core and Transformer Engine can build
        globals()[_name] = getattr(_module, _name)
