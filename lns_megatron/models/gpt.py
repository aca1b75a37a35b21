"""Build a megatron-core ``GPTModel`` with the LNS layer spec."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal, scaled_init_method_normal

from lns_megatron import compat, cpu
from lns_megatron.config import PretrainConfig, moe_layer_pattern
from lns_megatron.models.specs import get_gpt_lns_block_spec, get_gpt_lns_layer_spec
from lns_megatron.schemes import NORM_SCHEMES
from lns_megatron.schemes.tanh import DyTGPTModel


OUTPUT_LAYER_INITS = ("plain", "scaled")


def lns_transformer_config(output_layer_init: str = "plain", **config_kwargs) -> TransformerConfig:
    """A ``TransformerConfig`` whose output layers (``linear_proj``, ``linear_fc2``) start the same way
    whatever the norm scheme, so that a Pre-LN/LNS comparison differs in the scheme alone.

    ``"plain"``: N(0, ``init_method_std``), as every linear layer of the paper's code, for both arms (and
    as the paper advises for LNS). ``"scaled"``: megatron-core's default, N(0, std/sqrt(2L)).
    """
    if output_layer_init not in OUTPUT_LAYER_INITS:
        raise ValueError(f"output_layer_init={output_layer_init!r}; choose one of {OUTPUT_LAYER_INITS}")
    if output_layer_init == "plain" and config_kwargs.get("output_layer_init_method") is None:
        config_kwargs["output_layer_init_method"] = init_method_normal(config_kwargs.get("init_method_std", 0.02))
    if cpu.is_enabled():
        # gloo matches point-to-point messages by order, and megatron's batched p2p posts
        # send_prev before send_next: with PP=2 and VPP (prev == next) tensors get swapped.
        config_kwargs.setdefault("batch_p2p_comm", False)
    return TransformerConfig(**config_kwargs)


def transformer_config(c: PretrainConfig) -> TransformerConfig:
    """The driver's flags as megatron-core's TransformerConfig (used by training and by the tools' loader)."""
    # HybridModel's layers are attention or MLP: twice the transformer layers; its scaled output init is
    # still std/sqrt(2L) with L transformer layers, as for GPTModel.
    hybrid = bool(c.hybrid_layer_pattern)
    return lns_transformer_config(
        c.output_layer_init,
        num_layers=2 * c.num_layers if hybrid else c.num_layers,
        output_layer_init_method=(scaled_init_method_normal(c.init_method_std, c.num_layers)
                                  if hybrid and c.output_layer_init == "scaled" else None),
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.ffn_hidden_size,
        num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_query_groups,
        normalization=c.normalization,
        layernorm_epsilon=c.norm_epsilon,
        layernorm_zero_centered_gamma=c.apply_layernorm_1p,
        gated_linear_unit=c.swiglu,
        activation_func=F.silu if c.swiglu else F.gelu,
        add_bias_linear=not c.disable_bias_linear,
        init_method_std=c.init_method_std,
        embedding_init_method_std=c.embedding_init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=c.bf16,
        params_dtype=torch.bfloat16 if c.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if c.bf16 else torch.float32,
        tensor_model_parallel_size=c.tensor_model_parallel_size,
        pipeline_model_parallel_size=c.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=c.virtual_pipeline_model_parallel_size,
        sequence_parallel=c.sequence_parallel,
        fp8=c.fp8_format,
        fp8_recipe=c.fp8_recipe,
        fp8_amax_history_len=c.fp8_amax_history_len,
        fp8_amax_compute_algo="max",
        # The fused kernels need CUDA (and apex/TE); the CPU mode runs the unfused paths.
        bias_activation_fusion=torch.cuda.is_available() and c.swiglu,
        masked_softmax_fusion=importlib.util.find_spec("scaled_masked_softmax_cuda") is not None,  # apex kernel
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        context_parallel_size=c.context_parallel_size,
        **({"cp_comm_type": c.cp_comm_type} if c.context_parallel_size > 1 else {}),
        **moe_settings(c),
        **recompute_settings(c),
    )


def recompute_settings(c: PretrainConfig) -> dict:
    """The recompute flags as TransformerConfig fields, each only when set (so that a megatron-core without a
    field still builds a run that does not use it)."""
    out = {}
    if c.recompute_granularity is not None:
        out.update(recompute_granularity=c.recompute_granularity, recompute_method=c.recompute_method,
                   recompute_num_layers=c.recompute_num_layers)
    if c.recompute_modules is not None:
        out["recompute_modules"] = list(c.recompute_modules)
    return out


def moe_settings(c: PretrainConfig) -> dict:
    """The MoE flags as TransformerConfig fields (none for a dense model)."""
    if c.num_experts is None:
        return {}
    return dict(
        num_moe_experts=c.num_experts, moe_router_topk=c.moe_router_topk, moe_ffn_hidden_size=c.moe_ffn_hidden_size,
        moe_layer_freq=moe_layer_pattern(c.moe_layer_freq, c.num_layers),
        moe_shared_expert_intermediate_size=c.moe_shared_expert_intermediate_size,
        moe_router_score_function=c.moe_router_score_function, moe_router_pre_softmax=c.moe_router_pre_softmax,
        moe_router_load_balancing_type=c.moe_router_load_balancing_type, moe_aux_loss_coeff=c.moe_aux_loss_coeff,
        moe_z_loss_coeff=c.moe_z_loss_coeff, moe_token_dispatcher_type=c.moe_token_dispatcher_type,
        moe_grouped_gemm=c.moe_grouped_gemm, expert_model_parallel_size=c.expert_model_parallel_size,
        expert_tensor_parallel_size=c.expert_tensor_parallel_size,
    )


def tiny_config(output_layer_init: str = "plain", **overrides) -> TransformerConfig:
    """The small LLaMA-style float32 config used by the tests and CPU smoke runs."""
    kwargs = dict(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return lns_transformer_config(output_layer_init, **kwargs)


def build_gpt_model(
    config: TransformerConfig,
    *,
    vocab_size: int,
    max_sequence_length: int,
    norm_scheme: str = "lns",
    transformer_impl: str = "local",
    position_embedding_type: str = "rope",
    rotary_base: int = 10000,
    share_embeddings_and_output_weights: bool = False,
    qk_layernorm: bool = False,
    mix_ln_alpha: float = 0.25,
    dyt_alpha_init: tuple = (0.5, 0.5, 0.5),
    bhyt_lambda_init: tuple = (2.0, 2.0),
    vp_stage: Optional[int] = None,
    lns_depths: Optional[list] = None,
) -> GPTModel:
    """One model chunk for this pipeline rank (and virtual stage ``vp_stage``)."""
    if config.num_moe_experts:
        compat.moe_router_without_te()
    if norm_scheme == "pre" and (config.num_moe_experts or config.multi_latent_attention):
        # megatron-core's own MoE / MLA block: the baseline, unchanged
        spec = get_gpt_decoder_block_spec(dataclasses.replace(config, qk_layernorm=qk_layernorm),
                                          use_transformer_engine=transformer_impl == "transformer_engine",
                                          normalization=config.normalization, vp_stage=vp_stage)
    elif norm_scheme == "pre":  # megatron-core's own layer and final norm: the baseline, unchanged
        spec = get_gpt_lns_layer_spec(transformer_impl=transformer_impl, norm_scheme="pre",
                                      normalization=config.normalization, qk_layernorm=qk_layernorm)
    else:
        spec = get_gpt_lns_block_spec(config, transformer_impl, norm_scheme, qk_layernorm=qk_layernorm,
                                      mix_ln_alpha=mix_ln_alpha, dyt_alpha_init=dyt_alpha_init,
                                      bhyt_lambda_init=bhyt_lambda_init, vp_stage=vp_stage, lns_depths=lns_depths)
    model_class = DyTGPTModel if NORM_SCHEMES[norm_scheme].tanh else GPTModel
    return model_class(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
        vp_stage=vp_stage,
    )


def unwrap(chunk):
    """The GPTModel inside DDP and Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
