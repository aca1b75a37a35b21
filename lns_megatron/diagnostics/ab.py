"""The summary of a norm-scheme comparison: several arms, several seeds, one table.

``examples/ab_norm_schemes.sh`` (or ``ab_pre_vs_lns.sh``) trains each arm (a norm scheme and an
output-layer init) with several seeds into ``AB_DIR/ARM/seedS``; this reads them back and writes
``AB_DIR/summary/`` (``summary.md``, ``summary.json`` and plots). Before any number is read it checks
that the runs differ in the arm's flags and the seed alone, from their saved ``pretrain_config.json``
-- otherwise the comparison is not one, and it says which flag differs where.

Per run: the driver's last validation loss (TensorBoard ``lm loss validation``) and, on one shared set
of held-out windows (the depth report's seeded random draw), the loss and the depth metrics. Per arm:
the mean and the spread (sample standard deviation, min and max) over the seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from typing import Dict, List

import numpy as np

from lns_megatron.files import atomic_directory
from lns_megatron.training.checkpoint import CheckpointError, latest_checkpoint, load_model, saved_config

# What an arm is; the seed varies within it. Paths and run bookkeeping differ by construction.
ARM_FIELDS = ("norm_scheme", "output_layer_init", "depth_scaled_output_init")
# In a depth-growth study an arm is also its growth schedule, and its iterations (set for equal training FLOPs).
GROWTH_ARM_FIELDS = ("depth_growth", "growth_block_size", "growth_stages", "growth_schedule", "growth_lns_scales",
                     "growth_optimizer_state", "train_iters", "lr_decay_iters", "lr_warmup_iters",
                     "num_layers_per_virtual_pipeline_stage")
PER_RUN_FIELDS = ("seed", "save", "load", "tensorboard_dir", "world_size")
BASELINE = "pre-scaled"  # megatron-core's Pre-LN with its default depth-scaled output init


class ComparisonError(ValueError):
    """The runs do not form a fair comparison, or are missing: the message says which and why."""


def find_runs(root: str) -> Dict[str, Dict[int, str]]:
    """{arm: {seed: run directory}} of ``root/ARM/seedS`` directories that hold a checkpoint."""
    runs: Dict[str, Dict[int, str]] = {}
    for arm in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        for name in sorted(os.listdir(os.path.join(root, arm))):
            path = os.path.join(root, arm, name)
            if name.startswith("seed") and os.path.isdir(os.path.join(path, "ckpt")):
                runs.setdefault(arm, {})[int(name[4:])] = path
    if not runs:
        raise ComparisonError(f"{root}: no runs (ARM/seedS/ckpt directories); run examples/ab_norm_schemes.sh first")
    return runs


def check_fair(configs: Dict[str, Dict[int, dict]]) -> None:
    """Every run has the same flags but for its arm's and its seed."""
    arm0 = next(iter(configs))
    reference = next(iter(configs[arm0].values()))
    growing = any(config.get("depth_growth") for seeds in configs.values() for config in seeds.values())
    fields = ARM_FIELDS + (GROWTH_ARM_FIELDS if growing else ())
    for arm, seeds in configs.items():
        arm_values = {name: next(iter(seeds.values())).get(name) for name in fields}
        for seed, config in seeds.items():
            for name in sorted(set(reference) | set(config)):
                if name in PER_RUN_FIELDS:
                    continue
                mine, theirs = config.get(name), reference.get(name)
                if name in fields:
                    if mine != arm_values[name]:
                        raise ComparisonError(f"{arm}/seed{seed}: --{name.replace('_', '-')} {mine}, but other seeds "
                                              f"of the arm have {arm_values[name]}")
                elif mine != theirs:
                    raise ComparisonError(f"{arm}/seed{seed} differs from {arm0} in more than the norm scheme and "
                                          f"the init: --{name.replace('_', '-')} is {mine} there and {theirs} here; "
                                          "rerun the arms with identical flags")


def last_validation_loss(tensorboard_dir: str) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tensorboard_dir, size_guidance={"scalars": 0})
    acc.Reload()
    if "lm loss validation" not in acc.Tags()["scalars"]:
        raise ComparisonError(f"{tensorboard_dir}: no 'lm loss validation'; train with --eval-interval dividing "
                              "--train-iters and --eval-iters > 0")
    return acc.Scalars("lm loss validation")[-1].value


