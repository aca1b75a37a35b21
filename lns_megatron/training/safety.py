"""Run guards: what keeps a long cluster run from being lost or silently corrupted.

- :func:`compare_with_checkpoint` -- a resume trains the model it loads: architecture and tokenizer
  must match the checkpoint (Megatron-LM's ``check_checkpoint_args``, plus the tokenizer files), the
  learning-rate schedule must match unless ``--override-opt_param-scheduler`` or
  ``--use-checkpoint-opt_param-scheduler`` says which wins, and the optimizer state must be loadable
  into this run's optimizer and layout;
- :class:`RunLock` -- one run per ``--save`` directory, with stale locks of dead runs taken over;
- :func:`check_writable` -- ``--save`` and ``--tensorboard-dir`` are found unwritable at start, not at
  the first save hours later;
- :func:`claim_save_directory` -- all of that on rank 0 at start, the verdict shared with every rank;
- :func:`all_finite`, :func:`check_finite_state` -- NaN/Inf in the loss, the gradients or the state to be
  saved stop the run;
- :func:`describe_collective_failure` -- a frozen or dead rank ends the job with what, where and since when.

Every failure is one line that names the flag or file and the fix.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from typing import Iterable, List, Optional

import torch
import torch.distributed as dist

from lns_megatron.config import ConfigError, PretrainConfig, flag_name
from lns_megatron.data import metadata

# What defines the function the checkpoint computes: a resume with other values is refused.
ARCHITECTURE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "max_position_embeddings", "normalization", "norm_epsilon", "apply_layernorm_1p", "qk_layernorm",
                "swiglu", "disable_bias_linear", "position_embedding_type", "rotary_base",
                "untie_embeddings_and_output_weights", "norm_scheme", "mix_ln_alpha", "hybrid_layer_pattern",
                "num_experts")
MOE_ARCHITECTURE = ("moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq", "moe_shared_expert_intermediate_size",
                    "moe_router_score_function", "moe_router_pre_softmax")
TOKENIZER = ("tokenizer_type",)  # and the tokenizer's identity: its id -> token table, vocabulary and EOD
# What a resume may change on purpose (another data blend for annealing, a longer context): said, not refused.
DATA = ("data_path", "split", "mock_data", "seq_length", "global_batch_size")
# MoE training losses a resume may retune: said, not refused.
MOE_LOSSES = ("moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff")
# Flags --use-checkpoint-args takes from the checkpoint.
CHECKPOINT_ARGS = ARCHITECTURE + MOE_ARCHITECTURE + ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file",
                                                     "vocab_size", "eod_id", "make_vocab_size_divisible_by")
DERIVED_LABELS = {
    "padded_vocab_size": "padded vocabulary rows",
}
# The scheduler's own state names -> the flags that set them.
SCHEDULE_FLAGS = {"max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
                  "lr_decay_steps": "--lr-decay-iters (default: --train-iters)", "lr_decay_style": "--lr-decay-style",
                  "start_wd": "--weight-decay", "end_wd": "--weight-decay", "wd_incr_steps": "--lr-decay-iters"}


class NonFiniteError(RuntimeError):
    """A NaN or Inf where training needs finite numbers; nothing was applied or saved from it."""


def _label(name: str) -> str:
    return DERIVED_LABELS.get(name) or flag_name(name)


def differences(saved: dict, c: PretrainConfig, names: Iterable[str]) -> List[str]:
    """``--flag: checkpoint X, now Y`` for each name whose value differs (names the checkpoint lacks,
    from older versions, are not compared)."""
    out = []
    for name in names:
        if name in saved and saved[name] != getattr(c, name):
            out.append(f"{_label(name)}: checkpoint {saved[name]}, now {getattr(c, name)}")
    return out


def _tokenizer_differences(saved: dict, c: PretrainConfig) -> List[str]:
    """The tokenizer by what its ids mean (data.metadata's identity), whatever path it is read from."""
    before, now = saved.get("tokenizer_identity"), c.tokenizer_identity
    if not before or not now:
        return []
    mismatch = metadata.tokenizer_mismatch(before, now)
    out = [f"tokenizer (--tokenizer-model, --vocab-size): checkpoint {metadata.describe_tokenizer(before)}, now "
           f"{metadata.describe_tokenizer(now)} ({mismatch})"] if mismatch else []
    if before.get("eod") != now.get("eod"):
        out.append(f"--eod-id: checkpoint {before.get('eod')}, now {now.get('eod')}")
    return out


def apply_checkpoint_args(saved: dict, c: PretrainConfig) -> List[str]:
    """--use-checkpoint-args: the model and tokenizer flags become the checkpoint's; returns what changed."""
    taken = []
    for name in CHECKPOINT_ARGS:
        if name in saved and saved[name] != getattr(c, name):
            taken.append(f"{flag_name(name)} {saved[name]}")
            setattr(c, name, saved[name])
    return taken


def schedule_settings(c: PretrainConfig) -> dict:
    """The OptimizerParamScheduler settings of these flags (what the scheduler checkpoints, and WSD's two, which
    it does not: they are compared from the checkpoint's pretrain_config.json)."""
    settings = dict(max_lr=c.lr, min_lr=c.min_lr, lr_warmup_steps=c.lr_warmup_iters, lr_decay_steps=c.lr_decay_iters,
                    lr_decay_style=c.lr_decay_style, start_wd=c.weight_decay, end_wd=c.weight_decay,
                    wd_incr_steps=c.lr_decay_iters, wd_incr_style="constant")
    if c.lr_wsd_decay_iters is not None:  # also for a checkpoint's WSD under --use-checkpoint-opt_param-scheduler
        settings.update(wsd_decay_steps=c.lr_wsd_decay_iters, lr_wsd_decay_style=c.lr_wsd_decay_style)
    return settings


# WSD's settings, which the scheduler's state leaves out: from the saved flags.
WSD_FLAGS = ("lr_wsd_decay_iters", "lr_wsd_decay_style")


def compare_with_checkpoint(directory: str, saved: dict, saved_schedule: Optional[dict], c: PretrainConfig,
                            load_optimizer: bool) -> List[str]:
    """Refuse a resume that would train another model; returns the notices of deliberate changes."""
    where = f"--load {directory}"
    moe = saved.get("num_experts") is not None or c.num_experts is not None  # a dense model ignores the MoE flags
    names = ARCHITECTURE + TOKENIZER + (MOE_ARCHITECTURE if moe else ())
    mismatched = differences(saved, c, names) + _tokenizer_differences(saved, c)
    if mismatched:
        raise ConfigError(f"{where} holds another model or tokenizer: {'; '.join(mismatched)}. Pass the "
                          "checkpoint's values, or --use-checkpoint-args to take them from it")
    if "padded_vocab_size" in saved and saved["padded_vocab_size"] != c.padded_vocab_size:
        raise ConfigError(
            f"{where}: the vocabulary is padded to {saved['padded_vocab_size']} rows in the checkpoint and to "
            f"{c.padded_vocab_size} now (--make-vocab-size-divisible-by {c.make_vocab_size_divisible_by} x "
            f"--tensor-model-parallel-size {c.tensor_model_parallel_size}); choose --make-vocab-size-divisible-by "
            "so that the padding matches")
    if saved_schedule is not None and not c.use_checkpoint_opt_param_scheduler and not c.override_opt_param_scheduler:
        new = schedule_settings(c)
        changed = sorted({SCHEDULE_FLAGS[k] + f": checkpoint {saved_schedule[k]}, now {new[k]}"
                          for k in SCHEDULE_FLAGS if k in saved_schedule and saved_schedule[k] != new[k]})
        if c.lr_decay_style == "WSD" and saved_schedule.get("lr_decay_style") == "WSD":
            changed += differences(saved, c, WSD_FLAGS)
        if changed:
            raise ConfigError(
                f"{where}: the learning-rate schedule differs from the checkpoint's: {'; '.join(changed)}. Pass "
                "--override-opt_param-scheduler to follow the new flags from this iteration on, or "
                "--use-checkpoint-opt_param-scheduler to keep the checkpoint's schedule")
    if load_optimizer:
        _check_optimizer_state(where, saved, c)
    return differences(saved, c, DATA + (MOE_LOSSES if moe else ()))


def _check_optimizer_state(where: str, saved: dict, c: PretrainConfig) -> None:
    """megatron-core maps Adam state between layouts only within one kind of optimizer."""
    fix = "pass --no-load-optim to load the weights, iteration and schedule with fresh Adam moments"
    for name, kind in (("use_distributed_optimizer", "the distributed optimizer"), ("bf16", "bf16 main weights")):
        if name in saved and saved[name] != getattr(c, name):
            raise ConfigError(f"{where}: {flag_name(name)}: checkpoint {saved[name]}, now {getattr(c, name)}: "
                              f"megatron-core cannot map Adam state saved with and without {kind}; {fix}, or "
                              "match the checkpoint")
    if not c.use_distributed_optimizer or saved.get("dist_ckpt_optim_fully_reshardable", True):
        return
    layout = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
              "expert_model_parallel_size", "expert_tensor_parallel_size")
    changed = differences(saved, c, layout)
    if changed:
        raise ConfigError(f"{where}: its distributed-optimizer state is saved per data-parallel shard, which loads "
                          f"at another data-parallel size but not at another model-parallel layout ({'; '.join(changed)})"
                          f"; {fix}, or resume once at the checkpoint's layout and save with "
                          "--dist-ckpt-optim-fully-reshardable")


