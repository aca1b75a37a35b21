"""Diagnosing a slow run: a torch profiler window (--profile) and manual garbage collection (--manual-gc)."""

from __future__ import annotations

import gc
from typing import Optional

import torch
import torch.distributed as dist

from lns_megatron.config import PretrainConfig


class ProfilerWindow:
    """Megatron-LM's --profile with the torch profiler: iterations ``--profile-step-start`` up to, not including,
    ``--profile-step-end`` (absolute iteration numbers: a resumed run profiles the iterations it names), after one
    warm-up iteration, on the ``--profile-ranks``. ``tensorboard_trace_handler`` writes the trace into
    ``--tensorboard-dir``; each profiled step is also labelled with its iteration."""

    def __init__(self, c: PretrainConfig):
        self.c = c
        self.enabled = c.profile and dist.get_rank() in c.profile_ranks
        self.profiler: Optional[torch.profiler.profile] = None
        self.label = None

    def before(self, iteration: int) -> None:
        """Call before training iteration ``iteration`` (1-based)."""
        start, end = self.c.profile_step_start, self.c.profile_step_end
        if not self.enabled or not start - 1 <= iteration < end:
            return
        if self.profiler is None:
            warmup = 1 if iteration < start else 0
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities, record_shapes=True, profile_memory=True,
                schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=end - iteration - warmup, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.c.tensorboard_dir,
                                                                        worker_name=f"rank{dist.get_rank()}"))
            self.first = iteration + warmup
            self.profiler.start()
        self.label = torch.profiler.record_function(f"iteration {iteration}")
        self.label.__enter__()

    def after(self, iteration: int) -> None:
        """Call after training iteration ``iteration``: the trace is written after the last profiled one."""
        if self.profiler is None:
            return
        self.label.__exit__(None, None, None)
        self.label = None
        self.profiler.step()
        if iteration + 1 >= self.c.profile_step_end:
            self.stop()
            print(f"lns-pretrain: rank {dist.get_rank()}: profiler trace of iterations {self.first}.."
                  f"{self.c.profile_step_end - 1} written to {self.c.tensorboard_dir}", flush=True)

    def stop(self) -> None:
        if self.profiler is not None:
            if self.label is not None:
                self.label.__exit__(None, None, None)
            self.profiler.stop()
            self.profiler = None
            self.enabled = False


class ManualGC:
    """Megatron-LM's --manual-gc: Python's automatic collector off for the run (a collection pauses one rank at
    a random point and every other rank waits for it at the next collective), a full collection every
    ``--manual-gc-interval`` iterations and around validation instead, on every rank at the same point."""

    def __init__(self, c: PretrainConfig):
        self.c = c
        self.was_enabled = gc.isenabled()
        if c.manual_gc:
            gc.disable()
            gc.collect()

    def after(self, iteration: int) -> None:
        if self.c.manual_gc and self.c.manual_gc_interval and iteration % self.c.manual_gc_interval == 0:
            gc.collect()

    def around_validation(self) -> None:
        if self.c.manual_gc and self.c.manual_gc_eval:
            gc.collect()

    def close(self) -> None:
        if self.c.manual_gc and self.was_enabled:
            gc.enable()


class SavedActivationMeter:
    """The peak bytes of tensors held for the backward pass (activations), counted by autograd's saved-tensor
    hooks: a device-independent memory counter (the CPU has no ``max_memory_allocated``). Each storage counts
    once while any saved tensor uses it; the parameters of ``modules`` are not activations and do not count."""

    def __init__(self, modules):
        self.excluded = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
        self.users = {}
        self.live = 0
        self.peak = 0

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or tensor.device.type == "meta":
            return tensor
        count, size = self.users.get(key, (0, storage.nbytes()))
        if count == 0:
            self.live += size
            self.peak = max(self.peak, self.live)
        self.users[key] = (count + 1, size)
        return _Saved(tensor, self, key)

    def _release(self, key):
        count, size = self.users[key]
        if count == 1:
            del self.users[key]
            self.live -= size
        else:
            self.users[key] = (count - 1, size)

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(
            self._pack, lambda saved: saved.tensor if isinstance(saved, _Saved) else saved)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


class _Saved:
    """A saved tensor that tells its meter when autograd lets go of it."""

    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor, meter, key):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)
