"""Peri-LN: a norm on each sublayer's output as well as its input.

Kim et al., "Peri-LN: Revisiting Normalization Layer in the Transformer Architecture" (2025), the
placement of Gemma 2/3 and OLMo 2's output norms: ``x <- x + Norm_out(F(Norm_in(x)))`` for attention and
MLP, each ``Norm_out`` with its own gamma (initialized to 1) and the configured norm type. The final norm
stays. ``peri-lns`` adds LayerNorm Scaling (``1/sqrt(l)``) on the input norms only.

``Norm_out`` lives inside the sublayer's output projection (``linear_proj``, ``linear_fc2``): a
row-parallel linear whose output, bias included, goes through its norm before the residual add. Under
tensor parallelism that output is already all-reduced (or, with sequence parallelism, reduce-scattered
over the sequence with the whole hidden dimension), so the norm sees whole tokens; its parameters carry
``sequence_parallel`` like the input norms'. Checkpoint keys: ``...linear_proj.output_norm.weight``.
"""

from __future__ import annotations

from megatron.core.tensor_parallel import RowParallelLinear

from lns_megatron.schemes.lns import HAVE_TE, LNSNorm


class _OutputNorm:
    """Mixin for a row-parallel linear: returns ``(Norm_out(x W + b), None)``."""

    norm_class = LNSNorm

    def __init__(self, input_size, output_size, *args, config, **kwargs):
        super().__init__(input_size, output_size, *args, config=config, **kwargs)
        self.output_norm = self.norm_class(config, output_size, eps=config.layernorm_epsilon)

    def forward(self, x, *args, **kwargs):
        output, bias = super().forward(x, *args, **kwargs)
        if bias is not None:  # skip_bias_add: the bias belongs to F's output, inside the norm
            output = output + bias
        return self.output_norm(output), None


class PeriRowParallelLinear(_OutputNorm, RowParallelLinear):
    """megatron-core's ``RowParallelLinear`` followed by a Peri-LN output norm (:class:`LNSNorm`, unscaled)."""


if HAVE_TE:
    from megatron.core.extensions.transformer_engine import TENorm, TERowParallelLinear

    class PeriTERowParallelLinear(_OutputNorm, TERowParallelLinear):
        """Transformer Engine's ``TERowParallelLinear`` followed by a Peri-LN output norm (``TENorm``)."""

        norm_class = TENorm


def output_linear(transformer_impl: str):
    """The output projection class with Peri-LN's norm for this implementation."""
    return PeriRowParallelLinear if transformer_impl == "local" else PeriTERowParallelLinear
