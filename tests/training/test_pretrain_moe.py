"""Mixture of experts in the driver, on CPU through torchrun with megatron-core's MoE layer, router, all-to-all
dispatcher and dist-checkpointing: the auxiliary losses are logged as Megatron-LM logs them, an expert-parallel
checkpoint resumes exactly and reshards (EP=2 to EP=1, and to PP=2), and bad MoE flags are refused in one line
before anything is built."""

import json
import math

import pytest

from driver import (COMMON, data_flags, driver_error, learnable_documents, logged, logged_losses, read_tensorboard,
                    resume_error, run_driver, write_dataset)
from lns_megatron.config import ConfigError, moe_layer_pattern, parse_args, unused_moe_flags
from lns_megatron.training.metrics import flops_per_iteration
from lns_megatron.training.train import prepare_resume

MOE = ["--num-experts", "4", "--moe-ffn-hidden-size", "86", "--moe-aux-loss-coeff", "0.01", "--moe-z-loss-coeff",
       "0.001"]
DIST_OPT = ["--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable"]
EP2 = ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]
RTOL = 1e-5  # float32 sums of the same tokens in another order (other layouts)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_flags(write_dataset(str(tmp_path_factory.mktemp("data") / "cycle_text_document"),
                                    learnable_documents()))


def flags(data, *extra, experts=MOE):
    return [*COMMON, *data, *experts, "--global-batch-size", "8", "--lr", "1e-3", "--lr-warmup-iters", "1",
            "--lr-decay-iters", "4", "--train-iters", "4", "--seed", "7", "--log-interval", "1",
            "--depth-log-interval", "2", *extra]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """EP=2 (two experts per rank, all-to-all dispatch) x DP=2 with the distributed optimizer, saved at 2 and 4."""
    root = tmp_path_factory.mktemp("moe")
    _, out = run_driver(*flags(data, *EP2, *DIST_OPT, "--save", root / "ckpt", "--save-interval", "2",
                               "--tensorboard-dir", root / "tb"), nproc=2)
    return dict(ckpt=root / "ckpt", out=out, losses=logged_losses(out), tb=read_tensorboard(root / "tb"))


def close(a, b, rtol=RTOL):
    return math.isclose(a, b, rel_tol=rtol)


def test_aux_losses_are_logged_as_megatron_lm_logs_them(reference):
    """The console line and TensorBoard carry megatron-core's tracked load-balancing and z losses (their mean over
    the MoE layers, before the coefficient), every iteration."""
    out, tb = reference["out"], reference["tb"]
    assert "MoE in 4 layers: 4 experts of 86, top-2, EP=2 ETP=1" in out
    for name in ("load_balancing_loss", "z_loss"):
        console = logged(out, name)
        assert sorted(console) == [1, 2, 3, 4], (name, out[-3000:])
        assert len(tb[name]) == 4 and all(math.isclose(tb[name][i - 1], console[i], rel_tol=1e-5) for i in console)
        assert all(v > 0 and math.isfinite(v) for v in console.values())
    # Switch-style balancing loss: 1 for uniform routing, up to num_experts / top-k = 2 when collapsed.
    assert all(0.9 < v < 2.0 for v in logged(out, "load_balancing_loss").values())


def test_expert_parallel_resume_is_exact(data, reference, tmp_path):
    _, out = run_driver(*flags(data, *EP2, *DIST_OPT, "--load", reference["ckpt"] / "iter_0000002",
                               "--save", tmp_path / "resumed"), nproc=2)
    losses = logged_losses(out)
    assert sorted(losses) == [3, 4] and all(losses[i] == reference["losses"][i] for i in losses), losses
    assert logged(out, "load_balancing_loss")[4] == logged(reference["out"], "load_balancing_loss")[4]


def test_expert_parallel_checkpoint_reshards_to_one_process(data, reference, tmp_path):
    """EP=2 -> EP=1 on one process: the same losses, and the same per-layer gradient norms (the experts'
    gradients summed over the expert-parallel ranks and the optimizer shards, the others over DP)."""
    _, out = run_driver(*flags(data, *DIST_OPT, "--load", reference["ckpt"] / "iter_0000002", "--save-interval", "3",
                               "--save", tmp_path / "ep1", "--tensorboard-dir", tmp_path / "tb"))
    losses = logged_losses(out)
    assert sorted(losses) == [3, 4] and all(close(losses[i], reference["losses"][i]) for i in losses), losses
    tb = read_tensorboard(tmp_path / "tb")
    for layer in range(1, 5):
        name = f"depth/grad-norm/layer_{layer:03d}"
        assert close(tb[name][-1], reference["tb"][name][-1], rtol=1e-4), (name, tb[name], reference["tb"][name])
    # ... and back: the EP=1 state (one distributed optimizer) at EP=2 (dense and expert optimizers).
    _, out = run_driver(*flags(data, *EP2, *DIST_OPT, "--load", tmp_path / "ep1" / "iter_0000003",
                               "--save", tmp_path / "ep2"), nproc=2)
    assert sorted(logged_losses(out)) == [4] and close(logged_losses(out)[4], reference["losses"][4]), out[-2000:]


