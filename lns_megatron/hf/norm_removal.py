"""Normalization removal: fine-tune a trained model into a norm-free one.

Heimersheim (2024), "You can remove GPT2's LayerNorm by fine-tuning", and Baroni et al. (2025),
"Transformers Don't Need LayerNorm at Inference Time": every norm's per-token sigma (the RMS for
RMSNorm, the standard deviation for LayerNorm) is replaced, one norm at a time during fine-tuning, by
one constant per norm. The result is a model whose residual stream is read linearly, which makes
direct logit attribution exact.

:class:`FixedScaleNorm` takes the place of a Llama ``RMSNorm`` or a GPT-2 ``LayerNorm``; its
parameters keep their names, so checkpoints keep their keys. While the norm is real it computes
the original function, and an EMA (momentum 0.9, once per optimizer step, over every data-parallel
rank) tracks its input's mean sigma. The EMA is frozen when the norm is removed. Position 0 and
the EOS token have their own EMA and frozen value until the last step of the schedule.

The schedule (:func:`removal_steps`) removes the pre-MLP norms, one layer per
``--norm-removal-interval`` steps from ``--norm-removal-start``, then the attention-input norms (for
GPT-2 the query/key path of each layer, then the value path), then the final norm, then the special
treatment of position 0 and EOS. ``--norm-removal-aux-weight`` adds the papers' auxiliary loss: the
MSE between each position's sigma at the final norm's input and their mean.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from lns_megatron.hf.scaling import move_scale

MOMENTUM = 0.9  # the papers' EMA momentum for the live sigma
SPECIAL = "special"  # a schedule target: the position-0 / EOS treatment of every norm

# The norms of each family: (attention input, pre-MLP, final) and where the layers live.
FAMILIES = {
    "llama": dict(layers="model.layers", attention="input_layernorm", mlp="post_attention_layernorm",
                  final="model.norm", centered=False),
    "gpt2": dict(layers="transformer.h", attention="ln_1", mlp="ln_2", final="transformer.ln_f", centered=True),
}


class NormRemovalError(ValueError):
    """A model or schedule norm removal cannot work with; the message names the input and the fix."""


class TokenContext:
    """Which positions of the current batch are special (position 0, EOS) and which are padding.

    A forward pre-hook on the model fills it from ``input_ids`` and ``attention_mask``; the norms read it.
    """

    def __init__(self, eos_token_id: Optional[int]):
        self.eos_token_id = eos_token_id
        self.special: Optional[torch.Tensor] = None  # (batch, seq) bool
        self.valid: Optional[torch.Tensor] = None  # (batch, seq) bool: not padding

    def __call__(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            self.special = self.valid = None
            return
        special = torch.zeros_like(ids, dtype=torch.bool)
        special[:, 0] = True
        if self.eos_token_id is not None:
            special |= ids == self.eos_token_id
        mask = kwargs.get("attention_mask")
        self.special = special
        self.valid = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


class FixedScaleNorm(torch.nn.Module):
    """A Llama RMSNorm or GPT-2 LayerNorm whose per-token sigma can be replaced by one frozen scalar.

    Real: the original norm, bit for bit. Removed (per path): ``(x - mean(x) if centered) / c * gamma (+ beta)``
    with ``c`` the frozen EMA of the input's mean sigma, and the special positions' own frozen value until
    ``special_removed``. ``paths=2`` (GPT-2's attention input) returns the query/key path and the value path
    side by side, for :class:`SplitQKVProjection`.
    """

    def __init__(self, norm: torch.nn.Module, centered: bool, paths: int = 1, context: Optional[TokenContext] = None):
        super().__init__()
        self.weight = norm.weight
        self.bias = getattr(norm, "bias", None) if centered else None
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-5)))
        self.centered, self.paths, self.context = centered, paths, context
        self.original_class = type(norm)
        f32 = dict(dtype=torch.float32, device=norm.weight.device)
        self.register_buffer("live_sigma", torch.ones((), **f32))
        self.register_buffer("live_special_sigma", torch.ones((), **f32))
        self.register_buffer("tracked_steps", torch.zeros((), dtype=torch.int64, device=norm.weight.device))
        self.register_buffer("max_square", torch.zeros((), **f32))  # the largest per-token sigma^2 seen
        self.register_buffer("frozen_sigma", torch.ones(paths, **f32))
        self.register_buffer("frozen_special_sigma", torch.ones(paths, **f32))
        self.register_buffer("removed", torch.zeros(paths, dtype=torch.bool, device=norm.weight.device))
        self.register_buffer("special_removed", torch.zeros((), dtype=torch.bool, device=norm.weight.device))
        self.reset_statistics()
        self.refresh_flags()
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh_flags())

    def refresh_flags(self) -> None:
        """Python copies of the removal flags, so that the forward never waits on the device to read them."""
        self.path_removed, self.special_is_removed = self.removed.tolist(), bool(self.special_removed)

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, {'LayerNorm' if self.centered else 'RMSNorm'}, paths={self.paths}, "
                f"removed={self.removed.tolist()}, special_removed={bool(self.special_removed)}")

    # -------------------------------------------------------------------------------- statistics

    def reset_statistics(self) -> None:
        self.sums = None  # sum, count, special sum, special count, max sigma^2 (float64, on the input's device)

    def token_square(self, x: torch.Tensor) -> torch.Tensor:
        """Each position's sigma^2 (mean square, or variance when centered), in float32."""
        h = x.float()
        return (h.var(-1, unbiased=False) if self.centered else h.pow(2).mean(-1)) + self.eps

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        sigma2 = self.token_square(x)
        sigma = sigma2.sqrt()
        ctx = self.context
        valid = ctx.valid if ctx is not None and ctx.valid is not None else torch.ones_like(sigma, dtype=torch.bool)
        special = ctx.special if ctx is not None and ctx.special is not None else torch.zeros_like(valid)
        if special.shape != sigma.shape:  # a call the context does not describe (generation with a cache)
            return
        ordinary, special = valid & ~special, valid & special
        stats = torch.stack([sigma[ordinary].sum(), ordinary.sum(), sigma[special].sum(), special.sum(),
                             torch.where(valid, sigma2, 0).max()]).double()  # stays on the device: no sync here
        self.sums = stats if self.sums is None else self.sums + stats

    @torch.no_grad()
    def update(self, sums: torch.Tensor) -> None:
        """One EMA step from a whole optimizer step's statistics (reduced over ranks)."""
        total, count, special_total, special_count, max_square = sums.tolist()
        first = int(self.tracked_steps) == 0
        for live, t, n in ((self.live_sigma, total, count), (self.live_special_sigma, special_total, special_count)):
            if n:
                live.copy_(torch.tensor(t / n) if first else MOMENTUM * live + (1 - MOMENTUM) * (t / n))
        if count:
            self.tracked_steps += 1
        self.max_square.copy_(torch.maximum(self.max_square, torch.tensor(max_square)))

    @torch.no_grad()
    def remove(self, path: int) -> bool:
        """Freeze path ``path`` at the live sigma; False when it already was."""
        if self.path_removed[path]:
            return False
        self.frozen_sigma[path] = self.live_sigma
        self.frozen_special_sigma[path] = self.live_special_sigma
        self.removed[path] = True
        self.refresh_flags()
        return True

    @torch.no_grad()
    def remove_special(self) -> bool:
        if self.special_is_removed:
            return False
        self.special_removed.fill_(True)
        self.refresh_flags()
        return True

    @property
    def fully_removed(self) -> bool:
        return all(self.path_removed) and self.special_is_removed

    # -------------------------------------------------------------------------------- function

    def real(self, x: torch.Tensor) -> torch.Tensor:
        if self.centered:  # torch.nn.LayerNorm
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        h = x.to(torch.float32)  # transformers' LlamaRMSNorm
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def fixed(self, x: torch.Tensor, path: int) -> torch.Tensor:
        h = x.to(torch.float32)
        if self.centered:
            h = h - h.mean(-1, keepdim=True)
        sigma = self.frozen_sigma[path]
        special = self.context.special if self.context is not None else None
        if not self.special_is_removed and special is not None and special.shape == x.shape[:-1]:
            sigma = torch.where(special, self.frozen_special_sigma[path], sigma)[..., None]
        h = h / sigma
        if self.centered:
            return h.to(x.dtype) * self.weight + self.bias if self.bias is not None else h.to(x.dtype) * self.weight
        return self.weight * h.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            self.observe(x)
        outputs = [self.fixed(x, p) if removed else self.real(x) for p, removed in enumerate(self.path_removed)]
        return outputs[0] if self.paths == 1 else torch.cat(outputs, dim=-1)


class SplitQKVProjection(torch.nn.Module):
    """GPT-2's ``c_attn`` fed by a two-path :class:`FixedScaleNorm`: queries and keys from the first half of the
    input, values from the second. Same parameters and keys as the Conv1D it replaces; same FLOPs."""

    def __init__(self, c_attn: torch.nn.Module):
        super().__init__()
        self.weight, self.bias, self.nf = c_attn.weight, c_attn.bias, c_attn.nf  # Conv1D: weight (in, out)
        self.original_class = type(c_attn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.weight.shape[0]
        qk, v = x[..., :hidden], x[..., hidden:]
        split = 2 * self.nf // 3
        return torch.cat([qk @ self.weight[:, :split] + self.bias[:split],
                          v @ self.weight[:, split:] + self.bias[split:]], dim=-1)


# ------------------------------------------------------------------------------------------------ model


def norm_family(model: torch.nn.Module) -> str:
    """``"llama"`` or ``"gpt2"``: which norms the model holds; anything else is refused in one line."""
    for name, spec in FAMILIES.items():
        layers = _get(model, spec["layers"])
        if isinstance(layers, torch.nn.ModuleList) and len(layers) and _get(model, spec["final"]) is not None \
                and all(hasattr(layer, spec["attention"]) and hasattr(layer, spec["mlp"]) for layer in layers):
            extra = sorted(n for n, _ in layers[0].named_children()
                           if "norm" in n.lower() and n not in (spec["attention"], spec["mlp"]))
            if extra:
                break
            return name
    record = dict(getattr(getattr(model, "config", None), "lns_megatron", None) or {})
    if record.get("norm_scheme") in ("dyt", "bhyt"):
        raise NormRemovalError(f"norm removal: the model uses --norm-scheme {record['norm_scheme']}, which has no "
                               "norms to remove (its tanh is not a normalization); nothing to do")
    raise NormRemovalError(
        f"norm removal: {type(model).__name__} holds neither Llama-family norms (model.layers.N.input_layernorm, "
        "post_attention_layernorm, model.norm) nor GPT-2's (transformer.h.N.ln_1, ln_2, transformer.ln_f); "
        "norm removal maps those two families only")


def _get(model, path: str):
    for part in path.split("."):
        model = getattr(model, part, None)
        if model is None:
            return None
    return model


def _set(model, path: str, module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(model, parent) if parent else model, name, module)


def norm_names(model: torch.nn.Module) -> Dict[str, str]:
    """Module path of every removable norm -> a readable label, in schedule order of the norms."""
    spec = FAMILIES[norm_family(model)]
    layers = _get(model, spec["layers"])
    names = {}
    for kind, what in (("mlp", "pre-MLP"), ("attention", "attention-input")):
        for l in range(len(layers)):
            names[f"{spec['layers']}.{l}.{spec[kind]}"] = f"layer {l + 1} {what} norm"
    names[spec["final"]] = "final norm"
    return names


def removal_steps(model: torch.nn.Module, start: int, interval: int) -> List[Tuple[int, List[Tuple[str, object]], str]]:
    """The schedule: (step, [(norm path, path index or SPECIAL)], label) in order of removal."""
    kind = norm_family(model)
    spec = FAMILIES[kind]
    layers = len(_get(model, spec["layers"]))
    events = [([(f"{spec['layers']}.{l}.{spec['mlp']}", 0)], f"layer {l + 1} pre-MLP norm") for l in range(layers)]
    if kind == "gpt2":  # the attention input's query/key path, then its value path, as the paper does
        events += [([(f"{spec['layers']}.{l}.{spec['attention']}", 0)], f"layer {l + 1} attention-input norm (q/k)")
                   for l in range(layers)]
        events += [([(f"{spec['layers']}.{l}.{spec['attention']}", 1)], f"layer {l + 1} attention-input norm (v)")
                   for l in range(layers)]
    else:
        events += [([(f"{spec['layers']}.{l}.{spec['attention']}", 0)], f"layer {l + 1} attention-input norm")
                   for l in range(layers)]
    events.append(([(spec["final"], 0)], "final norm"))
    events.append(([(name, SPECIAL) for name in norm_names(model)], "position-0 / EOS special cases"))
    return [(start + i * interval, targets, label) for i, (targets, label) in enumerate(events)]


def check_schedule(model: torch.nn.Module, start: int, interval: int, total_steps: int) -> None:
    if start < 1:
        raise NormRemovalError(f"--norm-removal-start {start}: must be at least 1 (the first norm's sigma is the EMA of "
                               "the steps before its removal)")
    if interval < 1:
        raise NormRemovalError(f"--norm-removal-interval {interval}: must be at least 1")
    steps = removal_steps(model, start, interval)
    last = steps[-1][0]
    if last >= total_steps:
        raise NormRemovalError(
            f"--norm-removal-start {start} --norm-removal-interval {interval}: the schedule takes {len(steps)} removals "
            f"and ends at step {last}, but the run has {total_steps} steps; lower the interval or the start, or train "
            f"for more than {last} steps")


def fixed_scale_norms(model: torch.nn.Module) -> Dict[str, FixedScaleNorm]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FixedScaleNorm)}


