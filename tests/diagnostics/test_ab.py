"""examples/ab_pre_vs_lns.sh end to end on tiny runs: arms x seeds through the real launcher and driver,
one summary with the spread over seeds, and the fairness check that refuses arms differing in more
than the norm scheme and the init."""

import json
import os
import shutil
import subprocess

import pytest

from dist_launch import ROOT, script_env
from lns_megatron.diagnostics import ab
from lns_megatron.training.distributed import free_port


def run_ab(script, root, **env):
    """examples/SCRIPT on tiny runs into ``root``, with ``env`` (ARMS, SCHEMES, SEEDS, ...); returns its stdout."""
    env = dict(os.environ, AB_DIR=str(root), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **env)
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", script), "--seq-length", "32",
                           "--max-position-embeddings", "32", "--eval-interval", "2", "--log-interval", "2"],
                          cwd=ROOT, env=script_env(env), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def ab_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    stdout = run_ab("ab_pre_vs_lns.sh", root, ARMS="pre:scaled lns:plain", SEEDS="1 2", NUM_SAMPLES="4",
                    TRAIN_ITERS="4")
    return root, stdout


def test_summary_of_arms_and_seeds(ab_runs):
    root, stdout = ab_runs
    assert sorted(os.listdir(root / "summary")) == ["jacobian.png", "layer_removal.png", "linear_fit.png",
                                                     "summary.json", "summary.md", "validation_loss.png",
                                                     "variance.png"]
    summary = json.load(open(root / "summary" / "summary.json"))
    assert sorted(summary["arms"]) == ["lns-plain", "pre-scaled"]
    assert summary["arms"]["pre-scaled"]["config"] == {"norm_scheme": "pre", "output_layer_init": "scaled"}
    for arm in summary["arms"].values():
        loss = arm["validation_loss"]
        assert loss["n"] == 2 and len(set(loss["values"])) == 2  # the seeds differ
        assert loss["min"] <= loss["mean"] <= loss["max"] and loss["std"] > 0
    runs = summary["runs"]
    assert sorted(runs) == ["lns-plain/seed1", "lns-plain/seed2", "pre-scaled/seed1", "pre-scaled/seed2"]
    assert all(r["iteration"] == 4 for r in runs.values())
    for r in runs.values():  # the layer-utilization metrics, per run and per arm
        assert 0.0 <= r["useful-layer fraction"] <= 1.0 and r["linear-fit loss ratio, mean over layers"] > 0
        assert r["Jacobian ||J - I||_F / d, mean over the deeper half"] > 0
        assert r["causal effect on the next layer, mean over layers"] > 0
    assert summary["arms"]["lns-plain"]["permutation score, mean over adjacent pairs"]["n"] == 2
    md = (root / "summary" / "summary.md").read_text()
    assert "lns-plain (2 seeds)" in md and "Against the baseline `pre-scaled`" in md and "± " in md
    assert "Norm-scheme comparison" in stdout and "useful-layer fraction" in md and "Jacobian" in md


def test_runs_that_differ_in_more_than_the_arm_are_refused(ab_runs, tmp_path):
    root, _ = ab_runs
    shutil.copytree(root, tmp_path / "ab", ignore=shutil.ignore_patterns("summary"))
    iteration = open(tmp_path / "ab" / "lns-plain" / "seed2" / "ckpt" / "latest_checkpointed_iteration.txt").read()
    path = tmp_path / "ab" / "lns-plain" / "seed2" / "ckpt" / f"iter_{int(iteration):07d}" / "pretrain_config.json"
    config = json.load(open(path))
    config["lr"] = 0.5
    json.dump(config, open(path, "w"))
    with pytest.raises(ab.ComparisonError, match="lns-plain/seed2 differs from .* --lr is 0.5 there"):
        ab.summarize(str(tmp_path / "ab"), num_samples=2)


def test_every_scheme_under_one_script(tmp_path):
    """examples/ab_norm_schemes.sh: SCHEMES x INITS arms, with megatron-core's Pre-LN (pre:scaled) always one
    of them, through the real launcher and driver, summarized against it."""
    run_ab("ab_norm_schemes.sh", tmp_path, SCHEMES="peri-lns dyt", INITS="plain", SEEDS="1", NUM_SAMPLES="3",
           TRAIN_ITERS="2")
    summary = json.load(open(tmp_path / "summary" / "summary.json"))
    assert sorted(summary["arms"]) == ["dyt-plain", "peri-lns-plain", "pre-scaled"]
    assert summary["arms"]["dyt-plain"]["config"] == {"norm_scheme": "dyt", "output_layer_init": "plain"}
    assert "Against the baseline `pre-scaled`" in (tmp_path / "summary" / "summary.md").read_text()


def test_plots_of_the_default_eighteen_arms(ab_runs, tmp_path):
    """ab_norm_schemes.sh's default (every scheme x both inits, 18 arms) gets its five plots: the real runs'
    reports and curves, relabelled as 18 arms (a six-color palette once failed here, after the whole A/B)."""
    from lns_megatron.schemes import NORM_SCHEMES

    root, _ = ab_runs
    summary = ab.summarize(str(root), num_samples=2, fit_samples=3, jacobian_probes=2)
    key = next(iter(summary["_reports"]))
    report, curve = summary["_reports"][key], summary["_curves"][key]
    arms, reports, curves = {}, {}, {}
    for scheme in NORM_SCHEMES:
        for init in ("scaled", "plain"):
            arm = f"{scheme}-{init}"
            arms[arm] = {"config": {"norm_scheme": scheme, "output_layer_init": init}}
            for seed in (1, 2):
                reports[(arm, seed)], curves[(arm, seed)] = report, curve
    assert len(arms) == 18
    ab.plot(dict(summary, arms=arms, _reports=reports, _curves=curves), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["jacobian.png", "layer_removal.png", "linear_fit.png",
                                            "validation_loss.png", "variance.png"]


def test_a_growth_study_compares_schedules_and_budgets_as_arms():
    """In a growth study the schedule and --train-iters (set for equal FLOPs) are the arm's; without growth a
    differing --train-iters is refused, and within an arm it always is."""
    base = dict(norm_scheme="lns", output_layer_init="plain", seed=1, lr=1e-3, train_iters=300, depth_growth=None,
                growth_stages=None)
    grown = dict(base, depth_growth="midas", growth_stages=4, train_iters=325)
    ab.check_fair({"lns-plain": {1: base, 2: dict(base, seed=2)}, "lns-plain-midas": {1: grown, 2: dict(grown, seed=2)}})
    with pytest.raises(ab.ComparisonError, match="--train-iters"):
        ab.check_fair({"lns-plain": {1: base}, "lns-plain-long": {1: dict(base, train_iters=325)}})
    with pytest.raises(ab.ComparisonError, match="--train-iters 325, but other seeds of the arm have 300"):
        ab.check_fair({"lns-plain": {1: base}, "lns-plain-midas": {1: dict(grown, train_iters=300),
                                                                   2: dict(grown, seed=2)}})