def test_expert_parallel_checkpoint_reshards_to_a_pipeline(data, reference, tmp_path):
    _, out = run_driver(*flags(data, *DIST_OPT, "--pipeline-model-parallel-size", "2",
                               "--load", reference["ckpt"] / "iter_0000002", "--save", tmp_path / "pp2"), nproc=2)
    losses = logged_losses(out)
    assert sorted(losses) == [3, 4] and all(close(losses[i], reference["losses"][i]) for i in losses), losses
    assert sorted(logged(out, "z_loss")) == [3, 4]  # reduced over the pipeline stages


def test_a_resume_that_changes_the_experts_is_refused(data, reference):
    load = ["--load", reference["ckpt"]]
    error = resume_error(*flags(data, *DIST_OPT, *load, "--num-experts", "8"))
    assert "holds another model or tokenizer: --num-experts: checkpoint 4, now 8" in error
    error = resume_error(*flags(data, *DIST_OPT, *load, "--moe-router-topk", "1", "--moe-router-pre-softmax"))
    assert "--moe-router-topk: checkpoint 2, now 1" in error
    error = resume_error(*flags(data, *DIST_OPT, *load, experts=[]))  # dense now
    assert "--num-experts: checkpoint 4, now None" in error
    _, _, notices = prepare_resume(parse_args([str(a) for a in flags(data, *DIST_OPT, *load,
                                                                     "--moe-aux-loss-coeff", "0.02")]))
    assert notices == ["--moe-aux-loss-coeff: checkpoint 0.01, now 0.02"]


def test_dp_shard_optimizer_state_does_not_reshard_across_expert_parallel_sizes(data, reference, tmp_path):
    import shutil

    ckpt = tmp_path / "dp_shards"
    shutil.copytree(reference["ckpt"] / "iter_0000002", ckpt)
    path = ckpt / "pretrain_config.json"
    json.dump(dict(json.load(open(path)), dist_ckpt_optim_fully_reshardable=False), open(path, "w"))
    error = resume_error(*flags(data, "--use-distributed-optimizer", "--load", ckpt))
    assert "--expert-model-parallel-size: checkpoint 2, now 1" in error and "--no-load-optim" in error


@pytest.mark.parametrize("extra, world, expected", [
    (["--expert-model-parallel-size", "3"], 1, "--num-experts 4 is not divisible by --expert-model-parallel-size 3"),
    (["--expert-model-parallel-size", "4"], 2, "world size 2 is not divisible by --expert-tensor-parallel-size 1 x "
                                               "--expert-model-parallel-size 4"),
    (["--moe-grouped-gemm"], 1, "--moe-grouped-gemm with --transformer-impl local needs a CUDA GPU and the "
                                "grouped_gemm package"),
    (["--moe-router-topk", "5"], 1, "--moe-router-topk 5 is more than --num-experts 4"),
    (["--moe-router-topk", "1"], 1, "--moe-router-topk 1 needs --moe-router-pre-softmax"),
    (["--moe-layer-freq", "[1,0,1]"], 1, "--moe-layer-freq '[1,0,1]' has 3 entries for --num-layers 4"),
    (["--moe-layer-freq", "[0]*4"], 1, "makes no layer MoE"),
    (["--moe-layer-freq", "__import__('os')"], 1, "give an integer N or a list of 0 (dense) and 1 (MoE)"),
    (["--norm-scheme", "peri"], 1, "--num-experts with --norm-scheme peri: Peri-LN's output norm"),
    (["--norm-scheme", "deepnorm"], 1, "--num-experts with --norm-scheme deepnorm: its post-norm layer"),
    (["--tensor-model-parallel-size", "2"], 2, "--num-experts with --tensor-model-parallel-size 2 needs "
                                               "--sequence-parallel"),
    (["--moe-router-load-balancing-type", "sinkhorn"], 1, "sinkhorn balances by routing and takes no aux loss (megatron"
                                                          "-core asserts it in the first forward); give "
                                                          "--moe-aux-loss-coeff 0, not 0.01"),
], ids=["ep-divides", "world", "grouped-gemm", "topk", "top1", "freq-length", "freq-dense", "freq-code", "peri",
        "deepnorm", "tp-needs-sp", "sinkhorn-aux"])
def test_bad_moe_flags_are_refused_in_one_line(data, monkeypatch, extra, world, expected):
    assert expected in resume_error(*flags(data, *extra), world_size=world, monkeypatch=monkeypatch)


def test_expert_parallelism_without_experts_is_refused(data):
    error = resume_error(*flags(data, "--expert-model-parallel-size", "2", experts=[]))
    assert "--expert-model-parallel-size 2 needs --num-experts" in error


def test_the_driver_refuses_grouped_gemm_on_this_machine_before_starting(data):
    """One error line from the command line, and no process group or model built (nothing about megatron)."""
    error = driver_error(*flags(data, "--moe-grouped-gemm"))
    assert "--moe-grouped-gemm with --transformer-impl local" in error


