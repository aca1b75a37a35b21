"""tools/depth_report.py on real tiny checkpoints (shared with test_export): the report's numbers
against independent float64 computations, layer removal, the outputs, and bad input."""

import contextlib
import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trained_checkpoints import copy_checkpoint, trained_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: trained_checkpoint(tmp_path_factory, name) for name in ("lns", "pre_tp2")}


def report_cli(*args):
    from lns_megatron.diagnostics.report import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def loaded_lns(checkpoints):
    from lns_megatron.training import distributed
    from lns_megatron.training.checkpoint import load_model

    try:
        yield load_model(checkpoints["lns"], device="cpu")
    finally:
        distributed.destroy()


def held_out(loaded, num_samples=3, fit_samples=4):
    """(windows to measure on, other windows for the linear fits), from megatron's mock dataset."""
    from lns_megatron.diagnostics.report import build_parser, held_out_windows

    windows, fit, _ = held_out_windows(loaded, build_parser().parse_args(
        ["--load", "unused", "--mock-data", "--num-samples", str(num_samples), "--fit-samples", str(fit_samples)]))
    return windows, fit


def test_report_of_pre_and_lns_side_by_side(checkpoints, tmp_path):
    from lns_megatron.diagnostics.report import PLOTS, DepthReport

    out = tmp_path / "report"
    code, stdout, err = report_cli("--load", checkpoints["lns"], "--compare", checkpoints["pre_tp2"], "--mock-data",
                                   "--num-samples", "4", "--output", out)
    assert code == 0, err
    assert sorted(os.listdir(out)) == sorted(["report.json", "summary.md", *PLOTS])
    runs = json.load(open(out / "report.json"))["runs"]
    assert [r["label"] for r in runs] == ["lns", "pre"]
    fields = {f.name for f in dataclasses.fields(DepthReport)}
    for r in runs:
        assert set(r) == fields
        L = r["num_layers"]
        assert L == 4 and r["num_tokens"] == 4 * r["seq_length"]
        for name in ("variance", "hidden_norm", "relative_contribution", "logit_lens_kl", "removal_loss",
                     "removal_delta_loss", "removal_perplexity", "removal_delta_perplexity"):
            assert len(r[name]) == L and all(math.isfinite(v) for v in r[name]), name
        for name in ("angular_distance_all_tokens", "angular_distance_last_token"):
            assert [len(row) for row in r[name]] == [L - l for l in range(L)]  # d(l, l+n) for n = 1..L-l
            assert all(0.0 <= v <= 1.0 for row in r[name] for v in row)
        assert all(v > 0 for v in r["variance"]) and all(v >= -1e-9 for v in r["logit_lens_kl"])
        assert abs(r["logit_lens_kl"][-1]) < 1e-9  # the lens at the last layer is the model itself
        assert r["perplexity"] == pytest.approx(math.exp(r["loss"]))
        assert 0 <= r["effective_depth"] <= L and len(r["removal_delta_loss_stderr"]) == L
        needed = [max(r["threshold"], 2 * e) for e in r["removal_delta_loss_stderr"]]
        assert r["effective_layers"] == [l + 1 for l in range(L) if r["removal_delta_loss"][l] > needed[l]]
        assert r["effective_depth"] == len(r["effective_layers"])
    assert runs[0]["data"] == runs[1]["data"] and "4 windows of 32 tokens drawn at random (seed 4321)" in runs[0]["data"]
    assert runs[0]["iteration"] == runs[1]["iteration"] == 30
    summary = (out / "summary.md").read_text()
    assert "effective depth" in summary and "| lns | pre |" in summary
    assert "2 standard errors over 4 windows" in summary
    assert "effective depth" in stdout

    import matplotlib.image

    for name in PLOTS:
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 200 and image.shape[1] > 400, name
        assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 50, f"{name} is nearly blank"


