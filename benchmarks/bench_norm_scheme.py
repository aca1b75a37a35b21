"""Step time and memory of LNS against Pre-LN on the same config, in one process.

Both models are built side by side with the same flags; timed blocks alternate
(pre, lns, pre, lns, ...) so that machine noise hits both alike. Prints the median
step-time ratio lns/pre, peak memory of each (CUDA), and model FLOP/s.

    python benchmarks/bench_norm_scheme.py --preset tiny --micro-batch-size 8 --seq-length 64
    python benchmarks/bench_norm_scheme.py --preset llama-1b --bf16 --micro-batch-size 4 --seq-length 2048
    torchrun --nproc_per_node 8 benchmarks/bench_norm_scheme.py --preset llama-1b --bf16 \
        --transformer-impl transformer_engine --fp8-format hybrid ...

Any lns-pretrain flag works; --mock-data is implied. Extra flags: --rounds, --steps-per-round.
"""

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from lns_megatron.data import datasets as data
from lns_megatron.training import distributed, probes as diagnostics
from lns_megatron.config import parse_args, validate
from lns_megatron.schemes.lns import HAVE_TE
from lns_megatron.training.metrics import flops_per_iteration
from lns_megatron.training.train import build_model, build_optimizer, forward_step, train_step

# H100 SXM dense BF16 peak (FP8 doubles it); used for MFU.
PEAK_TFLOPS = {"bf16": 989.0, "fp8": 1979.0}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=5)
    ap.add_argument("--warmup-steps", type=int, default=3)
    own, rest = ap.parse_known_args()
    if "--mock-data" not in rest and "--data-path" not in rest:
        rest += ["--mock-data"] + ([] if "--vocab-size" in rest else ["--vocab-size", "32000"])
    steps = own.warmup_steps + own.rounds * own.steps_per_round
    rest += ["--num-workers", "0", "--train-iters", str(steps + 1), "--depth-log-interval", "0"]

    runs = {}
    for scheme in ("pre", "lns"):
        c = parse_args(rest + ["--norm-scheme", scheme])
        validate(c, torch.cuda.is_available(), HAVE_TE)
        if not runs:
            distributed.initialize(c.tensor_model_parallel_size, c.pipeline_model_parallel_size,
                                   c.virtual_pipeline_model_parallel_size, seed=c.seed)
            tokenizer = data.build_tokenizer_from_config(c)
            vocab = data.padded_vocab_size(tokenizer.vocab_size, c.make_vocab_size_divisible_by,
                                           c.tensor_model_parallel_size)
            train_ds, _, _ = data.build_datasets(c, tokenizer)
        model = build_model(c, vocab)
        optimizer, _ = build_optimizer(c, model)
        model[0].config.grad_scale_func = optimizer.scale_loss
        from megatron.core.distributed import finalize_model_grads
        model[0].config.finalize_model_grads_func = finalize_model_grads
        runs[scheme] = dict(c=c, model=model, optimizer=optimizer,
                            iters=data.data_iterators(train_ds, c, 0, len(model)), times=[], peak=0)

    def block(run, steps):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            train_step(run["model"], run["optimizer"], run["iters"], run["c"])
            run["optimizer"].step()
        sync()
        if torch.cuda.is_available():
            run["peak"] = max(run["peak"], torch.cuda.max_memory_allocated())
        return (time.perf_counter() - start) / steps

    for run in runs.values():
        block(run, own.warmup_steps)
    for _ in range(own.rounds):
        for run in runs.values():
            run["times"].append(block(run, own.steps_per_round))

    # The depth-health diagnostics the driver runs every --depth-log-interval iterations.
    lns = runs["lns"]
    batch = next(data.data_iterators(train_ds, lns["c"], 0, 1)[0])
    diag_times = []
    for _ in range(3):
        sync()
        start = time.perf_counter()
        diagnostics.layer_grad_norms(lns["model"], lns["optimizer"], lns["c"].num_layers)
        diagnostics.hidden_state_stats(lns["model"], batch, forward_step, lns["c"].num_layers, lns["c"].seq_length,
                                       lns["c"].sequence_parallel)
        sync()
        diag_times.append(time.perf_counter() - start)

    c = runs["lns"]["c"]
    flops = flops_per_iteration(c, vocab)
    world = dist.get_world_size()
    if dist.get_rank() == world - 1:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        print(f"device: {device} x {world} | preset {c.preset} | {c.num_layers}x{c.hidden_size} | impl {c.transformer_impl}"
              f" | bf16 {c.bf16} | fp8 {c.fp8_format} | mbs {c.micro_batch_size} gbs {c.global_batch_size} seq {c.seq_length}")
        for scheme, run in runs.items():
            t = statistics.median(run["times"])
            tflops = flops / (t * 1e12 * world)
            peak = PEAK_TFLOPS["fp8" if c.fp8_format else "bf16"]
            mem = f"{run['peak'] / 2**30:.2f} GiB" if torch.cuda.is_available() else "n/a (CPU)"
            mfu = f" | MFU {100 * tflops / peak:.1f}%" if torch.cuda.is_available() else ""
            print(f"{scheme:>4}: step {t * 1000:8.2f} ms (median of {len(run['times'])} blocks)"
                  f" | {tflops:8.2f} TFLOP/s/GPU{mfu} | peak memory {mem}")
        ratios = [l / p for l, p in zip(runs["lns"]["times"], runs["pre"]["times"])]
        print(f"step-time ratio lns/pre: median {statistics.median(ratios):.4f} "
              f"(per round: {' '.join(f'{r:.3f}' for r in ratios)})")
        diag, step = statistics.median(diag_times), statistics.median(lns["times"])
        print(f"depth diagnostics: {diag * 1000:.1f} ms per call = {100 * diag / (100 * step):.3f}% of training "
              f"time at the default --depth-log-interval 100")
        if torch.cuda.is_available():
            print(f"peak-memory ratio lns/pre: {runs['lns']['peak'] / runs['pre']['peak']:.4f}")
    distributed.destroy()


if __name__ == "__main__":
    main()