def install_fixed_scale_norms(model: torch.nn.Module, eos_token_id: Optional[int] = None) -> TokenContext:
    """Replace the model's norms by :class:`FixedScaleNorm` (real, tracking), in place. Idempotent."""
    kind = norm_family(model)
    spec = FAMILIES[kind]
    existing = fixed_scale_norms(model)
    if existing:
        return next(iter(existing.values())).context
    context = TokenContext(eos_token_id)
    for name in norm_names(model):
        norm = _get(model, name)
        two_paths = kind == "gpt2" and name.endswith("." + spec["attention"])
        fixed = FixedScaleNorm(norm, spec["centered"], paths=2 if two_paths else 1, context=context)
        move_scale(norm, fixed)  # an LNS model keeps its 1/sqrt(l) on the norm output
        _set(model, name, fixed)
        if two_paths:
            attn_path = name.rpartition(".")[0] + ".attn.c_attn"
            _set(model, attn_path, SplitQKVProjection(_get(model, attn_path)))
    model._norm_removal_hook = model.register_forward_pre_hook(context, with_kwargs=True)
    return context


@dataclasses.dataclass
class NormRemoval:
    """The schedule on a model with :class:`FixedScaleNorm` installed: EMA updates, removals, the aux loss."""

    model: torch.nn.Module
    start: int
    interval: int
    aux_weight: float = 0.0

    def __post_init__(self):
        self.norms = fixed_scale_norms(self.model)
        self.labels = norm_names(self.model)
        self.steps = removal_steps(self.model, self.start, self.interval)
        self.final_input = None
        self.final = self.norms[FAMILIES[norm_family(self.model)]["final"]]
        if self.aux_weight:
            self.final.register_forward_pre_hook(self._capture_final_input)

    def _capture_final_input(self, module, args):
        if module.training and torch.is_grad_enabled():
            self.final_input = args[0]

    @torch.no_grad()
    def update_statistics(self) -> None:
        """One EMA step for every norm, from this optimizer step's statistics summed over ranks."""
        seen = [n.sums for n in self.norms.values() if n.sums is not None]
        device = seen[0].device if seen else self.final.weight.device
        sums = torch.stack([n.sums if n.sums is not None else torch.zeros(5, dtype=torch.float64, device=device)
                            for n in self.norms.values()])
        if torch.distributed.is_initialized():
            total, largest = sums[:, :4].contiguous(), sums[:, 4:].contiguous()  # gloo reduces a view wrongly
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
            sums = torch.cat([total, largest], dim=1)
        sums = sums.cpu()
        for norm, row in zip(self.norms.values(), sums):
            norm.update(row)
            norm.reset_statistics()

    def apply_due(self, step: int) -> List[str]:
        """Remove what the schedule names up to ``step`` and is still real; returns what was removed now."""
        done = []
        for at, targets, label in self.steps:
            if at > step:
                break
            changed = [self.norms[name].remove_special() if path == SPECIAL else self.norms[name].remove(path)
                       for name, path in targets]
            if any(changed):
                done.append(label)
        return done

    def total(self) -> int:
        return len(self.steps)

    def removed_count(self) -> int:
        """How many of the schedule's removals are done."""
        return sum(all(self.norms[n].special_is_removed if p == SPECIAL else self.norms[n].path_removed[p]
                       for n, p in targets) for _, targets, _ in self.steps)

    def aux_loss(self) -> Optional[torch.Tensor]:
        """The papers' auxiliary loss on the last forward: the MSE between each position's sigma at the final norm's
        input and their mean (the target, without gradient), special positions and padding left out.

        Over data-parallel ranks it is the loss of the whole batch: the mean and the count are reduced, and the
        local sum is scaled so that the gradient average the ranks take gives the whole batch's gradient."""
        x, self.final_input = self.final_input, None
        if not self.aux_weight or x is None:
            return None
        sigma = self.final.token_square(x).sqrt()
        ctx = self.final.context
        keep = torch.ones_like(sigma, dtype=torch.bool)
        if ctx is not None and ctx.special is not None and ctx.special.shape == keep.shape:
            keep = ~ctx.special & (ctx.valid if ctx.valid is not None else keep)
        sigma = sigma[keep]
        totals = torch.stack([sigma.detach().sum(), torch.tensor(float(sigma.numel()), device=sigma.device)])
        world = 1
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
            world = torch.distributed.get_world_size()
        if not totals[1]:
            return None
        mean = totals[0] / totals[1]
        return self.aux_weight * (sigma - mean).pow(2).sum() * (world / totals[1])

    def scalars(self) -> Dict[str, float]:
        """TensorBoard scalars: the count removed, each norm's live sigma and (once removed) its frozen value."""
        out = {"norm_removal/removed": float(self.removed_count())}
        for name, norm in self.norms.items():
            tag = self.labels[name].replace(" ", "_")
            out[f"norm_removal/{tag}/live"] = float(norm.live_sigma)
            for p in range(norm.paths):
                if norm.removed[p]:
                    out[f"norm_removal/{tag}/frozen" + (f"_{'qk' if p == 0 else 'v'}" if norm.paths > 1 else "")] = \
                        float(norm.frozen_sigma[p])
        return out


