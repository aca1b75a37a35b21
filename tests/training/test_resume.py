"""Resuming, on CPU through torchrun with real megatron-core checkpoints: the distributed optimizer saves and
resumes exactly (train and validation losses), across data-parallel sizes and, in its fully reshardable
form, across TP; a switch of optimizer kind is refused unless --no-load-optim; a resume is compared with
the checkpoint (architecture, tokenizer, schedule) and a finished run is extended for more tokens."""

import json
import math
import os
import shutil

import pytest

from driver import (COMMON, data_flags, learnable_documents, logged, logged_losses, read_tensorboard, resume_error,
                    run_driver, validation_losses, write_dataset)
from lns_megatron.config import parse_args
from lns_megatron.training.train import prepare_resume

DIST_OPT = ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"]
RTOL = 1e-5  # float32 losses of the same samples reduced in another order (DP=2 against one process, TP=2)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_flags(write_dataset(str(tmp_path_factory.mktemp("data") / "cycle_text_document"),
                                    learnable_documents()))


def flags(data, *extra):
    return [*COMMON, *data, "--global-batch-size", "8", "--lr", "1e-3", "--lr-warmup-iters", "1",
            "--lr-decay-iters", "6", "--seed", "7",
            "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "2", *extra]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """DP=2 with the distributed optimizer (default dp_reshardable state), 6 iterations, saved at 3 and 6."""
    root = tmp_path_factory.mktemp("reference")
    _, out = run_driver(*flags(data, *DIST_OPT, "--train-iters", "6", "--save", root / "ckpt", "--save-interval", "3",
                               "--depth-log-interval", "3", "--tensorboard-dir", root / "tb"), nproc=2)
    return dict(ckpt=root / "ckpt", out=out, losses=logged_losses(out), valid=validation_losses(out),
                tb=read_tensorboard(root / "tb"))


def close(a, b):
    return math.isclose(a, b, rel_tol=RTOL)


def test_reference_run_saves_with_the_distributed_optimizer(reference):
    assert sorted(reference["losses"]) == list(range(1, 7)) and sorted(reference["valid"]) == [3, 6]
    assert sorted(os.listdir(reference["ckpt"])) == ["iter_0000003", "iter_0000006", "latest_checkpointed_iteration.txt"]
    assert reference["out"].count("saved checkpoint to ") == 2
    grad_norms = [reference["tb"][f"depth/grad-norm/layer_{l:03d}"][-1] for l in range(1, 5)]
    assert all(g > 0 and math.isfinite(g) for g in grad_norms), grad_norms  # reduced over the optimizer shards


def distcp_bytes(directory):
    """Bytes of each rank's torch_dist data file (``__<rank>_0.distcp``)."""
    return {int(f.split("_")[2]): os.path.getsize(os.path.join(directory, f))
            for f in os.listdir(directory) if f.endswith(".distcp")}


def test_parallel_save_spreads_the_replicated_weights(data, reference, tmp_path):
    """The reference run saved with the default fully parallel save: the weights both DP ranks hold are
    written once, split between them. --no-ckpt-fully-parallel-save writes them all from rank 0."""
    parallel = distcp_bytes(reference["ckpt"] / "iter_0000003")
    run_driver(*flags(data, *DIST_OPT, "--train-iters", "3", "--save", tmp_path / "rank0",
                      "--no-ckpt-fully-parallel-save"), nproc=2)
    from_rank0 = distcp_bytes(tmp_path / "rank0" / "iter_0000003")
    assert sorted(parallel) == sorted(from_rank0) == [0, 1]
    assert min(parallel.values()) / max(parallel.values()) > 0.8, parallel
    assert from_rank0[1] / from_rank0[0] < 0.7, from_rank0  # rank 1: its optimizer shard only
    assert abs(sum(parallel.values()) - sum(from_rank0.values())) / sum(from_rank0.values()) < 0.05


def test_resume_at_dp2_is_exact(data, reference, tmp_path):
    """Save at N, resume to 2N: the same train and validation losses as the run that never stopped (read
    with the fully parallel load: each tensor read by one rank, then exchanged)."""
    _, out = run_driver(*flags(data, *DIST_OPT, "--train-iters", "6", "--load", reference["ckpt"] / "iter_0000003",
                               "--ckpt-fully-parallel-load", "--save", tmp_path / "resumed"), nproc=2)
    losses, valid = logged_losses(out), validation_losses(out)
    assert sorted(losses) == [4, 5, 6]
    assert all(losses[i] == reference["losses"][i] for i in losses), (losses, reference["losses"])
    assert valid == {6: reference["valid"][6]}  # validation resumes where the uninterrupted run was


def test_dp2_state_resumes_on_one_process(data, reference, tmp_path):
    """dp_reshardable state reshards across data-parallel sizes."""
    _, out = run_driver(*flags(data, *DIST_OPT, "--train-iters", "6", "--load", reference["ckpt"] / "iter_0000003",
                               "--save", tmp_path / "resumed"))
    losses = logged_losses(out)
    assert sorted(losses) == [4, 5, 6] and all(close(losses[i], reference["losses"][i]) for i in losses), losses
    assert close(validation_losses(out)[6], reference["valid"][6])


def test_virtual_pipeline_saves_and_resumes_exactly(data, tmp_path):
    """PP=2 x VPP=2 with the plain optimizer: each rank holds two model chunks whose layers have the same
    chunk-local names; every chunk's optimizer state is saved (not only the last chunk's), the resume is
    exact, and the checkpoint reshards onto one process."""
    vpp = ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
    _, out = run_driver(*flags(data, *vpp, "--train-iters", "4", "--save", tmp_path / "ckpt", "--save-interval", "2"),
                        nproc=2)
    whole = logged_losses(out)
    _, out = run_driver(*flags(data, *vpp, "--train-iters", "4", "--load", tmp_path / "ckpt" / "iter_0000002",
                               "--save", tmp_path / "resumed"), nproc=2)
    losses = logged_losses(out)
    assert sorted(losses) == [3, 4] and all(losses[i] == whole[i] for i in losses), (losses, whole)
    _, out = run_driver(*flags(data, "--train-iters", "4", "--load", tmp_path / "ckpt" / "iter_0000002",
                               "--save", tmp_path / "one"))
    losses = logged_losses(out)
    assert sorted(losses) == [3, 4] and all(close(losses[i], whole[i]) for i in losses), (losses, whole)


def test_switching_optimizer_kind_needs_no_load_optim(data, reference, tmp_path):
    """DP=2 distributed-optimizer state -> one process without it, and the reverse: megatron-core cannot map
    Adam state between the two, so it is refused, and --no-load-optim loads weights, iteration and schedule."""
    load = reference["ckpt"] / "iter_0000003"
    error = resume_error(*flags(data, "--train-iters", "6", "--load", load))
    assert "--use-distributed-optimizer: checkpoint True, now False" in error and "--no-load-optim" in error
    _, out = run_driver(*flags(data, "--train-iters", "4", "--load", load, "--no-load-optim", "--save", tmp_path / "a"))
    assert "fresh Adam state (--no-load-optim)" in out
    assert close(logged_losses(out)[4], reference["losses"][4])  # same weights, data position and schedule
    assert close(logged(out, "learning rate")[4], logged(reference["out"], "learning rate")[4])

    run_driver(*flags(data, "--train-iters", "3", "--save", tmp_path / "plain"))  # one process, no DistOpt
    error = resume_error(*flags(data, *DIST_OPT, "--train-iters", "4", "--load", tmp_path / "plain"))
    assert "--use-distributed-optimizer: checkpoint False, now True" in error and "--no-load-optim" in error
    _, out = run_driver(*flags(data, *DIST_OPT, "--train-iters", "4", "--load", tmp_path / "plain", "--no-load-optim",
                               "--save", tmp_path / "b"), nproc=2)
    assert close(logged_losses(out)[4], reference["losses"][4])


def test_fully_reshardable_state_resumes_at_another_tp(data, reference, tmp_path, monkeypatch):
    # The padded vocabulary must keep its rows: 64 x TP 2 = the checkpoint's 128 x TP 1.
    tp2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--make-vocab-size-divisible-by", "64"]
    error = resume_error(*flags(data, *DIST_OPT, *tp2, "--train-iters", "6", "--load", reference["ckpt"]),
                         world_size=2, monkeypatch=monkeypatch)
    assert "saved per data-parallel shard" in error and "--tensor-model-parallel-size: checkpoint 1, now 2" in error
    assert "--dist-ckpt-optim-fully-reshardable" in error
    run_driver(*flags(data, *DIST_OPT, "--dist-ckpt-optim-fully-reshardable", "--train-iters", "3",
                      "--save", tmp_path / "full"), nproc=2)
    _, out = run_driver(*flags(data, *DIST_OPT, *tp2, "--train-iters", "5", "--load", tmp_path / "full",
                               "--save", tmp_path / "tp2"), nproc=2)
    losses = logged_losses(out)
    assert sorted(losses) == [4, 5] and all(math.isclose(losses[i], reference["losses"][i], rel_tol=1e-4)
                                            for i in losses), (losses, reference["losses"])


def copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "pretrain_config.json")
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))
    return dst


