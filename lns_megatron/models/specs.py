"""GPT layer specs with LayerNorm Scaling, built from megatron-core's own specs.

``get_gpt_lns_layer_spec`` takes megatron-core's local or Transformer Engine layer spec and
swaps in only what LNS needs: the layer class, and the modules that hold the pre-norms. All
else (attention backend, MLP, checkpoint key maps) stays megatron-core's.

``lns_local_spec`` and ``lns_te_spec`` are module-level ``ModuleSpec`` objects for Megatron-LM's
``pretrain_gpt.py --spec lns_megatron.specs lns_local_spec``, which imports the attribute and
uses it without calling it. They use RMSNorm, the LLaMA setup of the paper; the norm type itself
is chosen by ``TransformerConfig.normalization``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from lns_megatron.schemes.lns import HAVE_TE, LNSNorm, LNSTransformerLayer

NORM_SCHEMES = ("pre", "lns")
TRANSFORMER_IMPLS = ("local", "transformer_engine")


def get_gpt_lns_layer_spec(
    transformer_impl: Literal["local", "transformer_engine"] = "local",
    norm_scheme: Literal["pre", "lns"] = "lns",
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm",
    qk_layernorm: bool = False,
    **spec_kwargs,
) -> ModuleSpec:
    """A GPT layer spec with LayerNorm Scaling (``norm_scheme="lns"``) or plain Pre-LN (``"pre"``).

    ``"pre"`` returns megatron-core's own spec unchanged. Extra keyword arguments (for example
    ``num_experts``) go to megatron-core's spec function.
    """
    if norm_scheme not in NORM_SCHEMES:
        raise ValueError(f"get_gpt_lns_layer_spec: norm_scheme={norm_scheme!r}; choose one of {NORM_SCHEMES}")
    if normalization not in ("RMSNorm", "LayerNorm"):
        raise ValueError(f"get_gpt_lns_layer_spec: normalization={normalization!r}; choose RMSNorm or LayerNorm")

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
    if norm_scheme == "pre":
        return spec

    layer = spec.submodules
    if transformer_impl == "local":
        layer = dataclasses.replace(layer, input_layernorm=LNSNorm, pre_mlp_layernorm=LNSNorm)
    else:
        from lns_megatron.schemes.lns import LNSTELayerNormColumnParallelLinear as FusedNormLinear

        layer = dataclasses.replace(
            layer,
            self_attention=_with_submodule(layer.self_attention, "linear_qkv", FusedNormLinear),
            mlp=_with_submodule(layer.mlp, "linear_fc1", FusedNormLinear),
        )
    return dataclasses.replace(spec, module=LNSTransformerLayer, submodules=layer)


def _with_submodule(spec, name: str, module):
    """A copy of ``spec`` with one field of its submodules replaced, when that field is fused.

    ``spec`` is a ``ModuleSpec``, or (megatron-core 0.19's MLP) a ``functools.partial`` taking ``submodules=``.
    """
    partial = isinstance(spec, functools.partial)
    submodules = spec.keywords.get("submodules") if partial else spec.submodules
    if submodules is None or not hasattr(submodules, name):
        return spec  # e.g. MoE: LNSTransformerLayer refuses the unfused TE norm with a clear error
    submodules = dataclasses.replace(submodules, **{name: module})
    if partial:
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, "submodules": submodules})
    return dataclasses.replace(spec, submodules=submodules)


lns_local_spec = get_gpt_lns_layer_spec("local", "lns")
if HAVE_TE:
    lns_te_spec = get_gpt_lns_layer_spec("transformer_engine", "lns")
