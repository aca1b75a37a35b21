"""The LNS multiplier, free of megatron-core so that the Hugging Face side can use it alone."""

import math


def layernorm_scale(layer_number: int) -> float:
    """The LNS multiplier ``1/sqrt(l)`` of the 1-based global layer number ``l``."""
    if isinstance(layer_number, bool) or not isinstance(layer_number, int) or layer_number < 1:
        raise ValueError(f"layernorm_scale: layer_number must be an int >= 1 (1-based), got {layer_number!r}")
    return 1.0 / math.sqrt(layer_number)
