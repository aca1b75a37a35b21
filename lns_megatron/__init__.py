"""lns_megatron: LayerNorm Scaling for GPT pretraining on NVIDIA megatron-core.

The package is grouped by concern, each folder importing only from those listed before it:
``config``/``cpu``/``files`` -> ``schemes`` (the norm schemes) -> ``models`` (specs, GPTModel)
-> ``data`` -> ``training`` (loop, checkpoints, safety, metrics) -> ``diagnostics`` (the depth
report) -> ``hf`` (Hugging Face export, LNS on Hugging Face models, fine-tuning with DeepSpeed).

The public names below load on first use, so that ``python -m lns_megatron.pretrain`` can set
up its warning filters before megatron-core is imported.
"""

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "cpu": "lns_megatron.cpu",
    "get_gpt_lns_layer_spec": "lns_megatron.models.specs",
    "layernorm_scale": "lns_megatron.schemes.lns",
    "LNSNorm": "lns_megatron.schemes.lns",
    "LNSTransformerLayer": "lns_megatron.schemes.lns",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lns_megatron' has no attribute {name!r}")
    module = importlib.import_module(_PUBLIC[name])
    return module if module.__name__.endswith("." + name) else getattr(module, name)
