"""The pretraining driver end to end on CPU: learning, resume, layouts, launchers, TensorBoard,
and every bad input named in its error message."""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from dist_launch import ROOT
from lns_megatron.training.distributed import free_port

VOCAB = 64
COMMON = ["--preset", "tiny", "--seq-length", "32", "--max-position-embeddings", "32", "--num-workers", "0",
          "--micro-batch-size", "4", "--eval-interval", "1000", "--eval-iters", "1", "--depth-log-interval", "0"]


def write_dataset(prefix, documents):
    """An indexed dataset written by megatron-core's own builder."""
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(torch.tensor(doc, dtype=torch.int64), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


@pytest.fixture(scope="module")
def learnable_data(tmp_path_factory):
    """Documents that repeat a fixed cycle: the next token is predictable, so loss must fall."""
    rng = np.random.default_rng(0)
    cycle = rng.permutation(VOCAB - 1)
    docs = [np.roll(cycle, -int(rng.integers(VOCAB - 1)))[: int(rng.integers(40, 120))].tolist() for _ in range(300)]
    prefix = write_dataset(str(tmp_path_factory.mktemp("data") / "cycle_text_document"), docs)
    return ["--data-path", prefix, "--split", "90,10,0", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", str(VOCAB - 1)]


def run_driver(*args, nproc=1, expect_ok=True):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "lns_megatron.pretrain", *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "lns_megatron.pretrain", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, out[-5000:]
    return proc.returncode, out


def logged_losses(output):
    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"iteration\s+(\d+)/\s*\d+ \|.*?lm loss: (\S+) \|", output)}


def test_loss_falls_on_learnable_data(learnable_data):
    _, out = run_driver(*COMMON, *learnable_data, "--train-iters", "40", "--lr", "3e-3", "--log-interval", "5")
    losses = logged_losses(out)
    assert sorted(losses) == list(range(5, 41, 5))
    assert losses[40] < 0.5 * losses[5], losses
    assert "TFLOP/s/GPU" in out and "grad norm:" in out and "number of nan iterations:   0" in out


def test_resume_continues_exactly(learnable_data, tmp_path):
    args = [*COMMON, *learnable_data, "--train-iters", "20", "--lr", "1e-3", "--log-interval", "1", "--seed", "7"]
    _, whole = run_driver(*args)
    _, first = run_driver(*args, "--save", tmp_path / "ckpt", "--exit-interval", "10")
    assert open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read() == "10"
    _, resumed = run_driver(*args, "--load", tmp_path / "ckpt")
    whole, first, resumed = logged_losses(whole), logged_losses(first), logged_losses(resumed)
    assert sorted(first) == list(range(1, 11)) and sorted(resumed) == list(range(11, 21))
    assert all(first[i] == whole[i] for i in range(1, 11))
    assert all(resumed[i] == whole[i] for i in range(11, 21)), (resumed, whole)


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--pipeline-model-parallel-size", "2", "--global-batch-size", "8"],
    ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "8"],
    ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"],
], ids=["tp2-sp", "pp2", "pp2-vpp2", "dp2-distopt"])
def test_parallel_layouts_train(learnable_data, tmp_path, layout):
    _, out = run_driver(*COMMON, *learnable_data, "--train-iters", "6", "--lr", "3e-3", "--log-interval", "3",
                        "--depth-log-interval", "3", "--tensorboard-dir", tmp_path / "tb", *layout, nproc=2)
    losses = logged_losses(out)
    assert sorted(losses) == [3, 6] and all(math.isfinite(v) for v in losses.values())
    scalars = read_tensorboard(tmp_path / "tb")
    grad_norms = [scalars[f"depth/grad-norm/layer_{l:03d}"][-1] for l in range(1, 5)]
    assert all(g > 0 and math.isfinite(g) for g in grad_norms), grad_norms


def read_tensorboard(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars(learnable_data, tmp_path):
    run_driver(*COMMON, *learnable_data, "--train-iters", "4", "--log-interval", "2", "--eval-interval", "2",
               "--depth-log-interval", "2", "--tensorboard-dir", tmp_path / "tb")
    scalars = read_tensorboard(tmp_path / "tb")
    for name in ["lm loss", "learning-rate", "batch-size", "grad-norm", "loss-scale", "lm loss validation",
                 "lm loss validation ppl", "iteration-time", "throughput", "tokens-per-sec"]:
        assert name in scalars and scalars[name] and all(math.isfinite(v) for v in scalars[name]), name
    for metric in ["variance", "grad-norm", "angular-distance"]:
        for layer in range(1, 5):
            values = scalars[f"depth/{metric}/layer_{layer:03d}"]
            assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values), (metric, layer)
    assert all(0 < scalars[f"depth/angular-distance/layer_{l:03d}"][-1] < 1 for l in range(1, 5))