def validation_curve(tensorboard_dir: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tensorboard_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("lm loss validation")]


def spread(values: List[float]) -> dict:
    values = [float(v) for v in values]
    return dict(mean=float(np.mean(values)), std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                min=min(values), max=max(values), n=len(values), values=values)


def run_metrics(report) -> dict:
    """The numbers of one depth report that the comparison tabulates."""
    half = report.num_layers // 2
    return {
        "held-out loss": report.loss,
        "held-out perplexity": report.perplexity,
        "effective depth": report.effective_depth,
        "output variance, layer 1": report.variance[0],
        "output variance, layer L": report.variance[-1],
        "variance growth, layer 1 -> L": report.variance[-1] / report.variance[0],
        "Δloss on removal, mean over the deeper half": float(np.mean(report.removal_delta_loss[half:])),
        "d(l, l+1), mean over the deeper half": float(np.mean([r[0] for r in report.angular_distance_all_tokens[half:]])),
        "relative contribution, mean over the deeper half": float(np.mean(report.relative_contribution[half:])),
        # the layer-utilization metrics (utilization.py)
        "useful-layer fraction": report.useful_fraction,
        "linear-fit loss ratio, mean over layers": float(np.mean(report.linear_loss_ratio)),
        "causal effect on the next layer, mean over layers": float(np.mean(
            [row[0] for row in report.causal_effect if row])) if report.num_layers > 1 else 0.0,
        "permutation score, mean over adjacent pairs": float(np.mean(report.permutation_score))
        if report.permutation_score else 0.0,
        "Jacobian ||J - I||_F / d, mean over the deeper half": float(np.mean(report.jacobian_deviation[half:])),
        "Jacobian diagonal mean, mean over the deeper half": float(np.mean(report.jacobian_diagonal_mean[half:])),
    }


def summarize(root: str, num_samples: int = 32, seed: int = 4321, device: str = None,
              fit_samples: int = None, jacobian_probes: int = 16) -> dict:
    from lns_megatron.diagnostics import report as depth

    runs = find_runs(root)
    configs = {arm: {s: saved_config(latest_checkpoint(os.path.join(p, "ckpt"))[0]) for s, p in seeds.items()}
               for arm, seeds in runs.items()}
    check_fair(configs)
    first = next(iter(next(iter(runs.values())).values()))
    args = depth.build_parser().parse_args(["--load", os.path.join(first, "ckpt"), "--num-samples", str(num_samples),
                                            "--seed", str(seed)] + (["--device", device] if device else [])
                                           + (["--fit-samples", str(fit_samples)] if fit_samples else []))
    windows, fit_windows, where, per_run, reports = None, None, "", {}, {}
    for arm, seeds in runs.items():
        for s, path in seeds.items():
            loaded = load_model(os.path.join(path, "ckpt"), device=device)
            if windows is None:  # one set of held-out windows for every run
                windows, fit_windows, where = depth.held_out_windows(loaded, args)
                where += (f"; {len(windows)} windows drawn at random (seed {seed}), and {len(fit_windows)} others "
                          "for the linear fits")
            report = depth.analyze(loaded, windows, fit_windows=fit_windows, label=f"{arm} seed {s}",
                                   jacobian_probes=jacobian_probes, seed=seed, data=where)
            reports[(arm, s)] = report
            per_run[f"{arm}/seed{s}"] = dict(arm=arm, seed=s, iteration=loaded.iteration,
                                             validation_loss=last_validation_loss(os.path.join(path, "tb")),
                                             **run_metrics(report))
            del loaded
    arms = {}
    for arm, seeds in runs.items():
        rows = [per_run[f"{arm}/seed{s}"] for s in seeds]
        keys = ["validation_loss"] + list(run_metrics(reports[(arm, next(iter(seeds)))]).keys())
        arms[arm] = {k: spread([r[k] for r in rows]) for k in keys}
        arms[arm]["validation perplexity"] = spread([math.exp(r["validation_loss"]) for r in rows])
        first = configs[arm][next(iter(seeds))]
        arms[arm]["config"] = {k: first.get(k) for k in ARM_FIELDS[:2]} | (
            {k: first.get(k) for k in ("depth_growth", "train_iters")} if first.get("depth_growth") else {})
    reference = next(iter(next(iter(configs.values())).values()))
    return dict(root=os.path.abspath(root), data=where, arms=arms, runs=per_run, baseline=BASELINE,
                setup={k: reference.get(k) for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                                     "num_attention_heads", "seq_length", "global_batch_size",
                                                     "train_iters", "lr", "min_lr", "lr_warmup_iters",
                                                     "weight_decay", "clip_grad", "adam_beta2", "norm_epsilon",
                                                     "data_path", "tokenizer_model", "recipe", "bf16")}
                | {k: reference[k] for k in ("num_experts", "moe_router_topk", "moe_ffn_hidden_size",
                                             "moe_aux_loss_coeff") if reference.get(k)},
                _reports=reports, _curves={k: validation_curve(os.path.join(p, "tb"))
                                           for arm, seeds in runs.items() for s, p in seeds.items()
                                           for k in [(arm, s)]})


