"""Dynamic Tanh (DyT): an element-wise tanh in place of every norm.

Zhu, Chen, He, LeCun and Liu, "Transformers without Normalization" (2025): each norm, the final one
included, becomes ``DyT(x) = gamma * tanh(alpha * x) + beta`` with a learnable scalar ``alpha``. Its initial
value matters for language models; the paper's LLaMA runs start the pre-attention DyT higher than the
pre-MLP and final ones (LLaMA 2 7B: 0.8, 0.2, 0.2; 13B: 0.6, 0.15, 0.15), hence one initial value per
position. ``gamma`` starts at 1 and ``beta`` at 0; ``beta`` exists where the replaced norm has a bias
(LayerNorm, not RMSNorm), as in the paper's LLaMA code, which keeps RMSNorm's weight-only form. That code
also scales the embedding output by a learnable scalar initialized to ``sqrt(d)`` (:class:`DyTGPTModel`).
"""

from __future__ import annotations

import math

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig


class DyT(torch.nn.Module):
    """``gamma * tanh(alpha * x) + beta`` over the hidden dimension; built like megatron's norms, with
    ``(config, hidden_size, eps)`` (``eps`` unused) and the spec's ``alpha_init``.

    Parameters carry ``sequence_parallel`` so that ``finalize_model_grads`` all-reduces them over TP under
    sequence parallelism. Zero-centered gamma (``--apply-layernorm-1p``) stores ``gamma - 1``, as megatron's
    norms do.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, alpha_init: float = 0.5):
        super().__init__()
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        dtype = config.params_dtype
        self.alpha = torch.nn.Parameter(torch.full((1,), float(alpha_init), dtype=dtype))
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=dtype))
        self.bias = (torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
                     if config.normalization == "LayerNorm" else None)
        for p in (self.alpha, self.weight, self.bias):
            if p is not None:
                p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.weight + 1.0 if self.zero_centered_gamma else self.weight
        y = torch.tanh(self.alpha * x) * gamma
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, alpha={self.alpha.detach().item():.4g}, bias={self.bias is not None}"


class DyTGPTModel(GPTModel):
    """megatron-core's ``GPTModel`` for DyT: a learnable scalar multiplies the embedding output, initialized to
    ``sqrt(hidden_size)``, as in the paper's LLaMA code (without a norm, the first layer would otherwise see
    the embeddings' tiny initial values). Under sequence parallelism the scalar's gradient is all-reduced
    over TP like the DyT parameters'."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.pre_process:
            self.embedding_scale = torch.nn.Parameter(
                torch.full((1,), math.sqrt(self.config.hidden_size), dtype=self.config.params_dtype))
            self.embedding_scale.sequence_parallel = self.config.sequence_parallel
            self.embedding.register_forward_hook(self._scale_embedding)

    def _scale_embedding(self, module, args, output):
        return output * self.embedding_scale