def test_statistics_match_an_independent_computation(loaded_lns):
    """Every per-layer number against float64 math on hidden states captured by the test's own hooks,
    and the loss against megatron's own (vocab-parallel) cross entropy."""
    from lns_megatron.diagnostics.report import analyze

    model = loaded_lns.model
    windows, fit = held_out(loaded_lns)
    report = analyze(loaded_lns, windows, fit_windows=fit, label="lns", micro_batch_size=len(windows))
    tokens, labels = windows[:, :-1], windows[:, 1:]

    captured = []
    handles = [model.decoder.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: captured.append(kwargs["hidden_states"].double()), with_kwargs=True)]
    handles += [layer.register_forward_hook(lambda m, args, out: captured.append(out[0].double()))
                for layer in model.decoder.layers]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        per_token_loss = model(tokens, positions, None, labels=labels)
    for h in handles:
        h.remove()
    h = captured  # h[0] embeddings, h[l] output of layer l; [s, b, hidden]
    assert len(h) == 5
    assert report.loss == pytest.approx(per_token_loss.double().mean().item(), rel=1e-6)

    def cos_angle(x, y):
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        return torch.arccos(cos.clamp(-1, 1)) / math.pi

    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    with torch.no_grad():
        final = F.log_softmax(model.output_layer(model.decoder.final_layernorm(h[4].float()), weight=weight)[0]
                              .double(), -1)
        for l in range(1, 5):
            assert report.variance[l - 1] == pytest.approx(h[l].var(unbiased=False).item(), rel=1e-9)
            assert report.hidden_norm[l - 1] == pytest.approx(h[l].norm(dim=-1).mean().item(), rel=1e-9)
            assert report.relative_contribution[l - 1] == pytest.approx(
                ((h[l] - h[l - 1]).norm(dim=-1) / h[l - 1].norm(dim=-1)).mean().item(), rel=1e-9)
            lens = F.log_softmax(model.output_layer(model.decoder.final_layernorm(h[l].float()), weight=weight)[0]
                                 .double(), -1)
            kl = F.kl_div(final, lens, log_target=True, reduction="none").sum(-1).mean().item()  # KL(p_l || p_L)
            assert report.logit_lens_kl[l - 1] == pytest.approx(kl, rel=1e-6, abs=1e-9)
        for l in range(4):
            for n in range(1, 5 - l):
                angle = cos_angle(h[l], h[l + n])
                assert report.angular_distance_all_tokens[l][n - 1] == pytest.approx(angle.mean().item(), abs=1e-9)
                assert report.angular_distance_last_token[l][n - 1] == pytest.approx(angle[-1].mean().item(), abs=1e-9)


def test_removing_a_layer_changes_the_output_exactly_as_skipping_it(loaded_lns):
    from lns_megatron.diagnostics.report import analyze, forward_logits, skipped_layer

    model = loaded_lns.model
    windows, fit = held_out(loaded_lns, num_samples=2)
    tokens = windows[:, :-1]
    with torch.no_grad():
        full = forward_logits(model, tokens)
        for k in range(4):
            with skipped_layer(model, k):
                skipped = forward_logits(model, tokens)
            # The same removal by another mechanism: layer k's output replaced by its input.
            hook = model.decoder.layers[k].register_forward_hook(
                lambda m, args, kwargs, out: (kwargs["hidden_states"], out[1]), with_kwargs=True)
            reference = forward_logits(model, tokens)
            hook.remove()
            torch.testing.assert_close(skipped, reference, rtol=0, atol=0)
            assert (skipped - full).abs().max() > 1e-2, f"skipping layer {k + 1} left the logits unchanged"
        torch.testing.assert_close(forward_logits(model, tokens), full, rtol=0, atol=0)  # restored

    report = analyze(loaded_lns, windows, fit_windows=fit, label="lns")
    assert all(abs(d) > 1e-4 for d in report.removal_delta_loss)
    for k in range(4):
        with skipped_layer(model, k), torch.no_grad():
            loss = F.cross_entropy(forward_logits(model, tokens).double().flatten(0, 1), windows[:, 1:].flatten())
        assert report.removal_loss[k] == pytest.approx(loss.item(), rel=1e-9)


def test_held_out_jsonl_input(checkpoints, tmp_path):
    """--input text through a real tokenizer (a NullTokenizer run reads integer ids)."""
    path = tmp_path / "held_out.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(20):
            f.write(json.dumps({"body": " ".join(str(t) for t in rng.integers(0, 200, 40))}) + "\n")
    code, _, err = report_cli("--load", checkpoints["lns"], "--input", path, "--json-key", "body",
                              "--num-samples", "3", "--fit-samples", "8", "--seq-length", "16", "--output", tmp_path / "r")
    assert code == 0, err
    run = json.load(open(tmp_path / "r" / "report.json"))["runs"][0]
    assert run["num_tokens"] == 3 * 16 and run["data"].startswith(f"--input {path}")


