"""LayerNorm Scaling on Hugging Face Llama-family models, for fine-tuning as LNS.

Sun et al., "The Curse of Depth in Large Language Models" (2025): the outputs of layer ``l``'s
pre-attention and pre-MLP norms are multiplied by the constant ``1/sqrt(l)`` (``l`` 1-based over
the whole model; the final norm is untouched). The paper's second claim is that the gains carry
over to fine-tuning, which only holds if fine-tuning keeps the constant: a scale folded into the
norm weight gives the same output but not the same gradients (d/dgamma of the folded weight is
``sqrt(l)`` times larger) nor the same Adam updates.

:func:`apply_layernorm_scaling` multiplies the two norm outputs with a forward hook: no parameter,
buffer or state-dict key is added, so checkpoints stay plain Llama/Mistral/Qwen2 checkpoints and
DeepSpeed ZeRO (any stage) partitions the model as usual. The scheme is recorded in
``model.config.lns_megatron``, so ``save_pretrained`` writes it and :func:`from_pretrained` restores it.
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from lns_megatron.schemes.scale import layernorm_scale

PRE_NORMS = ("input_layernorm", "post_attention_layernorm")  # Llama's pre-attention and pre-MLP norms


class LayerNormScalingError(ValueError):
    """A model LNS cannot be applied to, or cannot be folded out of; the message says why and the fix."""


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers: the one ModuleList whose layers hold exactly the two Llama pre-norms.

    A layer with any other norm beside them (Gemma 2/3's pre/post-feedforward norms, where
    ``post_attention_layernorm`` normalizes the attention *output*) is refused: scaling it would not be LNS.
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) and all(
                all(hasattr(layer, n) for n in PRE_NORMS) for layer in module):
            found.append((name, module))
    kind = type(model).__name__
    if len(found) != 1:
        raise LayerNormScalingError(
            f"apply_layernorm_scaling: {kind} has {len(found)} lists of decoder layers holding "
            f"{' and '.join(PRE_NORMS)}; LNS maps Llama-family models (Llama, Mistral, Qwen2) only")
    name, layers = found[0]
    extra = sorted(n for n, _ in layers[0].named_children() if "norm" in n.lower() and n not in PRE_NORMS)
    if extra:
        raise LayerNormScalingError(
            f"apply_layernorm_scaling: the layers of {kind} ({name}) hold the norms {extra} beside "
            f"{' and '.join(PRE_NORMS)}, so post_attention_layernorm is not the pre-MLP norm; LNS maps "
            "Pre-LN Llama-family models (Llama, Mistral, Qwen2) only")
    return layers


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's transformer layers: GPT-2's ``transformer.h``, or a Llama-family model's :func:`decoder_layers`."""
    blocks = getattr(getattr(model, "transformer", None), "h", None)
    if isinstance(blocks, torch.nn.ModuleList) and len(blocks) and all(hasattr(b, "ln_1") for b in blocks):
        return blocks
    return decoder_layers(model)