def test_moe_layer_freq_follows_megatron_lm():
    assert moe_layer_pattern("1", 4) == [1, 1, 1, 1]
    assert moe_layer_pattern("2", 5) == [1, 0, 1, 0, 1]
    assert moe_layer_pattern("([0]+[1]*3)*2", 8) == [0, 1, 1, 1, 0, 1, 1, 1]
    assert moe_layer_pattern("[0, 1,1, 1]", 4) == [0, 1, 1, 1]
    for bad in ("0", "[2,1]", "[True, 1]", "1.5", "[1]*x"):
        with pytest.raises(ConfigError, match="--moe-layer-freq"):
            moe_layer_pattern(bad, 2)


def test_moe_flags_in_a_dense_run_are_named_not_used():
    mock = [*COMMON, "--mock-data", "--vocab-size", "100"]
    c = parse_args([*mock, "--moe-router-topk", "4", "--moe-aux-loss-coeff", "0.1"])
    assert unused_moe_flags(c) == ["--moe-router-topk", "--moe-aux-loss-coeff"]
    assert unused_moe_flags(parse_args([*mock, *MOE])) == []


def test_flops_count_the_active_experts():
    """Megatron-LM's count: each token through top-k experts (and the shared expert). tiny-moe's top-2 experts of
    86 are tiny's 172-wide MLP in FLOPs; MoE in every other layer is halfway to the 4x wider dense MLP."""
    base = ["--mock-data", "--vocab-size", "100", "--global-batch-size", "8"]
    dense = flops_per_iteration(parse_args(["--preset", "tiny", *base]), 128)
    moe = flops_per_iteration(parse_args(["--preset", "tiny-moe", *base]), 128)
    assert math.isclose(moe, dense, rel_tol=1e-12)
    wide = ["--moe-ffn-hidden-size", str(4 * 172), "--moe-router-topk", "2"]  # 2 x 688 = 8 x tiny's MLP width
    every = flops_per_iteration(parse_args(["--preset", "tiny-moe", *base, *wide]), 128)
    half = flops_per_iteration(parse_args(["--preset", "tiny-moe", *base, *wide, "--moe-layer-freq", "2"]), 128)
    assert math.isclose(half - dense, (every - dense) / 2, rel_tol=1e-12)
    shared = flops_per_iteration(parse_args(["--preset", "tiny-moe", *base, "--moe-shared-expert-intermediate-size",
                                             "172"]), 128)
    assert shared > moe


def test_expert_tensor_parallelism_other_than_tp_with_a_shared_expert_resumes_across_layouts(data, tmp_path):
    """A shared expert and the per-sequence balancing loss, with megatron's non-distributed optimizer: a
    one-process checkpoint resumes under TP=2 with SP for the dense parts and EP=2 x ETP=1 for the experts (expert
    TP other than TP; the optimizer chained in two there), and back, with the one-process run's losses and seq
    loss. (From scratch the layouts initialize the experts from other RNG streams, so only a resume compares.)"""
    extra = ["--moe-shared-expert-intermediate-size", "64", "--moe-router-load-balancing-type", "seq_aux_loss"]
    split = ["--make-vocab-size-divisible-by", "64", "--tensor-model-parallel-size", "2", "--sequence-parallel",
             "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
             "--moe-token-dispatcher-type", "alltoall"]  # 64 x TP 2: the one process's padding of 128
    _, one = run_driver(*flags(data, *extra, "--save", tmp_path / "one", "--save-interval", "2"))
    _, two = run_driver(*flags(data, *extra, *split, "--load", tmp_path / "one" / "iter_0000002",
                               "--save", tmp_path / "two", "--save-interval", "1"), nproc=2)
    assert "EP=2 ETP=1" in two and "TP=2" in two
    _, back = run_driver(*flags(data, *extra, "--load", tmp_path / "two" / "iter_0000003"))
    expected = logged_losses(one)
    assert "load_balancing_loss:" not in one.replace("seq_load_balancing_loss:", "")  # the one balancing loss asked for
    for out, iterations in ((two, [3, 4]), (back, [4])):
        got, seq = logged_losses(out), logged(out, "seq_load_balancing_loss")
        assert sorted(got) == iterations and all(close(got[i], expected[i]) for i in got), (expected, got)
        assert all(close(seq[i], logged(one, "seq_load_balancing_loss")[i]) for i in iterations), seq


@pytest.mark.parametrize("balancing, extra, logged_name", [
    ("sinkhorn", ["--moe-router-topk", "1", "--moe-aux-loss-coeff", "0"], None),  # balances by routing: no loss
    ("global_aux_loss", [], "global_load_balancing_loss"),
])
def test_other_balancing_types_train(data, balancing, extra, logged_name):
    _, out = run_driver(*flags(data, "--moe-router-load-balancing-type", balancing, *extra))
    losses = logged_losses(out)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    if logged_name:
        assert sorted(logged(out, logged_name)) == [1, 2, 3, 4]
    assert "load_balancing_loss" not in out.replace(logged_name or "-", "")
