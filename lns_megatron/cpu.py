"""CPU execution mode: run real megatron-core code on a machine without CUDA.

megatron-core 0.16 assumes CUDA in a handful of places (measured on torch 2.13 CPU):

- ``torch.cuda.current_device()`` in RoPE, the global memory buffer and p2p communication;
- the tensor-parallel RNG tracker saves and restores *CUDA* RNG states;
- ``device="cuda"`` is hard-coded in the schedules, ``FP32Optimizer`` and gradient clipping;
- gradient clipping asserts ``grad.type() == "torch.cuda.FloatTensor"``;
- p2p communication calls ``torch.cuda.synchronize()``;
- (0.19) the gradient buffers wait on ``torch.cuda.current_stream()`` before reducing;
- the MoE all-to-all token dispatcher copies its split sizes to the host on a ``torch.cuda.Stream`` of its own,
  as numpy arrays; on the CPU they stay tensors, which ``all_to_all_single`` does not take.

:func:`enable` points each of these at the CPU so that ``GPTModel``, megatron DDP, the
distributed optimizer and the pipeline schedules run with the gloo backend. It is a test
and smoke-run facility (unit tests, CI, a laptop), not a fast path: every torch call goes
through a Python ``TorchFunctionMode``. It does nothing when CUDA is available, and it is
never applied at import time.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.ByteTensor": "torch.cuda.ByteTensor",
    "torch.BoolTensor": "torch.cuda.BoolTensor",
}

_mode: "_CudaToCpu | None" = None


class _CpuStream:
    """``torch.cuda.current_stream()`` and ``torch.cuda.Stream()`` on the CPU: work is synchronous, so there is
    nothing to wait for."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, event=None) -> "_CpuStream":
        return self  # an event that is already complete: synchronize() and wait() return at once

    def wait(self, stream=None) -> None:
        pass


_CPU_STREAM = _CpuStream()


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # megatron passes torch.cuda.current_device(); an int device index means a GPU.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA placements to the CPU; reports CPU tensors' type() as CUDA's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda(device=None, non_blocking=False)
            return args[0].to("cpu")
        if name == "to":
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        if name == "type" and len(args) == 1 and not kwargs:
            result = func(*args)
            return _CUDA_TYPE_NAMES.get(result, result)
        return func(*args, **kwargs)


def is_enabled() -> bool:
    return _mode is not None


def enable() -> bool:
    """Switch this process to the CPU mode. Returns True if it was switched on.

    Call it before megatron-core initializes model parallelism; use the gloo backend for
    ``torch.distributed``. A no-op (returning False) when CUDA is available.
    """
    global _mode
    if torch.cuda.is_available():
        return False
    if _mode is not None:
        return True

    from megatron.core.tensor_parallel import random as tp_random

    def cpu_rng_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_cpu_rng_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    torch.cuda.Stream = _CpuStream  # a class still, for annotations such as `torch.cuda.Stream | None`
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.get_rng_state = cpu_rng_state
    torch.cuda.set_rng_state = set_cpu_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    tp_random._get_cuda_rng_state = cpu_rng_state
    tp_random._set_cuda_rng_state = set_cpu_rng_state

    all_to_all_single = torch.distributed.all_to_all_single

    def all_to_all_single_with_list_splits(output, input, output_split_sizes=None, input_split_sizes=None, *args,
                                           **kwargs):
        splits = [s.tolist() if torch.is_tensor(s) else s for s in (output_split_sizes, input_split_sizes)]
        return all_to_all_single(output, input, *splits, *args, **kwargs)

    torch.distributed.all_to_all_single = all_to_all_single_with_list_splits

    _mode = _CudaToCpu()
    _mode.__enter__()  # stays pushed for the life of the process
    return True