def record_removal(model: torch.nn.Module, start: int, interval: int, aux_weight: float) -> None:
    """Write the schedule into ``model.config.lns_megatron['norm_removal']``: save_pretrained keeps it, and
    :func:`lns_megatron.hf.from_pretrained` rebuilds the fixed-scale norms from it."""
    model.config.lns_megatron = {**dict(getattr(model.config, "lns_megatron", None) or {}),
                                 "norm_removal": dict(family=norm_family(model), start=start, interval=interval,
                                                      aux_weight=aux_weight, momentum=MOMENTUM)}


def restore(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """Rebuild the fixed-scale norms of a model saved mid- or post-removal, with their saved state."""
    from safetensors import safe_open

    install_fixed_scale_norms(model, getattr(model.config, "eos_token_id", None))
    state = {}
    files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    for f in files:
        with safe_open(os.path.join(path, f), framework="pt") as tensors:
            for key in tensors.keys():
                module, _, buffer = key.rpartition(".")
                if isinstance(_get(model, module), FixedScaleNorm) and buffer in dict(_get(model, module).named_buffers()):
                    state[key] = tensors.get_tensor(key)
    norms = fixed_scale_norms(model)
    expected = {f"{n}.{b}" for n, m in norms.items() for b, _ in m.named_buffers()}
    missing = sorted(expected - set(state))
    if missing:
        raise NormRemovalError(f"{path}: its config records norm removal but the weights lack {missing[0]} (and "
                               f"{len(missing) - 1} more); the directory is not a norm-removal save")
    for key, value in state.items():
        module, _, buffer = key.rpartition(".")
        getattr(_get(model, module), buffer).copy_(value)
    for norm in norms.values():
        norm.refresh_flags()
    return model