def test_two_node_launch_on_one_machine(tmp_path):
    env = dict(os.environ, NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               TRAIN_ITERS="4", CHECKPOINT_DIR=str(tmp_path / "ckpt"), TENSORBOARD_DIR=str(tmp_path / "tb"),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "examples", "pretrain_gpt_lns.sh")
    extra = ["--log-interval", "2", "--seq-length", "32", "--max-position-embeddings", "32"]
    nodes = [subprocess.Popen(["bash", script, *extra], env=dict(env, NODE_RANK=str(rank)), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "DP=2" in outs[0] + outs[1]
    assert sorted(logged_losses(outs[0] + outs[1])) == [2, 4]
    assert open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read() == "4"


# ---- bad input: one line naming the flag and the fix, before any model memory -------------

def driver_error(*args):
    code, out = run_driver(*args, expect_ok=False)
    errors = [l for l in out.splitlines() if l.startswith("lns-pretrain: error:")]
    assert code != 0 and len(errors) == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    return errors[0]


MOCK = ["--mock-data", "--vocab-size", "100", "--num-workers", "0"]


@pytest.mark.parametrize("args, expected", [
    (["--preset", "tiny", "--tensor-model-parallel-size", "3", *MOCK], "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--preset", "tiny", "--pipeline-model-parallel-size", "3", *MOCK], "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    (["--preset", "tiny", "--micro-batch-size", "4", "--global-batch-size", "6", *MOCK], "--global-batch-size 6 is not a multiple of --micro-batch-size 4"),
    (["--preset", "tiny", "--seq-length", "128", *MOCK], "--seq-length 128 is longer than --max-position-embeddings 64"),
    (["--preset", "tiny", "--num-workers", "0"], "no training data: give --data-path"),
    (["--preset", "tiny", "--data-path", "/nonexistent/corpus_text_document", "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"], "--data-path /nonexistent/corpus_text_document: /nonexistent/corpus_text_document.bin not found"),
    (["--preset", "tiny", "--load", "/nonexistent/ckpt", *MOCK], "--load /nonexistent/ckpt: no such directory"),
], ids=["heads-tp", "layers-pp", "batch", "seq-positions", "no-data", "missing-data", "missing-load"])
def test_bad_input_message(args, expected):
    assert expected in driver_error(*args)


def test_fp8_without_gpu_or_transformer_engine():
    from lns_megatron.schemes.lns import HAVE_TE

    args = ["--preset", "tiny", "--bf16", "--fp8-format", "hybrid", "--transformer-impl", "transformer_engine", *MOCK]
    if not torch.cuda.is_available():
        assert "--fp8-format needs a CUDA GPU" in driver_error(*args)
    elif not HAVE_TE:
        assert "--fp8-format needs Transformer Engine" in driver_error(*args)
    else:  # both present: FP8 is valid here, and validation passes
        from lns_megatron.config import parse_args, validate

        validate(parse_args(args), True, True)


def test_missing_tokenizer_message(learnable_data):
    prefix = learnable_data[1]
    error = driver_error("--preset", "tiny", "--data-path", prefix, "--split", "90,10,0", "--tokenizer-type", "HuggingFaceTokenizer",
                         "--tokenizer-model", "/nonexistent/tokenizer.json")
    assert "--tokenizer-model" in error and "/nonexistent/tokenizer.json" in error


def test_dataset_without_tokens_is_refused(tmp_path):
    prefix = write_dataset(str(tmp_path / "empty_text_document"), [[], []])
    assert os.path.getsize(prefix + ".bin") == 0 and os.path.getsize(prefix + ".idx") > 0
    error = driver_error("--preset", "tiny", "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "10")
    assert "holds no tokens" in error and "tools/preprocess_data.py" in error


def test_empty_split_is_refused(learnable_data):
    """300 documents split 969,30,1: the test split gets none, and megatron would loop forever."""
    error = driver_error("--preset", "tiny", *learnable_data, "--split", "969,30,1")
    assert "--split 969,30,1: the test split" in error and "hold no tokens" in error


def test_nan_loss_stops_without_checkpoint(tmp_path):
    """A learning rate of 1e20 blows the weights up after the first step."""
    code, out = run_driver("--preset", "tiny", *MOCK, "--lr", "1e20", "--train-iters", "5", "--log-interval", "1",
                           "--save", tmp_path / "ckpt", "--save-interval", "1", expect_ok=False)
    assert code != 0 and "lns-pretrain: error: lm loss is nan at iteration 2" in out, out[-3000:]
    # Iteration 1 was healthy and saved; nothing from the NaN state is.
    assert open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read() == "1"
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["iter_0000001", "latest_checkpointed_iteration.txt"]


def test_kill_during_save_keeps_latest_checkpoint(learnable_data, tmp_path):
    """SIGKILL while iteration 2 is being saved: the pointer still names iteration 1, which resumes."""
    import signal
    import time

    ckpt = tmp_path / "ckpt"
    args = [*COMMON, *learnable_data, "--hidden-size", "256", "--ffn-hidden-size", "1024", "--num-layers", "8",
            "--train-iters", "3", "--log-interval", "1", "--save", ckpt, "--save-interval", "1"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lns_megatron.pretrain", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    partial = ckpt / "iter_0000002.tmp"
    deadline = time.time() + 300
    while not partial.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    assert partial.exists(), "the save of iteration 2 was not caught in progress"
    os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its checkpoint-writer processes
    proc.wait()
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == "1"
    assert not (ckpt / "iter_0000002").exists()
    _, out = run_driver(*args, "--load", ckpt)  # resumes from 1, finishes, and replaces the debris
    assert sorted(logged_losses(out)) == [2, 3]
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == "3"
    assert sorted(os.listdir(ckpt)) == ["iter_0000001", "iter_0000002", "iter_0000003",
                                        "latest_checkpointed_iteration.txt"]
