"""Depth health: is each layer still doing work, or drifting toward identity?

Per transformer layer l (1-based, global; on a HybridModel, its attention and MLP layers together):
the variance of the residual stream it outputs, the gradient norm of its parameters, and the angular
distance arccos(cos(h_{l-1}, h_l))/pi between its input and output hidden states, averaged over
tokens (Gromov et al.; the curse-of-depth paper). Under Pre-LN the variance grows with depth and
deep layers' angular distance falls toward 0; LNS holds the variance down. Works for every TP/PP/VPP
layout: statistics are reduced over TP (sequence-parallel shards), the distributed-optimizer shards
and PP stages.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from lns_megatron.models.gpt import unwrap
from lns_megatron.models.hybrid import layers_per_transformer_layer

STATS = ("sum", "sumsq", "count", "angle", "tokens")


def angular_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """arccos(cos(x, y)) / pi along the last dimension, in [0, 1] (Gromov et al.; the LNS paper)."""
    cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).clamp(-1.0, 1.0)
    return torch.arccos(cos) / math.pi


def layer_input(args, kwargs) -> torch.Tensor:
    """The hidden states a TransformerLayer was called with (keyword or positional)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def layer_output(output) -> torch.Tensor:
    """The hidden states a TransformerLayer returned (it returns ``(hidden, context)``)."""
    return output[0] if isinstance(output, tuple) else output


def _layers(model: List):
    for chunk in model:
        yield from unwrap(chunk).decoder.layers


@torch.no_grad()
def hidden_state_stats(model: List, batch: dict, forward_step, num_layers: int, seq_length: int,
                       sequence_parallel: bool) -> Dict[str, List[float]]:
    """Residual-stream variance and input/output angular distance of every layer on ``batch``."""
    acc = torch.zeros(len(STATS), num_layers, dtype=torch.float64, device=_device(model))
    per_layer = _layers_per_transformer_layer(model)
    attention_inputs = {}  # HybridModel: transformer layer l runs from its attention layer's input

    def hook(layer, args, kwargs, output):
        x = layer_input(args, kwargs)
        if layer.layer_number % per_layer:  # a hybrid attention layer: its MLP layer completes layer l
            attention_inputs[layer.layer_number] = x
            return
        if per_layer > 1:
            x = attention_inputs.pop(layer.layer_number - 1)
        x, y = x.double(), layer_output(output).double()
        angle = angular_distance(x, y)
        acc[:, layer.layer_number // per_layer - 1] += torch.stack([
            y.sum(), y.square().sum(), torch.tensor(float(y.numel()), device=y.device),
            angle.sum(), torch.tensor(float(angle.numel()), device=y.device)])

    handles = [l.register_forward_hook(hook, with_kwargs=True) for l in _layers(model)]
    try:
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        rounds = pp if len(model) > 1 else 1  # interleaving needs micro-batches in multiples of PP
        get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter([batch] * rounds) for _ in model] if len(model) > 1 else iter([batch]),
            model=model if len(model) > 1 else model[0],
            num_microbatches=rounds, seq_length=seq_length,
            micro_batch_size=batch["tokens"].shape[0], forward_only=True,
        )
    finally:
        for h in handles:
            h.remove()
    if sequence_parallel:  # each TP rank saw its own tokens
        dist.all_reduce(acc, group=parallel_state.get_tensor_model_parallel_group())
    if parallel_state.get_context_parallel_world_size() > 1:  # and each CP rank its part of the sequence
        dist.all_reduce(acc, group=parallel_state.get_context_parallel_group())
    dist.all_reduce(acc, group=parallel_state.get_pipeline_model_parallel_group())
    total, sumsq, count, angle, tokens = acc
    mean = total / count
    return {"variance": (sumsq / count - mean.square()).tolist(), "angular-distance": (angle / tokens).tolist()}


def layer_grad_norms(model: List, optimizer, num_layers: int) -> List[float]:
    """L2 norm of each layer's (reduced) parameter gradients, from megatron DDP's main_grad.

    Under expert parallelism the experts' parameters (``allreduce=False``) differ between the expert-parallel
    ranks and are split by the expert tensor-parallel and expert data-parallel groups, so they are summed over
    those groups, the others over TP and DP."""
    owned = _distributed_optimizer_ranges(optimizer)
    ranks = {False: parallel_state.get_tensor_model_parallel_rank(),
             True: parallel_state.get_expert_tensor_parallel_rank()}
    device = _device(model)
    sq = {kind: torch.zeros(num_layers, dtype=torch.float64, device=device) for kind in (False, True)}
    per_layer = _layers_per_transformer_layer(model)
    for layer in _layers(model):
        for p in layer.parameters():
            grad = getattr(p, "main_grad", None)
            expert = not getattr(p, "allreduce", True)
            if grad is None or not (getattr(p, "tensor_model_parallel", False) or ranks[expert] == 0):
                continue  # replicated over TP: count one copy
            if owned is not None:
                r = owned.get(p)
                if r is None:
                    continue
                grad = grad.view(-1)[r.start:r.end]
            sq[expert][(layer.layer_number - 1) // per_layer] += grad.double().square().sum()
    dense, experts = sq[False], sq[True]
    dist.all_reduce(dense, group=parallel_state.get_tensor_model_parallel_group())
    if owned is not None:  # each data-parallel rank holds a shard of the reduced gradients
        dist.all_reduce(dense, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    if parallel_state.get_expert_model_parallel_world_size() > 1:
        dist.all_reduce(experts, group=parallel_state.get_expert_tensor_parallel_group())
        dist.all_reduce(experts, group=parallel_state.get_expert_model_parallel_group())
        if owned is not None:
            dist.all_reduce(experts, group=parallel_state.get_expert_data_parallel_group())
    total = dense + experts
    dist.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
    return total.sqrt().tolist()


def _distributed_optimizer_ranges(optimizer):
    """{param: the Range of it this rank owns} under the distributed optimizer, else None."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    ranges = {}
    for opt in inner:
        if not isinstance(opt, DistributedOptimizer):
            return None
        for p in opt.model_param_gbuf_map:
            ranges[p] = opt._get_model_param_range_map(p)["param"]
    return ranges


def _layers_per_transformer_layer(model: List) -> int:
    return layers_per_transformer_layer(unwrap(model[0]))


def _device(model):
    return next(unwrap(model[0]).parameters()).device
