"""Activation memory and step time of activation recompute against keeping every activation, in one process.

The same model (any lns-pretrain flags; --mock-data implied) is built once per setting, with the same weights
and batches: none, selective (--recompute-modules, default core_attn), full uniform over 1 layer, and full
block over half of the layers. Timed blocks alternate between the settings so that machine noise hits all
alike. Prints, per setting, the peak bytes held for the backward pass (autograd's saved tensors, a counter that
works on the CPU), on a GPU also ``torch.cuda.max_memory_allocated``, and the median step time, each as a
ratio to no recompute. The losses must agree (rel 1e-5; 1e-3 in bf16): a setting whose first loss differs is
reported as a failure, and the script exits 1.

    python benchmarks/bench_recompute.py --preset tiny --hidden-size 256 --num-layers 8 --seq-length 256 \
        --max-position-embeddings 256 --micro-batch-size 2
    python benchmarks/bench_recompute.py --preset llama-1b --bf16 --micro-batch-size 2 --seq-length 4096 \
        --max-position-embeddings 4096
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

import common
from lns_megatron.config import parse_args
from lns_megatron.data import datasets as data
from lns_megatron.training import distributed
from lns_megatron.training.profiling import SavedActivationMeter
from lns_megatron.training.train import train_step


def settings(num_layers: int, modules):
    return {
        "none": [],
        "selective (" + " ".join(modules) + ")": ["--recompute-granularity", "selective", "--recompute-modules",
                                                  *modules],
        "full, uniform 1": ["--recompute-granularity", "full", "--recompute-method", "uniform",
                            "--recompute-num-layers", "1"],
        f"full, block {num_layers // 2}": ["--recompute-granularity", "full", "--recompute-method", "block",
                                           "--recompute-num-layers", str(num_layers // 2)],
    }


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--recompute-modules", nargs="+", default=["core_attn"])
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--md", help="and as a Markdown table to this file")
    own, rest = ap.parse_known_args()
    if "--mock-data" not in rest and "--data-path" not in rest:
        rest += ["--mock-data"] + ([] if "--vocab-size" in rest else ["--vocab-size", "32000"])
    rest += ["--num-workers", "0", "--depth-log-interval", "0", "--lr", "0"]  # lr 0: every setting sees the same weights

    runs = {}
    for name, flags in settings(parse_args(rest).num_layers, own.recompute_modules).items():
        c = parse_args(rest + flags)
        if not runs:
            vocab, train_ds = common.start(c)
        distributed.set_seed(c.seed)  # the same initial weights for every setting
        model, optimizer = common.model_and_optimizer(c, vocab)
        runs[name] = dict(c=c, model=model, optimizer=optimizer, times=[])

    def step(run):  # the same first batch every time: the losses are comparable across settings
        return train_step(run["model"], run["optimizer"], data.data_iterators(train_ds, run["c"], 0, len(run["model"])),
                          run["c"], run["c"].num_microbatches)

    for run in runs.values():  # one measured step each: saved bytes, peak memory, loss
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        with SavedActivationMeter(run["model"]) as meter:
            run["loss"] = step(run)
        run["saved_peak"] = meter.peak
        run["cuda_peak"] = torch.cuda.max_memory_allocated() - base if torch.cuda.is_available() else None
    for _ in range(own.rounds):
        for run in runs.values():
            sync()
            start = time.perf_counter()
            for _ in range(own.steps_per_round):
                step(run)
            sync()
            run["times"].append((time.perf_counter() - start) / own.steps_per_round)

    base = runs["none"]
    c = base["c"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"{device} | {c.num_layers} layers x {c.hidden_size}, seq {c.seq_length}, micro-batch {c.micro_batch_size}, "
          f"{c.num_microbatches} micro-batch(es), {c.norm_scheme}")
    print(f"{'recompute':<28} {'saved for backward (MiB)':>25} {'ratio':>7} {'CUDA peak (MiB)':>16} {'ratio':>7} "
          f"{'step (ms)':>10} {'ratio':>7} {'loss':>10}")
    figures = {}
    failed = []
    for name, run in runs.items():
        t = statistics.median(run["times"])
        cuda = (f"{run['cuda_peak'] / 2**20:16.1f} {run['cuda_peak'] / base['cuda_peak']:7.3f}" if run["cuda_peak"]
                else f"{'n/a':>16} {'':>7}")
        print(f"{name:<28} {run['saved_peak'] / 2**20:25.2f} {run['saved_peak'] / base['saved_peak']:7.3f} {cuda} "
              f"{t * 1e3:10.1f} {t / statistics.median(base['times']):7.3f} {run['loss']:10.6f}")
        if abs(run["loss"] - base["loss"]) > (1e-3 if c.bf16 else 1e-5) * abs(base["loss"]):  # bf16 kernels may reorder
            failed.append(name)
        figures[name] = dict(saved_peak_bytes=run["saved_peak"], saved_ratio=run["saved_peak"] / base["saved_peak"],
                             cuda_peak_bytes=run["cuda_peak"], step_s=t,
                             step_ratio=t / statistics.median(base["times"]), loss=run["loss"])
    if failed:
        print(f"FAILED: the loss with {', '.join(failed)} differs from the loss without recompute")
    if own.json:
        with open(own.json, "w") as f:
            json.dump(dict(device=device, settings=figures, failed=failed), f, indent=1)
    if own.md:
        mib = lambda b: f"{b / 2**20:.1f}" if b else "n/a"
        rows = [f"| {name} | {mib(f['saved_peak_bytes'])} ({f['saved_ratio']:.3f}) | {mib(f['cuda_peak_bytes'])} | "
                f"{f['step_s'] * 1e3:.1f} ({f['step_ratio']:.3f}) | {f['loss']:.6f} |" for name, f in figures.items()]
        with open(own.md, "w") as f:
            f.write(f"### Activation recompute: {device}, {c.num_layers} layers x {c.hidden_size}, seq {c.seq_length}, "
                    f"micro-batch {c.micro_batch_size}\n\n| recompute | held for backward MiB (ratio) | CUDA peak MiB "
                    "| step ms (ratio) | loss |\n|---|---|---|---|---|\n" + "\n".join(rows)
                    + (f"\n\nFAILED: the losses differ with {', '.join(failed)}" if failed else "") + "\n")
    distributed.destroy()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