@pytest.mark.parametrize("flag, value, expected", [
    ("--norm-scheme", "pre", "holds another model or tokenizer: --norm-scheme: checkpoint lns, now pre"),
    ("--vocab-size", "640", "tokenizer (--tokenizer-model, --vocab-size): checkpoint NullTokenizer, vocabulary 64, now "
                            "NullTokenizer, vocabulary 641 (vocabulary 64 vs 641)"),
    ("--num-query-groups", "2", "--num-query-groups: checkpoint 4, now 2"),
    ("--normalization", "LayerNorm", "--normalization: checkpoint RMSNorm, now LayerNorm"),
    ("--make-vocab-size-divisible-by", "64", "the vocabulary is padded to 128 rows in the checkpoint and to 64 now"),
], ids=["norm-scheme", "vocab", "gqa", "normalization", "padding"])
def test_resume_with_another_model_is_refused(data, reference, flag, value, expected):
    error = resume_error(*flags(data, *DIST_OPT, "--train-iters", "6", "--load", reference["ckpt"], flag, value))
    assert expected in error
    assert "--use-checkpoint-args" in error or flag == "--make-vocab-size-divisible-by"


def test_resume_compares_tokenizer_and_reports_data_changes(data, reference, tmp_path):
    saved = json.load(open(reference["ckpt"] / "iter_0000006" / "pretrain_config.json"))
    other = dict(saved["tokenizer_identity"], eod=7)
    ckpt = copy_with_config(reference["ckpt"] / "iter_0000006", tmp_path / "other_tok", tokenizer_identity=other,
                            apply_layernorm_1p=True)
    error = resume_error(*flags(data, *DIST_OPT, "--train-iters", "6", "--load", ckpt))
    assert "--apply-layernorm-1p: checkpoint True, now False" in error
    assert "--eod-id: checkpoint 7, now 63" in error
    c = parse_args(flags(data, *DIST_OPT, "--train-iters", "6", "--load", str(reference["ckpt"]), "--split", "80,20,0"))
    _, _, notices = prepare_resume(c)
    assert notices == ["--split: checkpoint 90,10,0, now 80,20,0"]