def _scale_output(norm: torch.nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return output * norm.lns_scale


def scale_norm(norm: torch.nn.Module, scale: float) -> None:
    """Multiply ``norm``'s output by the constant ``scale`` (a forward hook; no parameter or buffer)."""
    norm.lns_scale = scale
    norm._lns_hook = norm.register_forward_hook(_scale_output)


def move_scale(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """Carry an LNS scale from a norm to the module replacing it."""
    if hasattr(old, "lns_scale"):
        old._lns_hook.remove()
        scale_norm(new, old.lns_scale)


def scaled_norms(model: torch.nn.Module) -> List[Tuple[int, torch.nn.Module]]:
    """(layer number, norm) of every pre-norm that carries an LNS scale."""
    return [(l, getattr(layer, n)) for l, layer in enumerate(decoder_layers(model), 1) for n in PRE_NORMS
            if hasattr(getattr(layer, n), "lns_scale")]


def lns_record(model: torch.nn.Module) -> dict:
    """What the model's config says about LNS (empty for a model that never met lns_megatron)."""
    return dict(getattr(model.config, "lns_megatron", None) or {})


def apply_layernorm_scaling(model: torch.nn.Module) -> torch.nn.Module:
    """Turn a Hugging Face Llama-family causal LM into LNS, in place, and return it.

    Layer ``l``'s ``input_layernorm`` and ``post_attention_layernorm`` outputs are multiplied by
    ``1/sqrt(l)``; the final norm is untouched; no parameter or buffer is added. Refuses a model
    that is already scaled, or whose config says an LNS scale is folded into its norm weights
    (a default ``tools/export_hf.py`` export: export with ``--keep-lns`` to fine-tune as LNS).
    """
    kind = type(model).__name__
    record = lns_record(model)
    if record.get("lns_folded_into"):
        raise LayerNormScalingError(
            f"apply_layernorm_scaling: {kind} already has LNS folded into its norm weights "
            f"({record['lns_folded_into']}); scaling it again would apply 1/sqrt(l) twice. Export the checkpoint "
            "with tools/export_hf.py --keep-lns and load it with lns_megatron.hf.from_pretrained")
    layers = decoder_layers(model)
    if scaled_norms(model):
        raise LayerNormScalingError(f"apply_layernorm_scaling: {kind} is already LNS (its pre-norms carry lns_scale)")
    depths = record.get("lns_depths") or range(1, len(layers) + 1)  # a grown model's layers may keep their l
    if len(depths) != len(layers):
        raise LayerNormScalingError(f"apply_layernorm_scaling: {kind} has {len(layers)} layers but its config's "
                                    f"lns_megatron.lns_depths names {len(depths)}; the config is not this model's")
    for l, layer in zip(depths, layers):
        for name in PRE_NORMS:
            scale_norm(getattr(layer, name), layernorm_scale(l))
    model.config.lns_megatron = {**record, "norm_scheme": "lns", "lns_folded_into": None}
    return model


@torch.no_grad()
def fold_layernorm_scaling(model: torch.nn.Module) -> torch.nn.Module:
    """Fold the LNS scales into the norm weights (and biases): the same function as a plain model.

    The result is a Pre-LN model any tool loads; fine-tuning it further is Pre-LN fine-tuning.
    Each fold is checked on a random input, so a norm whose output is not linear in its weight
    (a zero-centered ``1 + weight`` norm, say) is refused rather than folded wrongly.
    """
    for l, norm in scaled_norms(model):
        weight = norm.weight
        probe = torch.randn(4, weight.shape[-1], generator=torch.Generator().manual_seed(l)).to(weight)
        expected = norm(probe)
        norm._lns_hook.remove()
        for p in (weight, getattr(norm, "bias", None)):
            if isinstance(p, torch.Tensor):
                p.mul_(norm.lns_scale)
        tol = 1e-6 if weight.dtype == torch.float32 else 1e-2
        if not torch.allclose(norm(probe), expected, rtol=tol, atol=tol * max(1.0, float(expected.abs().max()))):
            raise LayerNormScalingError(
                f"fold_layernorm_scaling: layer {l}'s {type(norm).__name__} is not linear in its weight, so the "
                "LNS scale cannot be folded into it; keep the model unfolded (save_pretrained records LNS)")
        del norm.lns_scale, norm._lns_hook
    model.config.lns_megatron = {**lns_record(model), "norm_scheme": "lns",
                                 "lns_folded_into": ", ".join(PRE_NORMS)}
    return model


def from_pretrained(path: str, **kwargs) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained``, with LNS restored where the saved config records it unfolded.

    A ``tools/export_hf.py --keep-lns`` export, or a model fine-tuned as LNS and saved with
    ``save_pretrained``, comes back as the same LNS model; a folded export or a plain model comes back plain.
    A model saved during or after norm removal comes back with its fixed-scale norms (the exact norm-free form).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    config = AutoConfig.from_pretrained(path)
    removal = (getattr(config, "lns_megatron", None) or {}).get("norm_removal")
    verbosity = logging.get_verbosity()
    if removal:  # the fixed-scale norms' buffers are "unexpected" to the stock class; restore() reads them
        logging.set_verbosity_error()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    finally:
        logging.set_verbosity(verbosity)
    record = lns_record(model)
    if record.get("norm_scheme") == "lns" and not record.get("lns_folded_into"):
        apply_layernorm_scaling(model)
    if removal:  # saved mid- or post-removal: the fixed-scale norms and their frozen values
        from lns_megatron.hf.norm_removal import restore

        restore(model, path)
    return model


def is_lns(model: torch.nn.Module) -> bool:
    """True when the model computes LNS with an unfolded constant (hooks in place); GPT-2 never does."""
    if transformer_layers(model) is getattr(getattr(model, "transformer", None), "h", None):
        return False  # GPT-2: LNS maps the Llama family only
    return bool(scaled_norms(model))

