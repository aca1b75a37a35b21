"""Depth report: does each layer of a trained checkpoint still do work? (The curse of depth.)

On held-out tokens, for a checkpoint of any TP/PP layout (resharded by dist_checkpointing into
one TP=PP=1 model in this process), it measures per layer ``l`` (1-based; ``h_0`` is the
embedding output, ``h_l`` the output of layer ``l``, before the final norm):

- the residual stream's variance and mean L2 norm (Pre-LN: grows with depth; LNS: held down);
- the angular distance ``d(l, l+n) = arccos(cos(h_l, h_{l+n})) / pi`` for every start ``l`` and
  offset ``n``, on the last token and averaged over all tokens (Gromov et al. 2024);
- the loss and perplexity with layer ``l`` skipped (``h_l = h_{l-1}``, nothing fine-tuned);
- the relative contribution ``||h_l - h_{l-1}|| / ||h_{l-1}||``;
- the logit lens ``KL(p_l || p_L)``, with ``p_l = softmax(output_layer(final_norm(h_l)))``;
- the layer-utilization metrics of ``utilization.py``: usefulness (loss ratio with the layer replaced by
  its least-squares linear map, fitted on other held-out windows), causal effect on the later layers,
  permutation sensitivity of adjacent layers, and the Jacobian's deviation from identity.

Losses and logit-lens distributions use the model's full (padded) output vocabulary, as the
training loss does. Outputs: ``report.json`` (every number), PNG plots, ``summary.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import List

import numpy as np
import torch
import torch.nn.functional as F

from lns_megatron.data import metadata
from lns_megatron.files import atomic_directory
from lns_megatron.training.checkpoint import CheckpointError, LoadedModel, load_model
from lns_megatron.diagnostics import utilization
from lns_megatron.diagnostics.surgery import (forward_logits, lens_logits, recorded_hidden_states,  # noqa: F401
                                              skipped_layer, swapped_layers)
from lns_megatron.training.probes import angular_distance

REPORT_FILE = "report.json"
NOISE_MULTIPLE = 2.0  # a layer counts toward the effective depth when its Δloss exceeds this many standard errors
PLOTS = ("variance.png", "angular_distance.png", "layer_removal.png", "contribution.png", "utilization.png",
         "causal_effect.png")


class ReportError(ValueError):
    """Bad input for the report: the message names the input and the fix."""


@dataclass
class DepthReport:
    label: str
    checkpoint: str
    iteration: int
    norm_scheme: str
    num_layers: int
    num_samples: int
    num_tokens: int  # predicted tokens the losses average over
    seq_length: int
    loss: float  # mean cross entropy (nats) of the whole model
    perplexity: float
    # Per layer l = 1..L (index l-1):
    variance: List[float]  # variance of h_l over all elements
    hidden_norm: List[float]  # mean over tokens of ||h_l||
    relative_contribution: List[float]  # mean over tokens of ||h_l - h_{l-1}|| / ||h_{l-1}||
    logit_lens_kl: List[float]  # mean over tokens of KL(p_l || p_L), nats
    removal_loss: List[float]  # loss with layer l skipped
    removal_delta_loss: List[float]  # removal_loss - loss (signed: < 0 means the model is better without it)
    removal_delta_loss_stderr: List[float]  # standard error of removal_delta_loss across the windows
    removal_perplexity: List[float]
    removal_delta_perplexity: List[float]
    # angular_distance_*[l][n-1] = d(l, l+n): l = 0..L-1 (h_0 = embeddings), n = 1..L-l
    angular_distance_all_tokens: List[List[float]]
    angular_distance_last_token: List[List[float]]
    threshold: float
    effective_depth: int  # layers whose removal raises the loss by more than max(threshold, 2 x its stderr)
    effective_layers: List[int] = field(default_factory=list)
    embedding_norm: float = 0.0  # mean ||h_0||
    data: str = ""
    # Layer utilization (utilization.py). Usefulness: the loss with layer l replaced by its least-squares affine
    # map, fitted on fit_tokens tokens of other held-out windows; useful when linear_loss_ratio > useful_ratio.
    fit_tokens: int = 0
    linear_loss: List[float] = field(default_factory=list)
    linear_loss_ratio: List[float] = field(default_factory=list)  # linear_loss / loss
    useful_ratio: float = utilization.USEFUL_LOSS_RATIO
    useful_layers: List[int] = field(default_factory=list)
    useful_fraction: float = 0.0  # len(useful_layers) / num_layers
    # causal_effect[s-1][j]: skipping layer s, mean||Δh_l(skip) - Δh_l|| / mean||Δh_l|| for l = s+1+j
    causal_effect: List[List[float]] = field(default_factory=list)
    # index i: layers i+1 and i+2 swapped; loss(swapped) - loss (signed), its stderr, and |Δ| / loss (the paper's)
    permutation_delta_loss: List[float] = field(default_factory=list)
    permutation_delta_loss_stderr: List[float] = field(default_factory=list)
    permutation_score: List[float] = field(default_factory=list)
    # ||J - I||_F / d and tr(J) / d of each layer, Hutchinson estimates over jacobian_probes Rademacher probes
    jacobian_probes: int = 0
    jacobian_deviation: List[float] = field(default_factory=list)
    jacobian_deviation_stderr: List[float] = field(default_factory=list)
    jacobian_diagonal_mean: List[float] = field(default_factory=list)
    jacobian_diagonal_mean_stderr: List[float] = field(default_factory=list)
    layout: str = field(default="per-layer lists: index i is layer i+1 (1-based, global); angular_distance[l][n-1] "
                        "= arccos(cos(h_l, h_{l+n}))/pi, h_0 = embedding output, h_l = output of layer l")


# ---------------------------------------------------------------------------------------- data


def _draw(total_tokens: int, seq_length: int, num_samples: int, seed: int, source: str,
          fit_samples: int = 0) -> np.ndarray:
    """Start offsets of ``num_samples`` windows of ``seq_length + 1`` tokens and then of ``fit_samples`` more,
    drawn at random (seeded) without overlap from the whole stream, each part in increasing order."""
    width = seq_length + 1
    available = total_tokens // width
    if available == 0:
        raise ReportError(f"{source}: {total_tokens} tokens, fewer than one sample of {width} "
                          f"(--seq-length {seq_length} + 1); give more text or a shorter --seq-length")
    n = min(num_samples, available)
    fit = min(fit_samples, available - n)
    if n < num_samples or fit < fit_samples:
        print(f"depth_report: {source} holds only {n} + {fit} samples of {width} tokens (asked for {num_samples} "
              f"+ {fit_samples} for the linear fits)", flush=True)
    slots = np.random.default_rng(seed).choice(available, size=n + fit, replace=False)
    return np.concatenate([np.sort(slots[:n]), np.sort(slots[n:])]) * width


def _windows(stream: List[int], seq_length: int, num_samples: int, seed: int, source: str,
             fit_samples: int = 0) -> torch.Tensor:
    starts = _draw(len(stream), seq_length, num_samples, seed, source, fit_samples)
    stream = np.asarray(stream, dtype=np.int64)
    return torch.tensor(np.stack([stream[s:s + seq_length + 1] for s in starts]))


def _jsonl_windows(path, json_key, tokenizer, seq_length, num_samples, seed, fit_samples=0):
    if not os.path.isfile(path):
        raise ReportError(f"--input {path}: no such file; give a JSON-lines file with a {json_key!r} field per line")
    stream: List[int] = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[json_key]
            except (ValueError, KeyError, TypeError):
                raise ReportError(f"--input {path}:{number}: not a JSON object with a {json_key!r} field; fix the "
                                  "line or choose the field with --json-key") from None
            try:
                stream += tokenizer.tokenize(text) + [tokenizer.eod]
            except ValueError as e:  # e.g. NullTokenizer text that is not integer ids
                raise ReportError(f"--input {path}:{number}: the {tokenizer.kind} cannot tokenize it ({e})") from None
    return _windows(stream, seq_length, num_samples, seed, f"--input {path}", fit_samples)


def _indexed_windows(prefix, split, seq_length, num_samples, tokenizer, vocab_limit, seed, fit_samples=0):
    from megatron.core.datasets.blended_megatron_dataset_config import convert_split_vector_to_split_matrix

    from lns_megatron.config import ConfigError
    from lns_megatron.data import datasets, metadata

    label = f"--data-path {prefix}"
    try:  # the driver's checks: whole files, this tokenizer (so this EOD), a well-formed --split
        dataset = metadata.open_indexed(prefix, label)
        found = metadata.read_metadata(prefix, label)
        if found is not None:
            metadata.check_metadata_matches(found, dataset, label)
        metadata.check_token_ids(dataset, found, tokenizer, label)
        weights = datasets.parse_split(split) if split is not None else None
    except ConfigError as e:
        raise ReportError(str(e)) from None
    first, last = 0, len(dataset)
    if weights is not None:  # the validation part of the split: the documents training did not see
        bounds = convert_split_vector_to_split_matrix([w / sum(weights) for w in weights])[1]
        if bounds is None:
            raise ReportError(f"--split {split}: the validation split is empty; give it a weight, e.g. --split 0,1,0 "
                              "to use every document")
        first, last = (int(round(b * len(dataset))) for b in bounds)
    # The documents [first, last) as one stream; each window may span documents, as GPTDataset's samples do.
    ends = np.cumsum(dataset.sequence_lengths[first:last].astype(np.int64))
    source = f"--data-path {prefix} (documents {first}..{last})"
    rows = []
    for start in _draw(int(ends[-1]) if len(ends) else 0, seq_length, num_samples, seed, source, fit_samples):
        doc = int(np.searchsorted(ends, start, side="right"))
        offset = int(start - (ends[doc - 1] if doc else 0))
        pieces, need = [], seq_length + 1
        while need:
            piece = dataset.get(first + doc, offset=offset, length=min(need, int(dataset.sequence_lengths[first + doc]) - offset))
            pieces.append(piece.astype(np.int64))
            need -= len(piece)
            doc, offset = doc + 1, 0
        rows.append(np.concatenate(pieces))
    del dataset
    windows = torch.tensor(np.stack(rows))
    if int(windows.max()) >= vocab_limit:
        raise ReportError(f"--data-path {prefix}: token id {int(windows.max())} is outside the model's vocabulary "
                          f"({vocab_limit}); the data was prepared with another tokenizer")
    return windows


def _mock_windows(c, tokenizer, seq_length, num_samples, seed, fit_samples=0):
    """Held-out samples of megatron's MockGPTDataset (what a --mock-data run trained on), drawn at random:
    ``num_samples`` and then ``fit_samples`` others."""
    from lns_megatron.data import datasets

    mock = dataclasses.replace(c, mock_data=True, data_path=None, seq_length=seq_length, train_iters=1,
                               eval_interval=1, eval_iters=1, global_batch_size=4 * (num_samples + fit_samples),
                               seed=seed, split="0,1,0", data_cache_path=None)
    valid = datasets.build_datasets(mock, tokenizer)[1]
    picks = np.random.default_rng(seed).choice(len(valid), size=min(num_samples + fit_samples, len(valid)),
                                               replace=False)
    picks = np.concatenate([np.sort(picks[:num_samples]), np.sort(picks[num_samples:])])
    samples = [valid[int(i)] for i in picks]
    return torch.stack([torch.cat([torch.as_tensor(s["tokens"]), torch.as_tensor(s["labels"])[-1:]])
                        for s in samples]).long()


def held_out_windows(loaded: LoadedModel, args) -> (torch.Tensor, torch.Tensor, str):
    """Held-out token windows ``[n, seq_length + 1]``: ``--num-samples`` to measure on, ``--fit-samples``
    others to fit the usefulness metric's linear maps on, and a description of where they came from."""
    c = loaded.config
    seq = args.seq_length or c.seq_length
    n, fit = args.num_samples, args.num_samples if args.fit_samples is None else args.fit_samples
    if seq > c.max_position_embeddings:
        raise ReportError(f"--seq-length {seq} exceeds the model's --max-position-embeddings "
                          f"{c.max_position_embeddings}; give a shorter --seq-length")
    if args.input:
        windows = _jsonl_windows(args.input, args.json_key, loaded.tokenizer, seq, n, args.seed, fit)
        where = f"--input {args.input} ({loaded.tokenizer.kind})"
    elif args.data_path:
        split = args.split
        if split is None and c.data_path and args.data_path in c.data_path:
            split = c.split  # the run's own data: use its validation split only
        where = f"--data-path {args.data_path}" + (f" (validation part of split {split})" if split else "")
        windows = _indexed_windows(args.data_path, split, seq, n, loaded.tokenizer, loaded.model.vocab_size,
                                   args.seed, fit)
    elif args.mock_data or c.mock_data:
        windows = _mock_windows(c, loaded.tokenizer, seq, n, args.seed, fit)
        where = f"megatron MockGPTDataset (seed {args.seed})"
    elif c.data_path:
        prefix = c.data_path[-1]
        windows = _indexed_windows(prefix, c.split, seq, n, loaded.tokenizer, loaded.model.vocab_size, args.seed, fit)
        where = f"--data-path {prefix} (validation part of split {c.split}, from the run's config)"
    else:
        raise ReportError("no held-out data: give --input FILE.jsonl, --data-path PREFIX or --mock-data")
    fit_tokens = (len(windows) - n) * seq
    if fit_tokens <= c.hidden_size:  # fewer equations than unknowns: the fitted map would interpolate
        raise ReportError(f"--fit-samples {fit}: {max(len(windows) - n, 0)} windows of {seq} tokens beside the "
                          f"{min(n, len(windows))} measured on, fewer tokens than --hidden-size {c.hidden_size} + 1, "
                          "so the usefulness metric's linear maps cannot be fitted; give more held-out text, or "
                          "fewer --num-samples and more --fit-samples")
    return windows[:n], windows[n:], where


