"""Step time and memory of each norm scheme against Pre-LN on the same config, in one process.

The models (``--schemes``, default ``pre,lns``; ``pre`` is always the baseline) are built side by side
with the same flags; timed blocks alternate (pre, lns, peri, pre, lns, peri, ...) so that machine noise
hits all alike. Prints each scheme's median step-time ratio against pre, peak memory (CUDA), model
FLOP/s and MFU against the GPU's dense peak (PEAK_TFLOPS; FP8 runs give both the BF16 and the FP8
figure). ``--json PATH`` also writes them as JSON.

    python benchmarks/bench_norm_scheme.py --preset tiny --micro-batch-size 8 --seq-length 64
    python benchmarks/bench_norm_scheme.py --preset llama-1b --bf16 --micro-batch-size 4 --seq-length 2048
    torchrun --nproc_per_node 8 benchmarks/bench_norm_scheme.py --preset llama-1b --bf16 \
        --transformer-impl transformer_engine --fp8-format hybrid ...

Any lns-pretrain flag works; --mock-data is implied. Extra flags: --schemes, --rounds, --steps-per-round,
--warmup-steps, --json. FP8 GEMMs need every dimension divisible by 16: for llama-1b (FFN 5461) pass
e.g. --ffn-hidden-size 5504.
"""

import argparse
import json
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from lns_megatron.data import datasets as data
from lns_megatron.training import distributed, probes as diagnostics
import common
from lns_megatron.config import parse_args
from lns_megatron.training.metrics import flops_per_iteration
from lns_megatron.training.train import forward_step, train_step

