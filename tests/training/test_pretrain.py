"""The pretraining driver end to end on CPU: learning, layouts, launchers, TensorBoard, the console,
and every bad input named in one line before any process group or model memory exists."""

import math
import os
import re
import subprocess

import pytest
import torch

from dist_launch import ROOT, script_env
from driver import (COMMON, MOCK, data_flags, driver_error, learnable_documents, logged_losses, read_tensorboard,
                    run_driver, write_dataset)
from lns_megatron.config import ConfigError, build_parser, parse_args
from lns_megatron.training.distributed import free_port
from lns_megatron.training.train import prepare_resume


@pytest.fixture(scope="module")
def learnable_data(tmp_path_factory):
    return data_flags(write_dataset(str(tmp_path_factory.mktemp("data") / "cycle_text_document"),
                                    learnable_documents()))


def test_loss_falls_on_learnable_data(learnable_data):
    _, out = run_driver(*COMMON, *learnable_data, "--train-iters", "40", "--lr", "3e-3", "--log-interval", "5")
    losses = logged_losses(out)
    assert sorted(losses) == list(range(5, 41, 5))
    assert losses[40] < 0.5 * losses[5], losses
    assert "TFLOP/s/GPU" in out and "grad norm:" in out and "number of nan iterations:   0" in out
    assert "ETA: 0:00:0" in out
    # The start-up log states the init (the default: plain, the same std for every linear layer).
    assert "lns-pretrain: init N(0, 0.02); linear_proj and linear_fc2 plain N(0, 0.02); embeddings N(0, 0.02)" in out
    # The console: megatron-core's fallback notes (Apex, TE, deprecations) are not repeated per import.
    assert "Warning" not in out and "warn(" not in out, out[:3000]


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
    ["--pipeline-model-parallel-size", "2", "--global-batch-size", "8"],
    ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1", "--global-batch-size", "8"],
], ids=["tp2-sp", "pp2", "pp2-vpp2"])  # DP=2 with the distributed optimizer: tests/training/test_resume.py
def test_parallel_layouts_train(learnable_data, tmp_path, layout):
    _, out = run_driver(*COMMON, *learnable_data, "--train-iters", "6", "--lr", "3e-3", "--log-interval", "3",
                        "--depth-log-interval", "3", "--tensorboard-dir", tmp_path / "tb", *layout, nproc=2)
    losses = logged_losses(out)
    assert sorted(losses) == [3, 6] and all(math.isfinite(v) for v in losses.values())
    scalars = read_tensorboard(tmp_path / "tb")
    grad_norms = [scalars[f"depth/grad-norm/layer_{l:03d}"][-1] for l in range(1, 5)]
    assert all(g > 0 and math.isfinite(g) for g in grad_norms), grad_norms


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
    """Two nodes through the launcher; --train-iters 4 as an extra argument: the launcher's derived
    warmup must fit any length."""
    env = dict(os.environ, NNODES="2", GPUS_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               CHECKPOINT_DIR=str(tmp_path / "ckpt"), TENSORBOARD_DIR=str(tmp_path / "tb"),
               PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    script = os.path.join(ROOT, "examples", "pretrain_gpt_lns.sh")
    extra = ["--log-interval", "2", "--seq-length", "32", "--max-position-embeddings", "32", "--train-iters", "4"]
    nodes = [subprocess.Popen(["bash", script, *extra], env=script_env(dict(env, NODE_RANK=str(rank))), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "DP=2" in outs[0] + outs[1]
    assert sorted(logged_losses(outs[0] + outs[1])) == [2, 4]
    assert open(tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read() == "4"
    assert (outs[0] + outs[1]).count("saved checkpoint to ") == 1
    assert re.search(rf"saved checkpoint to {re.escape(str(tmp_path / 'ckpt'))}/iter_0000004 at iteration 4 in "
                     r"\d+\.\d s\n", outs[0] + outs[1])
    # The console on mock data: megatron's MockGPTDataset cache note, the TE/Apex fallback notes and the
    # tokenizer's pad-token note are not printed (megatron's logging has no "Warning" prefix: name them).
    for noise in ("MockGPTDataset", "path_to_cache", "Transformer Engine", "Apex", "pad token", "Warning", "warn("):
        assert noise not in outs[0] + outs[1], noise


# ---- bad input: one line naming the flag and the fix, before any model memory -------------

def config_error(*argv):
    """What the driver refuses before it starts any process group (checked in this process)."""
    with pytest.raises(ConfigError) as error:
        prepare_resume(parse_args([str(a) for a in argv]))
    return str(error.value)


def test_bad_input_is_one_line_without_traceback():
    error = driver_error("--preset", "tiny", "--tensor-model-parallel-size", "3", *MOCK)
    assert "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3" in error


@pytest.mark.parametrize("args, expected", [
    (["--tensor-model-parallel-size", "3", *MOCK], "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "3", *MOCK], "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    (["--micro-batch-size", "4", "--global-batch-size", "6", *MOCK], "--global-batch-size 6 is not a multiple of --micro-batch-size 4"),
    (["--seq-length", "128", *MOCK], "--seq-length 128 is longer than --max-position-embeddings 64"),
    (["--num-workers", "0"], "no training data: give --data-path"),
    (["--data-path", "/nonexistent/corpus_text_document", "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"], "--data-path /nonexistent/corpus_text_document: /nonexistent/corpus_text_document.bin not found"),
    (["--load", "/nonexistent/ckpt", *MOCK], "--load /nonexistent/ckpt: no such directory"),
    # Every number is bounded (--seq-length 0 used to kill the process with SIGFPE, a negative batch trained).
    (["--seq-length", "0", *MOCK], "--seq-length 0: must be greater than 0"),
    (["--global-batch-size", "-8", *MOCK], "--global-batch-size -8: must be greater than 0"),
    (["--train-iters", "0", *MOCK], "--train-iters 0: must be greater than 0"),
    (["--lr=-1e-3", *MOCK], "--lr -0.001: must be at least 0"),
    (["--lr", "nan", *MOCK], "--lr nan: must be a finite number"),
    (["--adam-beta2", "1.0", *MOCK], "--adam-beta2 1.0: must be less than 1"),
    (["--eval-interval", "0", *MOCK], "--eval-interval 0: must be greater than 0"),
    (["--save-interval", "0", "--save", "/tmp/x", *MOCK], "--save-interval 0: must be greater than 0"),
    (["--distributed-timeout-minutes", "0", *MOCK], "--distributed-timeout-minutes 0.0: must be greater than 0"),
    (["--lr-warmup-iters", "5", "--train-iters", "5", *MOCK], "--lr-warmup-iters 5 must be smaller than the decay length 5"),
    (["--finetune", *MOCK], "--finetune needs --load DIR"),
    (["--norm-scheme", "mix", "--mix-ln-alpha", "1.5", *MOCK], "--mix-ln-alpha 1.5: must be at most 1"),
    (["--norm-scheme", "post", "--hybrid-layer-pattern", "*-*-*-*-", *MOCK],
     "--hybrid-layer-pattern with --norm-scheme post: that scheme is built for GPTModel's layers only"),
], ids=["heads-tp", "layers-pp", "batch", "seq-positions", "no-data", "missing-data", "missing-load", "seq-zero",
        "negative-batch", "zero-iters", "negative-lr", "nan-lr", "beta2", "eval-interval", "save-interval", "timeout",
        "warmup", "finetune-without-load", "mix-alpha", "hybrid-post"])
def test_bad_input_message(args, expected):
    assert expected in config_error("--preset", "tiny", *args)


def test_warmup_fraction_fits_any_length():
    for iters in (1, 5, 20000):
        c = parse_args(["--preset", "tiny", *MOCK, "--train-iters", str(iters), "--lr-warmup-fraction", "0.1"])
        assert c.lr_warmup_iters == int(0.1 * iters) < c.lr_decay_iters
    # Two spellings of one setting: the later flag wins (a launcher's default, then the user's choice).
    assert parse_args(["--preset", "tiny", *MOCK, "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "7"]).lr_warmup_iters == 7
    assert parse_args(["--preset", "tiny", *MOCK, "--train-iters", "100", "--lr-warmup-iters", "7",
                       "--lr-warmup-fraction", "0.5"]).lr_warmup_iters == 50


def test_every_switch_means_what_it_says():
    """--x turns x on and --no-x off; a flag named --no-... (--no-load-optim, or one on by default) turns its
    field the way its name says, whatever argparse's BooleanOptionalAction would make of the prefix."""
    import dataclasses

    from lns_megatron.config import PretrainConfig, flag_name

    base = ["--preset", "tiny", *MOCK, "--load", os.getcwd()]
    switches = [f for f in dataclasses.fields(PretrainConfig) if f.type in ("bool", bool)
                and not f.metadata.get("derived")]
    assert {"no_load_optim", "no_load_rng", "check_for_nan_in_loss_and_grad"} <= {f.name for f in switches}
    for f in switches:
        flag = flag_name(f.name)
        parsed = vars(build_parser().parse_args([flag]))[f.name]
        assert parsed is not f.default, (flag, parsed)
        if not f.default and not flag.startswith("--no-"):
            assert vars(build_parser().parse_args([flag.replace("--", "--no-", 1)]))[f.name] is False, flag
    c = parse_args([*base, "--no-load-optim", "--no-load-rng"])
    assert c.no_load_optim and c.no_load_rng


def test_fp8_without_gpu_or_transformer_engine():
    from lns_megatron.schemes.lns import HAVE_TE

    args = ["--preset", "tiny", "--bf16", "--fp8-format", "hybrid", "--transformer-impl", "transformer_engine", *MOCK]
    if not torch.cuda.is_available():
        assert "--fp8-format needs a CUDA GPU" in config_error(*args)
    elif not HAVE_TE:
        assert "--fp8-format needs Transformer Engine" in config_error(*args)
    else:  # both present: FP8 is valid here, and validation passes
        from lns_megatron.config import validate

        validate(parse_args(args), True, True)


def test_missing_tokenizer_message(learnable_data):
    prefix = learnable_data[1]
    error = config_error("--preset", "tiny", "--data-path", prefix, "--split", "90,10,0", "--tokenizer-type",
                         "HuggingFaceTokenizer", "--tokenizer-model", "/nonexistent/tokenizer.json")
    assert "--tokenizer-model" in error and "/nonexistent/tokenizer.json" in error


def test_dataset_without_tokens_is_refused(tmp_path):
    prefix = write_dataset(str(tmp_path / "empty_text_document"), [[], []])
    assert os.path.getsize(prefix + ".bin") == 0 and os.path.getsize(prefix + ".idx") > 0
    error = config_error("--preset", "tiny", "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "10")
    assert "holds no tokens" in error and "tools/preprocess_data.py" in error


def test_empty_split_is_refused(learnable_data):
    """300 documents split 969,30,1: the test split gets none, and megatron would loop forever."""
    error = config_error("--preset", "tiny", *learnable_data, "--split", "969,30,1")
    assert "--split 969,30,1: the test split" in error and "hold no tokens" in error


@pytest.mark.parametrize("preset, lr, steps", [("llama-130m", 1e-3, 20000), ("llama-250m", 1e-3, 40000),
                                               ("llama-350m", 5e-4, 60000), ("llama-1b", 5e-4, 100000)])
def test_recipe_paper_fills_the_papers_settings(preset, lr, steps):
    c = parse_args(["--preset", preset, "--recipe", "paper", *MOCK])
    assert (c.lr, c.min_lr, c.train_iters, c.lr_decay_iters, c.lr_warmup_iters) == (lr, 0.1 * lr, steps, steps, steps // 10)
    assert (c.adam_beta1, c.adam_beta2, c.weight_decay, c.clip_grad, c.lr_decay_style) == (0.9, 0.999, 0.0, 0.0, "cosine")
    assert (c.bf16, c.norm_epsilon, c.untie_embeddings_and_output_weights, c.normalization) == (True, 1e-6, True, "RMSNorm")
    assert (c.global_batch_size, c.seq_length, c.init_method_std, c.output_layer_init) == (512, 256, 0.02, "plain")
    # Explicit flags win over the recipe; the floor follows an explicit --lr unless --min-lr is given too.
    c = parse_args(["--preset", preset, "--recipe", "paper", *MOCK, "--lr", "2e-3", "--train-iters", "100",
                    "--lr-warmup-iters", "5", "--no-bf16", "--global-batch-size", "16"])
    assert (c.lr, c.min_lr, c.train_iters, c.lr_warmup_iters, c.bf16, c.global_batch_size) == (2e-3, 2e-4, 100, 5, False, 16)
    assert parse_args(["--preset", preset, "--recipe", "paper", *MOCK, "--min-lr", "0"]).min_lr == 0.0