def _fmt(stat: dict, digits: int = 4) -> str:
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def markdown(summary: dict) -> str:
    arms = summary["arms"]
    names = list(arms)
    rows = [("validation loss (driver, last iteration)", "validation_loss", 4),
            ("validation perplexity", "validation perplexity", 2),
            ("held-out loss (shared windows)", "held-out loss", 4),
            ("effective depth", "effective depth", 1),
            ("output variance, layer 1", "output variance, layer 1", 4),
            ("output variance, layer L", "output variance, layer L", 4),
            ("variance growth, layer 1 -> L", "variance growth, layer 1 -> L", 1),
            ("Δloss on removal, mean over the deeper half", "Δloss on removal, mean over the deeper half", 4),
            ("d(l, l+1), mean over the deeper half", "d(l, l+1), mean over the deeper half", 4),
            ("relative contribution, mean over the deeper half", "relative contribution, mean over the deeper half", 4),
            ("useful-layer fraction (loss ratio > 1.1 with the layer replaced by its linear fit)",
             "useful-layer fraction", 3),
            ("linear-fit loss ratio, mean over layers", "linear-fit loss ratio, mean over layers", 4),
            ("causal effect on the next layer, mean over layers", "causal effect on the next layer, mean over layers",
             4),
            ("permutation score abs(Δloss) / loss, mean over adjacent pairs", "permutation score, mean over adjacent pairs",
             4),
            ("Jacobian ‖J − I‖_F / d, mean over the deeper half",
             "Jacobian ||J - I||_F / d, mean over the deeper half", 4),
            ("Jacobian diagonal mean, mean over the deeper half", "Jacobian diagonal mean, mean over the deeper half",
             4)]
    seeds = {a: arms[a]["validation_loss"]["n"] for a in names}
    lines = ["# Norm-scheme comparison", "",
             f"Runs: `{summary['root']}`; arms differ in `--norm-scheme` and `--output-layer-init` only"
             + (" (and the growth flags, with `--train-iters` set for equal FLOPs)" if any(
                 a["config"].get("depth_growth") for a in arms.values()) else "")
             + " (checked from each run's pretrain_config.json). Each cell: mean ± sample std (min–max) over the "
             "seeds.", "",
             "Setup: " + ", ".join(f"{k} {v}" for k, v in summary["setup"].items()), "",
             f"Held-out data for the depth metrics: {summary['data']}", "",
             "| | " + " | ".join(f"{a} ({seeds[a]} seeds)" for a in names) + " |",
             "|---" * (len(names) + 1) + "|"]
    lines += ["| " + label + " | " + " | ".join(_fmt(arms[a][key], digits) for a in names) + " |"
              for label, key, digits in rows]
    if BASELINE in arms:
        base = arms[BASELINE]["validation_loss"]
        lines += ["", f"Against the baseline `{BASELINE}` (megatron-core's Pre-LN with its depth-scaled output init):", ""]
        for a in names:
            if a == BASELINE:
                continue
            mine = arms[a]["validation_loss"]
            gap = mine["mean"] - base["mean"]
            noise = max(mine["max"] - mine["min"], base["max"] - base["min"])
            verdict = "exceeds" if abs(gap) > noise else "does not exceed"
            lines.append(f"- `{a}`: validation loss {gap:+.4f} against it; the gap {verdict} the seed range "
                         f"({noise:.4f}).")
    lines += ["", "Plots: ![validation](validation_loss.png) ![variance](variance.png) ![removal](layer_removal.png) "
              "![utilization](linear_fit.png) ![jacobian](jacobian.png)", ""]
    return "\n".join(lines)


