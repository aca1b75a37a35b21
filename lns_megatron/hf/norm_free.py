"""What a norm-removal fine-tuning ships: the norm-free model in two forms, and its scales folded.

- :func:`to_transformers` (the plain-transformers form): each fixed-scale norm becomes the stock norm with
  ``eps = E`` (huge) and its weight multiplied by ``sqrt(E) / c``, the trick of the released LN-free GPT-2
  models, so that ``AutoModelForCausalLM.from_pretrained`` of the stock architecture computes
  ``x / c * gamma``. The norm's output is off by a relative ``1 - 1/sqrt(1 + s/E) <= s / (2E)``, ``s`` the
  input's sigma^2 at that token: :func:`stock_error_bound` states it from the largest ``s`` seen in fine-tuning.
  GPT-2's attention input has two frozen values (query/key, value); they go into ``c_attn``'s columns.
- The exact form: ``save_pretrained`` of the fine-tuned model (config records the removal, the frozen values
  are buffers), loaded back by :func:`lns_megatron.hf.from_pretrained`.
- :func:`fold_fixed_scales`: every ``gamma / c`` (and LayerNorm's beta) multiplied into the linear maps that
  read the norm, leaving an identity (RMSNorm) or a mean-centering (LayerNorm): the residual stream maps
  linearly onto the logits, for direct logit attribution.
"""

from __future__ import annotations

import math
from typing import Dict

import torch

from lns_megatron.hf.norm_removal import (FAMILIES, FixedScaleNorm, NormRemovalError, SplitQKVProjection, _get, _set,
                                          fixed_scale_norms, norm_family)

STOCK_EPS = 1e12  # E: sqrt(E) = 1e6, far above any trained sigma; weights near gamma * 1e6 / c fit bf16/fp32

# The linear maps that read each norm, per family (relative to the layer; the final norm feeds lm_head).
READERS = {
    "llama": {"attention": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "mlp": ["mlp.gate_proj", "mlp.up_proj"]},
    "gpt2": {"attention": ["attn.c_attn"], "mlp": ["mlp.c_fc"]},
}


class Centering(torch.nn.Module):
    """x - mean(x): what remains of a LayerNorm once its scale and affine map are folded away."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True)


def _affine(norm: FixedScaleNorm):
    """The norm's gamma and beta (None for RMSNorm), with an LNS scale on its output multiplied in, in float32."""
    scale = getattr(norm, "lns_scale", 1.0)
    beta = norm.bias.float() * scale if norm.bias is not None else None
    return norm.weight.float() * scale, beta


def _fully_removed(model: torch.nn.Module, what: str) -> Dict[str, FixedScaleNorm]:
    norms = fixed_scale_norms(model)
    if not norms:
        raise NormRemovalError(f"{what}: the model has no fixed-scale norms (it was not fine-tuned with "
                               "--norm-removal-start); load it with lns_megatron.hf.from_pretrained")
    live = [name for name, n in norms.items() if not n.fully_removed]
    if live:
        raise NormRemovalError(f"{what}: {len(live)} norms are not fully removed yet ({live[0]} first); the schedule "
                               "did not finish: train past its last step, or ship the exact form (the run's final "
                               "directory, loaded with lns_megatron.hf.from_pretrained)")
    return norms


def stock_error_bound(norms: Dict[str, FixedScaleNorm], eps: float = STOCK_EPS) -> float:
    """The largest relative error of a norm output in the plain-transformers form, for inputs whose sigma^2
    stays within what fine-tuning saw: max s / (2 eps) over the norms (float rounding aside)."""
    return max(float(n.max_square) for n in norms.values()) / (2 * eps)


@torch.no_grad()
def to_transformers(model: torch.nn.Module, eps: float = STOCK_EPS) -> torch.nn.Module:
    """Turn a fully norm-removed model into the stock architecture computing the norm-free function, in place."""
    norms = _fully_removed(model, "the plain-transformers export")
    kind = norm_family(model)
    root = math.sqrt(eps)
    for name, norm in norms.items():
        hidden = norm.weight.shape[-1]
        stock = norm.original_class(hidden, eps=eps).to(norm.weight)
        gamma, beta = _affine(norm)
        if norm.paths == 2:  # GPT-2's ln_1: the stock norm outputs (x - mean) gamma; c_attn takes each path's 1/c, beta
            stock.weight.copy_(gamma * root)
            stock.bias.zero_()
            _unsplit_c_attn(model, name, norm, beta)
        else:
            stock.weight.copy_(gamma * (root / norm.frozen_sigma[0]))
            if beta is not None:
                stock.bias.copy_(beta)
        _set(model, name, stock)
    if hasattr(model, "_norm_removal_hook"):
        model._norm_removal_hook.remove()
        del model._norm_removal_hook
    model.config.update({"layer_norm_epsilon" if kind == "gpt2" else "rms_norm_eps": eps})
    _record(model, norms, dict(form="transformers", eps=eps, family=kind,
                               relative_error_bound=stock_error_bound(norms, eps)))
    return model


