"""Depth growth (training/growth.py, tools/grow_depth.py, --depth-growth) on real megatron-core checkpoints:
the operators against their definitions written out, copied tensors against their sources read back from the
files, function preservation, the schedule against its formula, exact resumes across a growth, TP=2 and PP=2,
and one line per bad input."""

import math
import subprocess
import sys

import pytest
import torch

from dist_launch import ROOT
from driver import COMMON, MOCK, driver_env, logged_losses, read_tensorboard, resume_error, run_driver
from lns_megatron.config import ConfigError
from lns_megatron.training import growth

TINY = [*COMMON, *MOCK, "--micro-batch-size", "2", "--log-interval", "1"]


# ------------------------------------------------------------------------------------------ operators


def test_midas_copies_the_middle_block_after_itself():
    # 8 layers in blocks of 2: n = 4 blocks, the middle one is block ceil(4/2) = 2, layers 3-4 (1-based).
    assert growth.layer_sources("midas", 8, 2) == ([0, 1, 2, 3, 2, 3, 4, 5, 6, 7], [False] * 4 + [True] * 2 + [False] * 4)
    # n = 3 blocks: block ceil(3/2) = 2, layers 3-4 of 6.
    assert growth.layer_sources("midas", 6, 2)[0] == [0, 1, 2, 3, 2, 3, 4, 5]
    assert growth.layer_sources("midas", 4, 4)[0] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_stack_and_identity():
    assert growth.layer_sources("stack", 3, None) == ([0, 1, 2, 0, 1, 2], [False] * 3 + [True] * 3)
    assert growth.layer_sources("identity", 4, 2) == ([0, 1, 1, 2, 3, 3], [False, False, True, False, False, True])


def test_stage_depths_and_boundaries_match_the_formula():
    assert growth.stage_depths("midas", 12, 4, 2) == [6, 8, 10, 12]
    assert growth.stage_depths("stack", 12, 3, None) == [3, 6, 12]
    assert growth.stage_depths("identity", 9, 2, 2) == [6, 9]
    for stages, alpha, iters in ((4, 1.0, 100), (3, 0.5, 37), (2, 2.0, 1000)):
        total = sum(i ** alpha for i in range(1, stages + 1))
        expected = [math.floor(iters * sum(j ** alpha for j in range(1, i + 1)) / total) for i in range(1, stages)]
        assert growth.stage_boundaries(iters, stages, alpha) == expected
    assert growth.stage_boundaries(100, 4, 1.0) == [10, 30, 60]  # 1:2:3:4


@pytest.mark.parametrize("call, words", [
    (lambda: growth.layer_sources("midas", 6, 4), "--growth-block-size 4"),
    (lambda: growth.stage_depths("midas", 10, 4, 4), "--num-layers 10 is not reachable"),
    (lambda: growth.stage_depths("stack", 12, 4, None), "multiple of 8"),
    (lambda: growth.parse_schedule("linear"), "--growth-schedule 'linear'"),
    (lambda: growth.stage_boundaries(3, 4, 1.0), "a stage would last no iteration"),
])
def test_bad_growth_arguments_get_one_line(call, words):
    with pytest.raises(ConfigError) as e:
        call()
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, words", [
    (["--depth-growth", "midas", "--growth-block-size", "3", "--growth-stages", "2"], "--growth-block-size 3"),
    (["--depth-growth", "midas", "--growth-block-size", "2", "--growth-stages", "3"], "not reachable"),
    (["--depth-growth", "midas", "--growth-block-size", "2"], "--growth-stages K >= 2"),
    (["--depth-growth", "stack", "--growth-stages", "2", "--norm-scheme", "mix"], "Mix-LN"),
    (["--depth-growth", "stack", "--growth-stages", "2", "--norm-scheme", "deepnorm"], "deepnorm: its residual scale"),
    (["--depth-growth", "identity", "--growth-block-size", "1", "--growth-stages", "2", "--norm-scheme", "post"],
     "do not make a layer the identity"),
    (["--depth-growth", "stack", "--growth-stages", "2", "--save", None], "needs --save"),
    (["--depth-growth", "stack", "--growth-stages", "2", "--pipeline-model-parallel-size", "4"],
     "stage 1 has 2 layers, which do not split over the 4 pipeline chunks"),
])
def test_driver_refuses_bad_growth_flags_in_one_line(argv, words, tmp_path, monkeypatch):
    save = ["--save", str(tmp_path / "ckpt")] if None not in argv else []
    argv = [a for a in argv if a is not None and a != "--save"]
    world = 4 if "4" in argv else 1
    message = resume_error(*COMMON, *MOCK, "--train-iters", "8", *save, *argv, world_size=world,
                           monkeypatch=monkeypatch)
    assert words in message and "\n" not in message, message


