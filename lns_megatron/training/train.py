"""The pretraining loop, built from megatron-core's parts.

parallel_state -> GPTModel or HybridModel (LNS spec) -> Float16Module (bf16) -> DDP -> distributed optimizer
-> OptimizerParamScheduler -> get_forward_backward_func (no pipelining, 1F1B or interleaved)
-> finalize_model_grads, with dist_checkpointing checkpoints. Mirrors Megatron-LM's
``pretrain_gpt.py`` without its ``megatron.training`` package, which megatron-core does not ship.
"""

from __future__ import annotations

import math
import os
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_batch_on_this_cp_rank

from lns_megatron import compat
from lns_megatron.config import ConfigError, PretrainConfig, moe_layer_pattern, unused_moe_flags, unused_scheme_flags, validate
from lns_megatron.data import datasets, metadata
from lns_megatron.models.build import check_moe_scheme, hybrid_pattern
from lns_megatron.models.gpt import transformer_config
from lns_megatron.schemes.lns import HAVE_TE
from lns_megatron.training import checkpoint, distributed, growth, probes, safety
from lns_megatron.training.build import build_model, build_optimizer  # noqa: F401  (public here too)
from lns_megatron.training.profiling import ManualGC, ProfilerWindow
from lns_megatron.training.safety import NonFiniteError
from lns_megatron.training.metrics import MetricsLogger, flops_per_iteration


def forward_step(data_iterator, model):
    """Megatron-LM's GPT forward step: per-token cross entropy averaged over the loss mask."""
    batch = next(data_iterator)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    mask = batch.get("attention_mask")
    if parallel_state.get_context_parallel_world_size() > 1:
        batch = get_batch_on_this_cp_rank(batch)  # two chunks of each sequence per rank, for causal balance
        mask = None  # TE's context-parallel attention applies the causal mask itself
    output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    return output, partial(_masked_mean_loss, batch["loss_mask"])


def _masked_mean_loss(loss_mask, per_token_loss):
    """The mean over the micro-batch's unmasked tokens. Under context parallelism each rank holds part of every
    sequence: its loss is its part of the whole mean, times CP, since DDP averages the gradients over the
    data- and context-parallel ranks."""
    loss_mask = loss_mask.view(-1).float()
    total = (per_token_loss.view(-1).float() * loss_mask).sum()
    whole = torch.stack([total.detach(), loss_mask.sum()])
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        dist.all_reduce(whole, group=parallel_state.get_context_parallel_group())
    tokens = whole[1].clamp(min=1)
    # clone(): the schedule divides the returned loss in place by the number of micro-batches.
    return total / tokens * cp, {"lm loss": (whole[0] / tokens).clone()}


