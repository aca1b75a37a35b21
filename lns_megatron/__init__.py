"""lns_megatron: LayerNorm Scaling for GPT pretraining on NVIDIA megatron-core."""

from lns_megatron import cpu
from lns_megatron.layer import LNSNorm, LNSTransformerLayer, layernorm_scale
from lns_megatron.specs import get_gpt_lns_layer_spec

__version__ = "0.1.0"
__all__ = ["cpu", "get_gpt_lns_layer_spec", "layernorm_scale", "LNSNorm", "LNSTransformerLayer"]
