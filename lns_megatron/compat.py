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


def _has_parameter(function, name: str) -> bool:
    import inspect

    return name in inspect.signature(function).parameters


def _transformer_config_has(name: str) -> bool:
    from megatron.core.transformer.transformer_config import TransformerConfig

    return name in TransformerConfig.__dataclass_fields__


def _scheduler_has(name: str) -> bool:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return _has_parameter(OptimizerParamScheduler.__init__, name)


def _async_save_available() -> bool:
    from megatron.core import dist_checkpointing

    return _has_parameter(dist_checkpointing.save, "async_sharded_save")


def async_save_arguments(async_save: bool) -> dict:
    """``dist_checkpointing.save`` arguments for an async save by megatron-core's own writer (the
    ``AsyncCallsQueue`` of ``strategies.async_utils``): 0.19 defaults to NVIDIA Resiliency Extension's instead."""
    from megatron.core import dist_checkpointing

    if async_save and _has_parameter(dist_checkpointing.save, "async_strategy"):
        return {"async_sharded_save": True, "async_strategy": "mcore"}
    return {"async_sharded_save": async_save}


def _rampup_available() -> bool:
    """The ramp-up calculator (before 0.19) or the step schedules that replaced it (0.19)."""
    try:
        from megatron.core import num_microbatches_calculator as calculators
    except ImportError:
        return False
    return any(hasattr(calculators, name) for name in ("RampupBatchsizeNumMicroBatchesCalculator",
                                                       "StepBatchsizeNumMicroBatchesCalculator"))


# (the flag as written, is it set in this config, does the installed megatron-core honour it)
VERSIONED_FLAGS = (
    ("--recompute-modules", lambda c: c.recompute_modules is not None, lambda: _transformer_config_has("recompute_modules")),
    ("--recompute-granularity", lambda c: c.recompute_granularity is not None,
     lambda: _transformer_config_has("recompute_granularity")),
    ("--cp-comm-type", lambda c: c.context_parallel_size > 1, lambda: _transformer_config_has("cp_comm_type")),
    ("--lr-decay-style WSD", lambda c: c.lr_decay_style == "WSD", lambda: _scheduler_has("wsd_decay_steps")),
    ("--async-save", lambda c: c.async_save, _async_save_available),
    ("--rampup-batch-size", lambda c: c.rampup_batch_size is not None, _rampup_available),
)


def unsupported_flag(c, flags=VERSIONED_FLAGS):
    """The first flag of ``c`` that the installed megatron-core cannot honour, as one line naming its version;
    None if there is none."""
    import megatron.core

    for flag, used, available in flags:
        if used(c) and not available():
            return (f"{flag} is not supported by the installed megatron-core {megatron.core.__version__}; upgrade "
                    "megatron-core or leave the flag out")
    return None
