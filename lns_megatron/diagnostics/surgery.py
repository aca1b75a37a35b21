"""Running a trained single-stage GPTModel with its layers recorded, skipped, replaced or reordered.

What the depth report and the layer-utilization metrics do to a model, each exact and undone on exit
(also on errors): nothing here changes a parameter.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, List

import torch

from lns_megatron.training.probes import layer_input, layer_output


class recorded_hidden_states:
    """Context manager: the residual stream of an unwrapped single-stage GPTModel during forwards.

    ``states`` becomes ``[h_0, h_1, ..., h_L]``: ``h_0`` is the input of the first layer (the
    embeddings), ``h_l`` the output of layer ``l``; each ``[s, b, hidden]``, detached, from the
    last forward only.
    """

    def __init__(self, gpt_model):
        self.layers = list(gpt_model.decoder.layers)
        self.states: List[torch.Tensor] = []
        self._handles = []

    def _first_input(self, layer, args, kwargs):
        self.states = [layer_input(args, kwargs).detach()]

    def _output(self, layer, args, kwargs, output):
        self.states.append(layer_output(output).detach())

    def __enter__(self):
        self._handles.append(self.layers[0].register_forward_pre_hook(self._first_input, with_kwargs=True))
        self._handles += [l.register_forward_hook(self._output, with_kwargs=True) for l in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


@contextmanager
def replaced_layer(gpt_model, index: int, function: Callable[[torch.Tensor], torch.Tensor]):
    """Run the block with ``decoder.layers[index]`` computing ``function(its input hidden states)`` instead."""
    layer = gpt_model.decoder.layers[index]

    def forward(*args, **kwargs):
        return function(layer_input(args, kwargs)), kwargs.get("context")

    layer.forward = forward  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del layer.forward


def skipped_layer(gpt_model, index: int):
    """Run the block without ``decoder.layers[index]``: that layer returns its input unchanged (it is not
    computed at all)."""
    return replaced_layer(gpt_model, index, lambda hidden: hidden)


@contextmanager
def swapped_layers(gpt_model, index: int):
    """Run the block with ``decoder.layers[index]`` and ``[index + 1]`` in each other's place.

    The modules move, each with everything it holds (an LNS layer keeps its own 1/sqrt(l)): the same
    trained functions, applied in another order.
    """
    layers = gpt_model.decoder.layers
    layers[index], layers[index + 1] = layers[index + 1], layers[index]
    try:
        yield
    finally:
        layers[index], layers[index + 1] = layers[index + 1], layers[index]


def lens_logits(gpt_model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, vocab] of a residual-stream state [s, b, h]: final norm (none under Post-LN and DeepNorm,
    whose layers end in a norm), then output layer."""
    weight = gpt_model.shared_embedding_or_output_weight() if gpt_model.share_embeddings_and_output_weights else None
    final_norm = gpt_model.decoder.final_layernorm
    logits, _ = gpt_model.output_layer(hidden if final_norm is None else final_norm(hidden), weight=weight)
    return logits.transpose(0, 1)


def forward_logits(gpt_model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's logits [b, s, padded vocab] (causal mask, positions 0..s-1)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
    return gpt_model(tokens, positions, None)
