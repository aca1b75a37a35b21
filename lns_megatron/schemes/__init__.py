"""Norm schemes: one module per family, each citing its paper, and the registry ``--norm-scheme NAME``
resolves through (``lns_megatron.models.specs`` builds the layer spec from it)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NormScheme:
    name: str
    description: str
    lns: bool = False  # input norms of layer l scaled by 1/sqrt(l) (lns.py)
    output_norms: bool = False  # Peri-LN norms on the attention and MLP outputs (peri.py)
    post_norm: str = ""  # norms after the residual add (post.py): "all" layers, or Mix-LN's "first" ones
    deepnorm: bool = False  # DeepNorm's residual and init scales (post.py)
    final_norm: bool = True  # the norm before the output layer
    tanh: bool = False  # every norm replaced by Dynamic Tanh (tanh.py)
    bhyt: bool = False  # the input norms replaced by Bounded Hyperbolic Tanh (bhyt.py)

    @property
    def no_moe_reason(self) -> str:
        """Why the scheme is not defined on an MoE layer ("" where it is: its norms sit before attention and
        before the MLP, whichever MLP that is)."""
        if self.output_norms:
            return ("Peri-LN's output norm sits on the MLP's output projection, and an MoE layer has one per expert "
                    "plus a weighted sum, so the paper's scheme has no single place for it")
        if self.post_norm:
            return ("its post-norm layer (with DeepNorm's residual and init scales, Mix-LN's Post-LN layers) is "
                    "defined on dense attention and MLP layers only")
        return ""

    @property
    def moe(self) -> bool:
        return not self.no_moe_reason

    @property
    def gpt_only(self) -> bool:
        """Built for GPTModel's layers only (HybridModel's stack takes the Pre-LN-shaped schemes)."""
        return bool(self.post_norm) or self.tanh or self.bhyt


NORM_SCHEMES = {s.name: s for s in (
    NormScheme("pre", "Pre-LN: megatron-core's own layer"),
    NormScheme("lns", "LayerNorm Scaling: Pre-LN with the input norms of layer l scaled by 1/sqrt(l)", lns=True),
    NormScheme("peri", "Peri-LN: norms on the input and the output of attention and MLP", output_norms=True),
    NormScheme("peri-lns", "Peri-LN with LNS on the input norms", lns=True, output_norms=True),
    NormScheme("post", "Post-LN: the norm after each residual add, no final norm", post_norm="all", final_norm=False),
    NormScheme("mix", "Mix-LN: Post-LN in the first floor(alpha N) layers, Pre-LN after", post_norm="first"),
    NormScheme("deepnorm", "DeepNorm: Post-LN with the residual scaled by (2N)^(1/4) and the value, output and "
               "MLP weights initialized scaled by (8N)^(-1/4)", post_norm="all", deepnorm=True, final_norm=False),
    NormScheme("dyt", "Dynamic Tanh: every norm, final included, replaced by gamma * tanh(alpha x) + beta",
               tanh=True),
    NormScheme("bhyt", "Bounded Hyperbolic Tanh: the input norms replaced by gamma * tanh(lambda x / (kappa s)), "
               "s exact before attention and approximated from the weights before the MLP", bhyt=True),
)}


def norm_scheme(name: str, where: str = "norm_scheme") -> NormScheme:
    """The registered scheme ``name``; anything else is refused naming the choices."""
    if name not in NORM_SCHEMES:
        raise ValueError(f"{where}={name!r}; choose one of {tuple(NORM_SCHEMES)}")
    return NORM_SCHEMES[name]