def _mean_loss(losses) -> float:
    """Mean micro-batch loss, averaged over DP and broadcast from the last stage to every rank."""
    value = torch.zeros(1, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and losses:
        value += torch.stack([l["lm loss"].double() for l in losses]).mean()
    dist.all_reduce(value, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    value /= parallel_state.get_data_parallel_world_size(with_context_parallel=True)
    dist.all_reduce(value, group=parallel_state.get_pipeline_model_parallel_group())
    return value.item()


def _run(model, iterators, c: PretrainConfig, forward_only: bool, num_microbatches: int):
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches, seq_length=c.seq_length, micro_batch_size=c.micro_batch_size,
        forward_only=forward_only,
    )


def train_step(model, optimizer, iterators, c: PretrainConfig, num_microbatches: int) -> float:
    """Forward and backward of one global batch; the gradients are reduced, not yet applied."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    return _mean_loss(_run(model, iterators, c, forward_only=False, num_microbatches=num_microbatches))


def batch_size_schedule(c: PretrainConfig):
    """megatron-core's calculator of each iteration's global batch from the samples consumed: constant, or ramped
    up by --rampup-batch-size. Micro-batches keep their size, so the sample order is the constant batch's."""
    from megatron.core import num_microbatches_calculator as calculators

    common = dict(micro_batch_size=c.micro_batch_size, data_parallel_size=c.data_parallel_size,
                  decrease_batch_size_if_needed=False, rank=dist.get_rank())
    if c.rampup_batch_size is None:
        return calculators.ConstantNumMicroBatchesCalculator(global_batch_size=c.global_batch_size, **common)
    start, increment, samples = c.rampup_batch_size
    if hasattr(calculators, "RampupBatchsizeNumMicroBatchesCalculator"):  # megatron-core before 0.19
        return calculators.RampupBatchsizeNumMicroBatchesCalculator(
            global_batch_size=c.global_batch_size, **common, start_global_batch_size=start,
            batch_size_increment=increment, ramup_samples=samples)
    # 0.19 replaced it by step schedules: the same rule, START + k INCREMENTs from ceil(k SAMPLES / steps) samples on
    steps = (c.global_batch_size - start) // increment
    schedule = " ".join(f"{-(-k * samples // steps)}:{start + k * increment}" for k in range(steps + 1))
    return calculators.StepBatchsizeNumMicroBatchesCalculator(**common, schedule=schedule)


def grown_description(c: PretrainConfig, plan, stage: int) -> str:
    """What grew into stage ``stage``: the operator's layer copies (and LNS's positions, when kept)."""
    sources, copies = growth.layer_sources(c.depth_growth, plan.depths[stage - 1], c.growth_block_size)
    kept = "; each layer keeps its LNS l" if plan.lns_depths[stage] is not None else ""
    return growth.describe(c.depth_growth, sources, copies) + kept


def check_step_is_finite(loss: float, model, iteration: int, last_checkpoint) -> None:
    """Megatron-LM's --check-for-nan-in-loss-and-grad, before the optimizer step."""
    if math.isfinite(loss):
        device = safety.grad_buffers(model)[0].device
        if safety.finite_everywhere(safety.all_finite(safety.grad_buffers(model)), device):
            return
        what = f"the gradients hold NaN/Inf (lm loss {loss:.6g})"
    else:
        what = f"lm loss is {loss}"
    raise NonFiniteError(
        f"{what} at iteration {iteration}; the update was not applied and nothing was saved from this state; "
        f"{safety.describe_last_checkpoint(last_checkpoint)} (lower --lr, raise --lr-warmup-iters or set "
        "--clip-grad, and restart)")


def evaluate(model, iterators, c: PretrainConfig) -> float:
    for chunk in model:
        chunk.eval()
    total = 0.0
    with torch.no_grad():
        for _ in range(c.eval_iters):
            total += _mean_loss(_run(model, iterators, c, forward_only=True, num_microbatches=c.num_microbatches))
    for chunk in model:
        chunk.train()
    return total / c.eval_iters


def prepare_resume(c: PretrainConfig):
    """Before any memory is allocated: the checkpoint to resume and what it must agree with."""
    directory = None
    if c.load is not None and c.use_checkpoint_args:  # the checkpoint's flags, before they are validated
        directory, _ = checkpoint.latest_checkpoint(c.load)
        taken = safety.apply_checkpoint_args(checkpoint.saved_config(directory), c)
        if taken and int(os.environ.get("RANK", "0")) == 0:
            print(f"lns-pretrain: --use-checkpoint-args: {', '.join(taken)} (from {directory})", flush=True)
    validate(c, torch.cuda.is_available(), HAVE_TE)
    unsupported = compat.unsupported_flag(c)
    if unsupported:
        raise ConfigError(unsupported)
    hybrid_pattern(c)  # refuses a pattern that does not fit --num-layers and the pipeline layout
    check_moe_scheme(c)
    plan = growth.schedule(c)
    if plan and c.use_distributed_optimizer and not c.dist_ckpt_optim_fully_reshardable:
        c.dist_ckpt_optim_fully_reshardable = True  # growth maps Adam state per layer: per-DP-shard saves have none
    try:  # megatron-core's own checks of the combination (at every stage's depth), before any process group or memory
        for stage in range(len(plan.depths) if plan else 1):
            transformer_config(growth.stage_config(c, plan, stage) if plan else c)
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"megatron-core refuses these flags: {e}") from None
    if c.load is not None:
        directory, _ = checkpoint.latest_checkpoint(c.load)
        saved = checkpoint.saved_config(directory)
        if c.use_checkpoint_opt_param_scheduler and saved.get("lr_decay_style") == "WSD":
            for name in safety.WSD_FLAGS:  # the scheduler's state leaves them out
                setattr(c, name, saved[name])
    if c.data_path:
        datasets.check_data_paths(c)  # may take --eod-id from the datasets' metadata
    tokenizer = datasets.build_tokenizer_from_config(c)
    c.tokenizer_identity = metadata.tokenizer_identity(tokenizer)  # saved with checkpoints, checked on resume
    c.padded_vocab_size = datasets.padded_vocab_size(tokenizer.vocab_size, c.make_vocab_size_divisible_by,
                                                     c.tensor_model_parallel_size)
    notices = []
    if directory is not None:
        if plan is None:
            c.lns_depths = saved.get("lns_depths")  # a grown checkpoint's layers keep the l recorded with it
            expected = c
        else:  # a checkpoint of stage k has stage k's depth, a boundary's the depth before its growth
            _, saved_iteration = checkpoint.latest_checkpoint(c.load)
            expected = growth.stage_config(c, plan, plan.stage_of_checkpoint(saved_iteration))
            if saved.get("num_layers") != expected.num_layers or saved.get("depth_growth") != c.depth_growth:
                raise ConfigError(
                    f"--load {directory}: a checkpoint of {saved.get('num_layers')} layers at iteration "
                    f"{saved_iteration}, but this --depth-growth schedule ({', '.join(map(str, plan.depths))} layers, "
                    f"growing after iterations {', '.join(map(str, plan.boundaries))}) has {expected.num_layers} "
                    "there; resume with the growth flags it was trained with")
        schedule = None if c.finetune else checkpoint.saved_schedule(directory)
        notices = safety.compare_with_checkpoint(directory, saved, schedule, expected,
                                                 load_optimizer=not (c.finetune or c.no_load_optim))
    return tokenizer, directory, notices


