"""The driver's model from its flags: a GPTModel, or with ``--hybrid-layer-pattern`` the same network as
megatron-core's HybridModel (0.19+). Used by the training loop and by the loader of the tools."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from lns_megatron.config import ConfigError, PretrainConfig
from lns_megatron.models import hybrid
from lns_megatron.models.gpt import build_gpt_model, transformer_config
from lns_megatron.schemes import NORM_SCHEMES


def hybrid_pattern(c: PretrainConfig) -> Optional[str]:
    """``--hybrid-layer-pattern`` with ``|`` between the pipeline chunks of the layout (None for GPTModel);
    a bad pattern, or a megatron-core without HybridModel, is a ConfigError naming the flag."""
    if not c.hybrid_layer_pattern:
        return None
    if NORM_SCHEMES[c.norm_scheme].gpt_only:
        raise ConfigError(f"--hybrid-layer-pattern with --norm-scheme {c.norm_scheme}: that scheme is built for "
                          "GPTModel's layers only; leave --hybrid-layer-pattern out")
    if not hybrid.HAVE_HYBRID:
        raise ConfigError("--hybrid-layer-pattern: HybridModel is in megatron-core 0.19 and later (Python 3.12); "
                          "upgrade megatron-core, or leave the flag out to train the same network as GPTModel")
    stages = c.pipeline_model_parallel_size * (c.virtual_pipeline_model_parallel_size or 1)
    try:
        return hybrid.layout_pattern(c.hybrid_layer_pattern, c.num_layers, stages)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_moe_scheme(c: PretrainConfig) -> None:
    """An MoE run's --norm-scheme is one defined on MoE layers, or a ConfigError says why not."""
    scheme = NORM_SCHEMES[c.norm_scheme]
    if c.num_experts is not None and not scheme.moe:
        raise ConfigError(f"--num-experts with --norm-scheme {c.norm_scheme}: {scheme.no_moe_reason}; use "
                          "--norm-scheme pre, lns, dyt or bhyt with MoE")


def dyt_alpha_init(c: PretrainConfig) -> tuple:
    """DyT's initial alpha at the pre-attention, pre-MLP and final positions (each defaults to --dyt-alpha-init)."""
    return tuple(c.dyt_alpha_init if v is None else v
                 for v in (c.dyt_alpha_init_attention, c.dyt_alpha_init_mlp, c.dyt_alpha_init_final))


def bhyt_lambda_init(c: PretrainConfig) -> tuple:
    """BHyT's initial lambda before attention and before the MLP (the latter defaults to --bhyt-lambda-init)."""
    return c.bhyt_lambda_init, c.bhyt_lambda_init if c.bhyt_lambda_init_mlp is None else c.bhyt_lambda_init_mlp


def build_model_chunk(c: PretrainConfig, config: TransformerConfig, vocab_size: int, vp_stage: Optional[int] = None):
    """The model chunk of this pipeline rank (and virtual stage ``vp_stage``)."""
    common = dict(norm_scheme=c.norm_scheme, transformer_impl=c.transformer_impl, qk_layernorm=c.qk_layernorm,
                  position_embedding_type=c.position_embedding_type, rotary_base=c.rotary_base,
                  share_embeddings_and_output_weights=not c.untie_embeddings_and_output_weights, vp_stage=vp_stage)
    pattern = hybrid_pattern(c)
    if pattern is None:
        return build_gpt_model(config, vocab_size=vocab_size, max_sequence_length=c.max_position_embeddings,
                               mix_ln_alpha=c.mix_ln_alpha, dyt_alpha_init=dyt_alpha_init(c),
                               bhyt_lambda_init=bhyt_lambda_init(c), lns_depths=c.lns_depths, **common)
    return hybrid.build_hybrid_lns_model(config, vocab_size, c.max_position_embeddings, pattern, **common)


def load_as_gpt(c: PretrainConfig, vocab_size: int, load):
    """A whole model on one process, loaded by ``load(model)``, as GPTModel: a HybridModel is loaded as itself,
    then its weights go into the GPTModel of the same network (what the export and the depth report read)."""
    model = build_model_chunk(c, transformer_config(c), vocab_size)
    load(model)
    if c.hybrid_layer_pattern:
        as_gpt = dataclasses.replace(c, hybrid_layer_pattern=None)
        gpt = build_model_chunk(as_gpt, transformer_config(as_gpt), vocab_size).to(next(model.parameters()).device)
        hybrid.copy_into_gpt(model, gpt)
        model = gpt
    return model
