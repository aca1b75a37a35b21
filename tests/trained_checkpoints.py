"""Tiny checkpoints trained by the real driver, once per test session, shared by the tool tests."""

import json
import os
import shutil
import subprocess
import sys

from dist_launch import ROOT
from lns_megatron.training.distributed import free_port

TINY = ["--seq-length", "32", "--max-position-embeddings", "32", "--mock-data", "--vocab-size", "200",
        "--train-iters", "30", "--global-batch-size", "4", "--micro-batch-size", "2", "--lr", "3e-3",
        "--num-workers", "0", "--eval-interval", "1000", "--eval-iters", "1", "--depth-log-interval", "0"]
LLAMA_TIED = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "172",
              "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--position-embedding-type", "rope"]
# name -> (processes, driver flags). Vocabulary 200 + EOD = 201 ids, padded to 256 rows by the driver.
RUNS = {
    "lns": (1, ["--preset", "tiny", "--num-query-groups", "2", "--norm-scheme", "lns"]),  # GQA, untied
    "pre_tp2": (2, ["--preset", "tiny", "--norm-scheme", "pre", "--tensor-model-parallel-size", "2"]),
    "lns_pp2_tied": (2, [*LLAMA_TIED, "--norm-scheme", "lns", "--pipeline-model-parallel-size", "2"]),
    "lns_bf16": (1, ["--preset", "tiny", "--norm-scheme", "lns", "--bf16"]),  # what H100 runs save
    "lns_moe": (1, ["--preset", "tiny-moe", "--norm-scheme", "lns"]),  # 4 experts, top-2
}
TOKENIZER_VOCAB = 201
_trained = {}


def trained_checkpoint(tmp_path_factory, name):
    """Train one tiny checkpoint per name and test session (shared with test_depth_report)."""
    if name not in _trained:
        nproc, flags = RUNS[name]
        save = tmp_path_factory.mktemp("ckpt") / name
        module = ["-m", "lns_megatron.pretrain", *flags, *TINY, "--save", str(save)]
        cmd = [sys.executable, *module] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            *module]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        _trained[name] = str(save)
    return _trained[name]


def copy_checkpoint(src, dst, **config_changes):
    shutil.copytree(src, dst)
    iter_dir = os.path.join(dst, sorted(d for d in os.listdir(dst) if d.startswith("iter_"))[-1])
    path = os.path.join(iter_dir, "pretrain_config.json")
    config = json.load(open(path))
    config.update(config_changes)
    json.dump(config, open(path, "w"))
    return str(dst)
