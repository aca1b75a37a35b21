"""Step ``driver_local``: the driver's own path on this machine (CUDA, or the CPU mode with --dry-run),
local spec, checkpoint save and resume on one device, with Adam and with the distributed optimizer; on a GPU
the iteration line must give the memory (allocated, reserved, peak).
Needs megatron-core only.

For each optimizer, three runs of ``lns-pretrain`` with the same flags and ``--lr-decay-iters N``: A trains
N iterations; B trains N/2 and saves; C loads B's checkpoint and trains to N. C's losses must equal A's.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from results import error_line, iterations, md_table, run_driver, step_args, write_json, write_text  # noqa: E402


def main():
    a = step_args(__doc__.split("\n\n")[0]).parse_args()
    import torch

    n = 6 if a.dry_run else 20
    if a.dry_run:
        model = ["--preset", "tiny", "--seq-length", "32", "--micro-batch-size", "4", "--global-batch-size", "8"]
    else:
        model = ["--preset", "llama-130m", "--seq-length", "1024", "--micro-batch-size", "8",
                 "--global-batch-size", "16", "--bf16"]
    common = model + ["--mock-data", "--vocab-size", "8192", "--norm-scheme", "lns", "--lr", "3e-4",
                      "--lr-warmup-iters", "2", "--lr-decay-iters", str(n), "--log-interval", "1", "--eval-iters", "0",
                      "--depth-log-interval", "0", "--num-workers", "0", "--seed", "1234"]
    result = dict(status="running", device=torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (CPU mode)",
                  iterations=n, checks={})
    for check, flags in (("Adam", []), ("distributed optimizer", ["--use-distributed-optimizer"])):
        result["checks"][check] = resume_check(common + flags, n)
        write_json(a.json, result)
    result["status"] = "ok" if all(c["status"] == "ok" for c in result["checks"].values()) else "failed"
    write_json(a.json, result)
    rows = [[check, name, r["rc"], r["wall_s"], len(r["losses"]), r["tflops_per_gpu"], r["error"] or ""]
            for check, c in result["checks"].items() for name, r in c["runs"].items()]
    verdicts = [f"{check}: {c['status']}" + (f" ({c['error']})" if c.get("error") else
                f", {c['compared']} resumed iterations, max |loss difference| {c['resume_max_abs_diff']}"
                f" (bitwise: {c['resume_bitwise']})") for check, c in result["checks"].items()]
    write_text(a.md, "### Driver: CUDA path, local spec, save and resume (Adam and the distributed optimizer)\n\n"
               + f"Device: {result['device']}. " + "; ".join(verdicts) + ".\n\n"
               + md_table(["optimizer", "run", "exit", "seconds", "iterations logged", "TFLOP/s/GPU (last)", "error"], rows))
    sys.exit(0 if result["status"] == "ok" else 1)


def resume_check(common, n) -> dict:
    import torch

    save_dir = tempfile.mkdtemp(prefix="lns-gpu-ckpt-")
    out = dict(status="running", runs={})
    plan = {"A: straight": ["--train-iters", n],
            "B: first half, save": ["--train-iters", n // 2, "--save", save_dir],
            "C: resume": ["--train-iters", n, "--load", save_dir, "--save", save_dir]}
    try:
        for name, extra in plan.items():
            rc, output, wall = run_driver(common + extra)
            its = iterations(output)
            out["runs"][name] = dict(
                rc=rc, wall_s=round(wall, 1), losses={i: f["lm loss"] for i, f in its.items() if "lm loss" in f},
                tflops_per_gpu=[f.get("throughput per GPU (TFLOP/s/GPU)") for f in its.values()][-1] if its else None,
                memory_gib={k: v for k, v in list(its.values())[-1].items() if k.startswith("mem ")} if its else {},
                error=error_line(output) if rc else None)
            if rc:
                out.update(status="failed", error=f"run {name}: {out['runs'][name]['error']}")
                return out
            memory = {"mem allocated (GiB)", "mem reserved (GiB)", "mem max allocated (GiB)"}
            if torch.cuda.is_available() and set(out["runs"][name]["memory_gib"]) != memory:
                out.update(status="failed", error=f"run {name}: the iteration line lacks the GPU memory fields")
                return out
            if name.startswith("B"):
                out["checkpoint_mib"] = round(sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(save_dir)
                                                  for f in fs) / 2**20, 1)
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)
    straight, resumed = out["runs"]["A: straight"]["losses"], out["runs"]["C: resume"]["losses"]
    pairs = [(straight[i], resumed[i]) for i in resumed if i in straight]
    diff = max(abs(x - y) for x, y in pairs) if pairs else None
    out.update(resumed_iterations=sorted(resumed), compared=len(pairs), resume_max_abs_diff=diff,
               resume_bitwise=diff == 0.0)
    if diff is not None and len(pairs) == n - n // 2 and diff <= 1e-6 * max(abs(x) for x, _ in pairs):
        out["status"] = "ok"
    else:
        out.update(status="failed", error=f"the resumed losses differ from the straight run's by up to {diff} "
                                          f"over {len(pairs)} of {n - n // 2} iterations")
    return out


if __name__ == "__main__":
    main()
