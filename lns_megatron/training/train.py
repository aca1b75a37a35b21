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
from typing import List

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.utils import get_batch_on_this_cp_rank

from lns_megatron import compat
from lns_megatron.config import ConfigError, PretrainConfig, moe_layer_pattern, unused_moe_flags, unused_scheme_flags, validate
from lns_megatron.data import datasets, metadata
from lns_megatron.models.build import build_model_chunk, check_moe_scheme, hybrid_pattern
from lns_megatron.models.gpt import transformer_config
from lns_megatron.schemes.lns import HAVE_TE
from lns_megatron.training import checkpoint, distributed, probes, safety
from lns_megatron.training.profiling import ManualGC, ProfilerWindow
from lns_megatron.training.safety import NonFiniteError
from lns_megatron.training.metrics import MetricsLogger


def build_model(c: PretrainConfig, vocab_size: int) -> List[torch.nn.Module]:
    config = transformer_config(c)
    vpp = c.virtual_pipeline_model_parallel_size
    model = []
    for vp_stage in range(vpp or 1):
        chunk = build_model_chunk(c, config, vocab_size, vp_stage if vpp else None)
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        if c.bf16:
            chunk = Float16Module(config, chunk)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=c.bf16, overlap_grad_reduce=c.overlap_grad_reduce,
            overlap_param_gather=c.overlap_param_gather, use_distributed_optimizer=c.use_distributed_optimizer,
        )
        # Only the first chunk's buckets may skip the bucketing of the embedding, as in Megatron-LM.
        model.append(DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=vp_stage > 0))
    return model


def build_optimizer(c: PretrainConfig, model):
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=c.lr, min_lr=c.min_lr, weight_decay=c.weight_decay,
            adam_beta1=c.adam_beta1, adam_beta2=c.adam_beta2, adam_eps=c.adam_eps, clip_grad=c.clip_grad,
            bf16=c.bf16, params_dtype=torch.bfloat16 if c.bf16 else torch.float32,
            use_distributed_optimizer=c.use_distributed_optimizer,
        ),
        model,
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, **safety.schedule_settings(c),
        use_checkpoint_opt_param_scheduler=c.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=c.override_opt_param_scheduler,
    )
    return optimizer, scheduler


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
    try:  # megatron-core's own checks of the combination, before any process group or memory
        transformer_config(c)
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
        schedule = None if c.finetune else checkpoint.saved_schedule(directory)
        notices = safety.compare_with_checkpoint(directory, saved, schedule, c,
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


def _train(c: PretrainConfig, tokenizer, resume_from, notices) -> dict:
    vocab = c.padded_vocab_size
    model = build_model(c, vocab)
    optimizer, scheduler = build_optimizer(c, model)
    config = model[0].config
    config.grad_scale_func = optimizer.scale_loss
    config.finalize_model_grads_func = finalize_model_grads
    if c.overlap_grad_reduce:
        config.no_sync_func = [chunk.no_sync for chunk in model] if len(model) > 1 else model[0].no_sync
    if c.overlap_param_gather:
        config.param_sync_func = [chunk.start_param_sync for chunk in model] if len(model) > 1 else model[0].start_param_sync

    iteration, consumed = 0, 0
    if resume_from is not None:
        iteration, consumed = checkpoint.load_checkpoint(
            resume_from, model, optimizer=None if c.finetune or c.no_load_optim else optimizer,
            scheduler=None if c.finetune else scheduler, load_rng=not (c.finetune or c.no_load_rng),
            fully_parallel=c.ckpt_fully_parallel_load)
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

    logger = MetricsLogger(c, vocab)
    if logger.is_writer:
        kind = f"HybridModel {c.hybrid_layer_pattern!r}" if c.hybrid_layer_pattern else "GPTModel"
        if c.num_experts:
            kind += (f", MoE in {sum(moe_layer_pattern(c.moe_layer_freq, c.num_layers))} layers: {c.num_experts} "
                     f"experts of {c.moe_ffn_hidden_size}, top-{c.moe_router_topk}, EP={c.expert_model_parallel_size} "
                     f"ETP={c.expert_tensor_parallel_size}")
        cp = f" CP={c.context_parallel_size} ({c.cp_comm_type})" if c.context_parallel_size > 1 else ""
        print(f"lns-pretrain: {c.norm_scheme} | {kind} | {c.num_layers} layers x {c.hidden_size} | TP={c.tensor_model_parallel_size} "
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
        if resume_from is not None:
            what = "weights only (--finetune)" if c.finetune else f"iteration {iteration}" + (
                ", fresh Adam state (--no-load-optim)" if c.no_load_optim else "")
            print(f"lns-pretrain: loaded {resume_from}: {what}", flush=True)
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
            directory = checkpoint.save_checkpoint(c.save, iteration, consumed, model, optimizer, scheduler, c,
                                                   async_saves=async_saves)
        if directory is not None:
            last_checkpoint = directory
        if dist.get_rank() == 0:
            print(f"lns-pretrain: saved checkpoint to {directory} at iteration {iteration} in "
                  f"{time.perf_counter() - start:.1f} s" if directory else
                  f"lns-pretrain: saving iteration {iteration} in the background ({time.perf_counter() - start:.1f} "
                  "s of training time)", flush=True)

    batches = batch_size_schedule(c)
    profiler = ProfilerWindow(c)
    collector = ManualGC(c)
    losses = {}
    phase = "start-up"
    try:
        while iteration < c.train_iters:
            phase = f"the forward and backward pass of iteration {iteration + 1}"
            profiler.before(iteration + 1)
            batches.update(consumed, consistency_check=True)
            loss = train_step(model, optimizer, train_iters, c, batches.get())
            iteration += 1
            logger.moe_losses(iteration, batches.get())
            if c.check_for_nan_in_loss_and_grad:
                check_step_is_finite(loss, model, iteration, last_checkpoint)
            depth_due = c.depth_log_interval and iteration % c.depth_log_interval == 0
            grad_norms = probes.layer_grad_norms(model, optimizer, c.num_layers) if depth_due else None
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
                stats = probes.hidden_state_stats(model, depth_batch, forward_step, c.num_layers, c.seq_length,
                                                  c.sequence_parallel)
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