def pretrain(c: PretrainConfig) -> dict:
    """Train; returns {"losses": {iteration: loss}, "iteration": last} (for tests and scripts)."""
    tokenizer, resume_from, notices = prepare_resume(c)
    distributed.initialize(c.tensor_model_parallel_size, c.pipeline_model_parallel_size,
                           c.virtual_pipeline_model_parallel_size, seed=c.seed,
                           timeout_minutes=c.distributed_timeout_minutes,
                           expert_model_parallel_size=c.expert_model_parallel_size,
                           expert_tensor_parallel_size=c.expert_tensor_parallel_size,
                           context_parallel_size=c.context_parallel_size)
    lock = safety.claim_save_directory(c)
    try:
        return _train(c, tokenizer, resume_from, notices)
    finally:
        if lock is not None:
            lock.release()


def build_training_state(c: PretrainConfig):
    """The model chunks, optimizer and scheduler of ``c``, wired into the schedules as Megatron-LM wires them."""
    model = build_model(c, c.padded_vocab_size)
    optimizer, scheduler = build_optimizer(c, model)
    config = model[0].config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if c.overlap_grad_reduce:
        config.no_sync_func = [chunk.no_sync for chunk in model] if len(model) > 1 else model[0].no_sync
    if c.overlap_param_gather:
        config.param_sync_func = [chunk.start_param_sync for chunk in model] if len(model) > 1 else model[0].start_param_sync
    return model, optimizer, scheduler


