"""LayerNorm Scaling (LNS) as megatron-core modules.

Sun et al., "The Curse of Depth in Large Language Models" (2025): in a Pre-LN transformer the
residual stream's variance grows with depth, so deep layers drift toward identity maps. LNS
multiplies the outputs of the pre-attention and pre-MLP norms of layer ``l`` (1-based, global
over the whole model) by ``1/sqrt(l)``. The final norm is not scaled.

The scale is applied to the norm's *affine parameters* inside the forward pass
(gamma -> s * gamma, beta -> s * beta), which is the same function with the same gradients as
multiplying the norm output, but costs a hidden-size multiply instead of an activation-sized
kernel, and keeps Transformer Engine's fused LayerNorm+GEMM intact. The scale is a Python
float: not a parameter and not a buffer, so meta-device init and ``to_empty()`` cannot wipe it,
and checkpoints are identical to Pre-LN ones.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from lns_megatron.schemes.scale import layernorm_scale  # noqa: F401  (public here too)

try:
    import transformer_engine  # noqa: F401  (megatron's TE wrappers import without it, as mocks)

    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


def scaled_affine(weight, bias, scale: float, zero_centered_gamma: bool):
    """Affine parameters whose norm output equals ``scale`` times the original norm output.

    With zero-centered gamma (``apply_layernorm_1p``) the norm multiplies by ``1 + gamma``, so
    the effective parameter is ``s * (1 + gamma) - 1``.
    """
    if scale == 1.0:
        return weight, bias
    weight = weight * scale + (scale - 1.0) if zero_centered_gamma else weight * scale
    return weight, (None if bias is None else bias * scale)


class LNSNorm(torch.nn.Module):
    """RMSNorm or LayerNorm (by ``config.normalization``) for the local spec, with LNS.

    ``lns_scale`` is set by :class:`LNSTransformerLayer` once the global layer number is known
    (megatron builds norms with ``(config, hidden_size, eps)`` only). Unlike megatron's
    ``WrappedTorchNorm`` it supports zero-centered gamma and sequence parallelism: its
    parameters carry ``sequence_parallel`` so that ``finalize_model_grads`` all-reduces them.
    """

    lns_scale: float = 1.0

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(
                f"LNSNorm: normalization={config.normalization!r} is not supported; use RMSNorm or LayerNorm"
            )
        self.rms = config.normalization == "RMSNorm"
        self.hidden_size = hidden_size
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in (self.weight, self.bias):
            if p is not None:
                p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = scaled_affine(self.weight, self.bias, self.lns_scale, self.zero_centered_gamma)
        if self.zero_centered_gamma:  # the torch kernels take the full gamma
            weight = weight + 1.0
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), weight, bias, self.eps)

    def extra_repr(self) -> str:
        kind = "RMSNorm" if self.rms else "LayerNorm"
        return f"{kind}({self.hidden_size}, eps={self.eps}), lns_scale={self.lns_scale:.6g}"


if HAVE_TE:

    class LNSTELayerNormColumnParallelLinear(TELayerNormColumnParallelLinear):
        """Transformer Engine's fused norm + column-parallel GEMM, with LNS on the norm.

        The fused kernel reads ``layer_norm_weight``/``layer_norm_bias``. For the duration of
        the forward they are replaced by their scaled versions (autograd carries the gradient
        back to the real parameters), so the fusion stays and no activation-sized kernel is
        added. The real parameters, their ``sequence_parallel`` attribute and the checkpoint
        keys are untouched.
        """

        lns_scale: float = 1.0

        def forward(self, x, *args, **kwargs):
            if self.lns_scale == 1.0:
                return super().forward(x, *args, **kwargs)
            params = self._parameters
            real = {n: params[n] for n in ("layer_norm_weight", "layer_norm_bias") if params.get(n) is not None}
            weight, bias = scaled_affine(
                real["layer_norm_weight"],
                real.get("layer_norm_bias"),
                self.lns_scale,
                self.config.layernorm_zero_centered_gamma,
            )
            params["layer_norm_weight"] = weight
            if bias is not None:
                params["layer_norm_bias"] = bias
            try:
                return super().forward(x, *args, **kwargs)
            finally:
                params.update(real)


_SCALED_NORM_CLASSES: dict = {}


def with_layernorm_scaling(norm: torch.nn.Module, zero_centered_gamma: bool, scale_output: bool = False):
    """``norm`` (an instance whose affine parameters are ``weight`` and ``bias``) turned into an instance of a
    subclass of its own class that applies ``lns_scale`` to its output; its parameters, hooks and checkpoint keys
    stay as they are.

    By default the scale goes into the effective weight and bias for the forward, as in the fused linear above:
    no activation-sized kernel. ``scale_output`` multiplies the output instead, and of a ``(normed, residual)``
    tuple only the first, for a norm that captured its weight elsewhere (TE's fused-residual RMSNorm hands its
    ``weight`` to an op pipeline at the first forward).
    """
    if hasattr(norm, "lns_zero_centered_gamma"):
        raise TypeError(f"with_layernorm_scaling: {type(norm).__name__} applies LayerNorm Scaling already")
    base = type(norm)
    key = (base, scale_output)
    if key not in _SCALED_NORM_CLASSES:

        def forward(self, x, *args, **kwargs):
            scale = self.lns_scale
            if scale == 1.0:
                return super(cls, self).forward(x, *args, **kwargs)
            if scale_output:
                out = super(cls, self).forward(x, *args, **kwargs)
                return (out[0] * scale, *out[1:]) if isinstance(out, tuple) else out * scale
            params = self._parameters
            real = {n: params[n] for n in ("weight", "bias") if params.get(n) is not None}
            weight, bias = scaled_affine(real["weight"], real.get("bias"), scale, self.lns_zero_centered_gamma)
            params["weight"] = weight
            if bias is not None:
                params["bias"] = bias
            try:
                return super(cls, self).forward(x, *args, **kwargs)
            finally:
                params.update(real)

        name = f"LNS{base.__name__}" + ("ScaledOutput" if scale_output else "")
        cls = type(name, (base,), dict(lns_scale=1.0, forward=forward, __module__=__name__, __qualname__=name,
                                       __doc__=f"{base.__name__} with LayerNorm Scaling (lns_scale)."))
        globals()[name] = cls  # findable by pickle
        _SCALED_NORM_CLASSES[key] = cls
    norm.__class__ = _SCALED_NORM_CLASSES[key]
    norm.lns_zero_centered_gamma = zero_centered_gamma
    return norm


if HAVE_TE:
    from megatron.core.extensions.transformer_engine import TENorm

    try:  # megatron-core 0.17+: RMSNorm that also returns the residual
        from megatron.core.extensions.transformer_engine import TEFusedResidualRMSNorm
    except ImportError:
        TEFusedResidualRMSNorm = None

    class LNSTENorm:
        """megatron-core's ``TENorm`` (a factory of Transformer Engine's ``LayerNorm``/``RMSNorm``) with LNS.

        This is the standalone TE norm of the MoE layers' pre-MLP norm and of multi-latent attention's input
        norm, which are not fused into a linear layer. The instance is TE's own, with
        :func:`with_layernorm_scaling`: the scale goes into the effective gamma (and beta) for the forward,
        zero-centered gamma included; TE's fused-residual RMSNorm (``(normed, residual)``) has only its
        normed output scaled.
        """

        lns_scale: float = 1.0  # set by LNSTransformerLayer on the instance

        def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
            norm = TENorm(config, hidden_size, eps, **kwargs)
            fused_residual = TEFusedResidualRMSNorm is not None and isinstance(norm, TEFusedResidualRMSNorm)
            return with_layernorm_scaling(norm, config.layernorm_zero_centered_gamma, scale_output=fused_residual)

    class LNSTENormWithResidual(LNSTENorm):
        """:class:`LNSTENorm` for megatron-core 0.19's ``has_residual=True`` norm positions."""

        def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **kwargs):
            return LNSTENorm.__new__(cls, config, hidden_size, eps, has_residual=True, **kwargs)