# ------------------------------------------------------------------------------------------ files


def check_writable(flag: str, directory: str) -> None:
    """Create ``directory`` and write a file into it, or fail with one line."""
    probe = os.path.join(directory, f".write-test-{socket.gethostname()}-{os.getpid()}")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {directory} is not writable ({e.strerror or e}); choose a directory this job "
                          "can write to") from None


def _process_start(pid: int) -> Optional[str]:
    """The start time of ``pid`` (clock ticks since boot), or None if it is not running."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class RunLock:
    """An exclusive lock on a ``--save`` directory, held by rank 0 for the life of the run.

    The lock file names the host, the process and its start time, and a thread touches it every
    ``HEARTBEAT_S``. A lock is stale, and is taken over with a message, when its process is gone
    (same host) or its heartbeat is older than ``STALE_AFTER_S`` (another host, whose processes
    cannot be seen from here).
    """

    FILE = ".lns-pretrain.lock"
    HEARTBEAT_S = 30.0
    STALE_AFTER_S = 300.0

    def __init__(self, directory: str):
        self.path = os.path.join(directory, self.FILE)
        self.me = dict(host=socket.gethostname(), pid=os.getpid(), start=_process_start(os.getpid()),
                       since=time.strftime("%Y-%m-%d %H:%M:%S"))
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.notice: Optional[str] = None  # set when a stale lock was taken over

    def _holder(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                holder = json.load(f)
            holder["age"] = time.time() - os.path.getmtime(self.path)
            return holder
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"host": "?", "pid": -1, "start": None, "age": 0.0}  # torn: treat as live until it ages

    def _is_live(self, holder: dict) -> bool:
        if holder["host"] == self.me["host"] and holder.get("pid", -1) > 0:
            return _process_start(holder["pid"]) == holder.get("start")
        return holder["age"] < self.STALE_AFTER_S

    def acquire(self) -> "RunLock":
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if self._is_live(holder):
                    raise ConfigError(
                        f"--save {os.path.dirname(self.path)} is in use by another run (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, since {holder.get('since', '?')}, seen {holder['age']:.0f} s ago); "
                        f"stop it or choose another --save (a dead run's lock, {self.path}, is taken over "
                        "automatically)")
                os.remove(self.path)
                self.notice = (f"took over the stale lock of pid {holder.get('pid')} on {holder.get('host')} "
                               f"(gone, last seen {holder['age']:.0f} s ago) in {os.path.dirname(self.path)}")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self._thread = threading.Thread(target=self._heartbeat, name="lns-save-lock", daemon=True)
            self._thread.start()
            return self
        raise ConfigError(f"--save {os.path.dirname(self.path)}: could not take the lock {self.path}; another run "
                          "is starting there")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        holder = self._holder()
        if holder is not None and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            os.remove(self.path)


def check_save_directory(c: PretrainConfig) -> None:
    """A --save that holds another run is refused unless --load resumes that run."""
    from lns_megatron.training.checkpoint import TRACKER

    tracker = os.path.join(c.save, TRACKER)
    if not os.path.isfile(tracker):
        return
    if c.load is not None:
        save, load = os.path.realpath(c.save), os.path.realpath(c.load)
        if os.path.commonpath([save, load]) == save:  # --load is --save or one of its iter_* directories
            return
    iteration = open(tracker).read().strip()
    raise ConfigError(f"--save {c.save} already holds a run (checkpoints up to iteration {iteration}); resume it "
                      f"with --load {c.save}, or choose an empty --save so that its checkpoints are not overwritten")


def claim_save_directory(c: PretrainConfig):
    """--save writable from every rank (each writes its own shards, perhaps through another node's mount),
    --tensorboard-dir from the last rank (its writer), --save free of other runs and locked by rank 0.
    Every rank raises the first error any rank found."""
    lock, error = None, None
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if c.save:
            check_writable("--save", c.save)
        if c.tensorboard_dir and rank == world - 1:
            check_writable("--tensorboard-dir", c.tensorboard_dir)
        if c.save and rank == 0:
            check_save_directory(c)
            lock = RunLock(c.save).acquire()
            if lock.notice:
                print(f"lns-pretrain: {lock.notice}", flush=True)
    except ConfigError as e:
        error = f"rank {rank} ({socket.gethostname()}): {e}" if world > 1 else str(e)
    errors = [None] * world
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        if lock is not None:
            lock.release()
        raise ConfigError(first)
    return lock


# ------------------------------------------------------------------------------------ non-finite


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """True if every element of every tensor is finite (one fused reduction per tensor)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None and t.numel())


