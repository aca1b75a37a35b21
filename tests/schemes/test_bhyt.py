"""Bounded Hyperbolic Tanh on real megatron-core modules, against the independent float64 reference."""

import pytest
import torch

import reference_llama
from lns_megatron.models.gpt import build_gpt_model, tiny_config
from lns_megatron.models.specs import get_gpt_lns_layer_spec
from lns_megatron.schemes.bhyt import KAPPA, BHyT, BHyTTransformerLayer, attention_output_variance
from lns_megatron.schemes.lns import LNSNorm

VOCAB, SEQ, BATCH = 96, 12, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAMBDAS = (2.0, 1.0)  # before attention, before the MLP (the paper's released runs)


def build(**config):
    return build_gpt_model(tiny_config(num_query_groups=2, **config), vocab_size=VOCAB, max_sequence_length=SEQ,
                           norm_scheme="bhyt", bhyt_lambda_init=LAMBDAS)


def test_model_matches_float64_reference(megatron_tp1):
    """Logits (rtol 1e-5, atol 2e-5) and every gradient (rtol 1e-4, atol 1e-5), lambdas included, equal the
    float64 reference's, whose MLP statistic is the paper's approximation with the value heads repeated per
    query head; with the exact statistic there (BHyT*) or with RMSNorm the reference differs."""
    torch.manual_seed(0)
    model = build().to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):  # gammas away from 1, so that a swapped one shows
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
            if name.endswith("layernorm.lam"):
                p.copy_(1.0 + 2.0 * torch.rand(p.shape, generator=gen))
            if name.endswith("linear_proj.weight"):
                p.mul_(100.0)  # the weight-derived term as large as the stream's own variance
            if name.endswith(("linear_fc1.weight", "linear_fc2.weight")):
                p.mul_(10.0)  # and the MLP's output large enough for its norm to show in the logits
        # unit-scale embeddings: BHyT is scale-invariant, so the tiny initial ones get gradients so large that
        # float32 rounding alone would exceed the tolerance
        model.embedding.word_embeddings.weight.mul_(50.0)
    other, logits, _ = reference_llama.check_model(model, model.config, VOCAB, SEQ, gen, lns=False, bhyt=True)
    assert (other(lns=False, bhyt=True, bhyt_exact=True) - logits).abs().max() > 1e-2
    assert (other(lns=False) - logits).abs().max() > 1e-2


def test_attention_output_variance_is_what_a_uniform_attention_adds(megatron_tp1):
    """``||W_V W_O||_F^2 / (T d)`` is the variance of the attention's output when every token attends to all T
    tokens equally and the inputs are independent with unit variance: checked on 20,000 random inputs through
    megatron's own value and output projections (rel 5%)."""
    torch.manual_seed(0)
    layer = build(num_layers=1).decoder.layers[0]
    attention, tokens, hidden = layer.self_attention, 8, layer.config.hidden_size
    config = attention.config
    x = torch.randn(tokens, 20000, hidden)
    with torch.no_grad():
        qkv, _ = attention.linear_qkv(x)
        groups, head_dim = config.num_query_groups, config.kv_channels
        heads_per_group = config.num_attention_heads // groups
        values = qkv.view(tokens, -1, groups, heads_per_group + 2, head_dim)[:, :, :, -1]
        uniform = values.mean(0).repeat_interleave(heads_per_group, dim=1).reshape(1, -1, hidden)
        out, _ = attention.linear_proj(uniform)
    measured = out.pow(2).mean()
    assert attention_output_variance(attention, tokens).item() == pytest.approx(measured.item(), rel=0.05)


def test_initial_values_and_wiring(megatron_tp1):
    """Lambda starts at its position's value and gamma at 1; the MLP's BHyT follows its layer's attention BHyT
    and attention without registering them again (the state dict has megatron's keys plus the lambdas); the
    final norm stays RMSNorm; under sequence parallelism every BHyT parameter is marked."""
    model = build()
    for layer in model.decoder.layers:
        assert isinstance(layer, BHyTTransformerLayer)
        attention_norm, mlp_norm = layer.input_layernorm, layer.pre_mlp_layernorm
        assert isinstance(attention_norm, BHyT) and attention_norm.lam.item() == LAMBDAS[0]
        assert mlp_norm.lam.item() == LAMBDAS[1] and torch.equal(mlp_norm.weight, torch.ones(64))
        assert attention_norm._after is None and mlp_norm._after == (attention_norm, layer.self_attention)
        assert sorted(k for k in mlp_norm.state_dict()) == ["lam", "weight"]
    assert type(model.decoder.final_layernorm) is LNSNorm
    sp = BHyT(tiny_config(tensor_model_parallel_size=2, sequence_parallel=True), 16)
    assert all(p.sequence_parallel for p in sp.parameters())


def test_bhyt_module_against_its_formula(megatron_tp1):
    """One BHyT before attention, in float64: ``gamma * tanh(lambda x / (kappa sqrt(mean(x^2) + eps)))`` with
    kappa = 10 (rtol 1e-12); zero-centered gamma stores gamma - 1."""
    config = tiny_config(layernorm_zero_centered_gamma=True, params_dtype=torch.float64)
    norm = BHyT(config, 16, eps=1e-6, lambda_init=1.5)
    with torch.no_grad():
        norm.weight.normal_()
    x = 5 * torch.randn(3, 2, 16, dtype=torch.float64)
    expected = (1 + norm.weight) * torch.tanh(1.5 * x / (10 * (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()))
    assert KAPPA == 10
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)


def test_mlp_statistic_under_context_parallelism_equals_the_whole_sequence(megatron_tp1):
    """Under CP=2 a rank holds two of four chunks of each sequence (megatron's causal load balance). Its BHyT
    before the MLP must see T = the whole sequence in ||W_V W_O||^2 / (T d), as at CP=1: its outputs on those
    tokens equal the CP=1 outputs on the same tokens (rtol 1e-6); counted with the local T instead, they differ."""
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        model.decoder.layers[0].self_attention.linear_proj.weight.mul_(100.0)  # the T-dependent term matters
    layer, config = model.decoder.layers[0], model.config
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    chunks = x.view(4, SEQ // 4, BATCH, -1)
    local = torch.cat([chunks[0], chunks[3]])  # CP rank 0 of 2

    def mlp_norm(tokens, cp):
        config.context_parallel_size = cp
        try:
            layer.input_layernorm(tokens)
            return layer.pre_mlp_layernorm(tokens)
        finally:
            config.context_parallel_size = 1

    whole = mlp_norm(x, 1).view(4, SEQ // 4, BATCH, -1)
    expected = torch.cat([whole[0], whole[3]])
    torch.testing.assert_close(mlp_norm(local, 2), expected, rtol=1e-6, atol=1e-7)
    assert (mlp_norm(local, 1) - expected).abs().max() > 1e-3


def test_refusals(megatron_tp1):
    with pytest.raises(ValueError, match="norm_scheme='bhyt' bounds a tanh by the root mean square, which Transformer"):
        get_gpt_lns_layer_spec("transformer_engine", "bhyt")
    with pytest.raises(ValueError, match="use transformer_impl='local' with normalization='RMSNorm'"):
        get_gpt_lns_layer_spec("local", "bhyt", normalization="LayerNorm")
    layer = build(num_layers=1).decoder.layers[0]
    with pytest.raises(RuntimeError, match="BHyT before the MLP ran without the attention's BHyT before it"):
        layer.pre_mlp_layernorm(torch.randn(4, 1, 64))