# ------------------------------------------------------------------------------------- analysis


@torch.no_grad()
def analyze(loaded: LoadedModel, windows: torch.Tensor, *, fit_windows: torch.Tensor, label: str,
            micro_batch_size: int = 4, threshold: float = 0.01, jacobian_probes: int = 16, seed: int = 4321,
            data: str = "") -> DepthReport:
    """Every metric of the report on ``windows``; the usefulness metric's linear maps are fitted on
    ``fit_windows`` (other held-out windows)."""
    model = loaded.model
    device = next(model.parameters()).device
    L = len(model.decoder.layers)
    if jacobian_probes < 2:
        raise ReportError(f"--jacobian-probes {jacobian_probes}: the estimator's standard error needs at least 2")
    linear_maps, fit_tokens = utilization.fit_linear_maps(model, fit_windows, micro_batch_size)
    causal = utilization.CausalEffect(L)
    jacobian = utilization.JacobianProbes(utilization.rademacher_probes(L, jacobian_probes, linear_maps[0].shape[1],
                                                                        seed))
    linear_nll, swap_nll = [[] for _ in range(L)], [[] for _ in range(L - 1)]
    f64 = dict(dtype=torch.float64, device="cpu")
    total, sumsq, count = torch.zeros(L, **f64), torch.zeros(L, **f64), 0
    norm, contribution, kl = torch.zeros(L, **f64), torch.zeros(L, **f64), torch.zeros(L, **f64)
    ang_all, ang_last = torch.zeros(L + 1, L + 1, **f64), torch.zeros(L + 1, L + 1, **f64)
    window_nll, removal_nll = [], [[] for _ in range(L)]  # per window: what the noise is measured on
    embedding_norm, tokens_seen, samples_seen = 0.0, 0, 0

    def nll(logits, labels):  # [batch]: the summed cross entropy of each window
        return F.cross_entropy(logits.double().flatten(0, 1), labels.flatten(), reduction="none").view(
            labels.shape).sum(1).cpu()

    for start in range(0, len(windows), micro_batch_size):
        batch = windows[start:start + micro_batch_size].to(device)
        tokens, labels = batch[:, :-1], batch[:, 1:]
        with recorded_hidden_states(model) as rec:
            logits = forward_logits(model, tokens)
        states = [h.double().cpu() for h in rec.states]  # L+1 of [s, b, h]
        assert len(states) == L + 1, f"recorded {len(states)} hidden states for {L} layers"
        window_nll.append(nll(logits, labels))
        final_logp = F.log_softmax(logits.double(), dim=-1)
        n_tok = tokens.numel()
        prev_norm = states[0].norm(dim=-1)
        embedding_norm += prev_norm.sum().item()
        for l in range(1, L + 1):
            h, prev = states[l], states[l - 1]
            total[l - 1] += h.sum()
            sumsq[l - 1] += h.square().sum()
            h_norm = h.norm(dim=-1)
            norm[l - 1] += h_norm.sum()
            contribution[l - 1] += ((h - prev).norm(dim=-1) / prev_norm.clamp(min=1e-30)).sum()
            prev_norm = h_norm
            logp = F.log_softmax(lens_logits(model, rec.states[l]).double(), dim=-1)
            kl[l - 1] += (logp.exp() * (logp - final_logp)).sum().item()
        count += states[1].numel()
        for l in range(L):
            for m in range(l + 1, L + 1):
                d = angular_distance(states[l], states[m])  # [s, b]
                ang_all[l, m] += d.sum()
                ang_last[l, m] += d[-1].sum()
        base_deltas = causal.deltas(rec.states)
        causal.add_base(base_deltas)
        for k in range(L):
            with skipped_layer(model, k), recorded_hidden_states(model) as skipped:
                removal_nll[k].append(nll(forward_logits(model, tokens), labels))
            causal.add_skip(k, base_deltas, causal.deltas(skipped.states))
            with utilization.linear_layer(model, k, linear_maps[k]):
                linear_nll[k].append(nll(forward_logits(model, tokens), labels))
        del base_deltas
        for k in range(L - 1):
            with swapped_layers(model, k):
                swap_nll[k].append(nll(forward_logits(model, tokens), labels))
        jacobian.add(model, tokens)
        tokens_seen += n_tok
        samples_seen += tokens.shape[0]

    per_window = tokens_seen / samples_seen
    base = torch.cat(window_nll)
    loss = base.sum().item() / tokens_seen
    removal = [torch.cat(r).sum().item() / tokens_seen for r in removal_nll]
    def stderr_over_windows(variant_nll):  # of the Δloss window by window: the noise a Δloss must exceed
        delta = (torch.cat(variant_nll) - base) / per_window
        return delta.std().item() / math.sqrt(len(delta)) if len(delta) > 1 else float("inf")

    stderr = [stderr_over_windows(r) for r in removal_nll]
    mean = total / count
    delta = [r - loss for r in removal]
    needed = [max(threshold, NOISE_MULTIPLE * e) for e in stderr]
    ang_all /= tokens_seen
    ang_last /= samples_seen
    linear = [torch.cat(r).sum().item() / tokens_seen for r in linear_nll]
    ratio = [x / loss for x in linear]
    useful = [l + 1 for l, r in enumerate(ratio) if r > utilization.USEFUL_LOSS_RATIO]
    swap_delta = [torch.cat(r).sum().item() / tokens_seen - loss for r in swap_nll]
    swap_stderr = [stderr_over_windows(r) for r in swap_nll]
    deviation, deviation_err, diagonal, diagonal_err = jacobian.estimates()
    return DepthReport(
        label=label, checkpoint=loaded.directory, iteration=loaded.iteration, norm_scheme=loaded.config.norm_scheme,
        num_layers=L, num_samples=samples_seen, num_tokens=tokens_seen, seq_length=windows.shape[1] - 1,
        loss=loss, perplexity=math.exp(loss),
        variance=(sumsq / count - mean.square()).tolist(),
        hidden_norm=(norm / tokens_seen).tolist(),
        relative_contribution=(contribution / tokens_seen).tolist(),
        logit_lens_kl=(kl / tokens_seen).tolist(),
        removal_loss=removal, removal_delta_loss=delta, removal_delta_loss_stderr=stderr,
        removal_perplexity=[math.exp(r) for r in removal],
        removal_delta_perplexity=[math.exp(r) - math.exp(loss) for r in removal],
        angular_distance_all_tokens=[ang_all[l, l + 1:].tolist() for l in range(L)],
        angular_distance_last_token=[ang_last[l, l + 1:].tolist() for l in range(L)],
        threshold=threshold, effective_depth=sum(d > n for d, n in zip(delta, needed)),
        effective_layers=[l + 1 for l, (d, n) in enumerate(zip(delta, needed)) if d > n],
        embedding_norm=embedding_norm / tokens_seen, data=data,
        fit_tokens=fit_tokens, linear_loss=linear, linear_loss_ratio=ratio, useful_layers=useful,
        useful_fraction=len(useful) / L, causal_effect=causal.matrix(),
        permutation_delta_loss=swap_delta, permutation_delta_loss_stderr=swap_stderr,
        permutation_score=[abs(d) / loss for d in swap_delta],
        jacobian_probes=jacobian_probes, jacobian_deviation=deviation, jacobian_deviation_stderr=deviation_err,
        jacobian_diagonal_mean=diagonal, jacobian_diagonal_mean_stderr=diagonal_err,
    )