def test_use_checkpoint_args_takes_model_flags(data, reference):
    c = parse_args(flags(data, *DIST_OPT, "--train-iters", "6", "--load", str(reference["ckpt"]), "--use-checkpoint-args",
                         "--num-layers", "8", "--norm-scheme", "pre"))
    prepare_resume(c)
    assert (c.num_layers, c.norm_scheme) == (4, "lns")


def test_extend_a_finished_run(data, reference, tmp_path):
    """A run finished at 6 (cosine to lr 0) continued to 8: refused until the schedule is chosen; then
    --override-opt_param-scheduler trains at lr > 0 and --use-checkpoint-opt_param-scheduler keeps lr 0."""
    longer = ["--train-iters", "8", "--lr-decay-iters", "8"]
    error = resume_error(*flags(data, *DIST_OPT, *longer, "--load", reference["ckpt"]))
    assert "--lr-decay-iters (default: --train-iters): checkpoint 6, now 8" in error
    assert "--override-opt_param-scheduler" in error and "--use-checkpoint-opt_param-scheduler" in error
    # What a user types first, a larger --train-iters alone (the decay follows it by default): refused too.
    argv = flags(data, *DIST_OPT, "--train-iters", "8", "--load", reference["ckpt"])
    at = argv.index("--lr-decay-iters")
    assert resume_error(*argv[:at], *argv[at + 2:]) == error
    assert logged(reference["out"], "learning rate")[6] == 0.0
    _, out = run_driver(*flags(data, *DIST_OPT, *longer, "--load", reference["ckpt"], "--override-opt_param-scheduler",
                               "--save", tmp_path / "more"))
    lr, losses = logged(out, "learning rate"), logged_losses(out)
    # The log shows the rate set for the next iteration: 8 trains at lr[7] > 0, and the new decay ends at 8.
    assert sorted(lr) == [7, 8] and lr[7] > 0 and lr[8] == 0.0 and all(math.isfinite(v) for v in losses.values())
    _, out = run_driver(*flags(data, *DIST_OPT, "--train-iters", "7", "--lr-decay-iters", "8", "--load", reference["ckpt"],
                               "--use-checkpoint-opt_param-scheduler", "--save", tmp_path / "kept"))
    assert logged(out, "learning rate") == {7: 0.0}
    assert "iterations 7..7 are past the end of the learning-rate decay (iteration 6): they train at --min-lr 0" in out


def test_finetune_loads_weights_only(data, reference, tmp_path):
    _, out = run_driver(*flags(data, "--train-iters", "2", "--load", reference["ckpt"], "--finetune",
                               "--save", tmp_path / "ft"))
    losses = logged_losses(out)
    assert "weights only (--finetune)" in out and sorted(losses) == [1, 2]
    assert losses[1] < reference["losses"][1]  # it starts from the trained weights
    assert open(tmp_path / "ft" / "latest_checkpointed_iteration.txt").read() == "2"


def test_no_load_rng_keeps_this_processs_random_state(reference):
    """--no-load-rng: the checkpoint's RNG states are not restored; without it they are, identically."""
    import torch

    from lns_megatron.training import distributed
    from lns_megatron.training.checkpoint import load_checkpoint, load_model

    try:
        model = load_model(str(reference["ckpt"]), device="cpu").model  # weights only (its own load skips RNG)
        torch.manual_seed(999)
        before = torch.get_rng_state()
        load_checkpoint(str(reference["ckpt"]), [model], load_rng=False)
        assert torch.equal(torch.get_rng_state(), before)
        load_checkpoint(str(reference["ckpt"]), [model], load_rng=True)
        restored = torch.get_rng_state()
        assert not torch.equal(restored, before)
        torch.manual_seed(5)
        load_checkpoint(str(reference["ckpt"]), [model], load_rng=True)
        assert torch.equal(torch.get_rng_state(), restored)
    finally:
        distributed.destroy()