class LNSTransformerLayer(TransformerLayer):
    """A megatron-core ``TransformerLayer`` with LayerNorm Scaling.

    Implements Sun et al., "The Curse of Depth in Large Language Models" (2025): the outputs
    of the pre-attention and pre-MLP norms are multiplied by ``1/sqrt(layer_number)``.
    ``self.layer_number`` is megatron's global 1-based index (pipeline and virtual-pipeline
    offsets included), so the scale is right under every parallel layout.

    The norm may be a real module (local spec: :class:`LNSNorm`) or fused into the next linear
    layer (Transformer Engine spec: ``input_layernorm`` is ``IdentityOp`` and the norm lives in
    ``linear_qkv``/``linear_fc1``). Either way the module that holds the norm's parameters must
    support ``lns_scale``; anything else is refused, because scaling an ``IdentityOp`` would
    silently do nothing.
    """

    def __init__(self, config: TransformerConfig, submodules, layer_number: int = 1, *args,
                 lns_depth: Optional[int] = None, **kwargs):
        super().__init__(config, submodules, layer_number, *args, **kwargs)
        self._lns_depth = lns_depth  # a grown model's layer may keep the l it was trained with (training/growth.py)
        self.lns_scale = layernorm_scale(self.lns_depth())
        for where, carrier in self._pre_norm_carriers():
            if not hasattr(type(carrier), "lns_scale"):
                raise TypeError(
                    f"LNSTransformerLayer: the {where} norm is a {type(carrier).__name__}, which cannot apply "
                    "LayerNorm Scaling; build the layer with lns_megatron.get_gpt_lns_layer_spec() "
                    "(it swaps in LNSNorm, LNSTENorm or the LNS fused norm-linear for each pre-norm)"
                )
            carrier.lns_scale = self.lns_scale

    def lns_depth(self) -> int:
        """The ``l`` of 1/sqrt(l): the global layer number (a hybrid stack counts pairs instead), or the one given."""
        return self.layer_number if self._lns_depth is None else self._lns_depth

    def _pre_norm_carriers(self):
        """The modules that hold the pre-attention and pre-MLP norm parameters (of the sublayers this
        layer has: a hybrid layer has attention or MLP only)."""
        carriers = []
        for where, norm, sublayer, fused in (("pre-attention", self.input_layernorm, self.self_attention, "linear_qkv"),
                                             ("pre-MLP", self.pre_mlp_layernorm, self.mlp, "linear_fc1")):
            if isinstance(norm, IdentityOp) and isinstance(sublayer, IdentityOp):
                continue  # no such sublayer
            carrier = getattr(sublayer, fused, None) if isinstance(norm, IdentityOp) else norm
            if carrier is None:
                raise TypeError(f"LNSTransformerLayer: the {where} norm is fused into {type(sublayer).__name__}, which "
                                f"has no {fused}; LNS reaches standalone norms and the norm fused into {fused} only "
                                "(build multi-latent attention without mla_down_proj_fusion)")
            carriers.append((where, carrier))
        return carriers

    def extra_repr(self) -> str:
        return f"layer_number={self.layer_number}, lns_depth={self.lns_depth()}, lns_scale={self.lns_scale:.6g}"