# ---------------------------------------------------------------------------------------- output


def _matrix(rows: List[List[float]]) -> np.ndarray:
    """Ragged d(l, l+n) rows -> an [L, L] array indexed [l, n-1], NaN where l + n > L."""
    out = np.full((len(rows), len(rows)), np.nan)
    for l, row in enumerate(rows):
        out[l, : len(row)] = row
    return out


def plot(reports: List[DepthReport], directory: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange"]
    layers = [np.arange(1, r.num_layers + 1) for r in reports]
    written = []

    def save(fig, name):
        for ax in fig.axes:
            if ax.get_label() != "<colorbar>":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                if ax.images:  # the angular-distance maps index layers on both axes
                    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.tight_layout()
        fig.savefig(os.path.join(directory, name), dpi=90)
        plt.close(fig)
        written.append(name)

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for r, x, color in zip(reports, layers, colors):
        axes[0].plot(x, r.variance, "o-", color=color, label=r.label)
        axes[1].plot(x, r.hidden_norm, "o-", color=color, label=r.label)
    axes[0].set(title="Residual-stream output variance", xlabel="layer", ylabel="Var(h_l)", yscale="log")
    axes[1].set(title="Hidden-state norm", xlabel="layer", ylabel="mean ||h_l||", yscale="log")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    save(fig, "variance.png")

    fig, axes = plt.subplots(2, len(reports), figsize=(4.2 * len(reports), 6.4), squeeze=False)
    for j, r in enumerate(reports):
        for i, (kind, rows) in enumerate((("all tokens", r.angular_distance_all_tokens),
                                          ("last token", r.angular_distance_last_token))):
            ax = axes[i, j]
            m = _matrix(rows)
            image = ax.imshow(m, origin="lower", cmap="viridis", vmin=0.0, vmax=max(0.5, float(np.nanmax(m))),
                              extent=(0.5, r.num_layers + 0.5, -0.5, r.num_layers - 0.5), aspect="auto")
            ax.set(title=f"{r.label}: d(l, l+n), {kind}", xlabel="offset n (layers)", ylabel="start l (0 = embeddings)")
            fig.colorbar(image, ax=ax, fraction=0.046)
    save(fig, "angular_distance.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.8 / len(reports)
    for k, (r, x, color) in enumerate(zip(reports, layers, colors)):
        offset = (k - (len(reports) - 1) / 2) * width
        axes[0].bar(x + offset, r.removal_delta_loss, width, color=color, label=f"{r.label} (loss {r.loss:.3f})",
                    yerr=NOISE_MULTIPLE * np.asarray(r.removal_delta_loss_stderr), capsize=2, ecolor="black")
        axes[1].bar(x + offset, r.removal_delta_perplexity, width, color=color, label=r.label)
    axes[0].axhline(reports[0].threshold, color="gray", linestyle="--", linewidth=1, label="effective-depth threshold")
    axes[0].axhline(0.0, color="black", linewidth=0.8)
    axes[0].set(title=f"Layer removal: loss increase (± {NOISE_MULTIPLE:g} s.e.)", xlabel="removed layer",
                ylabel="Δ loss (nats)")
    axes[1].set(title="Layer removal: perplexity increase", xlabel="removed layer", ylabel="Δ perplexity")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    save(fig, "layer_removal.png")

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for r, x, color in zip(reports, layers, colors):
        axes[0].plot(x, r.relative_contribution, "o-", color=color, label=r.label)
        axes[1].plot(x, r.logit_lens_kl, "o-", color=color, label=r.label)
    axes[0].set(title="Relative contribution", xlabel="layer", ylabel="||h_l - h_{l-1}|| / ||h_{l-1}||")
    axes[1].set(title="Logit lens", xlabel="layer", ylabel="KL(p_l || p_L) (nats)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    save(fig, "contribution.png")

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4))
    for k, (r, x, color) in enumerate(zip(reports, layers, colors)):
        offset = (k - (len(reports) - 1) / 2) * width
        axes[0, 0].plot(x, r.linear_loss_ratio, "o-", color=color,
                        label=f"{r.label} (useful {len(r.useful_layers)} of {r.num_layers})")
        axes[0, 1].bar(x[:-1] + offset, r.permutation_delta_loss, width, color=color, label=r.label,
                       yerr=NOISE_MULTIPLE * np.asarray(r.permutation_delta_loss_stderr), capsize=2, ecolor="black")
        axes[1, 0].errorbar(x, r.jacobian_deviation, yerr=NOISE_MULTIPLE * np.asarray(r.jacobian_deviation_stderr),
                            fmt="o-", color=color, capsize=2, label=r.label)
        axes[1, 1].errorbar(x, r.jacobian_diagonal_mean,
                            yerr=NOISE_MULTIPLE * np.asarray(r.jacobian_diagonal_mean_stderr), fmt="o-", color=color,
                            capsize=2, label=r.label)
    axes[0, 0].axhline(reports[0].useful_ratio, color="gray", linestyle="--", linewidth=1,
                       label=f"useful above {reports[0].useful_ratio:g}")
    axes[0, 0].set(title="Usefulness: loss ratio, layer -> its linear fit", xlabel="layer",
                   ylabel="loss(linear) / loss")
    axes[0, 1].axhline(0.0, color="black", linewidth=0.8)
    axes[0, 1].set(title=f"Permutation: Δloss, l and l+1 swapped (± {NOISE_MULTIPLE:g} s.e.)", xlabel="l",
                   ylabel="Δ loss (nats)")
    axes[1, 0].set(title=f"Jacobian: ||J - I||_F / d (± {NOISE_MULTIPLE:g} s.e.)", xlabel="layer",
                   ylabel="||J - I||_F / d")
    axes[1, 1].axhline(1.0, color="gray", linestyle="--", linewidth=1)
    axes[1, 1].set(title=f"Jacobian: diagonal mean (± {NOISE_MULTIPLE:g} s.e.)", xlabel="layer", ylabel="tr(J) / d")
    for ax in axes.flat:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    save(fig, "utilization.png")

    fig, axes = plt.subplots(1, len(reports), figsize=(4.4 * len(reports), 3.6), squeeze=False)
    for ax, r in zip(axes[0], reports):
        m = np.full((r.num_layers, r.num_layers), np.nan)  # [s - 1, l - 1], defined for l > s
        for s, row in enumerate(r.causal_effect):
            m[s, s + 1:] = row
        image = ax.imshow(m, origin="lower", cmap="magma", extent=(0.5, r.num_layers + 0.5, 0.5, r.num_layers + 0.5),
                          aspect="auto", vmin=0.0)
        ax.set(title=f"{r.label}: causal effect", xlabel="affected layer l", ylabel="skipped layer s")
        fig.colorbar(image, ax=ax, fraction=0.046)
    save(fig, "causal_effect.png")
    return written


def summary_markdown(reports: List[DepthReport]) -> str:
    def deep_half(values):
        return float(np.mean(values[len(values) // 2:]))

    rows = [
        ("checkpoint", lambda r: f"`{r.checkpoint}` (iteration {r.iteration})"),
        ("norm scheme", lambda r: r.norm_scheme),
        ("layers", lambda r: str(r.num_layers)),
        ("held-out tokens", lambda r: f"{r.num_tokens} ({r.num_samples} x {r.seq_length})"),
        ("loss / perplexity", lambda r: f"{r.loss:.4f} / {r.perplexity:.2f}"),
        ("**effective depth**", lambda r: f"**{r.effective_depth} of {r.num_layers}** (Δloss > max({r.threshold:g}, "
                                          f"{NOISE_MULTIPLE:g} standard errors over {r.num_samples} windows))"),
        ("Δloss on removal, mean over the deeper half", lambda r: f"{deep_half(r.removal_delta_loss):.4f}"),
        ("most important layer (Δloss)", lambda r: "{} ({:.4f})".format(
            int(np.argmax(r.removal_delta_loss)) + 1, max(r.removal_delta_loss))),
        ("least important layer (Δloss)", lambda r: "{} ({:.4f})".format(
            int(np.argmin(r.removal_delta_loss)) + 1, min(r.removal_delta_loss))),
        ("output variance, layer 1 -> L", lambda r: f"{r.variance[0]:.3g} -> {r.variance[-1]:.3g}"),
        ("d(l, l+1) all tokens, mean over the deeper half",
         lambda r: f"{deep_half([row[0] for row in r.angular_distance_all_tokens]):.4f}"),
        ("relative contribution, mean over the deeper half", lambda r: f"{deep_half(r.relative_contribution):.4f}"),
        ("logit-lens KL at layer L/2", lambda r: f"{r.logit_lens_kl[max(r.num_layers // 2 - 1, 0)]:.4f}"),
        ("**useful layers** (loss ratio > {:g} with the layer replaced by its linear fit)".format(
            reports[0].useful_ratio), lambda r: f"**{len(r.useful_layers)} of {r.num_layers}** "
                                                f"({r.useful_fraction:.2f}): {r.useful_layers}"),
        ("linear-fit loss ratio, mean over layers / deeper half", lambda r: "{:.4f} / {:.4f}".format(
            np.mean(r.linear_loss_ratio), deep_half(r.linear_loss_ratio))),
        ("causal effect on the next layer, mean over layers", lambda r: "{:.4f}".format(
            np.mean([row[0] for row in r.causal_effect if row]) if r.num_layers > 1 else float("nan"))),
        ("permutation score abs(Δloss) / loss, mean over adjacent pairs", lambda r: "{:.4f}".format(
            np.mean(r.permutation_score) if r.permutation_score else float("nan"))),
        ("Jacobian ‖J − I‖_F / d, mean over the deeper half", lambda r: "{:.4g} (± {:.2g} s.e.)".format(
            deep_half(r.jacobian_deviation), _mean_stderr(r.jacobian_deviation_stderr[r.num_layers // 2:]))),
        ("Jacobian diagonal mean, mean over the deeper half", lambda r: "{:.4f} (± {:.2g} s.e.)".format(
            deep_half(r.jacobian_diagonal_mean), _mean_stderr(r.jacobian_diagonal_mean_stderr[r.num_layers // 2:]))),
    ]
    lines = ["# Depth report", "", f"Held-out data: {reports[0].data}", "",
             "| | " + " | ".join(r.label for r in reports) + " |", "|---" * (len(reports) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(get(r) for r in reports) + " |" for name, get in rows]
    lines += ["", "Effective depth: the number of layers whose removal (skipping the layer, nothing fine-tuned) "
              "raises the held-out loss by more than the threshold and by more than twice its standard error across "
              "the windows (Δloss is signed; a negative one means the model does better without the layer). Deep layers that are near-identity maps (the "
              "curse of depth) have small Δloss, small d(l, l+1) and small relative contribution.", "",
              "Layer utilization: a layer is useful when replacing it by its least-squares affine map (fitted on "
              f"{reports[0].fit_tokens} tokens of other held-out windows) raises the loss by more than "
              f"{reports[0].useful_ratio:g}x. Causal effect of layer s on layer l > s: "
              "mean||Δh_l(s skipped) - Δh_l|| / mean||Δh_l||. Permutation score: |loss(l, l+1 swapped) - loss| / "
              "loss. Jacobian J = (1/N) sum_t' sum_t dh_l[t]/dh_{l-1}[t'] (J = I for an identity layer), "
              f"estimated with {reports[0].jacobian_probes} Rademacher probes; s.e. is the estimator's standard "
              "error over the probes.", "",
              "Plots: " + ", ".join(f"![{p}]({p})" for p in PLOTS), ""]
    return "\n".join(lines)


def _mean_stderr(stderrs: List[float]) -> float:
    """Standard error of the mean of independent estimates with these standard errors."""
    return float(np.sqrt(np.sum(np.square(stderrs))) / max(len(stderrs), 1))


def write_outputs(reports: List[DepthReport], output: str, args_dict: dict) -> str:
    """report.json, the plots and summary.md, written to a temp dir and renamed into place."""
    output = os.path.abspath(output)
    if os.path.exists(output) and os.listdir(output) and not os.path.isfile(os.path.join(output, REPORT_FILE)):
        raise ReportError(f"--output {output} exists and is not an earlier depth report; choose another directory")
    with atomic_directory(output) as partial:
        plot(reports, partial)
        with open(os.path.join(partial, "summary.md"), "w") as f:
            f.write(summary_markdown(reports))
        with open(os.path.join(partial, REPORT_FILE), "w") as f:  # allow_nan=False: every number is finite
            json.dump({"arguments": args_dict, "runs": [dataclasses.asdict(r) for r in reports]}, f, indent=1,
                      allow_nan=False)
    return output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="depth_report", description="Per-layer depth diagnostics of lns_megatron "
                                "checkpoints: variance, angular distance, layer removal, contribution, logit lens, "
                                "and layer utilization (usefulness, causal effect, permutation, Jacobian)")
    p.add_argument("--load", required=True, help="checkpoint directory (a run's --save, or one iter_* dir)")
    p.add_argument("--compare", help="a second checkpoint, reported side by side")
    p.add_argument("--label", help="name of --load in plots (default: its norm scheme)")
    p.add_argument("--compare-label", help="name of --compare in plots (default: its norm scheme)")
    data = p.add_argument_group("held-out data (default: what the run trained on, its validation split)")
    data.add_argument("--input", help="JSON-lines file of documents")
    data.add_argument("--json-key", default="text", help="field of --input holding the text")
    data.add_argument("--data-path", help="indexed dataset prefix from tools/preprocess_data.py")
    data.add_argument("--split", help="use the validation part of this train,valid,test split of --data-path "
                      "(default: the run's split if it trained on this prefix, else every document)")
    data.add_argument("--mock-data", action="store_true", help="megatron's MockGPTDataset tokens")
    data.add_argument("--tokenizer-type", help="override the run's tokenizer type")
    data.add_argument("--tokenizer-model", help="tokenizer file or directory (default: the run's)")
    p.add_argument("--num-samples", type=int, default=16, help="held-out sequences")
    p.add_argument("--seq-length", type=int, help="tokens per sequence (default: the run's --seq-length)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.01,
                   help="|Δloss| (nats) above which a removed layer counts toward the effective depth")
    p.add_argument("--fit-samples", type=int, help="held-out sequences, others than --num-samples, on which the "
                   "usefulness metric fits each layer's linear replacement (default: --num-samples)")
    p.add_argument("--jacobian-probes", type=int, default=16, help="random probes of the Jacobian estimator "
                   "(its standard error falls as 1/sqrt of this; one backward pass each)")
    p.add_argument("--seed", type=int, default=4321, help="seed of the random draw of held-out windows and of the "
                   "Jacobian probes")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--output", default="depth_report", help="directory for report.json, the PNGs and summary.md")
    return p


def run(args) -> List[DepthReport]:
    if sum(bool(x) for x in (args.input, args.data_path, args.mock_data)) > 1:
        raise ReportError("give one of --input, --data-path and --mock-data")
    if args.num_samples < 1 or args.micro_batch_size < 1:
        raise ReportError("--num-samples and --micro-batch-size must be positive")
    if args.fit_samples is not None and args.fit_samples < 1:
        raise ReportError(f"--fit-samples {args.fit_samples}: the linear fits need held-out windows; give at least 1")
    if args.jacobian_probes < 2:
        raise ReportError(f"--jacobian-probes {args.jacobian_probes}: the estimator's standard error needs at least 2")
    reports, windows, fit_windows, where, first = [], None, None, "", None
    for root, label in ((args.load, args.label), (args.compare, args.compare_label)):
        if root is None:
            continue
        loaded = load_model(root, args.tokenizer_model, args.tokenizer_type, args.device)
        if windows is None:  # one data source for every run, so that their numbers compare
            windows, fit_windows, where = held_out_windows(loaded, args)
            where += (f"; {len(windows)} windows of {windows.shape[1] - 1} tokens drawn at random (seed {args.seed}), "
                      f"and {len(fit_windows)} others for the linear fits")
            first = loaded
        else:
            if metadata.tokenizer_mismatch(metadata.tokenizer_identity(first.tokenizer),
                                           metadata.tokenizer_identity(loaded.tokenizer)):
                raise ReportError(f"--compare {root} was trained with another tokenizer than --load {args.load}; "
                                  "the two cannot be measured on the same held-out tokens")
            if windows.shape[1] - 1 > loaded.config.max_position_embeddings:
                raise ReportError(f"--compare {root}: its --max-position-embeddings {loaded.config.max_position_embeddings}"
                                  f" is shorter than the windows ({windows.shape[1] - 1}); give a shorter --seq-length")
        label = label or loaded.config.norm_scheme
        if any(r.label == label for r in reports):
            label = f"{label} ({os.path.basename(os.path.normpath(root))})"
        if loaded.config.hidden_size >= (fit_windows.shape[1] - 1) * len(fit_windows):
            raise ReportError(f"--compare {root}: its --hidden-size {loaded.config.hidden_size} needs more than "
                              f"{(fit_windows.shape[1] - 1) * len(fit_windows)} tokens for the linear fits; give more "
                              "--fit-samples")
        reports.append(analyze(loaded, windows, fit_windows=fit_windows, label=label,
                               micro_batch_size=args.micro_batch_size, threshold=args.threshold,
                               jacobian_probes=args.jacobian_probes, seed=args.seed, data=where))
        del loaded
    return reports


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    args = build_parser().parse_args(argv)
    from lns_megatron.training import distributed

    try:
        reports = run(args)
        path = write_outputs(reports, args.output, vars(args))
    except (ReportError, CheckpointError) as e:
        print(f"depth_report: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.destroy()
    print(summary_markdown(reports))
    print(f"depth_report: wrote {path}/{{{REPORT_FILE}, summary.md, {', '.join(PLOTS)}}}", flush=True)
    return 0