def grad_buffers(model: List) -> List[torch.Tensor]:
    """megatron DDP's contiguous gradient buffers of every model chunk."""
    return [buffer.grad_data for chunk in model
            for buffer in getattr(chunk, "buffers", []) + getattr(chunk, "expert_parallel_buffers", [])]


def optimizer_state_tensors(optimizer) -> List[torch.Tensor]:
    """The main parameters and the Adam moments of every (chained) megatron optimizer."""
    tensors = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None:
            continue
        tensors += [p for group in inner.param_groups for p in group["params"]]
        tensors += [v for state in inner.state.values() for v in state.values() if torch.is_tensor(v)]
    return tensors


def describe_last_checkpoint(last: Optional[str]) -> str:
    """Where to resume from, for the last words of a run that stops."""
    return f"the last good checkpoint is {last}" if last else "no checkpoint was saved before"


def check_finite_state(model: List, optimizer, iteration: int, last: Optional[str]) -> None:
    """Before a save: every weight and optimizer tensor finite on every rank, else stop without saving."""
    tensors = [p for chunk in model for p in chunk.parameters()] + optimizer_state_tensors(optimizer)
    if not finite_everywhere(all_finite(tensors), tensors[0].device):
        raise NonFiniteError(f"the model or optimizer state holds NaN/Inf at iteration {iteration}; it was not "
                             f"saved and {describe_last_checkpoint(last)}")


def finite_everywhere(ok: bool, device) -> bool:
    """All-reduce of a local verdict over every rank (False wins)."""
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


# ------------------------------------------------------------------------------------ collectives


class CollectiveError(RuntimeError):
    """A collective failed: a rank is frozen (timeout) or gone (connection lost)."""


def describe_collective_failure(error: RuntimeError, c: PretrainConfig, phase: str, last_checkpoint) -> Optional[str]:
    """One line for a collective that failed, or None if ``error`` is something else."""
    text = str(error)
    if "Timed out" in text or "timed out" in text:
        op = re.search(r"for (\w+) operation", text)
        what = (f"timed out after --distributed-timeout-minutes {c.distributed_timeout_minutes:g} waiting for the other "
                f"ranks ({op.group(1) if op else 'a collective'}): a rank is frozen or its node is gone")
    elif "Connection closed by peer" in text or "Connection reset" in text or "Broken pipe" in text:
        what = "lost its connection to another rank, which died"
    else:
        return None
    return (f"rank {dist.get_rank()} ({socket.gethostname()}) {what}, during {phase}; "
            f"{describe_last_checkpoint(last_checkpoint)}; restart the job")
