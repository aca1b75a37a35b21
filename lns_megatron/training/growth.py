"""Depth growth: a checkpoint, or a running job, made deeper by copying layers.

The operators, each a map from the grown model's layers to the layers they copy:

- ``midas`` (Saunshi et al., "On the Inductive Bias of Stacking Towards Improving Reasoning", 2024): the
  ``n = N / b`` blocks of ``b`` layers; the middle block, number ``ceil(n / 2)`` counted from 1, is copied and
  inserted after itself (``N -> N + b``).
- ``stack`` (G_stack; Du et al., "Stacking Your Transformers", 2024): the whole stack repeated (``N -> 2N``).
- ``identity`` (LLaMA Pro; Wu et al., 2024): a copy inserted after every ``k``-th layer (``N -> N + N / k``) with
  its ``linear_proj`` and ``linear_fc2`` (weights and biases, every expert's too) zeroed, so that in a pre-norm
  layer both residual branches add nothing: the grown model computes the old function.

A grown checkpoint is made by loading the old one into the deeper model with each of its layers' tensors read
from its source layer (:class:`LayerMapping`): dist-checkpointing's own load, for every TP/PP/VPP layout and
for the Adam moments and fp32 main weights of both optimizers (the distributed one needs its state saved
fully reshardable: a per-data-parallel-shard save has no per-layer tensors to map). Kapl et al. ("Do
Depth-Grown Models Overcome the Curse of Depth?", 2025) compare these against LNS trained from scratch.

LNS scales layer ``l`` by ``1/sqrt(l)``: after an insertion a layer may stand at a new ``l``. ``position``
(the default) gives every layer the scale of its new place; ``inherit`` keeps each layer's old ``l`` (a copy
takes its source's), recorded as ``lns_depths`` in the checkpoint's ``pretrain_config.json``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

from lns_megatron.config import ConfigError, PretrainConfig, moe_layer_pattern
from lns_megatron.schemes import NORM_SCHEMES
from lns_megatron.training import checkpoint
from lns_megatron.training.build import build_model, build_optimizer

OPERATORS = ("midas", "stack", "identity")
LNS_SCALES = ("position", "inherit")
OPTIMIZER_STATES = ("copy", "reset")
LAYER_KEY = "decoder.layers."
# What identity growth zeroes in a copy: the last linear map of each residual branch (dense, expert, shared expert).
ZEROED = re.compile(r"\.linear_(proj|fc2)\.(weight|bias)\d*$")
# Optimizer-state keys of a parameter: optimizer.state.KIND.PARAM; the fp32 main weights are zeroed with the weights.
MAIN_WEIGHTS = ("param", "fp32_param")


# ------------------------------------------------------------------------------------------ operators


def layer_sources(operator: str, num_layers: int, block_size: Optional[int]) -> Tuple[List[int], List[bool]]:
    """For each layer of the grown model (0-based, in order), the old layer it copies, and whether it is the
    inserted copy (the original keeps its place in the order)."""
    if operator == "stack":
        return list(range(num_layers)) * 2, [False] * num_layers + [True] * num_layers
    if not block_size or num_layers % block_size:
        what = "blocks of" if operator == "midas" else "a copy after every"
        raise ConfigError(f"--growth-block-size {block_size}: {operator} growth takes {what} b layers, and b must "
                          f"divide the {num_layers} layers it grows; choose a divisor of {num_layers}")
    sources, copies = [], []
    if operator == "midas":
        middle = math.ceil(num_layers // block_size / 2)  # 1-based block number
        end = middle * block_size
        for i in range(num_layers):
            sources.append(i)
            copies.append(False)
            if i == end - 1:
                sources += list(range(end - block_size, end))
                copies += [True] * block_size
        return sources, copies
    if operator == "identity":
        for i in range(num_layers):
            sources.append(i)
            copies.append(False)
            if (i + 1) % block_size == 0:
                sources.append(i)
                copies.append(True)
        return sources, copies
    raise ConfigError(f"--depth-growth {operator!r}; choose one of {OPERATORS}")


def grown_depth(operator: str, num_layers: int, block_size: Optional[int]) -> int:
    return len(layer_sources(operator, num_layers, block_size)[0])


def stage_depths(operator: str, final_layers: int, stages: int, block_size: Optional[int]) -> List[int]:
    """The depth of each of ``stages`` stages, the last ``final_layers``, each one growth of the one before."""
    depths = [final_layers]
    for _ in range(stages - 1):
        d = depths[0]
        before = {"midas": d - (block_size or 0), "stack": d // 2,
                  "identity": d * block_size // (block_size + 1) if block_size else 0}[operator]
        if before < 1 or (operator == "stack" and d % 2) or (before >= 1 and operator != "stack" and before % block_size) \
                or grown_depth(operator, before, block_size) != d:
            raise ConfigError(
                f"--num-layers {final_layers} is not reachable by {stages - 1} {operator} growth steps of "
                f"--growth-block-size {block_size} (each step from d layers to "
                f"{'d + b' if operator == 'midas' else 'd + d/b'}, every d a multiple of b)" if operator != "stack" else
                f"--num-layers {final_layers} is not reachable by {stages - 1} stack growth steps (each doubles the "
                f"depth: --num-layers must be a multiple of {2 ** (stages - 1)})")
        depths.insert(0, before)
    return depths


def parse_schedule(schedule: str) -> float:
    """The alpha of ``prop-ALPHA``."""
    match = re.fullmatch(r"prop-([0-9]*\.?[0-9]+)", schedule or "")
    if not match:
        raise ConfigError(f"--growth-schedule {schedule!r}: give prop-ALPHA (stage i lasts in proportion to i^ALPHA, "
                          "MIDAS's Prop-alpha), e.g. prop-1")
    return float(match.group(1))


def stage_boundaries(train_iters: int, stages: int, alpha: float) -> List[int]:
    """The iterations after which the model grows: stage i (1-based) lasts in proportion to i^alpha, so the
    boundary after stage i is ``floor(T * sum_{j<=i} j^alpha / sum_{j<=K} j^alpha)``."""
    weights = [(i + 1) ** alpha for i in range(stages)]
    total = sum(weights)
    bounds = [int(math.floor(train_iters * sum(weights[:i + 1]) / total + 1e-9)) for i in range(stages - 1)]
    if any(b < 1 for b in bounds) or len(set(bounds)) != len(bounds):
        raise ConfigError(f"--growth-stages {stages} over --train-iters {train_iters}: a stage would last no "
                          f"iteration (boundaries {bounds}); train longer or use fewer stages")
    return bounds


@dataclass(frozen=True)
class Schedule:
    """An in-run growth schedule: the depth and LNS positions of each stage and where the stages end."""

    operator: str
    depths: List[int]
    boundaries: List[int]  # stage i+1 starts after iteration boundaries[i]
    lns_depths: List[Optional[List[int]]]  # per stage; None: each layer's own position

    def stage_after(self, iteration: int) -> int:
        """The stage that trains iteration ``iteration + 1`` (0-based)."""
        return sum(b <= iteration for b in self.boundaries)

    def stage_of_checkpoint(self, iteration: int) -> int:
        """The stage of a checkpoint saved at ``iteration``: a boundary's checkpoint is saved before the growth."""
        return sum(b < iteration for b in self.boundaries)

    def flops_fraction(self, train_iters: int, flops_at) -> float:
        """The schedule's training FLOPs over training all ``train_iters`` at the final depth."""
        edges = [0] + self.boundaries + [train_iters]
        spent = sum((edges[i + 1] - edges[i]) * flops_at(d) for i, d in enumerate(self.depths))
        return spent / (train_iters * flops_at(self.depths[-1]))