def test_refuses_to_run_under_torchrun(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = report_cli("--load", checkpoints["lns"], "--mock-data", "--output", tmp_path / "out")
    assert code == 2 and "depth_report: error: run it as one process, not under torchrun" in err, err
    assert os.listdir(tmp_path) == []


def test_bad_input_is_named(checkpoints, tmp_path):
    def error(*args):
        code, _, err = report_cli(*args, "--output", tmp_path / "out")
        assert code == 2 and not (tmp_path / "out").exists(), err
        return err

    assert "nowhere: no such directory" in error("--load", tmp_path / "nowhere", "--mock-data")

    torn = copy_checkpoint(checkpoints["lns"], tmp_path / "torn")
    for name in os.listdir(os.path.join(torn, "iter_0000030")):
        if name.endswith(".distcp"):
            os.truncate(os.path.join(torn, "iter_0000030", name), 10)
    assert "iter_0000030: cannot be loaded" in error("--load", torn, "--mock-data")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1 2 3"}\n{"text": \n')
    assert f"--input {bad}:2: not a JSON object" in error("--load", checkpoints["lns"], "--input", bad)
    assert "no such file" in error("--load", checkpoints["lns"], "--input", tmp_path / "none.jsonl")
    assert "--max-position-embeddings" in error("--load", checkpoints["lns"], "--mock-data", "--seq-length", "999")
    assert "--data-path" in error("--load", checkpoints["lns"], "--data-path", tmp_path / "nothing")


def test_windows_are_drawn_at_random_across_the_whole_split(tmp_path):
    """Document i holds only token i: a window's tokens tell where it was drawn from."""
    from driver import write_dataset
    from lns_megatron.data.tokenizer import build_tokenizer
    from lns_megatron.diagnostics.report import _indexed_windows

    prefix = write_dataset(str(tmp_path / "docs_text_document"), [[i] * 50 for i in range(300)])
    tokenizer = build_tokenizer("NullTokenizer", vocab_size=511)
    draw = lambda seed: _indexed_windows(prefix, "90,10,0", 16, 8, tokenizer, vocab_limit=512, seed=seed)
    windows = draw(1)
    assert windows.shape == (8, 17)
    assert int(windows.min()) >= 270 and int(windows.max()) < 300  # the validation documents only
    documents = set(windows[:, 0].tolist())
    assert len(documents) >= 5 and max(documents) >= 290, documents  # spread over the split, not its start
    assert torch.equal(draw(1), windows) and not torch.equal(draw(2), windows)  # seeded


def test_effective_depth_counts_layers_above_the_noise(loaded_lns):
    """Signed Δloss per layer, its standard error over the windows, and the effective depth, against an
    independent per-window recomputation."""
    from lns_megatron.diagnostics.report import analyze, forward_logits, skipped_layer

    model = loaded_lns.model
    windows, fit = held_out(loaded_lns, num_samples=6)
    tokens, labels = windows[:, :-1], windows[:, 1:]
    report = analyze(loaded_lns, windows, fit_windows=fit, label="lns", micro_batch_size=4, threshold=0.0)

    def per_window_loss():
        logits = forward_logits(model, tokens).double()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape).mean(1)

    with torch.no_grad():
        base = per_window_loss()
        expected = []
        for k in range(4):
            with skipped_layer(model, k):
                delta = per_window_loss() - base
            mean, stderr = delta.mean().item(), delta.std().item() / math.sqrt(len(delta))
            assert report.removal_delta_loss[k] == pytest.approx(mean, rel=1e-6, abs=1e-9)
            assert report.removal_delta_loss_stderr[k] == pytest.approx(stderr, rel=1e-6, abs=1e-12)
            if mean > 2 * stderr:
                expected.append(k + 1)
    assert report.effective_layers == expected and report.effective_depth == len(expected)
    assert analyze(loaded_lns, windows, fit_windows=fit, label="lns", threshold=100.0).effective_depth == 0
