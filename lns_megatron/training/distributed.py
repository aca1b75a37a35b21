"""Process-group and model-parallel setup: NCCL on GPUs, gloo with the CPU mode elsewhere."""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from lns_megatron import cpu
from lns_megatron.config import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def initialize(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    seed: int = 1234,
    timeout_minutes: float = 10.0,
    expert_model_parallel_size: int = 1,
    expert_tensor_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
) -> None:
    """Start torch.distributed (from torchrun's environment, or as a single process) and
    megatron-core's model parallelism, then seed every RNG like Megatron-LM does."""
    cpu_mode = cpu.enable()
    if not dist.is_initialized():
        backend = "gloo" if cpu_mode else "nccl"
        timeout = timedelta(minutes=timeout_minutes)
        if not cpu_mode:
            per_node, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
            if per_node > gpus:  # NCCL cannot put two ranks on one GPU; every rank of the node sees it
                raise ConfigError(f"{per_node} processes on this node need a GPU each, and this node has {gpus} "
                                  f"GPU(s): launch at most {gpus} per node (torchrun --nproc_per_node {gpus})")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # plain `python`: a world of one, leaving the environment to child processes
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1, timeout=timeout)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
        context_parallel_size=context_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    set_seed(seed)


def set_seed(seed: int) -> None:
    """Megatron-LM's seeding: a different stream per pipeline stage, tracked TP streams."""
    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
