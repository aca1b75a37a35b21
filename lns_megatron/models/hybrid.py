"""LayerNorm Scaling on megatron-core's ``HybridModel`` (megatron-core 0.19 and later).

``HybridModel`` builds one layer per symbol of its layer pattern, so a transformer layer is two
hybrid layers: an attention layer (``*``) and an MLP layer (``-``). LNS (Sun et al., "The Curse of
Depth in Large Language Models", 2025) scales the pre-attention and the pre-MLP norm of transformer
layer ``l`` by ``1/sqrt(l)``, so here the attention layer and the MLP layer of pair ``l`` share it:
hybrid layers ``2l - 1`` and ``2l`` (megatron's global, 1-based numbering, pipeline offsets included).

Only a strictly alternating pattern ``*-*-...*-`` (with ``|`` pipeline separators anywhere) maps
to the paper's ``l``; any other pattern, or a Mamba, MoE, MLA or GDN symbol, is refused. The layers
are those of ``get_gpt_lns_layer_spec`` (local, or Transformer Engine's fused norm+GEMM), split in
two. With local modules the final norm is an unscaled :class:`LNSNorm`, since megatron's
``HybridStack`` builds Transformer Engine's norm unconditionally.

Such a HybridModel computes the same function as the GPTModel with the same weights
(:func:`gpt_key` maps the names), which is how checkpoints of it are exported and inspected.
"""

from __future__ import annotations

import dataclasses
import re

from megatron.core import parallel_state
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from lns_megatron.models.specs import get_gpt_lns_layer_spec
from lns_megatron.schemes import NORM_SCHEMES
from lns_megatron.schemes.lns import HAVE_TE, LNSNorm, LNSTransformerLayer

try:  # megatron-core 0.19 and later
    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    HAVE_HYBRID = True
except ImportError:
    HAVE_HYBRID = False

ALTERNATING = re.compile(r"^(\*-)+$")


def check_lns_pattern(pattern: str) -> int:
    """The number of attention+MLP pairs of a hybrid layer pattern LNS can map; refuses any other."""
    main = pattern.split("/")[0].replace("|", "")  # "/" starts the MTP part, "|" separates pipeline stages
    if not ALTERNATING.match(main):
        raise ValueError(f"hybrid_layer_pattern {pattern!r}: LNS counts its depth l over attention+MLP pairs, so "
                         "the pattern must alternate attention and MLP, starting with attention ('*-*-...*-', "
                         "'|' allowed between stages); Mamba, MoE, MLA and GDN layers have no LNS mapping")
    return len(main) // 2


class LNSHybridLayer(LNSTransformerLayer):
    """An attention-only or MLP-only hybrid layer with LNS: layer ``2l - 1`` (attention) or ``2l`` (MLP)
    of the stack is sublayer of transformer layer ``l`` and takes the scale ``1/sqrt(l)``."""

    def lns_depth(self) -> int:
        has_attention = not isinstance(self.self_attention, IdentityOp)
        if has_attention != (self.layer_number % 2 == 1):
            kind = "attention" if has_attention else "MLP"
            raise ValueError(f"LNSHybridLayer: an {kind} layer at position {self.layer_number} of the hybrid "
                             "pattern; LNS needs attention at odd and MLP at even positions ('*-*-...')")
        return (self.layer_number + 1) // 2


class _NoLNSMapping:
    """A hybrid layer kind (Mamba, MoE, MLA, GDN, DSA) that LNS has no mapping for."""

    def __init__(self, *args, layer_number=None, **kwargs):
        raise ValueError(f"LNS hybrid spec: layer {layer_number} of the pattern is not attention ('*') or MLP ('-'); "
                         "LNS on HybridModel maps alternating attention and MLP layers only")


if HAVE_HYBRID:

    class LNSHybridStack(HybridStack):
        """megatron-core's ``HybridStack`` with a local (unscaled) final norm instead of Transformer Engine's."""

        def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
            super().__init__(config, submodules, *args, post_layer_norm=False, **kwargs)
            self.post_layer_norm = post_layer_norm
            if self.post_process and post_layer_norm:
                self.final_norm = LNSNorm(config, config.hidden_size, eps=config.layernorm_epsilon)


def _require_hybrid(what: str) -> None:
    if not HAVE_HYBRID:
        raise ImportError(f"{what}: HybridModel is in megatron-core 0.19 and later (Python 3.12); "
                          "upgrade megatron-core, or use GPTModel with get_gpt_lns_layer_spec")