def _record(model, norms: Dict[str, FixedScaleNorm], norm_free: dict) -> None:
    """The config after an export: the removal is done (from_pretrained rebuilds nothing) and any LNS scale is in
    the weights (from_pretrained adds none)."""
    record = dict(getattr(model.config, "lns_megatron", None) or {})
    norm_free["schedule"] = record.pop("norm_removal", None)
    record["norm_free"] = norm_free
    if any(hasattr(n, "lns_scale") for n in norms.values()):
        record["lns_folded_into"] = "the norm-free model's weights"
    model.config.lns_megatron = record


def _unsplit_c_attn(model, norm_name: str, norm: FixedScaleNorm, beta) -> None:
    """c_attn (Conv1D, weight (in, out)) reading ``x - mean`` times gamma: each path's columns divided by its c,
    and beta pushed through the weight into the bias."""
    path = norm_name.rpartition(".")[0] + ".attn.c_attn"
    split = _get(model, path)
    weight, bias = split.weight, split.bias
    qk = 2 * split.nf // 3
    scale = torch.ones(split.nf, dtype=weight.dtype, device=weight.device)
    scale[:qk], scale[qk:] = 1 / norm.frozen_sigma[0], 1 / norm.frozen_sigma[1]
    conv = split.original_class(split.nf, weight.shape[0]).to(weight)
    conv.bias.copy_(bias + (beta @ weight.float()).to(bias.dtype) if beta is not None else bias)
    conv.weight.copy_(weight * scale)
    _set(model, path, conv)


@torch.no_grad()
def fold_fixed_scales(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each fully removed norm's ``gamma / c`` (and beta) into the linear maps that read it, in place: the norms
    become identities (RMSNorm) or mean-centerings (LayerNorm). The output layer is untied from the embeddings
    when the final norm folds into it. Logits are unchanged (up to float rounding)."""
    norms = _fully_removed(model, "fold_fixed_scales")
    kind = norm_family(model)
    spec = FAMILIES[kind]
    for name, norm in norms.items():
        layer, _, which = name.rpartition(".")
        if name == spec["final"]:
            readers, slot = ["lm_head"], None
            _untie_output(model)
        else:
            slot = "attention" if which == spec["attention"] else "mlp"
            readers = [f"{layer}.{r}" for r in READERS[kind][slot]]
        for reader in readers:
            _fold_into(model, reader, norm)
        _set(model, name, Centering() if norm.centered else torch.nn.Identity())
    if hasattr(model, "_norm_removal_hook"):
        model._norm_removal_hook.remove()
        del model._norm_removal_hook
    _record(model, norms, dict(form="folded", family=kind))
    return model


def _fold_into(model, path: str, norm: FixedScaleNorm) -> None:
    """The linear at ``path`` now reads ``x`` (centered) instead of ``x / c * gamma + beta``."""
    module = _get(model, path)
    gamma, beta = _affine(norm)
    if isinstance(module, SplitQKVProjection):  # weight (in, out); two paths
        weight = module.weight.float()
        qk = 2 * module.nf // 3
        gain = torch.stack([gamma / norm.frozen_sigma[0], gamma / norm.frozen_sigma[1]])
        new = weight.clone()
        new[:, :qk] = gain[0][:, None] * weight[:, :qk]
        new[:, qk:] = gain[1][:, None] * weight[:, qk:]
        bias = module.bias.float() + (beta @ weight if beta is not None else 0)
        conv = module.original_class(module.nf, weight.shape[0]).to(module.weight)
        conv.weight.copy_(new)
        conv.bias.copy_(bias)
        _set(model, path, conv)
        return
    gain = gamma / norm.frozen_sigma[0]
    if isinstance(module, torch.nn.Linear):  # weight (out, in)
        weight = module.weight.float()
        if beta is not None:
            if module.bias is None:
                module.bias = torch.nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                             device=module.weight.device))
            module.bias.copy_(module.bias.float() + weight @ beta)
        module.weight.copy_(weight * gain[None, :])
    else:  # transformers' Conv1D: weight (in, out)
        weight = module.weight.float()
        if beta is not None:
            module.bias.copy_(module.bias.float() + beta @ weight)
        module.weight.copy_(gain[:, None] * weight)


def _untie_output(model) -> None:
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = torch.nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False

