"""Console lines and TensorBoard scalars in Megatron-LM's style and names."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from lns_megatron.config import PretrainConfig, moe_layer_pattern


def flops_per_iteration(c: PretrainConfig, padded_vocab_size: int) -> float:
    """Megatron-LM's model FLOPs per iteration (forward + backward) for GQA, SwiGLU and MoE (each token through
    its top-k experts and the shared expert; the router's GEMM is not counted, as in Megatron-LM)."""
    kv_channels = c.hidden_size // c.num_attention_heads
    query_ratio = kv_channels * c.num_attention_heads / c.hidden_size
    gated = 1.5 if c.swiglu else 1.0
    expansion = 3 * 2 * 2  # fwd + 2x bwd; 2 FLOPs per MAC; two GEMMs per block
    moe_layers = sum(moe_layer_pattern(c.moe_layer_freq, c.num_layers)) if c.num_experts else 0
    mlp_width = (c.ffn_hidden_size * (c.num_layers - moe_layers)
                 + ((c.moe_ffn_hidden_size or c.ffn_hidden_size) * c.moe_router_topk
                    + (c.moe_shared_expert_intermediate_size or 0)) * moe_layers) / c.num_layers
    return (
        expansion * c.global_batch_size * c.seq_length * c.num_layers * c.hidden_size**2
        * (
            (1 + c.num_query_groups / c.num_attention_heads + c.seq_length / c.hidden_size / 2) * query_ratio
            + mlp_width / c.hidden_size * gated
            + padded_vocab_size / (2 * c.num_layers * c.hidden_size)
        )
    )


# megatron-core's router logs each load-balancing type under its own name.
MOE_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                  "global_aux_loss": "global_load_balancing_loss"}


def moe_loss_names(c: PretrainConfig) -> List[str]:
    """The MoE auxiliary losses this run logs (Megatron-LM's track names), none for a dense model."""
    if c.num_experts is None:
        return []
    balancing = MOE_LOSS_NAMES.get(c.moe_router_load_balancing_type)
    names = [balancing] if balancing and c.moe_aux_loss_coeff > 0 else []  # coefficient 0: megatron computes none
    return names + (["z_loss"] if c.moe_z_loss_coeff is not None else [])


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600:d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


