"""Norms after the residual add: Post-LN, Mix-LN and DeepNorm.

- Post-LN (Vaswani et al., "Attention Is All You Need", 2017; the baseline of the LNS and Mix-LN
  papers): ``x <- Norm(x + F(x))`` for attention and MLP, and no final norm.
- Mix-LN (Li et al., "Mix-LN: Unleashing the Power of Deeper Layers by Combining Pre-LN and Post-LN",
  2024): Post-LN in layers ``1 .. floor(alpha * N)``, Pre-LN after them, and Pre-LN's final norm.
- DeepNorm (Wang et al., "DeepNet: Scaling Transformers to 1,000 Layers", 2022), decoder-only:
  ``x <- Norm(a * x + F(x))`` with ``a = (2N)^(1/4)``; the value, output-projection and MLP weights
  start scaled by ``b = (8N)^(-1/4)`` (queries and keys are not); no final norm.

The layer is megatron-core's ``TransformerLayer`` with its input norms left out (``IdentityOp`` in the
spec) and each bias-dropout-add followed by the layer's own norm, so attention, MLP and the fused
kernels stay megatron-core's. ``N`` is the global number of layers, ``l`` megatron's global index.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from lns_megatron.schemes.lns import LNSNorm


def deepnorm_residual_scale(num_layers: int) -> float:
    """DeepNorm's ``a = (2N)^(1/4)`` for a decoder-only model of ``N`` layers."""
    return (2 * num_layers) ** 0.25


def deepnorm_init_scale(num_layers: int) -> float:
    """DeepNorm's ``b = (8N)^(-1/4)`` for a decoder-only model of ``N`` layers."""
    return (8 * num_layers) ** -0.25


def mix_ln_post_layers(num_layers: int, alpha: float) -> int:
    """How many of the first layers Mix-LN makes Post-LN: ``floor(alpha * N)``."""
    return math.floor(alpha * num_layers)


class NormAfterAdd:
    """megatron's bias-dropout-add, then ``Norm(a * residual + dropout(F(x) + bias))``.

    Called as megatron calls its ``*_bda``: ``bda(training, fused)(x_with_bias, residual, prob)``.
    """

    def __init__(self, bda, norm: torch.nn.Module, residual_scale: float):
        self.bda, self.norm, self.residual_scale = bda, norm, residual_scale

    def __call__(self, training: bool, fused: bool):
        add = self.bda(training, fused)

        def add_then_norm(x_with_bias, residual, prob):
            if self.residual_scale != 1.0:
                residual = residual * self.residual_scale
            return self.norm(add(x_with_bias, residual, prob))

        return add_then_norm


class PostNormTransformerLayer(TransformerLayer):
    """A megatron-core ``TransformerLayer`` with the norm after each residual add (Post-LN, DeepNorm).

    Its spec has no input norms (``IdentityOp``); this layer adds ``post_self_attn_layernorm`` and
    ``post_mlp_layernorm`` (``norm``: :class:`LNSNorm` unscaled, or Transformer Engine's ``TENorm``).
    ``residual_scale`` is DeepNorm's ``a`` (1 for Post-LN); ``init_scale`` its ``b``, applied once to the
    freshly initialized value rows of ``linear_qkv`` and to ``linear_proj``, ``linear_fc1`` and ``linear_fc2``.
    """

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1, *args,
                 residual_scale: float = 1.0, init_scale: float = 1.0, norm=LNSNorm, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self.residual_scale, self.init_scale = residual_scale, init_scale
        self.post_self_attn_layernorm = norm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.post_mlp_layernorm = norm(config, config.hidden_size, eps=config.layernorm_epsilon)
        self.self_attn_bda = NormAfterAdd(self.self_attn_bda, self.post_self_attn_layernorm, residual_scale)
        self.mlp_bda = NormAfterAdd(self.mlp_bda, self.post_mlp_layernorm, residual_scale)
        if init_scale != 1.0:
            self._scale_initial_weights(init_scale)

    @torch.no_grad()
    def _scale_initial_weights(self, b: float) -> None:
        attention = self.self_attention
        qkv = attention.linear_qkv.weight  # per query group: [queries of the group, key, value] rows
        heads_per_group = self.config.num_attention_heads // self.config.num_query_groups
        head_dim = self.config.kv_channels
        groups = qkv.view(-1, (heads_per_group + 2) * head_dim, qkv.shape[-1])
        groups[:, (heads_per_group + 1) * head_dim:, :] *= b
        for linear in (attention.linear_proj, self.mlp.linear_fc1, self.mlp.linear_fc2):
            linear.weight.mul_(b)

    def extra_repr(self) -> str:
        return f"layer_number={self.layer_number}, post-norm, residual_scale={self.residual_scale:.6g}"
