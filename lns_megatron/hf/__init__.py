"""Hugging Face interoperability: export (``export.py``), LNS on Hugging Face models (``scaling.py``) and
fine-tuning with DeepSpeed (``finetune.py``)."""

from lns_megatron.hf.scaling import (LayerNormScalingError, apply_layernorm_scaling, fold_layernorm_scaling,
                                     from_pretrained)

__all__ = ["LayerNormScalingError", "apply_layernorm_scaling", "fold_layernorm_scaling", "from_pretrained"]
