"""The norm-scheme registry (lns_megatron.schemes) behind --norm-scheme: every scheme through the driver."""

import contextlib
import io
import json
import math

import pytest

from lns_megatron.config import ConfigError, PretrainConfig, parse_args
from lns_megatron.schemes import NORM_SCHEMES
from lns_megatron.training.train import prepare_resume

MOCK = ["--preset", "tiny", "--mock-data", "--vocab-size", "100", "--num-workers", "0"]


def test_the_flag_offers_exactly_the_registry():
    assert PretrainConfig.__dataclass_fields__["norm_scheme"].metadata["choices"] == list(NORM_SCHEMES)


def test_flags_of_other_schemes_are_named_at_start_up():
    """An A/B gives every arm the same flags: a scheme's own flag is not refused under another scheme, but
    said to be unused."""
    from lns_megatron.config import unused_scheme_flags

    assert unused_scheme_flags(parse_args([*MOCK, "--norm-scheme", "lns", "--dyt-alpha-init", "0.2",
                                           "--mix-ln-alpha", "0.25"])) == ["--dyt-alpha-init"]
    assert unused_scheme_flags(parse_args([*MOCK, "--norm-scheme", "dyt", "--dyt-alpha-init-mlp", "0.2"])) == []


@pytest.mark.parametrize("args, expected", [
    (["--norm-scheme", "dyt", "--transformer-impl", "transformer_engine"],
     "--norm-scheme dyt with --transformer-impl transformer_engine: Transformer Engine fuses LayerNorm and RMSNorm"),
    (["--norm-scheme", "dyt", "--qk-layernorm"], "--norm-scheme dyt replaces every norm"),
    (["--norm-scheme", "dyt", "--dyt-alpha-init", "0"], "--dyt-alpha-init 0.0: must be greater than 0"),
    (["--norm-scheme", "bhyt", "--transformer-impl", "transformer_engine"],
     "--norm-scheme bhyt with --transformer-impl transformer_engine: Transformer Engine fuses LayerNorm and RMSNorm"),
    (["--norm-scheme", "bhyt", "--normalization", "LayerNorm"],
     "--norm-scheme bhyt with --normalization LayerNorm: BHyT bounds by the root mean square"),
])
def test_refusals_before_anything_starts(args, expected):
    with pytest.raises(ConfigError) as error:
        prepare_resume(parse_args([*MOCK, *args]))
    assert expected in str(error.value)


@pytest.mark.parametrize("scheme", ["peri", "peri-lns", "post", "mix", "deepnorm", "dyt", "bhyt"])
def test_driver_trains_resumes_reports_and_exports_or_refuses(tmp_path, scheme):
    """Through the driver: learns, writes the depth scalars, resumes exactly (Mix-LN's checkpoint holds one key
    per layer, its layers differ), the depth report reads it (Post-LN and DeepNorm have no final norm for the
    logit lens); Peri-LN, with or without LNS, exports to Gemma 2 with the same logits, the export refuses the
    others in one line naming the scheme."""
    from driver import logged_losses, read_tensorboard, run_driver
    from lns_megatron.diagnostics.report import main as report
    from lns_megatron.hf.export import main as export

    flags = ["--preset", "tiny", "--norm-scheme", scheme, "--mix-ln-alpha", "0.5", "--seq-length", "32",
             "--max-position-embeddings", "32", "--mock-data", "--vocab-size", "200", "--num-workers", "0",
             "--micro-batch-size", "4", "--train-iters", "4", "--lr", "3e-3", "--log-interval", "1",
             "--eval-interval", "1000", "--eval-iters", "1"]
    _, out = run_driver(*flags, "--save", tmp_path / "ckpt", "--save-interval", "2", "--depth-log-interval", "2",
                        "--tensorboard-dir", tmp_path / "tb")
    whole = logged_losses(out)
    assert f"lns-pretrain: {scheme} |" in out and sorted(whole) == [1, 2, 3, 4] and whole[4] < whole[1], whole
    assert ("--mix-ln-alpha not used by --norm-scheme" in out) == (scheme != "mix")
    scalars = read_tensorboard(tmp_path / "tb")
    for metric in ("variance", "angular-distance", "grad-norm"):
        values = [scalars[f"depth/{metric}/layer_{l:03d}"][-1] for l in range(1, 5)]
        assert all(math.isfinite(v) and v > 0 for v in values), (metric, values)
    _, out = run_driver(*flags, "--load", tmp_path / "ckpt" / "iter_0000002", "--save", tmp_path / "resumed")
    resumed = logged_losses(out)
    assert sorted(resumed) == [3, 4] and all(resumed[i] == whole[i] for i in resumed), (resumed, whole)

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = report(["--load", str(tmp_path / "ckpt"), "--mock-data", "--num-samples", "2", "--fit-samples", "3",
                       "--output", str(tmp_path / "report")])
    assert code == 0, err.getvalue()
    assert json.load(open(tmp_path / "report" / "report.json"))["runs"][0]["norm_scheme"] == scheme
    with contextlib.redirect_stderr(err := io.StringIO()):
        code = export(["--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
    if scheme.startswith("peri"):  # Gemma 2's layer has Peri-LN's four norms
        assert code == 0, err.getvalue()
        assert_gemma2_logits_equal(tmp_path / "ckpt", tmp_path / "hf", scheme)
        return
    lines = err.getvalue().strip().splitlines()
    assert code != 0 and len(lines) == 1 and f"--norm-scheme {scheme}" in lines[0], lines
    assert not (tmp_path / "hf").exists()


def assert_gemma2_logits_equal(checkpoint, export_dir, scheme):
    """The Peri-LN checkpoint's logits and its Gemma2ForCausalLM export's, in float32 (atol 2e-5; for Peri-LN +
    LNS, with LNS left unfolded they differ by more than 1e-2)."""
    import torch
    from transformers import Gemma2ForCausalLM

    from lns_megatron.diagnostics.report import forward_logits
    from lns_megatron.training import distributed
    from lns_megatron.training.checkpoint import load_model

    config = json.load(open(export_dir / "config.json"))
    assert config["architectures"] == ["Gemma2ForCausalLM"] and config["lns_megatron"]["norm_scheme"] == scheme
    tokens = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    try:
        loaded = load_model(str(checkpoint), device="cpu")
        with torch.no_grad():
            megatron = forward_logits(loaded.model, tokens)[..., :loaded.vocab_size]
    finally:
        distributed.destroy()
    hf = Gemma2ForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(tokens).logits
        assert megatron.abs().max() > 0.1
        torch.testing.assert_close(logits, megatron, rtol=0, atol=2e-5)
        if scheme != "peri-lns":
            return
        for i in range(len(hf.model.layers)):  # unfold LNS: (1 + w) * sqrt(l) - 1
            for norm in (hf.model.layers[i].input_layernorm, hf.model.layers[i].pre_feedforward_layernorm):
                norm.weight.copy_((1 + norm.weight) * math.sqrt(i + 1) - 1)
        assert (hf(tokens).logits - megatron).abs().max() > 1e-2