def schedule(c: PretrainConfig) -> Optional[Schedule]:
    """The run's growth schedule (None without --depth-growth); a schedule that cannot run is refused."""
    if not c.depth_growth:
        return None
    if c.growth_stages is None or c.growth_stages < 2:
        raise ConfigError(f"--depth-growth {c.depth_growth} needs --growth-stages K >= 2 (the depth grows K - 1 times "
                          "to --num-layers)")
    depths = stage_depths(c.depth_growth, c.num_layers, c.growth_stages, c.growth_block_size)
    bounds = stage_boundaries(c.train_iters, c.growth_stages, parse_schedule(c.growth_schedule))
    check_growable(c, c.depth_growth)
    if not c.save:
        raise ConfigError(f"--depth-growth {c.depth_growth} needs --save: the model grows by saving at each stage "
                          "boundary and loading that checkpoint into the deeper model (and a resume starts from it)")
    if c.finetune:
        raise ConfigError("--depth-growth with --finetune: a schedule starts at iteration 0 from its first stage's "
                          "depth; grow a checkpoint with tools/grow_depth.py instead")
    if c.num_experts and 0 < sum(moe_layer_pattern(c.moe_layer_freq, c.num_layers)) < c.num_layers:
        raise ConfigError(f"--depth-growth with --moe-layer-freq {c.moe_layer_freq}: the schedule's shallower stages "
                          "have no defined MoE pattern for mixed dense and MoE layers; use --moe-layer-freq 1, or grow "
                          "a checkpoint with tools/grow_depth.py (a copy keeps its source's kind)")
    chunks = c.pipeline_model_parallel_size * (c.virtual_pipeline_model_parallel_size or 1)
    for i, depth in enumerate(depths):
        if depth % chunks:
            raise ConfigError(f"--depth-growth: stage {i + 1} has {depth} layers, which do not split over the {chunks} "
                              "pipeline chunks (PP x VPP); choose a block size or stage count that keeps every depth "
                              f"a multiple of {chunks}")
    inherit = c.growth_lns_scales == "inherit" and NORM_SCHEMES[c.norm_scheme].lns
    lns = [None]
    for depth in depths[:-1]:
        sources, _ = layer_sources(c.depth_growth, depth, c.growth_block_size)
        lns.append(inherited_lns_depths(lns[-1], sources) if inherit else None)
    return Schedule(c.depth_growth, depths, bounds, lns)


