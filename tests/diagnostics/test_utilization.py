"""The layer-utilization metrics of the depth report (usefulness, causal effect, permutation sensitivity,
the Jacobian's deviation from identity) on a real tiny checkpoint, each against an independent computation
that goes through the model by other means (the test's own hooks, numpy's least squares, the exact
Jacobian row by row)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trained_checkpoints import trained_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory, "lns")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from lns_megatron.training import distributed
    from lns_megatron.training.checkpoint import load_model

    try:
        yield load_model(checkpoint, device="cpu")
    finally:
        distributed.destroy()


@pytest.fixture(scope="module")
def data(loaded):
    from lns_megatron.diagnostics.report import build_parser, held_out_windows

    windows, fit, _ = held_out_windows(loaded, build_parser().parse_args(
        ["--load", "unused", "--mock-data", "--num-samples", "4", "--fit-samples", "6"]))
    return windows, fit


@pytest.fixture(scope="module")
def report(loaded, data):
    from lns_megatron.diagnostics.report import analyze

    windows, fit = data
    return analyze(loaded, windows, fit_windows=fit, label="lns", micro_batch_size=3, jacobian_probes=8)


def states_of(model, tokens, replace=None):
    """[h_0, ..., h_L] in float64 by the test's own hooks; ``replace``: {layer index: f(input) -> output}."""
    captured, handles = [], []
    layers = model.decoder.layers
    handles.append(layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: captured.append(kwargs["hidden_states"].double()), with_kwargs=True))

    def output_hook(index):
        def hook(m, args, kwargs, out):
            if replace and index in replace:
                out = (replace[index](kwargs["hidden_states"]), out[1])
            captured.append(out[0].double())
            return out
        return hook

    handles += [layer.register_forward_hook(output_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    try:
        with torch.no_grad():
            logits = model(tokens, positions, None)
    finally:
        for h in handles:
            h.remove()
    return captured, logits


def loss_of(logits, labels):
    return F.cross_entropy(logits.double().flatten(0, 1), labels.flatten()).item()


def test_fit_windows_are_other_windows(data):
    windows, fit = data
    assert windows.shape == (4, 33) and fit.shape == (6, 33)
    assert not any(torch.equal(w, f) for w in windows for f in fit)


def test_usefulness_against_numpy_least_squares(loaded, data, report):
    """Each layer's affine fit by numpy's lstsq on the raw states, applied by a forward hook."""
    model, (windows, fit) = loaded.model, data
    fit_states, _ = states_of(model, fit[:, :-1])
    tokens, labels = windows[:, :-1], windows[:, 1:]
    _, logits = states_of(model, tokens)
    base = loss_of(logits, labels)
    assert report.loss == pytest.approx(base, rel=1e-9)
    assert report.fit_tokens == fit[:, :-1].numel()
    for k in range(report.num_layers):
        x = fit_states[k].flatten(0, 1).numpy()
        y = fit_states[k + 1].flatten(0, 1).numpy()
        affine = np.linalg.lstsq(np.hstack([x, np.ones((len(x), 1))]), y, rcond=None)[0]
        w, b = torch.from_numpy(affine[:-1]), torch.from_numpy(affine[-1])
        _, logits = states_of(model, tokens, {k: lambda h: (h.double() @ w + b).to(h.dtype)})
        linear = loss_of(logits, labels)
        assert report.linear_loss[k] == pytest.approx(linear, rel=1e-5), k
        assert report.linear_loss_ratio[k] == pytest.approx(linear / base, rel=1e-5)
        assert abs(linear - base) > 1e-4, f"layer {k + 1}: the linear replacement changed nothing"
    assert report.useful_layers == [l + 1 for l, r in enumerate(report.linear_loss_ratio) if r > 1.1]
    assert report.useful_fraction == len(report.useful_layers) / report.num_layers


def test_causal_effect_against_hooks(loaded, data, report):
    """Skipping by a forward hook that returns the input; the paper's ratio of mean norms."""
    model, (windows, _) = loaded.model, data
    tokens = windows[:, :-1]
    base, _ = states_of(model, tokens)
    L = report.num_layers
    delta = lambda h, l: h[l] - h[l - 1]  # Δh_l, l 1-based
    assert [len(row) for row in report.causal_effect] == [L - s for s in range(1, L + 1)]
    for s in range(1, L + 1):
        skipped, _ = states_of(model, tokens, {s - 1: lambda h: h})
        torch.testing.assert_close(skipped[s], skipped[s - 1], rtol=0, atol=0)
        for l in range(s + 1, L + 1):
            change = (delta(skipped, l) - delta(base, l)).norm(dim=-1).mean()
            expected = (change / delta(base, l).norm(dim=-1).mean()).item()
            assert report.causal_effect[s - 1][l - s - 1] == pytest.approx(expected, rel=1e-6), (s, l)
            assert expected > 1e-3
    assert all(math.isfinite(v) for row in report.causal_effect for v in row)


def test_permutation_against_calling_the_layers_in_the_other_order(loaded, data, report):
    """Positions k and k+1 each run the other's forward on their input (hooks), the ModuleList untouched."""
    model, (windows, _) = loaded.model, data
    tokens, labels = windows[:, :-1], windows[:, 1:]
    layers = model.decoder.layers
    _, logits = states_of(model, tokens)
    base = loss_of(logits, labels)
    per_window = lambda lg: F.cross_entropy(lg.double().flatten(0, 1), labels.flatten(), reduction="none").view(
        labels.shape).mean(1)
    assert len(report.permutation_delta_loss) == report.num_layers - 1
    for k in range(report.num_layers - 1):
        def run(other):
            def hook(m, args, kwargs, out):
                return layers[other].forward(**kwargs)
            return hook
        handles = [layers[k].register_forward_hook(run(k + 1), with_kwargs=True),
                   layers[k + 1].register_forward_hook(run(k), with_kwargs=True)]
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        try:
            with torch.no_grad():
                swapped = model(tokens, positions, None)
        finally:
            for h in handles:
                h.remove()
        delta = loss_of(swapped, labels) - base
        assert report.permutation_delta_loss[k] == pytest.approx(delta, rel=1e-6, abs=1e-10)
        assert report.permutation_score[k] == pytest.approx(abs(delta) / base, rel=1e-6, abs=1e-10)
        windows_delta = per_window(swapped) - per_window(logits)
        assert report.permutation_delta_loss_stderr[k] == pytest.approx(
            windows_delta.std().item() / math.sqrt(len(windows_delta)), rel=1e-6)
        assert abs(delta) > 1e-5, f"swapping layers {k + 1} and {k + 2} changed nothing"
    # the model is back in its order
    _, again = states_of(model, tokens)
    torch.testing.assert_close(again, logits, rtol=0, atol=0)


def exact_mean_jacobians(model, tokens):
    """J_l = (1/N) sum_t' sum_t dh_l[t]/dh_{l-1}[t'] of every layer, exactly: row i is the gradient of
    sum_t h_l[t, i] with respect to the layer's input, averaged over the N input positions (d backward
    passes per layer through the layer's own forward, called with the arguments the block passed it)."""
    calls = []
    handles = [layer.register_forward_pre_hook(lambda m, args, kwargs: calls.append((m, dict(kwargs))),
                                               with_kwargs=True) for layer in model.decoder.layers]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        model(tokens, positions, None)
    for h in handles:
        h.remove()
    jacobians = []
    for layer, kwargs in calls:
        x = kwargs.pop("hidden_states").detach().clone().requires_grad_(True)
        with torch.enable_grad():
            y = layer.forward(hidden_states=x, **kwargs)[0]
            d = y.shape[-1]
            rows = []
            for i in range(d):
                basis = torch.zeros_like(y)
                basis[..., i] = 1.0
                rows.append(torch.autograd.grad(y, x, grad_outputs=basis, retain_graph=i < d - 1)[0]
                            .double().flatten(0, 1).mean(0))
        jacobians.append(torch.stack(rows))  # [i, j] = d(sum_t y[t, i]) / dx[t', j], mean over t'
    return jacobians


def test_jacobian_estimator_against_the_exact_jacobian(loaded, data):
    """The estimator with the run's own probes equals the formula on the exact J; with many probes it lands
    within its stated error of the exact ||J - I||_F / d and tr(J) / d, and the stated error matches the
    estimator's exact spread for Rademacher probes."""
    from lns_megatron.diagnostics.utilization import JacobianProbes, rademacher_probes

    model, (windows, _) = loaded.model, data
    tokens = windows[:2, :-1]
    exact = exact_mean_jacobians(model, tokens)
    L, d = len(exact), exact[0].shape[0]
    assert d == 64
    K = 128
    probes = rademacher_probes(L, K, d, seed=7)
    estimator = JacobianProbes(probes)
    estimator.add(model, tokens[:1])  # two micro-batches: the sums must combine to the mean over both
    estimator.add(model, tokens[1:])
    deviation, deviation_err, diagonal, diagonal_err = estimator.estimates()
    identity = torch.eye(d, dtype=torch.float64)
    for l, J in enumerate(exact):
        A = J - identity
        # The same probes through the exact matrix: the estimator's arithmetic, exactly.
        squared = ((probes[l] @ J) - probes[l]).square().sum(-1)  # ||(J - I)^T v||^2 per probe
        assert deviation[l] == pytest.approx(math.sqrt(squared.mean().item()) / d, rel=1e-5)
        trace = ((probes[l] @ J) * probes[l]).sum(-1)
        assert diagonal[l] == pytest.approx(trace.mean().item() / d, rel=1e-5, abs=1e-7)
        # Against the exact values, within 4 stated standard errors.
        true_deviation = A.norm().item() / d
        true_diagonal = torch.diagonal(J).mean().item()
        assert abs(deviation[l] - true_deviation) < 4 * deviation_err[l], (l, deviation[l], true_deviation)
        assert abs(diagonal[l] - true_diagonal) < 4 * diagonal_err[l], (l, diagonal[l], true_diagonal)
        # The stated error against the estimator's exact spread: for Rademacher v and symmetric M,
        # Var(v^T M v) = 2 sum_{i != j} M_ij^2.
        M = A @ A.T
        var_sq = 2 * (M.square().sum() - torch.diagonal(M).square().sum()).item()
        expected_err = math.sqrt(var_sq / K) / (2 * A.norm().item()) / d
        assert 0.6 < deviation_err[l] / expected_err < 1.6, (l, deviation_err[l], expected_err)
        S = (J + J.T) / 2
        var_tr = 2 * (S.square().sum() - torch.diagonal(S).square().sum()).item()
        assert 0.6 < diagonal_err[l] / (math.sqrt(var_tr / K) / d) < 1.6
        assert true_deviation > 1e-3, f"layer {l + 1} is the identity: nothing tested"


def test_moe_checkpoint(tmp_path_factory):
    """On an MoE model (megatron-core's MoELayer, router and dispatcher, in eval mode: no aux-loss gradient
    enters the Jacobian) the estimator is the exact formula too, and every metric is finite."""
    from lns_megatron.diagnostics.report import analyze, build_parser, held_out_windows
    from lns_megatron.diagnostics.utilization import JacobianProbes, rademacher_probes
    from lns_megatron.training import distributed
    from lns_megatron.training.checkpoint import load_model

    try:
        loaded = load_model(trained_checkpoint(tmp_path_factory, "lns_moe"), device="cpu")
        model = loaded.model
        assert type(model.decoder.layers[0].mlp).__name__ == "MoELayer"
        windows, fit, _ = held_out_windows(loaded, build_parser().parse_args(
            ["--load", "unused", "--mock-data", "--num-samples", "2", "--fit-samples", "4"]))
        tokens = windows[:, :-1]
        exact = exact_mean_jacobians(model, tokens)
        probes = rademacher_probes(len(exact), 4, exact[0].shape[0], seed=3)
        estimator = JacobianProbes(probes)
        estimator.add(model, tokens)
        deviation, _, diagonal, _ = estimator.estimates()
        d = exact[0].shape[0]
        for l, J in enumerate(exact):
            squared = ((probes[l] @ J) - probes[l]).square().sum(-1)
            assert deviation[l] == pytest.approx(math.sqrt(squared.mean().item()) / d, rel=1e-5)
            assert diagonal[l] == pytest.approx(((probes[l] @ J) * probes[l]).sum(-1).mean().item() / d,
                                                rel=1e-5, abs=1e-7)
        report = analyze(loaded, windows, fit_windows=fit, label="moe", jacobian_probes=4)
        assert all(math.isfinite(v) for v in report.linear_loss + report.permutation_delta_loss
                   + report.jacobian_deviation)
        assert all(math.isfinite(v) for row in report.causal_effect for v in row)
        model.train()
        with pytest.raises(ValueError, match="eval mode"):
            estimator.add(model, tokens)
    finally:
        distributed.destroy()


def test_report_carries_the_utilization_numbers(report):
    L = report.num_layers
    for name in ("linear_loss", "linear_loss_ratio", "jacobian_deviation", "jacobian_deviation_stderr",
                 "jacobian_diagonal_mean", "jacobian_diagonal_mean_stderr"):
        values = getattr(report, name)
        assert len(values) == L and all(math.isfinite(v) for v in values), name
    assert all(e > 0 for e in report.jacobian_deviation_stderr) and report.jacobian_probes == 8
    assert len(report.permutation_score) == L - 1


def test_bad_utilization_flags_are_named(checkpoint, tmp_path):
    from test_depth_report import report_cli

    def error(*args):
        code, _, err = report_cli("--load", checkpoint, "--mock-data", *args, "--output", tmp_path / "out")
        assert code == 2 and not (tmp_path / "out").exists(), err
        return err

    assert "--jacobian-probes 1: the estimator's standard error needs at least 2" in error("--jacobian-probes", "1")
    assert "--fit-samples 0" in error("--fit-samples", "0")
    err = error("--num-samples", "2", "--fit-samples", "1")  # 32 tokens for 65 unknowns per output
    assert "--fit-samples 1: 1 windows of 32 tokens" in err and "--hidden-size 64 + 1" in err
