"""Small, named shims for particular megatron-core releases (one place for them)."""

from __future__ import annotations


def moe_router_without_te() -> None:
    """megatron-core 0.16.1's MoE router gating tests ``te_general_gemm``, a name its ``moe_utils`` binds only when
    Transformer Engine imports, so without TE every MoE forward fails with a NameError. 0.19 binds it to None
    there; bind it to None the same way (the router then runs its own ``torch.mm``). Called when an MoE model
    is built, never at import."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