def stage_config(c: PretrainConfig, plan: Schedule, stage: int) -> PretrainConfig:
    """The run's flags for stage ``stage`` (0-based): its depth, LNS positions and (the same number of) virtual
    pipeline stages."""
    depth = plan.depths[stage]
    changes = dict(num_layers=depth, lns_depths=plan.lns_depths[stage])
    if c.num_layers_per_virtual_pipeline_stage:
        changes["num_layers_per_virtual_pipeline_stage"] = depth // (
            c.pipeline_model_parallel_size * c.virtual_pipeline_model_parallel_size)
    return dataclasses.replace(c, **changes)


def inherited_lns_depths(old: Optional[List[int]], sources: List[int]) -> List[int]:
    """``inherit``: each layer keeps the ``l`` of its source (``old``, or the source's own position)."""
    return [(old[s] if old else s + 1) for s in sources]


def check_growable(c: PretrainConfig, operator: str) -> None:
    """Refuse, in one line, growth that is not defined for this model."""
    scheme = NORM_SCHEMES[c.norm_scheme]
    if scheme.post_norm == "first":
        raise ConfigError("depth growth with --norm-scheme mix: Mix-LN's Post-LN layers are the first "
                          "floor(--mix-ln-alpha x N), which moves with N, so a copied layer would change kind; "
                          "grow a pre-norm scheme (pre, lns, peri, peri-lns, dyt, bhyt) or post")
    if scheme.deepnorm:
        raise ConfigError("depth growth with --norm-scheme deepnorm: its residual scale (2N)^(1/4) and init scale "
                          "(8N)^(-1/4) are set by N, so the grown model's layers would need other constants than the "
                          "ones they were trained with; grow a pre-norm scheme")
    if operator == "identity" and (scheme.post_norm or scheme.output_norms):
        where = "the norm after the residual add" if scheme.post_norm else "Peri-LN's output norm (its bias)"
        raise ConfigError(f"--depth-growth identity with --norm-scheme {c.norm_scheme}: zeroed linear_proj and "
                          f"linear_fc2 do not make a layer the identity there ({where} still acts); use midas or stack")
    if c.hybrid_layer_pattern:
        raise ConfigError("depth growth with --hybrid-layer-pattern: growth copies GPTModel transformer layers; "
                          "grow the GPTModel form of the network (leave --hybrid-layer-pattern out)")