# ------------------------------------------------------------------------------------------ grow_depth


def train(tmp_path, name, *flags):
    """3 iterations of a 5-iteration schedule, saved."""
    save = tmp_path / name
    run_driver(*TINY, "--train-iters", "5", "--exit-interval", "3", "--save", save, *flags)
    return save


def grow(load, save, *flags, expect_ok=True):
    proc = subprocess.run([sys.executable, "tools/grow_depth.py", "--load", load, "--save", save, *map(str, flags)],
                          cwd=ROOT, env=driver_env(), capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == expect_ok, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def tensors(save):
    """Every tensor of a checkpoint, read back by torch's DCP reader (megatron-core stacks the layers)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    directory = sorted(save.glob("iter_*"))[-1]
    dcp_to_torch_save(str(directory), str(directory) + ".pt")
    return {k: v for k, v in torch.load(str(directory) + ".pt", weights_only=False).items()
            if isinstance(v, torch.Tensor)}


def assert_copied(old, new, sources, copies, zeroed=()):
    """Each layer tensor of ``new`` (weights, Adam moments, main weights) equals its source's in ``old``."""
    layer_keys = [k for k in new if ".layers." in k and new[k].dim() > 0 and new[k].shape[0] == len(sources)]
    assert any(k.startswith("optimizer.state.exp_avg.") for k in layer_keys), sorted(new)
    for key in layer_keys:
        for j, (s, copy) in enumerate(zip(sources, copies)):
            zero = copy and any(key.endswith(z) for z in zeroed) and ".exp_avg" not in key
            expected = torch.zeros_like(old[key][s]) if zero else old[key][s]
            assert torch.equal(new[key][j], expected), (key, j, s)
    for key in set(new) - set(layer_keys):  # embeddings, final norm, output layer and their Adam state
        if key in old and old[key].shape == new[key].shape:
            assert torch.equal(new[key], old[key]), key


def logits(save, depths=None):
    code = f"""
import torch
from lns_megatron.training.checkpoint import load_model
m = load_model({str(save)!r}).model
torch.manual_seed(0)
tokens = torch.randint(0, 100, (2, 32))
with torch.no_grad():
    out = m(tokens, torch.arange(32).unsqueeze(0).expand(2, -1), None)
torch.save((out, [getattr(l, 'lns_scale', 1.0) for l in m.decoder.layers]), {str(save) + '.logits'!r})
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=driver_env(), check=True, capture_output=True)
    return torch.load(str(save) + ".logits")


def test_identity_growth_preserves_the_function_and_copies_every_tensor(tmp_path):
    old = train(tmp_path, "pre", "--norm-scheme", "pre", "--output-layer-init", "scaled")
    out = grow(old, tmp_path / "grown", "--operator", "identity", "--block-size", "2")
    assert "identity: 4 -> 6 layers, 2 copied to 3; 4 copied to 6" in out and "--num-layers 6" in out
    sources, copies = growth.layer_sources("identity", 4, 2)
    assert_copied(tensors(old), tensors(tmp_path / "grown"), sources, copies,
                  zeroed=("linear_proj.weight", "linear_fc2.weight", "linear_proj.bias", "linear_fc2.bias"))
    before, _ = logits(old)
    after, _ = logits(tmp_path / "grown")
    assert torch.equal(before, after)  # float32: the zeroed branches add exact zeros
    # The grown checkpoint resumes with the driver: same iteration, data position, schedule.
    _, log = run_driver(*TINY, "--train-iters", "5", "--norm-scheme", "pre", "--output-layer-init", "scaled",
                        "--num-layers", "6", "--load", tmp_path / "grown", "--save", tmp_path / "resumed")
    assert sorted(logged_losses(log)) == [4, 5] and "6 layers x 64" in log


def test_identity_growth_of_lns_by_position_and_inherit(tmp_path):
    """LNS's 1/sqrt(l) moves with a layer's place: identity growth by position changes the function; inherit
    keeps every layer's l, recorded in the checkpoint, and the function with it (and it survives export)."""
    old = train(tmp_path, "lns", "--norm-scheme", "lns")
    grow(old, tmp_path / "position", "--operator", "identity", "--block-size", "2")
    grow(old, tmp_path / "inherit", "--operator", "identity", "--block-size", "2", "--lns-scales", "inherit")
    before, _ = logits(old)
    moved, scales = logits(tmp_path / "position")
    kept, kept_scales = logits(tmp_path / "inherit")
    assert scales == pytest.approx([1 / math.sqrt(l) for l in range(1, 7)])
    assert kept_scales == pytest.approx([1 / math.sqrt(l) for l in (1, 2, 2, 3, 4, 4)])
    assert torch.equal(kept, before)
    assert (moved - before).abs().max() > 1e-3  # measured in docs/growth.md
    # Export (folded) keeps the inherited scales: the Hugging Face model computes the grown model's logits.
    from transformers import LlamaForCausalLM

    subprocess.run([sys.executable, "tools/export_hf.py", "--load", tmp_path / "inherit", "--output",
                    tmp_path / "hf"], cwd=ROOT, env=driver_env(), check=True, capture_output=True)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    torch.manual_seed(0)
    tokens = torch.randint(0, 100, (2, 32))
    with torch.no_grad():
        exported = hf(tokens).logits
    torch.testing.assert_close(exported, kept[..., :exported.shape[-1]], rtol=1e-4, atol=1e-4)


def test_midas_growth_of_the_distributed_optimizer_and_reset(tmp_path):
    old = train(tmp_path, "dist", "--norm-scheme", "lns", "--use-distributed-optimizer", "--bf16",
                "--dist-ckpt-optim-fully-reshardable")
    grow(old, tmp_path / "copy", "--operator", "midas", "--block-size", "2")
    sources, copies = growth.layer_sources("midas", 4, 2)
    before, grown = tensors(old), tensors(tmp_path / "copy")
    assert any(k.startswith("optimizer.state.param.") for k in grown)  # the fp32 main weights, copied too
    assert_copied(before, grown, sources, copies)
    grow(old, tmp_path / "reset", "--operator", "midas", "--block-size", "2", "--optimizer-state", "reset")
    reset = tensors(tmp_path / "reset")
    for key, value in reset.items():
        if key.startswith("optimizer.state.exp_avg"):
            assert not value.any(), key
        elif key.startswith("optimizer.state.param.") and ".layers." in key:
            assert torch.equal(value, grown[key]), key
    # A checkpoint saved per data-parallel shard has no per-layer Adam state: refused in one line.
    shard = train(tmp_path, "per_shard", "--norm-scheme", "lns", "--use-distributed-optimizer")
    out = grow(shard, tmp_path / "no", "--operator", "stack", expect_ok=False)
    assert "dp_reshardable" in out and "--dist-ckpt-optim-fully-reshardable" in out
    assert not (tmp_path / "no").exists()


def test_grow_depth_refuses_in_one_line(tmp_path):
    mix = train(tmp_path, "mix", "--norm-scheme", "mix")
    out = grow(mix, tmp_path / "out", "--operator", "stack", expect_ok=False)
    assert out.count("grow_depth: error:") == 1 and "Mix-LN" in out
    pre = train(tmp_path, "pre", "--norm-scheme", "pre")
    for flags, words in ((["--operator", "midas", "--block-size", "3"], "--growth-block-size 3"),
                         (["--operator", "stack"], "is the checkpoint being grown")):
        target = pre if "stack" in flags else tmp_path / "out"
        out = grow(pre, target, *flags, expect_ok=False)
        assert out.count("grow_depth: error:") == 1 and words in out, out


# ------------------------------------------------------------------------------------------ --depth-growth


GROWTH = ["--norm-scheme", "lns", "--num-layers", "4", "--train-iters", "6", "--depth-growth", "midas",
          "--growth-block-size", "2", "--growth-stages", "2"]  # 2 -> 4 layers after iteration 2 (prop-1: 1:2)


def test_in_run_growth_resumes_exactly_before_and_after_the_growth(tmp_path):
    _, whole = run_driver(*TINY, *GROWTH, "--save", tmp_path / "whole", "--depth-log-interval", "1",
                          "--tensorboard-dir", tmp_path / "tb")
    assert "depth growth (midas, prop-1): 2 -> 4 layers, growing after iterations 2;" in whole
    assert "lns-pretrain: depth growth at iteration 2: midas: 2 -> 4 layers, 1-2 copied to 3-4" in whole
    losses = logged_losses(whole)
    assert sorted(losses) == list(range(1, 7))
    # The depth scalars go on with the new layer count; the FLOPs follow the depth.
    board = read_tensorboard(tmp_path / "tb")
    assert len(board["depth/variance/layer_001"]) == 6 and len(board["depth/variance/layer_004"]) == 4, sorted(board)
    tflops = [float(x) for x in __import__("re").findall(r"TFLOP/s/GPU\): (\S+) \|", whole)]
    assert len(tflops) == 6
    for stop in (2, 4):  # at the boundary (its checkpoint is the 2-layer one) and in the grown stage
        save = tmp_path / f"stop{stop}"
        run_driver(*TINY, *GROWTH, "--save", save, "--exit-interval", stop)
        _, rest = run_driver(*TINY, *GROWTH, "--save", save, "--load", save)
        resumed = logged_losses(rest)
        assert sorted(resumed) == list(range(stop + 1, 7))
        assert all(resumed[i] == losses[i] for i in resumed), (stop, resumed, losses)


STACK_8 = ["--norm-scheme", "lns", "--num-layers", "8", "--train-iters", "6", "--depth-growth", "stack",
           "--growth-stages", "2", "--global-batch-size", "4"]  # 4 -> 8 layers after iteration 2 (2 micro-batches)


@pytest.mark.parametrize("growth_flags, layout", [
    (GROWTH, ["--tensor-model-parallel-size", "2"]),
    (GROWTH, ["--pipeline-model-parallel-size", "2"]),
    (STACK_8, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"]),
], ids=["tp2", "pp2", "pp2-vpp2"])
def test_in_run_growth_at_tp2_and_pp2_matches_one_process(tmp_path, growth_flags, layout):
    """The boundary's checkpoint (2 layers, one process) grown and trained on at TP=2 or PP=2, against the same
    in one process: the grown load reshards (a PP=2 stage holds copies of layers another stage saved)."""
    import shutil

    flags = [*TINY, *growth_flags, "--use-distributed-optimizer", "--make-vocab-size-divisible-by", "64"]
    run_driver(*flags, "--save", tmp_path / "one", "--exit-interval", "2")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    _, one = run_driver(*flags, "--save", tmp_path / "one", "--load", tmp_path / "one")
    _, two = run_driver(*flags[:-1], "32" if "--tensor-model-parallel-size" in layout else "64", *layout,
                        "--save", tmp_path / "two", "--load", tmp_path / "two", nproc=2)
    assert f"depth growth at iteration 2: {growth_flags[growth_flags.index('--depth-growth') + 1]}: " in two
    a, b = logged_losses(one), logged_losses(two)
    assert sorted(a) == sorted(b) == list(range(3, 7))
    for i in a:
        assert b[i] == pytest.approx(a[i], rel=1e-5), (i, a, b)
