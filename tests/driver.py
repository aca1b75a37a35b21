"""Running the real pretraining driver from tests: data made by megatron-core's builder, the CLI in a
subprocess (one process or torchrun), and its Megatron-style log lines parsed back."""

import os
import re
import subprocess
import sys

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from dist_launch import ROOT
from lns_megatron.training.distributed import free_port

VOCAB = 64
COMMON = ["--preset", "tiny", "--seq-length", "32", "--max-position-embeddings", "32", "--num-workers", "0",
          "--micro-batch-size", "4", "--eval-interval", "1000", "--eval-iters", "1", "--depth-log-interval", "0"]
MOCK = ["--mock-data", "--vocab-size", "100", "--num-workers", "0"]


def write_dataset(prefix, documents):
    """An indexed dataset written by megatron-core's own builder."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def learnable_documents(seed=0, count=300):
    """Documents that repeat a fixed cycle: the next token is predictable, so loss must fall."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(VOCAB - 1)
    return [np.roll(cycle, -int(rng.integers(VOCAB - 1)))[: int(rng.integers(40, 120))].tolist() for _ in range(count)]


def data_flags(prefix):
    return ["--data-path", prefix, "--split", "90,10,0", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(VOCAB - 1)]


def driver_env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
                PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def driver_command(*args, nproc=1, nnodes=1, node_rank=0, master_port=None):
    if nproc == 1 and nnodes == 1:
        return [sys.executable, "-m", "lns_megatron.pretrain", *map(str, args)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
            f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={master_port or free_port()}",
            "-m", "lns_megatron.pretrain", *map(str, args)]


def run_driver(*args, nproc=1, expect_ok=True):
    proc = subprocess.run(driver_command(*args, nproc=nproc), cwd=ROOT, env=driver_env(), capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, out[-5000:]
    return proc.returncode, out


def driver_error(*args, nproc=1):
    """The driver's one error line (asserting it is exactly one, with no traceback of ours)."""
    code, out = run_driver(*args, nproc=nproc, expect_ok=False)
    errors = [line for line in out.splitlines() if line.startswith("lns-pretrain: error:")]
    assert code != 0 and len(errors) == 1, out[-3000:]
    # torchrun reports a failed worker with a traceback of its own (ChildFailedError); no other may appear.
    tracebacks = out.split("Traceback (most recent call last):")[1:]
    assert all("torch.distributed.elastic.multiprocessing.errors.ChildFailedError" in t for t in tracebacks), \
        out[-3000:]
    return errors[0]


def resume_error(*argv, world_size=1, monkeypatch=None):
    """The ConfigError the driver's start-up checks (flags, then the --load checkpoint) raise for ``argv``."""
    import pytest

    from lns_megatron.config import ConfigError, parse_args
    from lns_megatron.training.train import prepare_resume

    if monkeypatch is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ConfigError) as error:
        prepare_resume(parse_args([str(a) for a in argv]))
    return str(error.value)


def logged(output, field):
    """{iteration: value} of one field of the iteration lines (e.g. "lm loss", "learning rate")."""
    pattern = rf"iteration\s+(\d+)/\s*\d+ \|.*?{re.escape(field)}: (\S+) \|"
    return {int(m.group(1)): float(m.group(2)) for m in re.finditer(pattern, output)}


def logged_losses(output):
    return logged(output, "lm loss")


def validation_losses(output):
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"validation loss at iteration (\d+) \| lm loss value: (\S+)", output)}


def read_tensorboard(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
