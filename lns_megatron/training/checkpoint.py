"""Checkpoints in megatron's torch_dist format, with a crash-safe "latest" pointer.

Layout (Megatron-LM's): ``SAVE/iter_0000100/`` holds one checkpoint, and
``SAVE/latest_checkpointed_iteration.txt`` names the newest complete one. A save is written
to ``iter_0000100.tmp`` and renamed when every rank has finished; only then does the pointer
move (by an atomic replace), so a process killed mid-save never damages the latest checkpoint.
With ``--async-save`` the shards are written by a forked process per rank while training goes on;
the rename and the pointer wait for :class:`AsyncSaves` to see every rank's writer done (its files
fsynced), at a later iteration or at the end of the run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException  # a BaseException

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (get_default_load_sharded_strategy,
                                                            get_default_save_sharded_strategy)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (FullyParallelLoadStrategyWrapper,
                                                                        FullyParallelSaveStrategyWrapper)

from lns_megatron import compat
from lns_megatron.config import ConfigError, PretrainConfig
from lns_megatron.data import datasets, metadata
from lns_megatron.models.build import load_as_gpt
from lns_megatron.schemes import NORM_SCHEMES
from lns_megatron.models.gpt import unwrap
from lns_megatron.training import distributed

TRACKER = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "pretrain_config.json"


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_checkpoint(root: str) -> Tuple[str, int]:
    """(directory, iteration) of the newest complete checkpoint under ``root``.

    ``root`` may also be one ``iter_*`` directory itself.
    """
    if not os.path.isdir(root):
        raise CheckpointError(f"checkpoint {root}: no such directory; give a --save directory of an earlier run")
    if os.path.isfile(os.path.join(root, CONFIG_FILE)):
        name = os.path.basename(os.path.normpath(root))
        return root, int(name.split("_")[-1]) if name.startswith("iter_") else 0
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"checkpoint {root}: no {TRACKER}; it holds no complete checkpoint (was a save interrupted?)")
    text = open(tracker).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"checkpoint {root}: {TRACKER} says {text!r}, not an iteration number; the file is corrupt")
    directory = iteration_dir(root, int(text))
    if not os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        raise CheckpointError(f"checkpoint {directory}: missing or incomplete ({CONFIG_FILE} absent)")
    return directory, int(text)


def saved_config(directory: str) -> dict:
    with open(os.path.join(directory, CONFIG_FILE)) as f:
        return json.load(f)


def saved_schedule(directory: str) -> Optional[dict]:
    """The learning-rate scheduler state saved in a checkpoint (its small common file only)."""
    try:
        return dist_checkpointing.load_common_state_dict(directory).get("opt_param_scheduler")
    except Exception as e:  # a torn or foreign checkpoint
        raise CheckpointError(f"checkpoint {directory}: cannot read its common state ({type(e).__name__}: {e}); "
                              "pass an earlier iter_* directory") from None


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "np": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["np"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def content_metadata(use_distributed_optimizer: bool, fully_reshardable: bool,
                     non_homogeneous_layers: bool = False) -> dict:
    """What shapes the sharded state dict, saved in the checkpoint and read back on load (Megatron-LM's
    ``_build_sharded_state_dict_metadata``). megatron-core's default distributed-optimizer layout
    (``fully_sharded_model_space``) cannot be saved with torch_dist, so it is never used. Layers that
    differ (Mix-LN's Post-LN and Pre-LN ones) are saved one key per layer instead of stacked."""
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if non_homogeneous_layers:
        metadata["non_homogeneous_layers"] = True
    if use_distributed_optimizer:
        metadata["distrib_optim_sharding_type"] = "fully_reshardable" if fully_reshardable else "dp_reshardable"
    return metadata


def _initialize_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its Adam state (zeros, step 0) so that megatron-core can build
    the sharded state dict to load into: with torch's Adam (no Apex or TE) its ``state_dict()`` reads
    ``step`` from the per-parameter state, which is empty before the first step (megatron-core 0.16)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and opt.init_state_fn is not None:
            opt.init_state_fn(opt.optimizer, opt.config)
            for state in opt.optimizer.state.values():
                state.setdefault("step", torch.tensor(0.0))


def _load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict``, mended for torch's Adam without Apex or TE (megatron-core 0.16).

    There the distributed optimizer keeps Adam's ``step`` per parameter. Its loader restores it from the
    saved parameter groups as ONE tensor shared by every parameter (torch's in-place ``step += 1`` then
    advances it once per parameter), and then copies the loaded shards into every per-parameter key,
    ``step`` included, which the shards lack (``fully_reshardable``: a KeyError) or hold as the placeholder
    of :func:`_initialize_optimizer_state` (``dp_reshardable``: a wrong bias correction). So the parameter
    state is loaded here, after the rest, with the steps set aside and then given back one per parameter.
    With Apex/TE Adam the step lives in the parameter groups only and this is megatron's own path.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    state = _common_state_in_this_layout(state, optimizers)
    states = [state] if len(optimizers) == 1 else [v for _, v in sorted(state.items())]
    deferred = []
    for opt, saved in zip(optimizers, states):
        torch_adam_steps = any("step" in g for g in saved.get("optimizer", {}).get("param_groups", []))
        if isinstance(opt, DistributedOptimizer) and torch_adam_steps and "param_state" in saved:
            deferred.append((opt, saved.pop("param_state"), saved["param_state_sharding_type"]))
    with torch.no_grad():  # it copies into fp32 main params that are the model's own leaves
        optimizer.load_state_dict(state)
        for opt, param_state, sharding_type in deferred:
            steps = {p: s.pop("step") for p, s in opt.optimizer.state.items() if "step" in s}
            load = {"fully_reshardable": opt.load_parameter_state_from_fully_reshardable,
                    "dp_reshardable": opt.load_parameter_state_from_dp_reshardable}[sharding_type]
            load(param_state)
            for p, step in steps.items():
                opt.optimizer.state[p]["step"] = step.clone()


def _common_state_in_this_layout(state: dict, optimizers: list) -> dict:
    """Expert parallelism splits the distributed optimizer in two (dense and expert parameters); at EP=1 it is
    one. From a checkpoint saved with the other count, dist-checkpointing loads the (fully reshardable,
    per-parameter) shards into this run's layout, but the common part (parameter groups, sharding type) comes back
    in the saved one: give it this run's. The dense and expert groups hold the same settings (the driver sets no
    expert-specific ones) but for megatron's ``is_expert_parallel`` mark, which is set to each part's own."""
    def expert_parallel(groups):
        return bool(groups and groups[0].get("is_expert_parallel"))

    parts = sorted(k for k in state if isinstance(k, int))
    common = {k: v for k, v in state.items() if not isinstance(k, int)}
    if parts and "param_groups" in common:  # megatron's (non-distributed) optimizer of torch Adam
        return _torch_adam_state_in_this_layout(state, parts, common, optimizers)
    if len(optimizers) == 1 and parts:  # saved chained, loading one: the dense part's common state
        dense = [k for k in parts if not expert_parallel(state[k].get("optimizer", {}).get("param_groups"))]
        saved = {k: v for k, v in state[(dense or parts)[0]].items() if k != "param_state"}
        return {**saved, **common}
    if len(optimizers) > 1 and {"optimizer", "param_state_sharding_type"} <= common.keys():  # saved as one
        out = {}
        for k in parts:
            shared = copy.deepcopy({name: common[name] for name in ("optimizer", "param_state_sharding_type")})
            mark = expert_parallel(optimizers[k].optimizer.param_groups)
            for group in shared["optimizer"].get("param_groups", []):
                group["is_expert_parallel"] = mark
            out[k] = {**shared, **state[k]}
        return out
    return state


def _torch_adam_state_in_this_layout(state: dict, parts: list, common: dict, optimizers: list) -> dict:
    """:func:`_common_state_in_this_layout` for the non-distributed optimizer. Its per-parameter state comes
    back in this run's layout; its parameter groups' settings and Adam's ``common_step`` in the saved one
    (one optimizer's at top level, or a chained one's per part). Each of this run's groups takes the saved
    group with its settings (weight-decay and lr multipliers), and its own ``params`` and expert mark."""
    def settings(group):
        return tuple(group.get(k) for k in ("wd_mult", "lr_mult", "is_decoupled_lr"))

    def matched(saved_groups, live_groups, template_groups):
        saved_groups = sorted(saved_groups, key=lambda g: bool(g.get("is_expert_parallel")))  # dense first
        out = []
        for live, template in zip(live_groups, template_groups):
            match = next((g for g in saved_groups if settings(g) == settings(live)), None)
            if match is None:
                raise CheckpointError(f"the checkpoint has no optimizer parameter group with weight-decay and lr "
                                      f"multipliers {settings(live)[:2]}; resume with the flags it was saved with")
            out.append({**match, "params": template["params"], "is_expert_parallel": live.get("is_expert_parallel")})
        return out

    if len(optimizers) == 1:  # saved chained (EP > 1), loading one
        saved_groups = [g for k in parts for g in state[k]["param_groups"]]
        step = next((state[k]["state"]["common_step"] for k in parts if "common_step" in state[k].get("state", {})),
                    None)
        groups = matched(saved_groups, optimizers[0].optimizer.param_groups, common["param_groups"])
        return {**common, "param_groups": groups,
                "state": {**common["state"], **({"common_step": step} if step is not None else {})}}
    out = {}  # saved as one, loading chained: the one's settings and step into every part
    for k in parts:
        groups = matched(common["param_groups"], optimizers[k].optimizer.param_groups, state[k]["param_groups"])
        out[k] = {**state[k], "param_groups": groups, "state": {**state[k]["state"], **common.get("state", {})}}
    return out


def _sharded_state(model: List, optimizer, is_loading: bool, metadata: dict) -> dict:
    state = {f"model{i}": unwrap(chunk).sharded_state_dict(metadata=metadata) for i, chunk in enumerate(model)}
    if optimizer is not None:
        if is_loading:
            _initialize_optimizer_state(optimizer)
        group_metadata = dict(metadata, dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        # The chunks nested, as Megatron-LM passes them: their layers' dict keys are chunk-local, so merged
        # into one dict the chunks of a virtual pipeline would overwrite each other.
        state["optimizer"] = optimizer.sharded_state_dict(dict(state), is_loading=is_loading, metadata=group_metadata)
    pp, tp = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()
    state["rng_state"] = ShardedObject(
        "rng_state", _rng_state(), (pp, tp),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )
    return state


def _last_line(error: BaseException) -> str:
    """The last line of an error's message (torch's CheckpointException carries a whole traceback)."""
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


class AsyncSaves:
    """megatron-core's queue of async checkpoint writes (``AsyncCallsQueue``, one forked writer per rank and save).
    Every method is called on every rank: finishing a save needs all of them."""

    def __init__(self):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.queue = AsyncCallsQueue()
        self.pending: List[Tuple[int, str]] = []  # (iteration, directory it will have), oldest first

    def schedule(self, request, iteration: int, final: str) -> None:
        self.queue.schedule_async_request(request)
        self.pending.append((iteration, final))

    def poll(self, blocking: bool = False) -> List[Tuple[int, str]]:
        """Finish the saves whose writers are done on every rank (all of them with ``blocking``); returns the
        (iteration, directory) of each that became a complete checkpoint."""
        if not self.pending:
            return []
        try:
            done = self.queue.maybe_finalize_async_calls(blocking=blocking)
        except (Exception, TorchCheckpointException) as e:
            iteration, final = self.pending[0]
            raise CheckpointError(f"the background save of iteration {iteration} to {final}.tmp failed "
                                  f"({_last_line(e)}); the latest complete checkpoint is "
                                  "unchanged: free space or fix the mount, then resume from it") from None
        finished, self.pending = self.pending[:len(done)], self.pending[len(done):]
        return finished


def _publish(root: str, iteration: int, partial: str, final: str, config: PretrainConfig) -> None:
    """On rank 0, once every rank's shards are written: the config (written last, it marks completeness), the
    rename, then the pointer by an atomic replace, each made durable."""
    with open(os.path.join(partial, CONFIG_FILE), "w") as f:
        f.write(config.to_json())
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(partial, final)
    tmp_tracker = os.path.join(root, TRACKER + ".tmp")
    with open(tmp_tracker, "w") as f:
        f.write(str(iteration))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_tracker, os.path.join(root, TRACKER))
    directory = os.open(root, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename and the replace
    finally:
        os.close(directory)


def save_checkpoint(root: str, iteration: int, consumed_samples: int, model: List, optimizer, scheduler,
                    config: PretrainConfig, async_saves: Optional[AsyncSaves] = None) -> Optional[str]:
    """Save, and return the complete checkpoint's directory; with ``async_saves``, schedule the write and return
    None (the directory comes out of :meth:`AsyncSaves.poll` when every rank has written its part)."""
    final = iteration_dir(root, iteration)
    partial = final + ".tmp"
    rank = dist.get_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # debris of an interrupted save
        os.makedirs(partial)
    dist.barrier()
    metadata = content_metadata(config.use_distributed_optimizer, config.dist_ckpt_optim_fully_reshardable,
                                non_homogeneous_layers=NORM_SCHEMES[config.norm_scheme].post_norm == "first")
    state = _sharded_state(model, optimizer, is_loading=False, metadata=metadata)
    state.update(iteration=iteration, consumed_samples=consumed_samples,
                 opt_param_scheduler=scheduler.state_dict() if scheduler is not None else None)
    strategy = get_default_save_sharded_strategy()
    if config.ckpt_fully_parallel_save:  # Megatron-LM's default: replicated tensors written once, spread over DP
        strategy = FullyParallelSaveStrategyWrapper(
            strategy, parallel_state.get_data_parallel_group(with_context_parallel=True))
    config_now = copy.deepcopy(config)  # as it is now, whenever the save completes
    try:
        request = dist_checkpointing.save(state, partial, sharded_strategy=strategy, content_metadata=metadata,
                                          **compat.async_save_arguments(async_saves is not None))
    except (Exception, TorchCheckpointException) as e:  # a full disk, a lost mount, a quota
        raise CheckpointError(f"saving iteration {iteration} to {partial} failed on rank {rank} "
                              f"({_last_line(e)}); the latest complete checkpoint in "
                              f"{root} is unchanged: free space or fix the mount, then resume from it") from None
    if async_saves is not None:
        if rank == 0:  # megatron runs it after every rank's writer is done and the shards' metadata is written
            request.add_finalize_fn(lambda: _publish(root, iteration, partial, final, config_now))
        async_saves.schedule(request, iteration, final)
        return None
    dist.barrier()
    if rank == 0:
        _publish(root, iteration, partial, final, config_now)
    dist.barrier()
    return final


def load_checkpoint(root: str, model: List, optimizer=None, scheduler=None, load_rng: bool = True,
                    fully_parallel: bool = False, layer_mapping=None) -> Tuple[int, int]:
    """Load into ``model`` (any TP/PP layout: dist_checkpointing reshards). Returns
    (iteration, consumed_samples). ``fully_parallel``: each tensor is read by one data-parallel rank and
    exchanged (Megatron-LM's --ckpt-fully-parallel-load). ``layer_mapping`` (a
    :class:`lns_megatron.training.growth.LayerMapping`): ``model`` is a grown one, whose layers are read from
    their source layers of the checkpoint."""
    directory, _ = latest_checkpoint(root)
    saved = saved_config(directory)
    same_layout = (saved.get("tensor_model_parallel_size") == parallel_state.get_tensor_model_parallel_world_size()
                   and saved.get("pipeline_model_parallel_size") == parallel_state.get_pipeline_model_parallel_world_size())
    try:  # megatron-core 0.19 reads the content metadata from the shards too
        metadata = dist_checkpointing.load_content_metadata(directory) or {}
        if (layer_mapping is not None and optimizer is not None
                and metadata.get("distrib_optim_sharding_type") == "dp_reshardable"):
            raise CheckpointError(f"checkpoint {directory}: its distributed-optimizer state is saved per data-parallel "
                                  "shard (dp_reshardable), which holds no per-layer Adam state to map onto the grown layers; "
                                  "train it one more iteration with --dist-ckpt-optim-fully-reshardable (it saves at the "
                                  "end) and grow that checkpoint")
        sharded = _sharded_state(model, optimizer, is_loading=True, metadata=metadata)
        if not (load_rng and same_layout):
            sharded.pop("rng_state")
        strategy = None
        if fully_parallel and layer_mapping is None:  # a grown model reads some tensors twice: no exchange plan
            strategy = FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(directory),
                                                        parallel_state.get_data_parallel_group(with_context_parallel=True))
        copies = layer_mapping.remap(sharded) if layer_mapping is not None else None
        state = dist_checkpointing.load(sharded, directory, sharded_strategy=strategy,
                                        validate_access_integrity=layer_mapping is None)
        if layer_mapping is not None:
            layer_mapping.finish(state, dist_checkpointing.load(copies, directory, validate_access_integrity=False))
    except (CheckpointError, ConfigError):
        raise
    except (Exception, TorchCheckpointException) as e:  # a missing shard, a torn file, another model shape
        reason = _last_line(e)
        raise CheckpointError(f"checkpoint {directory}: cannot be loaded into this model ({reason}): its files are "
                              "torn or corrupt, or it holds another model shape; pass an earlier iter_* directory "
                              "or the flags it was trained with") from e
    for i, chunk in enumerate(model):
        unwrap(chunk).load_state_dict(state[f"model{i}"])
    if optimizer is not None:
        _load_optimizer_state(optimizer, state["optimizer"])
    if scheduler is not None and state.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if "rng_state" in state:
        _set_rng_state(state["rng_state"])
    return state["iteration"], state["consumed_samples"]


# Loading a trained checkpoint into one process, for the tools (export, depth report).


@dataclass
class LoadedModel:
    """An unwrapped TP=PP=1 ``GPTModel`` in eval mode, loaded from a checkpoint."""

    model: torch.nn.Module
    config: PretrainConfig  # as saved, except tokenizer_model when overridden
    directory: str  # the iter_* directory that was loaded
    iteration: int
    tokenizer: object  # lns_megatron.data.tokenizer.Tokenizer
    vocab_size: int  # the tokenizer's true vocabulary (the model's rows beyond it are padding)


def _ensure_single_process_parallel_state(seed: int) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CheckpointError("run it as one process, not under torchrun: checkpoints of any TP/PP are resharded "
                              "into one model on one device on load")
    if parallel_state.model_parallel_is_initialized():
        layout = (parallel_state.get_tensor_model_parallel_world_size(),
                  parallel_state.get_pipeline_model_parallel_world_size())
        if layout != (1, 1):
            raise CheckpointError(f"model parallelism is already initialized with TP, PP = {layout}; loading for "
                                  "export or a report needs TP=PP=1 (run it as a separate single process)")
        return
    distributed.initialize(1, 1, seed=seed)


def load_model(root: str, tokenizer_model: Optional[str] = None, tokenizer_type: Optional[str] = None,
               device: Optional[str] = None) -> LoadedModel:
    """Load the newest checkpoint under ``root`` (or one ``iter_*`` directory) into a TP=PP=1 model."""
    directory, iteration = latest_checkpoint(root)
    try:
        config = PretrainConfig.from_dict(saved_config(directory))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {directory}: pretrain_config.json is corrupt ({e}); "
                              "it was not written by lns_megatron.pretrain") from None
    if tokenizer_type is not None:
        config.tokenizer_type = tokenizer_type
    if tokenizer_model is not None:
        config.tokenizer_model = tokenizer_model
    try:
        tokenizer = datasets.build_tokenizer_from_config(config)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {directory} was trained with --tokenizer-type {config.tokenizer_type}: {e} "
                              "(pass --tokenizer-model PATH to point at the tokenizer's current location)") from None
    if config.tokenizer_identity:  # recorded by the driver: another tokenizer would trim or misread the vocabulary
        given = metadata.tokenizer_identity(tokenizer)
        mismatch = metadata.tokenizer_mismatch(config.tokenizer_identity, given)
        if mismatch:
            raise CheckpointError(
                f"checkpoint {directory} was trained with {metadata.describe_tokenizer(config.tokenizer_identity)}, "
                f"the tokenizer given is {metadata.describe_tokenizer(given)} ({mismatch}); pass --tokenizer-model the "
                "tokenizer the run was trained with")
    padded = datasets.padded_vocab_size(tokenizer.vocab_size, config.make_vocab_size_divisible_by,
                                        config.tensor_model_parallel_size)  # the padding of the training layout

    _ensure_single_process_parallel_state(config.seed)
    # One process, one device: TP/PP/VPP collapse to 1 (dist_checkpointing reshards); FP8 and TE
    # are training-time kernels; the local spec reads TE checkpoints (same keys, same math).
    single = dataclasses.replace(
        config, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        num_layers_per_virtual_pipeline_stage=None, sequence_parallel=False, fp8_format=None,
        transformer_impl="local", world_size=1,
    )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    def load(model):
        model.to(device)
        load_checkpoint(root, [model], load_rng=False)

    model = load_as_gpt(single, padded, load)
    model.eval()
    return LoadedModel(model, config, directory, iteration, tokenizer, tokenizer.vocab_size)
