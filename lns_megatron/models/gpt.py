"""Build a megatron-core ``GPTModel`` with the LNS layer spec."""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import init_method_normal

from lns_megatron import cpu
from lns_megatron.config import PretrainConfig
from lns_megatron.schemes.lns import LNSNorm
from lns_megatron.models.specs import get_gpt_lns_layer_spec


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
    return lns_transformer_config(
        c.output_layer_init,
        num_layers=c.num_layers,
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
    share_embeddings_and_output_weights: bool = False,
    qk_layernorm: bool = False,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """One model chunk for this pipeline rank (and virtual stage ``vp_stage``)."""
    spec = get_gpt_lns_layer_spec(
        transformer_impl=transformer_impl,
        norm_scheme=norm_scheme,
        normalization=config.normalization,
        qk_layernorm=qk_layernorm,
    )
    if norm_scheme == "lns" and transformer_impl == "local":
        # megatron's final norm without apex (WrappedTorchNorm) refuses sequence parallelism and
        # zero-centered gamma; an unscaled LNSNorm supports both and is the same function.
        spec = TransformerBlockSubmodules(
            layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=LNSNorm
        )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        vp_stage=vp_stage,
    )


def unwrap(chunk):
    """The GPTModel inside DDP and Float16Module wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk
