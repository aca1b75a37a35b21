"""Peri-LN and Peri-LN + LNS on real megatron-core modules, against the independent float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import reference_llama
from lns_megatron import get_gpt_lns_layer_spec
from lns_megatron.models.gpt import build_gpt_model, tiny_config
from lns_megatron.schemes import NORM_SCHEMES
from lns_megatron.schemes.peri import PeriRowParallelLinear

VOCAB, SEQ, BATCH = 96, 12, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randomize_norms(model, gen):
    """Non-unit gammas on every norm (input, output, final), so that a swapped or missing one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen).to(p.device))


@pytest.mark.parametrize("scheme", ["peri", "peri-lns"])
def test_model_matches_float64_reference(megatron_tp1, scheme):
    """Logits and every parameter gradient of the float32 model equal the float64 reference's
    (rtol 1e-5 / atol 2e-5 for logits, rtol 1e-4 / atol 1e-5 of the largest gradient for gradients)."""
    torch.manual_seed(0)
    config = tiny_config(num_query_groups=2)
    model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme=scheme).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    randomize_norms(model, gen)
    lns = NORM_SCHEMES[scheme].lns
    other, logits, _ = reference_llama.check_model(model, config, VOCAB, SEQ, gen, lns=lns, peri=True)
    # Without the output norms (or with LNS toggled) the reference is another function: the check can fail.
    for variant in (dict(lns=lns, peri=False), dict(lns=not lns, peri=True)):
        assert (other(**variant) - logits).abs().max() > 1e-2


def test_layer_structure_and_checkpoint_keys(megatron_tp1):
    """Output norms start at gamma 1; LNS scales only the input norms; output-norm parameters carry
    sequence_parallel; the checkpoint names them under the output projections."""
    config = tiny_config(sequence_parallel=False)
    peri = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme="peri")
    peri_lns = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme="peri-lns")
    for layer in peri_lns.decoder.layers:
        scale = 1 / math.sqrt(layer.layer_number)
        assert layer.input_layernorm.lns_scale == layer.pre_mlp_layernorm.lns_scale == pytest.approx(scale)
        for out in (layer.self_attention.linear_proj, layer.mlp.linear_fc2):
            assert isinstance(out, PeriRowParallelLinear) and out.output_norm.lns_scale == 1.0
            assert torch.equal(out.output_norm.weight, torch.ones(config.hidden_size))
    for layer in peri.decoder.layers:
        assert layer.input_layernorm.lns_scale == 1.0 and isinstance(layer.mlp.linear_fc2, PeriRowParallelLinear)
    keys = set(peri.state_dict())
    for l in range(config.num_layers):
        assert {f"decoder.layers.{l}.self_attention.linear_proj.output_norm.weight",
                f"decoder.layers.{l}.mlp.linear_fc2.output_norm.weight"} <= keys
    sharded = peri.sharded_state_dict()  # replicated over TP, stacked over layers like the other norms
    assert sharded["decoder.layers.0.mlp.linear_fc2.output_norm.weight"].key == "decoder.layers.mlp.linear_fc2.output_norm.weight"


def test_output_norm_includes_the_bias(megatron_tp1):
    """With linear biases (returned separately by megatron for its fused bias-dropout-add), the norm
    normalizes x W^T + b; LayerNorm with its own bias, float64 reference."""
    config = tiny_config(normalization="LayerNorm", add_bias_linear=True, params_dtype=torch.float64)
    linear = PeriRowParallelLinear(32, config.hidden_size, config=config, init_method=torch.nn.init.normal_,
                                   bias=True, input_is_parallel=True, skip_bias_add=True)
    with torch.no_grad():
        linear.bias.normal_()
        linear.output_norm.weight.normal_()
        linear.output_norm.bias.normal_()
    x = torch.randn(5, 2, 32, dtype=torch.float64)
    out, bias = linear(x)
    expected = F.layer_norm(x @ linear.weight.T + linear.bias, (config.hidden_size,), linear.output_norm.weight,
                            linear.output_norm.bias, config.layernorm_epsilon)
    assert bias is None
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_sequence_parallel_marks_the_output_norms(megatron_tp1):
    """finalize_model_grads all-reduces over TP exactly the parameters marked sequence_parallel."""
    config = tiny_config(tensor_model_parallel_size=2, sequence_parallel=True)
    linear = PeriRowParallelLinear(32, config.hidden_size, config=config, init_method=torch.nn.init.normal_,
                                   bias=False, input_is_parallel=True, skip_bias_add=True)
    assert linear.output_norm.weight.sequence_parallel is True


@pytest.mark.parametrize("scheme", ["peri", "peri-lns"])
def test_layers_without_output_projections_are_refused(scheme):
    with pytest.raises(ValueError, match=f"norm_scheme='{scheme}' puts a norm on linear_fc2's output"):
        get_gpt_lns_layer_spec(norm_scheme=scheme, num_experts=2)
    with pytest.raises(ValueError, match="norm_scheme='peri-ln'; choose one of \\('pre', 'lns', 'peri', 'peri-lns', "):
        get_gpt_lns_layer_spec(norm_scheme="peri-ln")


def test_benchmark_reports_each_scheme_against_pre(tmp_path):
    """benchmarks/bench_norm_scheme.py --schemes: every scheme's step time beside pre's, as ratios."""
    import json
    import subprocess
    import sys

    from dist_launch import ROOT

    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_norm_scheme.py", "--preset", "tiny", "--micro-batch-size", "2",
         "--seq-length", "16", "--max-position-embeddings", "16", "--vocab-size", "100", "--schemes", "peri,peri-lns",
         "--rounds", "2", "--steps-per-round", "1", "--warmup-steps", "1", "--json", str(tmp_path / "b.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "b.json").read_text())
    assert list(figures["schemes"]) == ["pre", "peri", "peri-lns"]
    for scheme in ("peri", "peri-lns"):
        assert figures["schemes"][scheme]["step_time_ratio"] > 0 and f"step-time ratio {scheme}/pre" in proc.stdout
    assert figures["schemes"]["pre"]["step_time_ratio"] == 1.0
