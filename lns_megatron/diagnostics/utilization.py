"""Layer-utilization metrics of "When Does Sparsity Mitigate the Curse of Depth in LLMs" (2026).

Each asks of layer ``l`` of a trained single-stage GPTModel (``h_0`` the embeddings, ``h_l`` the output
of layer ``l``, ``Δh_l = h_l - h_{l-1}``) whether it does work that the rest of the model depends on:

- **usefulness**: replace the layer with the least-squares affine map ``h_{l-1} W + b`` fitted on
  held-out hidden states (other windows than those the loss is measured on); the layer is *useful*
  when the loss ratio ``loss(linear) / loss`` exceeds 1.1 (the paper's threshold);
- **causal effect** of layer ``s`` on a later layer ``l``: with ``s`` skipped,
  ``mean ||Δh_l(skip) - Δh_l|| / mean ||Δh_l||`` over tokens (the paper's ratio of means);
- **permutation sensitivity**: the loss change when layers ``l`` and ``l+1`` swap places;
- **Jacobian deviation from identity** ``||J - I||_F / d`` and the diagonal mean ``tr(J) / d``, with
  the paper's ``J = (1/N) sum_{t'} sum_t dh_l[t] / dh_{l-1}[t']`` (the summed response of every output
  position to one position's input, averaged over the N input positions; ``J = I`` for an identity layer).
  Estimated with K Rademacher probes ``v`` (Hutchinson): ``E ||J^T v - v||^2 = ||J - I||_F^2`` and
  ``E v^T J v = tr(J)``, each probe one backward pass through every layer at once, so that it runs at
  d = 2048; the standard error over the probes is reported beside each estimate.
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from lns_megatron.diagnostics.surgery import forward_logits, recorded_hidden_states, replaced_layer
from lns_megatron.training.probes import layer_input, layer_output

USEFUL_LOSS_RATIO = 1.1  # the paper's threshold: replacing a useful layer by a linear map costs > 10% loss


# ------------------------------------------------------------------------------------- usefulness


@torch.no_grad()
def fit_linear_maps(gpt_model, windows: torch.Tensor, micro_batch_size: int) -> Tuple[List[torch.Tensor], int]:
    """Per layer, the least-squares affine map from its input to its output on ``windows`` ([n, s + 1]).

    Returns ``([A_1, ..., A_L], tokens)``: ``A_l`` is ``[d + 1, d]`` float64 with ``h_l ≈ [h_{l-1}, 1] A_l``
    (the minimum-norm solution where the states do not determine it), from the normal equations
    accumulated in float64 over every token.
    """
    device = next(gpt_model.parameters()).device
    L = len(gpt_model.decoder.layers)
    gram, cross, tokens = None, None, 0
    for start in range(0, len(windows), micro_batch_size):
        batch = windows[start:start + micro_batch_size, :-1].to(device)
        with recorded_hidden_states(gpt_model) as rec:
            forward_logits(gpt_model, batch)
        states = [h.flatten(0, 1).double() for h in rec.states]
        d = states[0].shape[1]
        if gram is None:
            gram = torch.zeros(L, d + 1, d + 1, dtype=torch.float64, device=device)
            cross = torch.zeros(L, d + 1, d, dtype=torch.float64, device=device)
        ones = torch.ones(len(states[0]), 1, dtype=torch.float64, device=device)
        for l in range(L):
            x = torch.cat([states[l], ones], dim=1)
            gram[l] += x.T @ x
            cross[l] += x.T @ states[l + 1]
        tokens += len(states[0])
    # gelsd: the SVD-based solver, minimum norm where the Gram matrix is singular (CPU-only in torch)
    maps = [torch.linalg.lstsq(gram[l].cpu(), cross[l].cpu(), driver="gelsd").solution for l in range(L)]
    return maps, tokens


def linear_layer(gpt_model, index: int, affine: torch.Tensor):
    """Run the block with ``decoder.layers[index]`` replaced by ``h -> [h, 1] affine`` (float64, then the
    model's dtype)."""
    weight, bias = affine[:-1], affine[-1]

    def apply(hidden):
        w, b = weight.to(hidden.device), bias.to(hidden.device)
        return (hidden.double() @ w + b).to(hidden.dtype)

    return replaced_layer(gpt_model, index, apply)


# ------------------------------------------------------------------------------------- causal effect


class CausalEffect:
    """Accumulates ``sum_tokens ||Δh_l(skip s) - Δh_l||`` and ``sum_tokens ||Δh_l||`` over micro-batches."""

    def __init__(self, num_layers: int):
        self.L = num_layers
        self.change = torch.zeros(num_layers, num_layers, dtype=torch.float64)  # [s - 1, l - 1]
        self.base = torch.zeros(num_layers, dtype=torch.float64)  # [l - 1]

    @staticmethod
    def deltas(states: List[torch.Tensor]) -> List[torch.Tensor]:
        return [(states[l] - states[l - 1]).double() for l in range(1, len(states))]

    def add_base(self, base_deltas: List[torch.Tensor]) -> None:
        for l, delta in enumerate(base_deltas):
            self.base[l] += delta.norm(dim=-1).sum().item()

    def add_skip(self, skipped: int, base_deltas: List[torch.Tensor], skip_deltas: List[torch.Tensor]) -> None:
        """``skipped``: the 0-based index of the layer skipped; only later layers are affected."""
        for l in range(skipped + 1, self.L):
            self.change[skipped, l] += (skip_deltas[l] - base_deltas[l]).norm(dim=-1).sum().item()

    def matrix(self) -> List[List[float]]:
        """``[s - 1][l - s - 1]``: the effect of skipping layer ``s`` on layer ``l``, for l = s+1..L."""
        base = self.base.clamp(min=1e-300)
        return [(self.change[s, s + 1:] / base[s + 1:]).tolist() for s in range(self.L)]


# ------------------------------------------------------------------------------------------ Jacobian


def rademacher_probes(num_layers: int, num_probes: int, hidden: int, seed: int) -> torch.Tensor:
    """``[L, K, d]`` float64 entries ±1, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (num_layers, num_probes, hidden), generator=g).double() * 2 - 1


class JacobianProbes:
    """Accumulates ``sum_{t'} (v^T sum_t dh_l[t]/dh_{l-1}[t'])`` per layer and probe over micro-batches.

    Every layer's input is cut from the graph (a fresh leaf), so one backward pass per probe gives each
    layer's vector-Jacobian product through that layer alone.
    """

    def __init__(self, probes: torch.Tensor):
        self.probes = probes  # [L, K, d]
        self.sums = torch.zeros_like(probes)
        self.positions = 0

    def add(self, gpt_model, tokens: torch.Tensor) -> None:
        if gpt_model.training:  # dropout and MoE aux-loss gradients would enter the Jacobian
            raise ValueError("JacobianProbes: put the model in eval mode (model.eval()) first")
        layers = list(gpt_model.decoder.layers)
        inputs, outputs = [], []

        def cut(layer, args, kwargs):  # the layer's input as a leaf of its own graph
            leaf = layer_input(args, kwargs).detach().requires_grad_(True)
            inputs.append(leaf)
            if "hidden_states" in kwargs:
                return args, dict(kwargs, hidden_states=leaf)
            return (leaf, *args[1:]), kwargs

        def keep(layer, args, kwargs, output):
            outputs.append(layer_output(output))

        handles = [l.register_forward_pre_hook(cut, with_kwargs=True) for l in layers]
        handles += [l.register_forward_hook(keep, with_kwargs=True) for l in layers]
        try:
            with torch.enable_grad():
                forward_logits(gpt_model, tokens)
                K = self.probes.shape[1]
                for k in range(K):
                    probes = [self.probes[l, k].to(outputs[l].device, outputs[l].dtype).expand_as(outputs[l])
                              for l in range(len(layers))]
                    # autograd.grad: only these input gradients, no parameter .grad is touched
                    grads = torch.autograd.grad(outputs, inputs, grad_outputs=probes, retain_graph=k < K - 1)
                    for l, g in enumerate(grads):
                        self.sums[l, k] += g.double().sum(dim=(0, 1)).cpu()
        finally:
            for h in handles:
                h.remove()
        self.positions += tokens.numel()

    def estimates(self):
        """Per layer: (||J - I||_F / d, its standard error, tr(J) / d, its standard error)."""
        d, K = self.probes.shape[2], self.probes.shape[1]
        vjp = self.sums / self.positions  # J^T v, [L, K, d]
        squared = (vjp - self.probes).square().sum(-1)  # [L, K]: ||(J - I)^T v||^2, mean ||J - I||_F^2
        trace = (vjp * self.probes).sum(-1)  # [L, K]: v^T J v, mean tr(J)
        deviation, deviation_err, diagonal, diagonal_err = [], [], [], []
        for l in range(len(squared)):
            mean_sq = squared[l].mean().item()
            se_sq = squared[l].std().item() / math.sqrt(K) if K > 1 else float("inf")
            norm = math.sqrt(mean_sq)
            deviation.append(norm / d)
            deviation_err.append((se_sq / (2 * norm) if norm > 0 else math.sqrt(se_sq)) / d)  # delta method
            diagonal.append(trace[l].mean().item() / d)
            diagonal_err.append((trace[l].std().item() / math.sqrt(K) if K > 1 else float("inf")) / d)
        return deviation, deviation_err, diagonal, diagonal_err