def _train(c: PretrainConfig, tokenizer, resume_from, notices) -> dict:
    vocab = c.padded_vocab_size
    plan = growth.schedule(c)
    resumed_at = checkpoint.latest_checkpoint(resume_from)[1] if resume_from is not None else 0
    stage = plan.stage_after(resumed_at) if plan else 0
    model_c = growth.stage_config(c, plan, stage) if plan else c  # the flags of the model being trained now
    model, optimizer, scheduler = build_training_state(model_c)
    config = model[0].config

    iteration, consumed = 0, 0
    if resume_from is not None:
        grows = plan is not None and plan.stage_of_checkpoint(resumed_at) < stage  # a boundary's checkpoint
        iteration, consumed = checkpoint.load_checkpoint(
            resume_from, model, optimizer=None if c.finetune or c.no_load_optim else optimizer,
            scheduler=None if c.finetune else scheduler, load_rng=not (c.finetune or c.no_load_rng),
            fully_parallel=c.ckpt_fully_parallel_load,
            layer_mapping=growth.layer_mapping(c, plan.depths[stage - 1]) if grows else None)
        if c.finetune or c.no_load_optim:
            optimizer.reload_model_params()  # bf16: the fp32 main weights from the loaded ones (Megatron-LM's too)
        if c.finetune:
            iteration, consumed = 0, 0
    start_iteration = iteration
    last_checkpoint = resume_from
    train_ds, valid_ds, _ = datasets.build_datasets(c, tokenizer)
    train_iters = datasets.data_iterators(train_ds, c, consumed, len(model))
    # Megatron-LM: validation resumes where an uninterrupted run would be.
    valid_consumed = iteration // c.eval_interval * c.eval_iters * c.global_batch_size
    valid_iters = datasets.data_iterators(valid_ds, c, valid_consumed, len(model)) if c.eval_iters > 0 else None
    depth_batch = next(datasets.data_iterators(valid_ds or train_ds, c, 0, 1)[0]) if c.depth_log_interval else None

    logger = MetricsLogger(model_c, vocab)
    if logger.is_writer:
        kind = f"HybridModel {c.hybrid_layer_pattern!r}" if c.hybrid_layer_pattern else "GPTModel"
        if c.num_experts:
            kind += (f", MoE in {sum(moe_layer_pattern(c.moe_layer_freq, c.num_layers))} layers: {c.num_experts} "
                     f"experts of {c.moe_ffn_hidden_size}, top-{c.moe_router_topk}, EP={c.expert_model_parallel_size} "
                     f"ETP={c.expert_tensor_parallel_size}")
        cp = f" CP={c.context_parallel_size} ({c.cp_comm_type})" if c.context_parallel_size > 1 else ""
        print(f"lns-pretrain: {c.norm_scheme} | {kind} | {model_c.num_layers} layers x {c.hidden_size} | TP={c.tensor_model_parallel_size} "
              f"PP={c.pipeline_model_parallel_size} VPP={c.virtual_pipeline_model_parallel_size}{cp} DP={c.data_parallel_size} | "
              f"{c.num_microbatches} micro-batches of {c.micro_batch_size} | vocab {tokenizer.vocab_size} (padded {vocab})",
              flush=True)
        if c.recompute_granularity:
            what = (f"{c.recompute_method} over {c.recompute_num_layers} layer(s)" if c.recompute_granularity == "full"
                    else ", ".join(config.recompute_modules))
            print(f"lns-pretrain: activation recompute: {c.recompute_granularity} ({what})", flush=True)
        output_std = c.init_method_std / (math.sqrt(2 * c.num_layers) if c.output_layer_init == "scaled" else 1)
        print(f"lns-pretrain: init N(0, {c.init_method_std:g}); linear_proj and linear_fc2 {c.output_layer_init} "
              f"N(0, {output_std:.4g}); embeddings N(0, {c.embedding_init_method_std or c.init_method_std:g})",
              flush=True)
        if plan:
            fraction = plan.flops_fraction(c.train_iters, lambda d: flops_per_iteration(
                growth.stage_config(c, plan, plan.depths.index(d)), vocab))
            print(f"lns-pretrain: depth growth ({c.depth_growth}, {c.growth_schedule}): "
                  f"{' -> '.join(map(str, plan.depths))} layers, growing after iterations "
                  f"{', '.join(map(str, plan.boundaries))}; {fraction:.3f} of the training FLOPs of {c.num_layers} "
                  f"layers throughout ({1 - fraction:.1%} saved)", flush=True)
        if resume_from is not None:
            what = "weights only (--finetune)" if c.finetune else f"iteration {iteration}" + (
                ", fresh Adam state (--no-load-optim)" if c.no_load_optim else "")
            print(f"lns-pretrain: loaded {resume_from}: {what}", flush=True)
            if plan and plan.stage_of_checkpoint(resumed_at) < stage:
                print(f"lns-pretrain: depth growth at iteration {iteration}: {grown_description(c, plan, stage)}",
                      flush=True)
        for notice in notices:
            print(f"lns-pretrain: resuming with a changed setting: {notice}", flush=True)
        unused = unused_scheme_flags(c)
        if unused:
            print(f"lns-pretrain: {', '.join(unused)} not used by --norm-scheme {c.norm_scheme}", flush=True)
        unused = unused_moe_flags(c)
        if unused:
            print(f"lns-pretrain: {', '.join(unused)} not used without --num-experts (a dense model)", flush=True)
        if (resume_from is not None and scheduler.lr_decay_style != "constant"
                and scheduler.lr_decay_steps <= iteration < c.train_iters):
            print(f"lns-pretrain: iterations {iteration + 1}..{c.train_iters} are past the end of the learning-rate "
                  f"decay (iteration {scheduler.lr_decay_steps}): they train at --min-lr {scheduler.min_lr:g}",
                  flush=True)
        if resume_from is not None and c.lr_decay_style == "WSD" and iteration < c.train_iters:
            decay_start = scheduler.lr_decay_steps - scheduler.wsd_decay_steps
            phase = "the stable phase" if iteration < decay_start else "WSD's decay"
            print(f"lns-pretrain: WSD: resuming in {phase}; the learning rate is constant to iteration {decay_start} "
                  f"and decays ({scheduler.lr_wsd_decay_style}) over iterations {decay_start + 1}.."
                  f"{scheduler.lr_decay_steps}", flush=True)
    if logger.is_writer and iteration >= c.train_iters:
        print(f"lns-pretrain: the checkpoint is at iteration {iteration}, --train-iters is {c.train_iters}: "
              "nothing to train (raise --train-iters, with --override-opt_param-scheduler to extend the schedule)",
              flush=True)

    async_saves = checkpoint.AsyncSaves() if c.async_save else None

    def finish_async_saves(blocking: bool) -> None:
        nonlocal last_checkpoint
        if async_saves is None:
            return
        with logger.untimed():
            finished = async_saves.poll(blocking)
        for saved_iteration, directory in finished:
            last_checkpoint = directory
            if dist.get_rank() == 0:
                print(f"lns-pretrain: saved checkpoint to {directory} at iteration {saved_iteration} (written in "
                      "the background)", flush=True)

    def save(iteration):
        nonlocal last_checkpoint
        safety.check_finite_state(model, optimizer, iteration, last_checkpoint)
        finish_async_saves(blocking=True)  # one background save at a time: the pointer moves in order
        start = time.perf_counter()
        with logger.untimed():
            directory = checkpoint.save_checkpoint(c.save, iteration, consumed, model, optimizer, scheduler, model_c,
                                                   async_saves=async_saves)
        if directory is not None:
            last_checkpoint = directory
        if dist.get_rank() == 0:
            print(f"lns-pretrain: saved checkpoint to {directory} at iteration {iteration} in "
                  f"{time.perf_counter() - start:.1f} s" if directory else
                  f"lns-pretrain: saving iteration {iteration} in the background ({time.perf_counter() - start:.1f} "
                  "s of training time)", flush=True)

    def grow():
        """At a stage boundary: the boundary's checkpoint, loaded into the next stage's deeper model."""
        nonlocal model, optimizer, scheduler, model_c, stage, config
        finish_async_saves(blocking=True)
        if last_checkpoint != checkpoint.iteration_dir(c.save, iteration):
            save(iteration)
            finish_async_saves(blocking=True)
        stage += 1
        model_c = growth.stage_config(c, plan, stage)
        del model, optimizer, scheduler  # before the deeper one is allocated
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        with logger.untimed():
            model, optimizer, scheduler = build_training_state(model_c)
            config = model[0].config
            checkpoint.load_checkpoint(last_checkpoint, model, optimizer, scheduler,
                                       layer_mapping=growth.layer_mapping(c, plan.depths[stage - 1]))
        logger.set_model(model_c, vocab)
        if logger.is_writer:
            print(f"lns-pretrain: depth growth at iteration {iteration}: {grown_description(c, plan, stage)}",
                  flush=True)

    batches = batch_size_schedule(c)
    profiler = ProfilerWindow(c)
    collector = ManualGC(c)
    losses = {}
    phase = "start-up"
    try:
        while iteration < c.train_iters:
            if plan and stage < len(plan.boundaries) and iteration >= plan.boundaries[stage]:
                phase = f"the depth growth after iteration {iteration}"
                grow()
            phase = f"the forward and backward pass of iteration {iteration + 1}"
            profiler.before(iteration + 1)
            batches.update(consumed, consistency_check=True)
            loss = train_step(model, optimizer, train_iters, c, batches.get())
            iteration += 1
            logger.moe_losses(iteration, batches.get())
            if c.check_for_nan_in_loss_and_grad:
                check_step_is_finite(loss, model, iteration, last_checkpoint)
            depth_due = c.depth_log_interval and iteration % c.depth_log_interval == 0
            grad_norms = probes.layer_grad_norms(model, optimizer, model_c.num_layers) if depth_due else None
            phase = f"the optimizer step of iteration {iteration}"
            update_ok, grad_norm, _ = optimizer.step()
            if c.clip_grad == 0 and update_ok:  # megatron computes the norm only to clip
                grad_norm = optimizer.get_grad_norm()
            if not (math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm))):
                logger.nan += 1  # trained on with --no-check-for-nan-in-loss-and-grad
            if update_ok:
                scheduler.step(increment=1)
            consumed += batches.get_current_global_batch_size()
            losses[iteration] = loss
            logger.training_step(iteration, consumed, batches.get_current_global_batch_size(), loss,
                                 scheduler.get_lr(optimizer.param_groups[0]),
                                 grad_norm, optimizer.get_loss_scale().item(), skipped=not update_ok)
            if depth_due:
                phase = f"the depth diagnostics of iteration {iteration}"
                stats = probes.hidden_state_stats(model, depth_batch, forward_step, model_c.num_layers,
                                                  c.seq_length, c.sequence_parallel)
                stats["grad-norm"] = grad_norms
                logger.depth(iteration, stats)
            if valid_iters and iteration % c.eval_interval == 0:
                phase = f"the validation at iteration {iteration}"
                with logger.untimed():
                    collector.around_validation()
                    logger.validation(iteration, evaluate(model, valid_iters, c))
                    collector.around_validation()
            if c.save and c.save_interval and iteration % c.save_interval == 0:
                phase = f"the checkpoint save at iteration {iteration}"
                save(iteration)
            phase = f"the end of iteration {iteration}"
            finish_async_saves(blocking=False)
            profiler.after(iteration)
            collector.after(iteration)
            if c.exit_interval and iteration >= c.exit_interval:
                break
        trained = iteration > start_iteration
        if c.save and trained and not (c.save_interval and iteration % c.save_interval == 0):
            phase = f"the checkpoint save at iteration {iteration}"
            save(iteration)
        phase = "the last background checkpoint save"
        finish_async_saves(blocking=True)
    except RuntimeError as e:
        if isinstance(e, NonFiniteError):
            finish_async_saves(blocking=True)  # a save of an earlier, finite state completes
            raise
        message = safety.describe_collective_failure(e, c, phase, last_checkpoint)
        if message is None:
            raise
        raise safety.CollectiveError(message) from None
    finally:
        profiler.stop()
        collector.close()
        logger.close()
    return {"losses": losses, "iteration": iteration}