def grown_moe_layer_freq(c: PretrainConfig, sources: List[int]) -> str:
    """The MoE pattern of the grown model: a layer is MoE where its source is."""
    pattern = moe_layer_pattern(c.moe_layer_freq, c.num_layers)
    grown = [pattern[s] for s in sources]
    return "1" if all(grown) else "[" + ",".join(map(str, grown)) + "]"


def grown_config(c: PretrainConfig, operator: str, block_size: Optional[int], lns_scales: str
                 ) -> Tuple[PretrainConfig, List[int], List[bool]]:
    """The config of the grown model (``num_layers``, ``lns_depths``, the MoE pattern, the VPP split) and its
    layer map."""
    check_growable(c, operator)
    sources, copies = layer_sources(operator, c.num_layers, block_size)
    inherit = lns_scales == "inherit" and NORM_SCHEMES[c.norm_scheme].lns
    changes = dict(num_layers=len(sources), lns_depths=inherited_lns_depths(c.lns_depths, sources) if inherit else None)
    if c.num_experts:
        changes["moe_layer_freq"] = grown_moe_layer_freq(c, sources)
    if c.num_layers_per_virtual_pipeline_stage:  # the same number of virtual stages, each deeper
        chunks = c.pipeline_model_parallel_size * c.virtual_pipeline_model_parallel_size
        if len(sources) % chunks:
            raise ConfigError(f"the grown model's {len(sources)} layers do not split over the {chunks} pipeline "
                              "chunks of the checkpoint's layout (PP x VPP); choose a block size that keeps the depth "
                              f"a multiple of {chunks}")
        changes["num_layers_per_virtual_pipeline_stage"] = len(sources) // chunks
    return dataclasses.replace(c, **changes), sources, copies


# ------------------------------------------------------------------------------------------ checkpoint mapping