def get_hybrid_lns_stack_spec(norm_scheme: str = "lns", normalization: str = "RMSNorm",
                              transformer_impl: str = "local", qk_layernorm: bool = False) -> ModuleSpec:
    """A ``HybridStack`` spec: the attention and MLP halves of ``get_gpt_lns_layer_spec``'s layer, with LNS
    (or Pre-LN). Under Transformer Engine the pre-norms stay fused into ``linear_qkv``/``linear_fc1``."""
    _require_hybrid("get_hybrid_lns_stack_spec")
    if NORM_SCHEMES.get(norm_scheme) and NORM_SCHEMES[norm_scheme].gpt_only:
        raise ValueError(f"get_hybrid_lns_stack_spec: norm_scheme={norm_scheme!r} is built for GPTModel's layers only")
    gpt = get_gpt_lns_layer_spec(transformer_impl, norm_scheme, normalization, qk_layernorm=qk_layernorm)
    layer = LNSHybridLayer if NORM_SCHEMES[norm_scheme].lns else gpt.module  # (checked by the GPT spec)
    sub = gpt.submodules
    attention = dataclasses.replace(sub, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp)
    mlp = dataclasses.replace(sub, input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp)
    refused = {f.name: _NoLNSMapping for f in dataclasses.fields(HybridStackSubmodules)
               if f.name not in ("attention_layer", "mlp_layer", "mtp_block_spec")}
    stack = LNSHybridStack if transformer_impl == "local" else HybridStack  # TE: megatron's TENorm, unscaled
    return ModuleSpec(module=stack, submodules=HybridStackSubmodules(
        attention_layer=ModuleSpec(module=layer, submodules=attention),
        mlp_layer=ModuleSpec(module=layer, submodules=mlp), **refused))


def build_hybrid_lns_model(config, vocab_size: int, max_sequence_length: int, hybrid_layer_pattern: str,
                           norm_scheme: str = "lns", transformer_impl: str = "local", qk_layernorm: bool = False,
                           vp_stage=None, **kwargs):
    """A ``HybridModel`` with LNS; ``config.num_layers`` counts hybrid layers (twice the transformer layers).

    Builds the chunk of this pipeline rank and virtual stage ``vp_stage``; further keyword arguments go to
    ``HybridModel``."""
    _require_hybrid("build_hybrid_lns_model")
    pairs = check_lns_pattern(hybrid_layer_pattern)
    if config.num_layers != 2 * pairs:
        raise ValueError(f"build_hybrid_lns_model: num_layers={config.num_layers} but hybrid_layer_pattern "
                         f"{hybrid_layer_pattern!r} has {2 * pairs} layers; set num_layers to {2 * pairs}")
    kwargs.setdefault("position_embedding_type", "rope")
    kwargs.setdefault("pre_process", parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage))
    kwargs.setdefault("post_process", parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage))
    spec = get_hybrid_lns_stack_spec(norm_scheme, config.normalization, transformer_impl, qk_layernorm)
    return HybridModel(config, spec, vocab_size, max_sequence_length, hybrid_layer_pattern=hybrid_layer_pattern,
                       vp_stage=vp_stage, **kwargs)


def layout_pattern(pattern: str, num_layers: int, stages: int) -> str:
    """The driver's ``--hybrid-layer-pattern`` for ``num_layers`` transformer layers split evenly over ``stages``
    pipeline stages (PP x VPP chunks, as for GPTModel): the pattern with ``|`` between the stages' pairs."""
    flag = "--hybrid-layer-pattern"
    if "|" in pattern or "/" in pattern:
        raise ValueError(f"{flag} {pattern!r}: give it without '|' or '/'; the pipeline stages come from "
                         "--pipeline-model-parallel-size and --num-layers-per-virtual-pipeline-stage, as for "
                         "GPTModel, and multi-token prediction is not supported by lns-pretrain")
    try:
        pairs = check_lns_pattern(pattern)
    except ValueError as e:
        raise ValueError(f"{flag} {str(e).split(' ', 1)[1]}") from None
    if pairs != num_layers:
        raise ValueError(f"{flag} {pattern!r} has {pairs} attention+MLP pairs but --num-layers is {num_layers}; "
                         f"give {'*-' * num_layers!r} or --num-layers {pairs}")
    per_stage = "*-" * (num_layers // stages)
    return "|".join([per_stage] * stages)


def layers_per_transformer_layer(model) -> int:
    """2 for a HybridModel (attention and MLP are separate layers), 1 for a GPTModel."""
    return 2 if HAVE_HYBRID and isinstance(model, HybridModel) else 1


def gpt_key(name: str) -> str:
    """A HybridModel (LNS stack) parameter name -> the same parameter's GPTModel name: hybrid layers ``2i``
    (attention) and ``2i + 1`` (MLP) are transformer layer ``i``."""
    if name.startswith("decoder.layers."):
        index, rest = name[len("decoder.layers."):].split(".", 1)
        return f"decoder.layers.{int(index) // 2}.{rest}"
    return name.replace("decoder.final_norm.", "decoder.final_layernorm.")


def copy_into_gpt(hybrid, gpt) -> None:
    """Load a whole (unsplit) HybridModel's weights into the GPTModel of the same network, checking that every
    parameter of each has its counterpart."""
    source = {gpt_key(k): v for k, v in hybrid.state_dict().items() if not k.endswith("_extra_state")}
    target = {k for k in gpt.state_dict() if not k.endswith("_extra_state")}
    if set(source) != target:
        raise ValueError(f"copy_into_gpt: the HybridModel and GPTModel differ: only in HybridModel "
                         f"{sorted(set(source) - target)[:4]}, only in GPTModel {sorted(target - set(source))[:4]}")
    gpt.load_state_dict(source, strict=False)


# For Megatron-LM's `pretrain_hybrid.py --spec lns_megatron.specs lns_hybrid_stack_spec` (or the TE one).
if HAVE_HYBRID:
    lns_hybrid_stack_spec = get_hybrid_lns_stack_spec("lns")
    if HAVE_TE:
        lns_hybrid_te_stack_spec = get_hybrid_lns_stack_spec("lns", transformer_impl="transformer_engine")
