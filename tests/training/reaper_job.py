"""A small torchrun job with the kinds of processes a trainer starts: a data-loader worker (torch's) and a
forked writer (as megatron's checkpoint writers are), under the watchdog of lns_megatron.training.reaper.
Each step reads a batch from the worker, waits for the writer, and all-reduces over gloo with a short
timeout, so a frozen process anywhere stops the job as a frozen rank stops a real one.

    torchrun --nproc_per_node 2 tests/training/reaper_job.py PID_DIR
"""

import datetime
import json
import multiprocessing
import os
import sys
import time

from lns_megatron.training import reaper

WATCHDOG = reaper.start()

import torch  # noqa: E402  (after the watchdog, as in the driver)
import torch.distributed as dist  # noqa: E402


class Steps(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield torch.ones(4)


def serve_writes(connection):
    while connection.recv() is not None:
        connection.send("written")


def main(pid_dir):
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=3))
    rank = dist.get_rank()
    batches = iter(torch.utils.data.DataLoader(Steps(), batch_size=None, num_workers=1))
    here, there = multiprocessing.get_context("fork").Pipe()
    writer = multiprocessing.get_context("fork").Process(target=serve_writes, args=(there,), daemon=True)
    writer.start()
    for step in range(100000):
        batch = next(batches)
        here.send(step)
        here.recv()
        dist.all_reduce(batch)
        if step == 1:  # every process is up: say who is who
            import psutil

            worker = [c.pid for c in psutil.Process().children() if c.name() == "pt_data_worker"]
            path = os.path.join(pid_dir, f"rank{rank}.json")
            with open(path + ".tmp", "w") as f:
                json.dump(dict(trainer=os.getpid(), watchdog=WATCHDOG, writer=writer.pid, worker=worker[0]), f)
            os.replace(path + ".tmp", path)
        time.sleep(0.05)


if __name__ == "__main__":
    main(sys.argv[1])