class LayerMapping:
    """Loads a checkpoint of ``old_layers`` layers into a grown model: each layer tensor of the sharded state dict
    (weights, Adam moments, fp32 main weights, extra states; homogeneous layers, stacked on the first axis with
    their global layer as offset) is read from its source layer. The copies are read in a second load, since
    dist-checkpointing's torch loader reads each slice of a tensor at most once per rank (every operator copies
    each old layer at most once). Given to :func:`lns_megatron.training.checkpoint.load_checkpoint`."""

    def __init__(self, sources: List[int], copies: List[bool], old_layers: int, zero_copies: bool,
                 reset_moments: bool):
        self.sources, self.copies, self.old_layers = sources, copies, old_layers
        self.zero_copies, self.reset_moments = zero_copies, reset_moments
        self.zeroed = []  # paths of the loaded tensors to zero after the load
        self.copied = []  # paths of the copies' tensors, loaded by the second load
        self.copied_layers = []  # and the grown model's layer of each

    def remap(self, sharded: dict) -> dict:
        """Rewrite ``sharded`` in place and move the copies' entries out of it, into the returned second state dict
        (same paths)."""
        self.zeroed.clear()
        self.copied.clear()
        self.copied_layers.clear()
        second = {}
        self._walk(sharded, (), second)
        if torch.distributed.get_world_size() == 1:
            second["growth scratch"] = self._scratch(second)
        return second

    def _scratch(self, second: dict) -> dict:
        """On one rank, torch's loader takes the shards a rank does not read for its own (it places them on rank
        ``(rank + 1) % world``): every old layer of each tensor the copies read is read, into scratch buffers."""
        read = {}  # (key, offsets but the layer's) -> (one entry, the old layers the copies read)
        for path, layer in zip(self.copied, self.copied_layers):
            value = _get(second, path)
            if isinstance(value, ShardedObject):
                continue
            rest = () if isinstance(value, ShardedTensorFactory) else tuple(value.global_offset[1:])
            read.setdefault((value.key, rest), (value, set()))[1].add(self.sources[layer])
        scratch, index = {}, 0
        for value, layers in read.values():
            for old_layer in sorted(set(range(self.old_layers)) - layers):
                if isinstance(value, ShardedTensorFactory):
                    item = dataclasses.replace(value, data=torch.empty_like(value.data),
                                               build_fn=self._remapped_build(value.build_fn, old_layer))
                else:
                    item = dataclasses.replace(value, data=torch.empty_like(value.data),
                                               global_offset=(old_layer,) + tuple(value.global_offset[1:]))
                scratch[index] = item
                index += 1
        return scratch

    @staticmethod
    def _remapped_build(build_fn, old_layer: int):
        def build(*args):
            built = build_fn(*args)  # already mapped: only the layer changes
            if isinstance(built, (ShardedTensor, ShardedObject)):
                return dataclasses.replace(built, global_offset=(old_layer,) + tuple(built.global_offset[1:]))
            for k, v in (built.items() if isinstance(built, dict) else enumerate(built)):
                built[k] = dataclasses.replace(v, global_offset=(old_layer,) + tuple(v.global_offset[1:]))
            return built
        return build

    def _walk(self, node, path, second) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in list(items):
            if isinstance(value, (dict, list)):
                self._walk(value, path + (key,), second)
                continue
            if isinstance(value, ShardedTensorFactory) and LAYER_KEY in value.key:
                layer = self._layer_of(value.build())
                mapped = dataclasses.replace(value, build_fn=self._mapped_build(value.build_fn))
            elif isinstance(value, (ShardedTensor, ShardedObject)) and LAYER_KEY in value.key:
                layer = self._layer_of(value)
                mapped = self._mapped(value)
            else:  # not a layer's: the embeddings, final norm and output layer, whose moments a reset resets too
                if self.reset_moments and _is_moment(getattr(value, "key", "")):
                    self.zeroed.append(path + (key,))
                continue
            self._note(value.key, layer, path + (key,))
            if self.copies[layer]:
                if not isinstance(node, dict):
                    raise ConfigError(f"{value.key}: a layer tensor in a list of the sharded state dict; growth maps "
                                      "megatron-core's dict layouts only")
                del node[key]
                target = second
                for k in path:
                    target = target.setdefault(k, {})
                target[key] = mapped
                self.copied.append(path + (key,))
                self.copied_layers.append(layer)
            else:
                node[key] = mapped

    def _layer_of(self, built) -> int:
        items = [built] if isinstance(built, (ShardedTensor, ShardedObject)) else list(
            built.values() if isinstance(built, dict) else built)
        layers = set()
        for item in items:
            self._check(item)
            layers.add(item.global_offset[0])
        if len(layers) != 1:
            raise ConfigError(f"{items[0].key}: one entry spans layers {sorted(layers)}; growth maps one layer each")
        return layers.pop()

    def _check(self, item) -> None:
        new_layers = len(self.sources)
        if item.global_shape[0] != new_layers or (isinstance(item, ShardedTensor) and item.prepend_axis_num < 1):
            raise ConfigError(f"{item.key}: not a layer tensor stacked over the {new_layers} layers (global shape "
                              f"{tuple(item.global_shape)}); growth maps megatron-core's homogeneous layer layout only")

    def _mapped_build(self, build_fn):
        def build(*args):
            built = build_fn(*args)
            if isinstance(built, (ShardedTensor, ShardedObject)):
                return self._mapped(built)
            mapped = dict(built) if isinstance(built, dict) else list(built)
            for k, v in (mapped.items() if isinstance(mapped, dict) else enumerate(mapped)):
                mapped[k] = self._mapped(v)
            return mapped
        return build

    def _mapped(self, item):
        self._check(item)
        offset = (self.sources[item.global_offset[0]],) + tuple(item.global_offset[1:])
        changes = dict(global_offset=offset, global_shape=(self.old_layers,) + tuple(item.global_shape[1:]))
        if getattr(item, "axis_fragmentations", None):  # the shard grid torch's loader builds (one shard per layer)
            changes["axis_fragmentations"] = (self.old_layers,) + tuple(item.axis_fragmentations[1:])
        return dataclasses.replace(item, **changes)

    def _note(self, key: str, layer: int, path: tuple) -> None:
        moment = _is_moment(key)
        if moment and self.reset_moments:
            self.zeroed.append(path)
        elif self.zero_copies and not moment and self.copies[layer] and ZEROED.search(key):
            self.zeroed.append(path)

    def finish(self, state: dict, second: dict) -> None:
        """After both loads, before the state goes into the model and optimizer: the copies' tensors into ``state``,
        the zeroed copies, the reset moments and (with ``reset_moments``) Adam's step counts."""
        for path in self.copied:
            _set(state, path, _get(second, path))
        for path in self.zeroed:
            _set(state, path, torch.zeros_like(_get(state, path)))
        if self.reset_moments:
            _reset_steps(state.get("optimizer"))