def plot(summary: dict, directory: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    configs = {arm: summary["arms"][arm]["config"] for arm in summary["arms"]}
    arms, many = list(configs), len(configs) > 6
    # One color per scheme, one line style per output-layer init: 9 schemes x 2 inits stay readable.
    schemes = sorted({c["norm_scheme"] for c in configs.values()})
    palette = plt.get_cmap("tab10" if len(schemes) <= 10 else "tab20").colors
    color = {a: palette[schemes.index(c["norm_scheme"]) % len(palette)] for a, c in configs.items()}
    style = {a: "--" if c["output_layer_init"] == "plain" else "-" for a, c in configs.items()}
    size, legend = ((9, 5.4), dict(fontsize="x-small", ncol=2)) if many else ((6, 3.6), {})
    reports, curves = summary["_reports"], summary["_curves"]

    fig, ax = plt.subplots(figsize=size)
    for (arm, s), curve in sorted(curves.items()):
        steps, values = zip(*curve)
        ax.plot(steps, values, style[arm], color=color[arm], alpha=0.8, label=arm if s == min(
            x for a, x in curves if a == arm) else None)
    ax.set(title="Validation loss (each seed)", xlabel="iteration", ylabel="lm loss validation")
    ax.legend(**legend)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "validation_loss.png"), dpi=90)
    plt.close(fig)

    for name, attribute, title, ylabel, log in (
            ("variance.png", "variance", "Residual-stream output variance (mean over seeds)", "Var(h_l)", True),
            ("layer_removal.png", "removal_delta_loss", "Layer removal: loss increase (mean over seeds)",
             "Δ loss (nats)", False),
            ("linear_fit.png", "linear_loss_ratio", "Usefulness: loss ratio, layer -> its linear fit (mean over seeds)",
             "loss(linear) / loss", False),
            ("jacobian.png", "jacobian_deviation", "Jacobian ||J - I||_F / d (mean over seeds)", "||J - I||_F / d",
             True)):
        fig, ax = plt.subplots(figsize=size)
        for arm in arms:
            rows = np.array([getattr(r, attribute) for (a, _), r in reports.items() if a == arm])
            x = np.arange(1, rows.shape[1] + 1)
            ax.plot(x, rows.mean(0), "o" + style[arm], color=color[arm], label=arm)
            if len(rows) > 1 and not many:  # seed bands of many arms hide the lines
                ax.fill_between(x, rows.min(0), rows.max(0), color=color[arm], alpha=0.15)
        ax.set(title=title, xlabel="layer", ylabel=ylabel, yscale="log" if log else "linear")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(**legend)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, name), dpi=90)
        plt.close(fig)


def write(summary: dict, output: str) -> str:
    with atomic_directory(output) as partial:
        plot(summary, partial)
        with open(os.path.join(partial, "summary.md"), "w") as f:
            f.write(markdown(summary))
        with open(os.path.join(partial, "summary.json"), "w") as f:
            json.dump({k: v for k, v in summary.items() if not k.startswith("_")}, f, indent=1, allow_nan=False)
    return output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ab_summary", description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="AB_DIR of examples/ab_norm_schemes.sh (ARM/seedS/{ckpt,tb})")
    p.add_argument("--output", help="summary directory (default: RUNS/summary)")
    p.add_argument("--num-samples", type=int, default=32, help="held-out windows for the depth metrics")
    p.add_argument("--fit-samples", type=int, help="other held-out windows for the usefulness metric's linear fits "
                   "(default: --num-samples)")
    p.add_argument("--jacobian-probes", type=int, default=16, help="random probes of the Jacobian estimator")
    p.add_argument("--seed", type=int, default=4321, help="seed of the windows' random draw and the Jacobian probes")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    return p


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    args = build_parser().parse_args(argv)
    from lns_megatron.training import distributed

    try:
        summary = summarize(args.runs, args.num_samples, args.seed, args.device, args.fit_samples,
                            args.jacobian_probes)
        path = write(summary, args.output or os.path.join(args.runs, "summary"))
    except (ComparisonError, CheckpointError, ValueError) as e:
        print(f"ab_summary: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.destroy()
    print(markdown(summary))
    print(f"ab_summary: wrote {path}/{{summary.md, summary.json, validation_loss.png, variance.png, layer_removal.png, "
          "linear_fit.png, jacobian.png}")
    return 0