class MetricsLogger:
    """Only the last rank writes TensorBoard and prints the iteration line, as in Megatron-LM."""

    def __init__(self, c: PretrainConfig, padded_vocab_size: int):
        self.set_model(c, padded_vocab_size)
        self.is_writer = dist.get_rank() == dist.get_world_size() - 1
        self.writer = None
        if self.is_writer and c.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=c.tensorboard_dir, max_queue=100)
        self.interval_start = time.perf_counter()
        self.interval_iters = 0
        self.interval_samples = 0
        self.skipped = 0
        self.nan = 0
        self.moe_totals: Dict[str, torch.Tensor] = {}

    def set_model(self, c: PretrainConfig, padded_vocab_size: int) -> None:
        """The model's flags: at the start, and when depth growth makes it deeper (FLOPs and MoE layers follow)."""
        self.c = c
        self.flops_per_sample = flops_per_iteration(c, padded_vocab_size) / c.global_batch_size
        self.moe_names = moe_loss_names(c)
        self.moe_pattern = moe_layer_pattern(c.moe_layer_freq, c.num_layers) if self.moe_names else None

    def moe_losses(self, iteration: int, num_microbatches: int) -> None:
        """Read and reset megatron-core's MoE loss tracker, on every rank (it reduces over the pipeline and data
        parallel ranks), as Megatron-LM's training_log does: TensorBoard gets each iteration's mean over the MoE
        layers, the console line its mean over the log interval."""
        if not self.moe_names:
            return
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        track_moe_metrics(loss_scale=1.0 / num_microbatches, iteration=iteration, writer=self.writer,
                          total_loss_dict=self.moe_totals, force_initialize=True, track_names=self.moe_names,
                          num_layers=self.c.num_layers, moe_layer_freq=self.moe_pattern)

    @contextlib.contextmanager
    def untimed(self):
        """Validation and checkpoint saves do not count as iteration time (as in Megatron-LM)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.interval_start += time.perf_counter() - start

    def scalar(self, name: str, value: float, iteration: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, iteration)

    def training_step(self, iteration: int, consumed_samples: int, batch_size: int, loss: float, lr: float,
                      grad_norm: Optional[float], loss_scale: float, skipped: bool) -> None:
        """``batch_size``: this iteration's global batch (it grows under --rampup-batch-size)."""
        self.interval_iters += 1
        self.interval_samples += batch_size
        self.skipped += int(skipped)
        if iteration % self.c.log_interval != 0:
            return
        seconds = time.perf_counter() - self.interval_start
        elapsed = seconds / self.interval_iters
        tflops = self.flops_per_sample * self.interval_samples / (seconds * 1e12 * dist.get_world_size())
        tokens_per_sec = self.interval_samples * self.c.seq_length / seconds
        values: Dict[str, float] = {
            "lm loss": loss, "learning-rate": lr, "batch-size": batch_size, "loss-scale": loss_scale,
            "iteration-time": elapsed, "throughput": tflops, "tokens-per-sec": tokens_per_sec,
        }
        if grad_norm is not None:
            values["grad-norm"] = grad_norm
        memory = ""
        if torch.cuda.is_available():
            values.update({"mem-allocated-bytes": torch.cuda.memory_allocated(),
                           "mem-reserved-bytes": torch.cuda.memory_reserved(),
                           "mem-max-allocated-bytes": torch.cuda.max_memory_allocated()})
            memory = (f" mem allocated (GiB): {values['mem-allocated-bytes'] / 2**30:.2f} | mem reserved (GiB): "
                      f"{values['mem-reserved-bytes'] / 2**30:.2f} | mem max allocated (GiB): "
                      f"{values['mem-max-allocated-bytes'] / 2**30:.2f} |")
        for name, value in values.items():
            self.scalar(name, value, iteration)
        moe = "".join(f" {name}: {float(total) / self.interval_iters:.6E} |" for name, total in self.moe_totals.items())
        self.moe_totals = {}
        if self.is_writer:
            grad = f"{grad_norm:.3f}" if grad_norm is not None else "n/a"
            print(
                f" [{time.strftime('%Y-%m-%d %H:%M:%S')}] iteration {iteration:8d}/{self.c.train_iters:8d} |"
                f" consumed samples: {consumed_samples:12d} | elapsed time per iteration (ms): {elapsed * 1000:.1f} |"
                f" throughput per GPU (TFLOP/s/GPU): {tflops:.3g} | tokens per second: {tokens_per_sec:.0f} |"
                f" learning rate: {lr:.6E} | global batch size: {batch_size:5d} |"
                f" lm loss: {loss:.6E} |{moe} loss scale: {loss_scale:.1f} | grad norm: {grad} |"
                f" number of skipped iterations: {self.skipped:3d} | number of nan iterations: {self.nan:3d} |"
                f" ETA: {_duration(elapsed * (self.c.train_iters - iteration))} |{memory}",
                flush=True,
            )
        self.interval_start = time.perf_counter()
        self.interval_iters = 0
        self.interval_samples = 0
        self.skipped = 0
        self.nan = 0

    def validation(self, iteration: int, loss: float) -> None:
        ppl = math.exp(min(20.0, loss))
        self.scalar("lm loss validation", loss, iteration)
        self.scalar("lm loss validation ppl", ppl, iteration)
        if self.is_writer:
            line = f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} "
            print("-" * len(line) + "\n" + line + "\n" + "-" * len(line), flush=True)

    def depth(self, iteration: int, stats: Dict[str, list]) -> None:
        for metric, per_layer in stats.items():
            for layer, value in enumerate(per_layer, start=1):
                self.scalar(f"depth/{metric}/layer_{layer:03d}", value, iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