def _is_moment(key: str) -> bool:
    """An Adam moment's entry (optimizer.state.exp_avg.PARAM and the like), not a main weight's."""
    return key.startswith("optimizer.state.") and key.split(".")[2] not in MAIN_WEIGHTS


def _get(node, path):
    for key in path:
        node = node[key]
    return node


def _set(node, path, value) -> None:
    for key in path[:-1]:  # a copy's entries alone (its Adam state) were moved out whole: the load left no dict
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _reset_steps(node) -> None:
    """Adam's step counts to 0: the per-group ``step`` and megatron's ``common_step``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("step", "common_step") and isinstance(value, (int, float, torch.Tensor)):
                node[key] = torch.zeros_like(value) if isinstance(value, torch.Tensor) else type(value)(0)
            else:
                _reset_steps(value)
    elif isinstance(node, list):
        for value in node:
            _reset_steps(value)


# ------------------------------------------------------------------------------------------ growing


def describe(operator: str, sources: List[int], copies: List[bool]) -> str:
    """What grew, in 1-based layer numbers: "layers 5-6 copied to 7-8" and the like."""
    runs = []  # (first copy position, first source, length), 0-based
    for j, (s, copy) in enumerate(zip(sources, copies)):
        if copy and runs and runs[-1][0] + runs[-1][2] == j and runs[-1][1] + runs[-1][2] == s:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        elif copy:
            runs.append((j, s, 1))

    def span(a, n):
        return f"{a + 1}" if n == 1 else f"{a + 1}-{a + n}"

    shown = "; ".join(f"{span(s, n)} copied to {span(j, n)}" for j, s, n in runs[:6]) + ("; ..." if len(runs) > 6 else "")
    zeroed = " (linear_proj and linear_fc2 of each copy zeroed)" if operator == "identity" else ""
    return (f"{operator}: {len(sources) - sum(copies)} -> {len(sources)} layers, {shown} (numbers in the grown "
            f"model){zeroed}")


def layer_mapping(c: PretrainConfig, old_layers: int) -> LayerMapping:
    """The mapping that loads a checkpoint of ``old_layers`` layers into ``c``'s grown model by ``c``'s operator."""
    sources, copies = layer_sources(c.depth_growth, old_layers, c.growth_block_size)
    return LayerMapping(sources, copies, old_layers, zero_copies=c.depth_growth == "identity",
                        reset_moments=c.growth_optimizer_state == "reset")


def grow_checkpoint(load: str, save: str, operator: str, block_size: Optional[int] = None,
                    lns_scales: str = "position", optimizer_state: str = "copy") -> str:
    """Read the newest checkpoint under ``load`` (any TP/PP/VPP layout), write the grown one under ``save`` with
    the same iteration, data position, scheduler and (copied or reset) Adam state; returns its directory.

    One process holds the whole model and its optimizer state. The output is written at TP=PP=1 with the
    distributed optimizer's state fully reshardable, so that it loads at any layout; its
    ``pretrain_config.json`` is the source's with the grown ``num_layers`` (and ``lns_depths``, the MoE pattern)."""
    directory, iteration = checkpoint.latest_checkpoint(load)
    if os.path.abspath(save) == os.path.abspath(load) or os.path.abspath(save) == os.path.abspath(directory):
        raise ConfigError(f"--save {save} is the checkpoint being grown; write the grown model to a new directory")
    if os.path.isfile(os.path.join(save, checkpoint.TRACKER)):
        raise ConfigError(f"--save {save} already holds checkpoints; give an empty or new directory")
    old = PretrainConfig.from_dict(checkpoint.saved_config(directory))
    if old.depth_growth:
        raise ConfigError(f"{directory} is from a run with --depth-growth {old.depth_growth}: it grows by its schedule "
                          "when resumed; grow it by hand only from a run without --depth-growth")
    if old.padded_vocab_size is None:
        raise ConfigError(f"{directory}: its pretrain_config.json has no padded_vocab_size (saved by an older "
                          "lns_megatron); resume it once with this version and save")
    new, sources, copies = grown_config(old, operator, block_size, lns_scales)
    new = dataclasses.replace(new, depth_growth=None, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              num_layers_per_virtual_pipeline_stage=None, sequence_parallel=False,
                              context_parallel_size=1, expert_model_parallel_size=1, expert_tensor_parallel_size=None,
                              world_size=1, dist_ckpt_optim_fully_reshardable=True, recompute_granularity=None,
                              recompute_method=None, recompute_num_layers=None, recompute_modules=None)
    build = dataclasses.replace(new, transformer_impl="local", fp8_format=None)  # the same keys and function
    checkpoint._ensure_single_process_parallel_state(old.seed)
    model = build_model(build, old.padded_vocab_size)
    optimizer, scheduler = build_optimizer(build, model)
    mapping = LayerMapping(sources, copies, old.num_layers, zero_copies=operator == "identity",
                           reset_moments=optimizer_state == "reset")
    iteration, consumed = checkpoint.load_checkpoint(directory, model, optimizer, scheduler, load_rng=False,
                                                     layer_mapping=mapping)
    return checkpoint.save_checkpoint(save, iteration, consumed, model, optimizer, scheduler, new)


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="grow_depth", description="Write a deeper copy of an lns_megatron checkpoint "
                                "(MIDAS, stacking or identity blocks); resume it with the driver and --num-layers of "
                                "the grown model")
    p.add_argument("--load", required=True, help="a --save directory (its newest checkpoint) or one iter_* directory")
    p.add_argument("--save", required=True, help="a new directory for the grown checkpoint")
    p.add_argument("--operator", required=True, choices=OPERATORS)
    p.add_argument("--block-size", type=int, help="midas: the block b it copies; identity: a copy after every b-th "
                   "layer")
    p.add_argument("--lns-scales", default="position", choices=LNS_SCALES,
                   help="LNS: each layer's 1/sqrt(l) from its new place, or each layer keeps its l (copies their "
                   "source's); recorded in the checkpoint")
    p.add_argument("--optimizer-state", default="copy", choices=OPTIMIZER_STATES,
                   help="copy the Adam moments to the copied layers, or reset every moment and Adam's step")
    return p


def main(argv=None) -> int:
    import sys
    import warnings

    from lns_megatron.training import distributed

    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    args = build_parser().parse_args(argv)
    try:
        old = checkpoint.saved_config(checkpoint.latest_checkpoint(args.load)[0])
        directory = grow_checkpoint(args.load, args.save, args.operator, args.block_size, args.lns_scales,
                                    args.optimizer_state)
    except (ConfigError, checkpoint.CheckpointError) as e:
        print(f"grow_depth: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.destroy()
    grown = checkpoint.saved_config(directory)
    sources, copies = layer_sources(args.operator, old["num_layers"], args.block_size)
    print(f"grow_depth: {describe(args.operator, sources, copies)}; Adam state "
          f"{'copied' if args.optimizer_state == 'copy' else 'reset'}; LNS scales by {args.lns_scales}", flush=True)
    print(f"grow_depth: wrote {directory} (iteration {os.path.basename(directory).split('_')[-1].lstrip('0') or 0}); "
          f"resume with --load {args.save} --num-layers {grown['num_layers']}", flush=True)
    return 0
