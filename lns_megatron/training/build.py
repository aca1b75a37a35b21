"""The model chunks, optimizer and learning-rate scheduler of a run, from megatron-core's parts: GPTModel or
HybridModel (LNS spec) -> Float16Module (bf16) -> DDP -> distributed optimizer -> OptimizerParamScheduler.
Used by the training loop and by depth growth, which builds a deeper model mid-run."""

from __future__ import annotations

from typing import List

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from lns_megatron.config import PretrainConfig
from lns_megatron.models.build import build_model_chunk
from lns_megatron.models.gpt import transformer_config
from lns_megatron.training import safety


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
