"""GPT layer specs with LayerNorm Scaling (and the other norm schemes), built from megatron-core's own specs.

``get_gpt_lns_layer_spec`` takes megatron-core's local or Transformer Engine layer spec and
swaps in only what the scheme needs: the layer class, the modules that hold the pre-norms and, for
Peri-LN, the output projections that carry the output norms. All else (attention backend, MLP,
checkpoint key maps) stays megatron-core's.

``lns_local_spec`` and ``lns_te_spec`` are module-level ``ModuleSpec`` objects for Megatron-LM's
``pretrain_gpt.py --spec lns_megatron.specs lns_local_spec``, which imports the attribute and
uses it without calling it. They use RMSNorm, the LLaMA setup of the paper; the norm type itself
is chosen by ``TransformerConfig.normalization``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import List, Literal, Optional, Tuple

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from lns_megatron.config import moe_layer_pattern
from lns_megatron.schemes import NORM_SCHEMES as _SCHEMES
from lns_megatron.schemes import norm_scheme as _norm_scheme
from lns_megatron.schemes import peri, post
from lns_megatron.schemes.bhyt import BHyT, BHyTTransformerLayer
from lns_megatron.schemes.lns import HAVE_TE, LNSNorm, LNSTransformerLayer
from lns_megatron.schemes.tanh import DyT

NORM_SCHEMES = tuple(_SCHEMES)
TRANSFORMER_IMPLS = ("local", "transformer_engine")


def get_gpt_lns_layer_spec(
    transformer_impl: Literal["local", "transformer_engine"] = "local",
    norm_scheme: str = "lns",
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm",
    qk_layernorm: bool = False,
    num_layers: Optional[int] = None,
    dyt_alpha_init: Tuple[float, float, float] = (0.5, 0.5, 0.5),
    bhyt_lambda_init: Tuple[float, float] = (2.0, 2.0),
    **spec_kwargs,
) -> ModuleSpec:
    """A GPT layer spec with the norm scheme ``norm_scheme`` (see ``lns_megatron.schemes.NORM_SCHEMES``):
    LayerNorm Scaling (``"lns"``, the default), plain Pre-LN (``"pre"``), Peri-LN (``"peri"``, ``"peri-lns"``),
    Post-LN (``"post"``), DeepNorm (``"deepnorm"``, which needs ``num_layers``, the model's N), Dynamic Tanh
    (``"dyt"``, local only: ``dyt_alpha_init`` holds the initial alpha before attention, before the MLP and,
    for the block's final DyT, at the end), Bounded Hyperbolic Tanh (``"bhyt"``, local RMSNorm only:
    ``bhyt_lambda_init`` holds the initial lambda before attention and before the MLP). Mix-LN's layers
    differ by depth: its spec is :func:`get_gpt_lns_block_spec`'s.

    ``"pre"`` returns megatron-core's own spec unchanged. Extra keyword arguments (for example
    ``num_experts``) go to megatron-core's spec function.
    """
    scheme = _norm_scheme(norm_scheme, "get_gpt_lns_layer_spec: norm_scheme")
    if scheme.post_norm == "first":
        raise ValueError("get_gpt_lns_layer_spec: norm_scheme='mix' has Post-LN and Pre-LN layers; build its "
                         "per-layer spec with get_gpt_lns_block_spec(config, norm_scheme='mix', mix_ln_alpha=...)")
    if scheme.tanh and (transformer_impl != "local" or qk_layernorm):
        raise ValueError("get_gpt_lns_layer_spec: norm_scheme='dyt' replaces every norm with a tanh, which "
                         "Transformer Engine cannot fuse and qk_layernorm would not get; use transformer_impl='local' "
                         "without qk_layernorm")
    if scheme.bhyt and (transformer_impl != "local" or normalization != "RMSNorm"):
        raise ValueError("get_gpt_lns_layer_spec: norm_scheme='bhyt' bounds a tanh by the root mean square, which "
                         "Transformer Engine cannot fuse; use transformer_impl='local' with normalization='RMSNorm'")
    if scheme.deepnorm and not num_layers:
        raise ValueError("get_gpt_lns_layer_spec: norm_scheme='deepnorm' scales by the model's number of layers; "
                         "pass num_layers=N")
    if normalization not in ("RMSNorm", "LayerNorm"):
        raise ValueError(f"get_gpt_lns_layer_spec: normalization={normalization!r}; choose RMSNorm or LayerNorm")

    if transformer_impl == "local" and spec_kwargs.get("multi_latent_attention"):
        raise ValueError("get_gpt_lns_layer_spec: multi_latent_attention with transformer_impl='local': megatron-core's "
                         "local DotProductAttention cannot run MLA (it takes no k_channels; seen in 0.16.1 and 0.19.2); "
                         "use transformer_impl='transformer_engine'")
    if transformer_impl == "local":
        spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization=normalization, **spec_kwargs)
    elif transformer_impl == "transformer_engine":
        if not HAVE_TE:
            raise ImportError(
                "get_gpt_lns_layer_spec: transformer_impl='transformer_engine' needs Transformer Engine; "
                "install it with `pip install -e .[te]` on a CUDA machine, or use transformer_impl='local'"
            )
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm, **spec_kwargs)
    else:
        raise ValueError(
            f"get_gpt_lns_layer_spec: transformer_impl={transformer_impl!r}; choose one of {TRANSFORMER_IMPLS}"
        )
    if scheme.name == "pre":
        return spec
    if scheme.post_norm:
        return _post_norm_spec(spec, transformer_impl, scheme.deepnorm and num_layers)
    if scheme.tanh:
        attention, mlp, _ = dyt_alpha_init
        return dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, input_layernorm=ModuleSpec(module=DyT, params=dict(alpha_init=attention)),
            pre_mlp_layernorm=ModuleSpec(module=DyT, params=dict(alpha_init=mlp))))
    if scheme.bhyt:
        attention, mlp = bhyt_lambda_init
        return dataclasses.replace(spec, module=BHyTTransformerLayer, submodules=dataclasses.replace(
            spec.submodules, input_layernorm=ModuleSpec(module=BHyT, params=dict(lambda_init=attention)),
            pre_mlp_layernorm=ModuleSpec(module=BHyT, params=dict(lambda_init=mlp))))

    layer = spec.submodules
    if transformer_impl == "local":
        # LNSNorm (scale 1 unless LNS sets it) supports sequence parallelism and zero-centered gamma,
        # which megatron's local norm without apex refuses.
        layer = dataclasses.replace(layer, input_layernorm=LNSNorm, pre_mlp_layernorm=LNSNorm)
    elif scheme.lns:
        from lns_megatron.schemes.lns import LNSTELayerNormColumnParallelLinear as FusedNormLinear

        layer = dataclasses.replace(
            layer,
            input_layernorm=_lns_te_norm(layer.input_layernorm),
            pre_mlp_layernorm=_lns_te_norm(layer.pre_mlp_layernorm),
            self_attention=_with_submodule(layer.self_attention, "linear_qkv", FusedNormLinear),
            mlp=_with_submodule(layer.mlp, "linear_fc1", FusedNormLinear),
        )
    if scheme.output_norms:
        output = peri.output_linear(transformer_impl)
        layer = dataclasses.replace(
            layer,
            self_attention=_with_submodule(layer.self_attention, "linear_proj", output, required=scheme.name),
            mlp=_with_submodule(layer.mlp, "linear_fc2", output, required=scheme.name),
        )
    return dataclasses.replace(spec, module=LNSTransformerLayer if scheme.lns else spec.module, submodules=layer)


def _lns_te_norm(norm):
    """A standalone TE pre-norm (the MoE layers' pre-MLP norm, multi-latent attention's input norm) as its LNS
    version; IdentityOp (the norm fused into the next linear) stays."""
    from megatron.core.extensions.transformer_engine import TENorm

    from lns_megatron.schemes.lns import LNSTENorm, LNSTENormWithResidual

    if norm is TENorm:
        return LNSTENorm
    if getattr(norm, "__name__", "") == "_TENormWithResidual":  # megatron-core 0.19's has_residual=True norm
        return LNSTENormWithResidual
    return norm


def moe_layers(config, vp_stage: Optional[int] = None) -> Optional[List[bool]]:
    """Which layers of this pipeline chunk are MoE (from ``config.moe_layer_freq``), or None for a dense model."""
    if not config.num_moe_experts:
        return None
    pattern = moe_layer_pattern(str(config.moe_layer_freq), config.num_layers)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    return [bool(v) for v in pattern[offset:offset + get_num_layers_to_build(config, vp_stage=vp_stage)]]


def _post_norm_spec(spec: ModuleSpec, transformer_impl: str, deepnorm_layers) -> ModuleSpec:
    """megatron's layer spec without input norms, as a :class:`PostNormTransformerLayer` (Post-LN, or DeepNorm
    for a model of ``deepnorm_layers`` layers). Under Transformer Engine the column-parallel linears lose the
    norm fused into them and the post-norms are ``TENorm``."""
    layer = dataclasses.replace(spec.submodules, input_layernorm=IdentityOp, pre_mlp_layernorm=IdentityOp)
    if not (_submodules(layer.self_attention, "linear_qkv") and _submodules(layer.mlp, "linear_fc1")):
        raise ValueError("get_gpt_lns_layer_spec: the post-norm schemes (post, mix, deepnorm) are built for dense "
                         "attention and MLP layers; MoE and multi-latent attention are not supported with them")
    norm = LNSNorm
    if transformer_impl == "transformer_engine":
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TENorm

        norm = TENorm
        layer = dataclasses.replace(
            layer,
            self_attention=_with_submodule(layer.self_attention, "linear_qkv", TEColumnParallelLinear),
            mlp=_with_submodule(layer.mlp, "linear_fc1", TEColumnParallelLinear),
        )
    params = dict(norm=norm)
    if deepnorm_layers:
        params.update(residual_scale=post.deepnorm_residual_scale(deepnorm_layers),
                      init_scale=post.deepnorm_init_scale(deepnorm_layers))
    return ModuleSpec(module=post.PostNormTransformerLayer, submodules=layer, params=params)


def get_gpt_lns_block_spec(config, transformer_impl: str = "local", norm_scheme: str = "lns",
                           qk_layernorm: bool = False, mix_ln_alpha: float = 0.25,
                           dyt_alpha_init: Tuple[float, float, float] = (0.5, 0.5, 0.5),
                           bhyt_lambda_init: Tuple[float, float] = (2.0, 2.0),
                           vp_stage: Optional[int] = None,
                           lns_depths: Optional[List[int]] = None) -> TransformerBlockSubmodules:
    """The layer specs of this pipeline chunk (global layer numbers from megatron's offset) and the final
    norm, for every scheme but ``"pre"`` (which is megatron's own: pass ``get_gpt_lns_layer_spec`` to GPTModel).

    The final norm is an unscaled :class:`LNSNorm` (local; megatron's own without apex refuses sequence
    parallelism and zero-centered gamma) or ``TENorm``, and none for Post-LN and DeepNorm. Mix-LN's first
    ``floor(mix_ln_alpha * N)`` layers are Post-LN, the others Pre-LN. ``lns_depths``: for an LNS scheme, the
    ``l`` of each layer's ``1/sqrt(l)`` (all N of them) where it is not the layer's own number (a grown model's)."""
    scheme = _norm_scheme(norm_scheme, "get_gpt_lns_block_spec: norm_scheme")
    count = get_num_layers_to_build(config, vp_stage=vp_stage)
    moe = moe_layers(config, vp_stage)
    if moe and not scheme.moe:
        raise ValueError(f"get_gpt_lns_block_spec: norm_scheme={norm_scheme!r} on MoE layers: {scheme.no_moe_reason}")
    if getattr(config, "multi_latent_attention", False) and norm_scheme not in ("pre", "lns"):
        raise ValueError(f"get_gpt_lns_block_spec: norm_scheme={norm_scheme!r} with multi-latent attention: only pre "
                         "and lns are built on MLA layers (the other schemes' norms are placed on standard attention)")
    if scheme.post_norm == "first":
        if not 0.0 <= mix_ln_alpha <= 1.0:
            raise ValueError(f"get_gpt_lns_block_spec: mix_ln_alpha={mix_ln_alpha}; it is a fraction of the layers, "
                             "in [0, 1]")
        post_layers = post.mix_ln_post_layers(config.num_layers, mix_ln_alpha)
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
        pre_spec, post_spec = (get_gpt_lns_layer_spec(transformer_impl, kind, config.normalization, qk_layernorm,
                                                      num_layers=config.num_layers) for kind in ("pre", "post"))
        if transformer_impl == "local":  # Mix-LN's Pre-LN layers with LNSNorm, as every non-"pre" scheme
            pre_spec = dataclasses.replace(pre_spec, submodules=dataclasses.replace(
                pre_spec.submodules, input_layernorm=LNSNorm, pre_mlp_layernorm=LNSNorm))
        layers = [post_spec if offset + i + 1 <= post_layers else pre_spec for i in range(count)]
    else:
        def layer_spec(is_moe: bool):
            extra = dict(num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm) if is_moe else {}
            if config.multi_latent_attention:
                extra["multi_latent_attention"] = True
            return get_gpt_lns_layer_spec(transformer_impl, norm_scheme, config.normalization, qk_layernorm,
                                          num_layers=config.num_layers, dyt_alpha_init=dyt_alpha_init,
                                          bhyt_lambda_init=bhyt_lambda_init, **extra)

        specs = {kind: layer_spec(kind) for kind in set(moe or [False])}
        layers = [specs[moe[i] if moe else False] for i in range(count)]
        if lns_depths is not None and scheme.lns:
            if len(lns_depths) != config.num_layers:
                raise ValueError(f"get_gpt_lns_block_spec: lns_depths has {len(lns_depths)} entries for "
                                 f"{config.num_layers} layers")
            offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
            layers = [dataclasses.replace(spec, params=dict(spec.params, lns_depth=lns_depths[offset + i]))
                      for i, spec in enumerate(layers)]
    final_norm = None
    if scheme.tanh:
        final_norm = ModuleSpec(module=DyT, params=dict(alpha_init=dyt_alpha_init[2]))
    elif scheme.final_norm:
        if transformer_impl == "local":
            final_norm = LNSNorm
        else:
            from megatron.core.extensions.transformer_engine import TENorm as final_norm
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=final_norm)


def _submodules(spec, name: str):
    """The submodules of ``spec`` (a ``ModuleSpec`` or a ``functools.partial`` taking ``submodules=``) when they
    have the field ``name``, else None."""
    partial = isinstance(spec, functools.partial)
    submodules = spec.keywords.get("submodules") if partial else getattr(spec, "submodules", None)
    return submodules if submodules is not None and hasattr(submodules, name) else None


def _with_submodule(spec, name: str, module, required: str = ""):
    """A copy of ``spec`` with one field of its submodules replaced, when it has that field; when it does
    not (MoE, MLA), ``required`` names the scheme that needs it and makes that an error.

    ``spec`` is a ``ModuleSpec``, or (megatron-core 0.19's MLP) a ``functools.partial`` taking ``submodules=``.
    """
    partial = isinstance(spec, functools.partial)
    submodules = _submodules(spec, name)
    if submodules is None:
        if required:
            raise ValueError(f"get_gpt_lns_layer_spec: norm_scheme={required!r} puts a norm on {name}'s output, "
                             f"which this layer ({getattr(spec, 'module', spec)}) does not have; MoE and "
                             "multi-latent attention are not supported with it")
        return spec  # e.g. MoE: LNSTransformerLayer refuses the unfused TE norm with a clear error
    submodules = dataclasses.replace(submodules, **{name: module})
    if partial:
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "submodules": submodules})
    return dataclasses.replace(spec, submodules=submodules)


lns_local_spec = get_gpt_lns_layer_spec("local", "lns")
if HAVE_TE:
    lns_te_spec = get_gpt_lns_layer_spec("transformer_engine", "lns")
