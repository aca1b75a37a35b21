"""Bounded Hyperbolic Tanh (BHyT) in place of the two input norms of each layer.

Byun, Choi, Kim, Park and Song, "Bounded Hyperbolic Tangent: A Stable and Efficient Alternative to
Pre-Layer Normalization in Large Language Models" (2026, arXiv:2601.09719; code: MLAI-Yonsei/BHyT).
Each norm becomes ``gamma * tanh(lambda * x / (kappa * s))``: by Chebyshev's inequality ``|x| <= kappa * s``
with probability ``1 - 1/kappa^2`` (0.99 for ``kappa = 10``), so the tanh sees ``|input| <= lambda``, its
non-saturating range, whatever the residual stream's scale. ``lambda`` is a learnable scalar per norm,
``gamma`` a learnable gain.

The block-level variance approximation: ``s^2`` is computed exactly (the mean square over the hidden
dimension, RMSNorm's statistic) once per layer, before attention; before the MLP it is approximated as
``s^2 + ||W_V W_O||_F^2 / (T d) * lambda_attn^2 / kappa^2``, the variance a uniform attention over ``T``
tokens adds to the stream (``W_V``, ``W_O`` the value and output projections, query heads sharing their
group's value head; ``lambda_attn`` detached, as in the paper's code). The final norm stays RMSNorm, as in
the paper's released runs.

Where we differ from the paper's code: it refreshes ``||W_V W_O||_F^2`` from the weights every ~1/50 of the
training steps; we compute it from the current weights at every forward (no gradient), so the model is a
function of its weights alone and resumes and reshards exactly. Under tensor parallelism that is one
all-reduce of a ``d x d`` matrix per layer and micro-batch (``benchmarks/bench_norm_scheme.py`` measures it).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

KAPPA = 10.0  # the paper's p = 0.99 = 1 - 1/kappa^2


class BHyT(torch.nn.Module):
    """``gamma * tanh(lambda * x / (KAPPA * sqrt(s^2 + eps)))``, built like megatron's norms with
    ``(config, hidden_size, eps)`` and the spec's ``lambda_init``.

    Before attention ``s^2`` is the mean square of ``x``, kept in :attr:`variance` for the layer's second
    BHyT; that one (wired by :class:`BHyTTransformerLayer`) adds the attention's variance instead of
    computing its own. Parameters carry ``sequence_parallel``; zero-centered gamma stores ``gamma - 1``.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, lambda_init: float = 2.0):
        super().__init__()
        self.config = config
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        dtype = config.params_dtype
        self.lam = torch.nn.Parameter(torch.full((1,), float(lambda_init), dtype=dtype))
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=dtype))
        for p in (self.lam, self.weight):
            p.sequence_parallel = config.sequence_parallel
        self.variance = None  # the exact statistic of the last forward, for the MLP's BHyT
        self._after = None  # (the attention's BHyT, the attention) when this one is before the MLP

    def follow(self, attention_norm: "BHyT", attention) -> None:
        """Approximate this norm's statistic from ``attention_norm``'s and ``attention``'s weights. Kept in a
        tuple so that neither is registered as a submodule of this norm."""
        self._after = (attention_norm, attention)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._after is None:
            variance = _at_least_float32(x).pow(2).mean(-1, keepdim=True)
            self.variance = variance
        else:
            norm, attention = self._after
            if norm.variance is None:
                raise RuntimeError("BHyT before the MLP ran without the attention's BHyT before it; build the layer "
                                   "as BHyTTransformerLayer (get_gpt_lns_layer_spec(norm_scheme='bhyt'))")
            tokens = x.shape[0] * self._sequence_shards()
            added = attention_output_variance(attention, tokens) * _at_least_float32(norm.lam.detach()).square() / KAPPA**2
            variance, norm.variance = norm.variance + added, None
        scale = self.lam * torch.rsqrt(variance + self.eps) / KAPPA
        gamma = self.weight + 1.0 if self.zero_centered_gamma else self.weight
        return (torch.tanh(scale * x) * gamma).to(x.dtype)

    def _sequence_shards(self) -> int:
        """How many ranks hold a part of the sequence this rank holds a part of (sequence and context
        parallelism), so that ``T`` is the whole sequence the attention sees."""
        shards = self.config.context_parallel_size
        if self.config.sequence_parallel:
            shards *= self.config.tensor_model_parallel_size
        return shards

    def extra_repr(self) -> str:
        where = "before the MLP, approximated" if self._after else "before attention, exact"
        return f"{self.weight.numel()}, lambda={self.lam.detach().item():.4g}, kappa={KAPPA:g}, statistic {where}"


@torch.no_grad()
def attention_output_variance(attention, tokens: int) -> torch.Tensor:
    """``||W_V W_O||_F^2 / (T d)`` (in float32 at least) for megatron's ``SelfAttention`` with ``T = tokens``: the
    variance a uniform attention over ``T`` tokens of unit-variance inputs adds to each of the ``d`` hidden
    units. Each query head reads its group's value head, so the output projection's head columns are summed
    per group before the product. Under tensor parallelism each rank holds some groups: the ``d x d``
    products are summed over the ranks before the norm is taken."""
    config = attention.config
    head_dim = config.kv_channels
    heads_per_group = config.num_attention_heads // config.num_query_groups
    qkv = _at_least_float32(attention.linear_qkv.weight)  # [groups * (heads_per_group + 2) * head_dim, d], per group: q, k, v
    out = _at_least_float32(attention.linear_proj.weight)  # [d, heads * head_dim]
    hidden = out.shape[0]
    values = qkv.view(-1, (heads_per_group + 2) * head_dim, qkv.shape[-1])[:, -head_dim:, :]
    out_per_group = out.view(hidden, -1, heads_per_group, head_dim).sum(2)
    product = out_per_group.reshape(hidden, -1) @ values.reshape(-1, qkv.shape[-1])  # W_O W_V: [d, d]
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(product, group=parallel_state.get_tensor_model_parallel_group())
    return product.square().sum() / (tokens * hidden)


def _at_least_float32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


class BHyTTransformerLayer(TransformerLayer):
    """megatron-core's ``TransformerLayer`` with BHyT as both input norms, the second one reading the first's
    statistic and the attention's weights (the paper's block-level variance approximation)."""

    def __init__(self, config: TransformerConfig, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        if not (isinstance(self.input_layernorm, BHyT) and isinstance(self.pre_mlp_layernorm, BHyT)):
            raise ValueError("BHyTTransformerLayer needs BHyT as input_layernorm and pre_mlp_layernorm")
        if not hasattr(self.self_attention, "linear_qkv") or not hasattr(self.self_attention, "linear_proj"):
            raise ValueError("norm_scheme='bhyt' approximates the MLP's statistic from the attention's value and "
                             "output projections (linear_qkv, linear_proj); multi-latent attention has neither")
        self.pre_mlp_layernorm.follow(self.input_layernorm, self.self_attention)
