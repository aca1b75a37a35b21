"""LayerNorm Scaling on megatron-core's ``HybridModel`` (megatron-core 0.19 and later).

``HybridModel`` builds one layer per symbol of its layer pattern, so a transformer layer is two
hybrid layers: an attention layer (``*``) and an MLP layer (``-``). LNS (Sun et al., "The Curse of
Depth in Large Language Models", 2025) scales the pre-attention and the pre-MLP norm of transformer
layer ``l`` by ``1/sqrt(l)``, so here the attention layer and the MLP layer of pair ``l`` share it:
hybrid layers ``2l - 1`` and ``2l`` (megatron's global, 1-based numbering, pipeline offsets included).

Only a strictly alternating pattern ``*-*-...*-`` (with ``|`` pipeline separators anywhere) maps
to the paper's ``l``; any other pattern, or a Mamba, MoE, MLA or GDN symbol, is refused. The final
norm is an unscaled :class:`LNSNorm`, since megatron's ``HybridStack`` builds Transformer Engine's
norm unconditionally, and the modules are megatron-core's local ones (as in ``get_gpt_lns_layer_spec``).
"""

from __future__ import annotations

import dataclasses
import re

from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from lns_megatron.models.specs import get_gpt_lns_layer_spec
from lns_megatron.schemes.lns import LNSNorm, LNSTransformerLayer

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


def get_hybrid_lns_stack_spec(norm_scheme: str = "lns", normalization: str = "RMSNorm") -> ModuleSpec:
    """A ``HybridStack`` spec of local modules: attention and MLP layers with LNS (or Pre-LN)."""
    _require_hybrid("get_hybrid_lns_stack_spec")
    gpt = get_gpt_lns_layer_spec("local", norm_scheme, normalization)
    layer = LNSHybridLayer if norm_scheme == "lns" else gpt.module
    sub = gpt.submodules
    attention = dataclasses.replace(sub, pre_mlp_layernorm=IdentityOp, mlp=IdentityOp, mlp_bda=IdentityFuncOp)
    mlp = dataclasses.replace(sub, input_layernorm=IdentityOp, self_attention=IdentityOp, self_attn_bda=IdentityFuncOp)
    refused = {f.name: _NoLNSMapping for f in dataclasses.fields(HybridStackSubmodules)
               if f.name not in ("attention_layer", "mlp_layer", "mtp_block_spec")}
    return ModuleSpec(module=LNSHybridStack, submodules=HybridStackSubmodules(
        attention_layer=ModuleSpec(module=layer, submodules=attention),
        mlp_layer=ModuleSpec(module=layer, submodules=mlp), **refused))


def build_hybrid_lns_model(config, vocab_size: int, max_sequence_length: int, hybrid_layer_pattern: str,
                           norm_scheme: str = "lns", **kwargs):
    """A ``HybridModel`` with LNS; ``config.num_layers`` counts hybrid layers (twice the transformer layers)."""
    _require_hybrid("build_hybrid_lns_model")
    pairs = check_lns_pattern(hybrid_layer_pattern)
    if config.num_layers != 2 * pairs:
        raise ValueError(f"build_hybrid_lns_model: num_layers={config.num_layers} but hybrid_layer_pattern "
                         f"{hybrid_layer_pattern!r} has {2 * pairs} layers; set num_layers to {2 * pairs}")
    kwargs.setdefault("position_embedding_type", "rope")
    return HybridModel(config, get_hybrid_lns_stack_spec(norm_scheme, config.normalization), vocab_size,
                       max_sequence_length, hybrid_layer_pattern=hybrid_layer_pattern, **kwargs)