# Dense (no sparsity) peak TFLOP/s per GPU from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name() in this order (first match wins). Add yours for its MFU.
PEAK_TFLOPS = [
    ("H200 NVL", {"bf16": 835.0, "fp8": 1670.0}),
    ("H200", {"bf16": 989.0, "fp8": 1979.0}),  # H200 SXM: the H100 SXM's compute, more memory
    ("GH200", {"bf16": 989.0, "fp8": 1979.0}),
    ("H100 NVL", {"bf16": 835.0, "fp8": 1670.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp8": 1513.0}),
    ("H100", {"bf16": 989.0, "fp8": 1979.0}),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("A100", {"bf16": 312.0}),
]


def peak_tflops(device_name: str) -> dict:
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in device_name:
            return peaks
    return {}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_parser() -> argparse.ArgumentParser:
    """This script's own flags; the rest go to the driver's parser (lns_megatron.config)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=5)
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--schemes", default="pre,lns", help="comma-separated --norm-scheme values (pre is added)")
    return ap


def main():
    own, rest = build_parser().parse_known_args()
    schemes = ["pre"] + [s for s in own.schemes.split(",") if s and s != "pre"]
    if "--mock-data" not in rest and "--data-path" not in rest:
        rest += ["--mock-data"] + ([] if "--vocab-size" in rest else ["--vocab-size", "32000"])
    steps = own.warmup_steps + own.rounds * own.steps_per_round
    rest += ["--num-workers", "0", "--train-iters", str(steps + 1), "--depth-log-interval", "0"]

    runs = {}
    for scheme in schemes:
        c = parse_args(rest + ["--norm-scheme", scheme])
        if not runs:
            vocab, train_ds = common.start(c)
        model, optimizer = common.model_and_optimizer(c, vocab)
        runs[scheme] = dict(c=c, model=model, optimizer=optimizer,
                            iters=data.data_iterators(train_ds, c, 0, len(model)), times=[], peak=0)

    def block(run, steps):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            train_step(run["model"], run["optimizer"], run["iters"], run["c"], run["c"].num_microbatches)
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
    lns = runs[schemes[-1]]
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

    c = lns["c"]
    flops = flops_per_iteration(c, vocab)
    world = dist.get_world_size()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    peaks = peak_tflops(device) if cuda else {}
    figures = dict(
        device=device, world_size=world, preset=c.preset, num_layers=c.num_layers, hidden_size=c.hidden_size,
        ffn_hidden_size=c.ffn_hidden_size, transformer_impl=c.transformer_impl, bf16=c.bf16,
        fp8_format=c.fp8_format, fp8_recipe=c.fp8_recipe if c.fp8_format else None,
        micro_batch_size=c.micro_batch_size, global_batch_size=c.global_batch_size, seq_length=c.seq_length,
        flops_per_iteration=flops, peak_tflops=peaks, schemes={},
    )
    for scheme, run in runs.items():
        t = statistics.median(run["times"])
        tflops = flops / (t * 1e12 * world)
        figures["schemes"][scheme] = dict(
            step_ms=t * 1000, block_ms=[x * 1000 for x in run["times"]], tflops_per_gpu=tflops,
            mfu_bf16=tflops / peaks["bf16"] if "bf16" in peaks else None,
            mfu_fp8=tflops / peaks["fp8"] if c.fp8_format and "fp8" in peaks else None,
            peak_memory_gib=run["peak"] / 2**30 if cuda else None,
        )
    pre = runs["pre"]
    for scheme, f in figures["schemes"].items():  # each against the Pre-LN block of the same round
        f["step_time_ratio_per_round"] = [x / p for x, p in zip(runs[scheme]["times"], pre["times"])]
        f["step_time_ratio"] = statistics.median(f["step_time_ratio_per_round"])
        f["peak_memory_ratio"] = runs[scheme]["peak"] / pre["peak"] if cuda else None
    diag, step = statistics.median(diag_times), statistics.median(lns["times"])
    figures.update(depth_diagnostics_ms=diag * 1000, depth_diagnostics_share=diag / (100 * step))
    if "lns" in runs:  # the LNS overhead, as the GPU kit reads it
        ratios = figures["schemes"]["lns"]["step_time_ratio_per_round"]
        figures.update(step_time_ratio=statistics.median(ratios), step_time_ratio_per_round=ratios,
                       peak_memory_ratio=figures["schemes"]["lns"]["peak_memory_ratio"])
    if dist.get_rank() == world - 1:
        print(f"device: {device} x {world} | preset {c.preset} | {c.num_layers}x{c.hidden_size} | impl {c.transformer_impl}"
              f" | bf16 {c.bf16} | fp8 {c.fp8_format} {c.fp8_recipe if c.fp8_format else ''}"
              f"| mbs {c.micro_batch_size} gbs {c.global_batch_size} seq {c.seq_length}")
        for scheme, f in figures["schemes"].items():
            mfu = "".join(f" | MFU {100 * f[k]:.1f}% ({k[4:]} peak)" for k in ("mfu_bf16", "mfu_fp8") if f[k] is not None)
            mem = f"{f['peak_memory_gib']:.2f} GiB" if cuda else "n/a (CPU)"
            print(f"{scheme:>8}: step {f['step_ms']:8.2f} ms (median of {len(f['block_ms'])} blocks)"
                  f" | {f['tflops_per_gpu']:8.2f} TFLOP/s/GPU{mfu} | peak memory {mem}")
        if cuda and not peaks:
            print(f"MFU: no peak for {device!r}; add it to PEAK_TFLOPS in benchmarks/bench_norm_scheme.py")
        for scheme, f in figures["schemes"].items():
            if scheme != "pre":
                print(f"step-time ratio {scheme}/pre: median {f['step_time_ratio']:.4f} "
                      f"(per round: {' '.join(f'{r:.3f}' for r in f['step_time_ratio_per_round'])})"
                      + (f" | peak-memory ratio {f['peak_memory_ratio']:.4f}" if cuda else ""))
        print(f"depth diagnostics: {diag * 1000:.1f} ms per call = {100 * diag / (100 * step):.3f}% of training "
              f"time at the default --depth-log-interval 100")
        if own.json:
            with open(own.json + ".tmp", "w") as out:
                json.dump(figures, out, indent=1)
            os.replace(own.json + ".tmp", own.json)
    distributed.destroy()


if __name__ == "__main__":
    main()
