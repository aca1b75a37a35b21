"""(f) Transformer Engine: the fused LNS spec equals the unfused local one, and FP8 runs.

These need Transformer Engine and a CUDA GPU; elsewhere they skip and say so.
"""

import math

import pytest
import torch

from lns_megatron.schemes.lns import HAVE_TE

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Transformer Engine tests)"),
    pytest.mark.skipif(not HAVE_TE, reason="needs Transformer Engine (pip install -e .[te])"),
]

VOCAB, SEQ, BATCH = 128, 32, 2
LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}


def to_te_names(state):
    out = {}
    for name, value in state.items():
        for local, te in LOCAL_TO_TE.items():
            if name.endswith(local):
                name = name[: -len(local)] + te
        out[name] = value
    return out


def build_pair(megatron_tp1, norm_scheme="lns", **overrides):
    from lns_megatron.models.gpt import build_gpt_model, tiny_config

    config = tiny_config(**overrides)
    torch.manual_seed(0)
    local = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme=norm_scheme).cuda()
    with torch.no_grad():
        for name, p in local.named_parameters():
            if "norm" in name:  # input, output (Peri-LN), post and final norms
                p.copy_(0.5 * torch.randn_like(p) + (0.0 if config.layernorm_zero_centered_gamma else 1.0))
    fused = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme=norm_scheme,
                            transformer_impl="transformer_engine").cuda()
    missing, unexpected = fused.load_state_dict(to_te_names(local.state_dict()), strict=False)
    assert not [m for m in missing if not m.endswith("_extra_state")] and not unexpected
    return local, fused


@pytest.mark.parametrize("overrides", [{}, {"layernorm_zero_centered_gamma": True},
                                       {"normalization": "LayerNorm", "add_bias_linear": True}],
                         ids=["rmsnorm", "zero-centered", "layernorm-bias"])
def test_fused_te_spec_equals_unfused_local(megatron_tp1, overrides):
    torch.backends.cuda.matmul.allow_tf32 = False
    local, fused = build_pair(megatron_tp1, **overrides)
    for layer in fused.decoder.layers:
        assert layer.self_attention.linear_qkv.lns_scale == 1 / math.sqrt(layer.layer_number)
        assert layer.mlp.linear_fc1.lns_scale == 1 / math.sqrt(layer.layer_number)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    positions = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device="cuda"), 1)
    probe = torch.randn(BATCH, SEQ, VOCAB, device="cuda")
    out_local, out_fused = local(tokens, positions, mask), fused(tokens, positions, mask)
    torch.testing.assert_close(out_fused, out_local, rtol=2e-3, atol=2e-3)
    (out_local * probe).sum().backward()
    (out_fused * probe).sum().backward()
    fused_params = dict(fused.named_parameters())
    for name, p in to_te_names(dict(local.named_parameters())).items():
        torch.testing.assert_close(fused_params[name].grad, p.grad, rtol=5e-3, atol=5e-3, msg=name)


def test_fp8_forward_backward_runs_with_lns(megatron_tp1):
    if not torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("FP8 needs an Ada or Hopper GPU (compute capability 8.9+)")
    from lns_megatron.models.gpt import build_gpt_model, tiny_config

    config = tiny_config(fp8="hybrid", fp8_recipe="delayed", params_dtype=torch.bfloat16, bf16=True,
                         hidden_size=128, ffn_hidden_size=256, num_attention_heads=4)
    model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, transformer_impl="transformer_engine").cuda()
    tokens = torch.randint(0, VOCAB, (BATCH * 8, SEQ), device="cuda")
    positions = torch.arange(SEQ, device="cuda").expand(tokens.shape)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    assert torch.isfinite(loss)
    qkv = model.decoder.layers[-1].self_attention.linear_qkv
    assert qkv.lns_scale == 0.5 and torch.isfinite(qkv.layer_norm_weight.grad).all()


def test_hybrid_te_spec_equals_gpt_te(megatron_tp1):
    """HybridModel with the Transformer Engine LNS stack spec: the fused norms carry 1/sqrt(l) per attention+MLP
    pair, and the logits equal GPTModel's with the TE LNS spec on the same weights. Before megatron-core 0.19
    the builder refuses, naming the version."""
    from lns_megatron.models.gpt import build_gpt_model, tiny_config
    from lns_megatron.models.hybrid import HAVE_HYBRID, build_hybrid_lns_model, gpt_key

    config = tiny_config()
    pattern = "*-" * config.num_layers
    hybrid_config = tiny_config(num_layers=2 * config.num_layers)
    if not HAVE_HYBRID:
        with pytest.raises(ImportError, match="HybridModel is in megatron-core 0.19"):
            build_hybrid_lns_model(hybrid_config, VOCAB, SEQ, pattern, transformer_impl="transformer_engine")
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    gpt = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, transformer_impl="transformer_engine").cuda()
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    hybrid = build_hybrid_lns_model(hybrid_config, VOCAB, SEQ, pattern, transformer_impl="transformer_engine").cuda()
    gpt_state = gpt.state_dict()
    weights = {k: gpt_state[gpt_key(k)] for k in hybrid.state_dict() if not k.endswith("_extra_state")}
    missing, unexpected = hybrid.load_state_dict(weights, strict=False)
    assert not [m for m in missing if not m.endswith("_extra_state")] and not unexpected
    for i, layer in enumerate(hybrid.decoder.layers):
        carrier = layer.self_attention.linear_qkv if i % 2 == 0 else layer.mlp.linear_fc1
        assert carrier.lns_scale == pytest.approx(1 / math.sqrt(i // 2 + 1))
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    positions = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)
    with torch.no_grad():
        mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device="cuda"), 1)
        torch.testing.assert_close(hybrid(tokens, positions, mask), gpt(tokens, positions, mask), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["peri-lns", "post", "mix", "deepnorm"])
def test_te_specs_of_the_other_schemes_equal_local(megatron_tp1, scheme):
    """Peri-LN's output norms as TENorm inside TERowParallelLinear's subclass, the post-norm layers with the
    unfused TEColumnParallelLinear and TENorm (Mix-LN's Pre-LN layers fused): the local spec's logits."""
    torch.backends.cuda.matmul.allow_tf32 = False
    local, fused = build_pair(megatron_tp1, norm_scheme=scheme)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    positions = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device="cuda"), 1)
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens, positions, mask), local(tokens, positions, mask), rtol=2e-3, atol=2e-3)


# LNS on the standalone TE norms: MoE layers' pre-MLP norm, multi-latent attention's input norm.
PRE_NORM_PARAMS = ("input_layernorm.weight", "input_layernorm.bias", "pre_mlp_layernorm.weight",
                   "pre_mlp_layernorm.bias", "linear_qkv.layer_norm_weight", "linear_qkv.layer_norm_bias",
                   "linear_fc1.layer_norm_weight", "linear_fc1.layer_norm_bias")


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm", "zero-centered", "fused-residual"])
def test_lns_te_norm_equals_the_scaled_te_norm(megatron_tp1, kind):
    """LNSTENorm is Transformer Engine's own norm whose output (the first of TE's fused-residual RMSNorm's
    (normed, residual)) is 1/sqrt(l) times TENorm's, with the same gradients by the chain rule."""
    from megatron.core.extensions.transformer_engine import TENorm

    from lns_megatron.models.gpt import tiny_config
    from lns_megatron.schemes.lns import TEFusedResidualRMSNorm, LNSTENorm

    overrides = {"layernorm": dict(normalization="LayerNorm"),
                 "zero-centered": dict(layernorm_zero_centered_gamma=True),
                 "fused-residual": dict(fused_residual_rmsnorm=True)}.get(kind, {})
    kwargs = {}
    if kind == "fused-residual":
        from megatron.core.transformer.transformer_config import TransformerConfig

        if "fused_residual_rmsnorm" not in TransformerConfig.__dataclass_fields__:
            # megatron-core before 0.17: no such norm, and LNSTENorm's import of it falls back to None
            assert TEFusedResidualRMSNorm is None
            return
        if TEFusedResidualRMSNorm is None:
            pytest.skip("megatron-core's fused-residual RMSNorm needs Transformer Engine 1.13 or later")
        kwargs["has_residual"] = True
    config = tiny_config(**overrides)
    torch.manual_seed(0)
    reference, scaled = TENorm(config, 64, **kwargs).cuda(), LNSTENorm(config, 64, **kwargs).cuda()
    assert type(scaled).__mro__[1] is type(reference) and type(scaled).__name__.startswith("LNS")
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(0.5 * torch.randn_like(p))
    scaled.load_state_dict(reference.state_dict())
    assert list(scaled.state_dict()) == list(reference.state_dict())
    scaled.lns_scale = 1 / math.sqrt(5)
    x = torch.randn(8, 2, 64, device="cuda", requires_grad=True)
    out, expected = scaled(x), reference(x)
    if kind == "fused-residual":
        (out, residual), (expected, reference_residual) = out, expected
        torch.testing.assert_close(residual, reference_residual, rtol=0, atol=0)
    expected = expected * scaled.lns_scale
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(out)
    got = torch.autograd.grad((out * probe).sum(), [x, *scaled.parameters()])
    want = torch.autograd.grad((expected * probe).sum(), [x, *reference.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def mla_config(**overrides):
    import dataclasses

    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from lns_megatron.models.gpt import tiny_config

    base = tiny_config(**overrides)
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    return MLATransformerConfig(**{**fields, "multi_latent_attention": True}, q_lora_rank=32, kv_lora_rank=16,
                                qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16, rope_type="rope")


def moe_config(**overrides):
    from lns_megatron.models.gpt import tiny_config

    return tiny_config(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=0.01,
                       **overrides)


@pytest.mark.parametrize("layers", ["moe", "moe-grouped-gemm", "mla", "mla-moe"])
def test_te_lns_on_moe_and_mla_equals_te_pre_ln_with_scaled_norm_weights(megatron_tp1, layers):
    """The Transformer Engine LNS spec on MoE and MLA layers (standalone LNSTENorm where megatron keeps a TENorm,
    the fused norm-linear elsewhere) computes megatron-core's own TE Pre-LN block with each layer's pre-norm
    weights times 1/sqrt(l): logits and gradients."""
    from lns_megatron.models.gpt import build_gpt_model

    torch.backends.cuda.matmul.allow_tf32 = False
    experts = dict(moe_grouped_gemm=True) if layers == "moe-grouped-gemm" else {}
    if layers.startswith("mla"):
        config = mla_config(**(dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)
                               if layers == "mla-moe" else {}))
    else:
        config = moe_config(**experts)

    def build(scheme):
        torch.manual_seed(0)
        return build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme=scheme,
                               transformer_impl="transformer_engine").cuda()

    lns, pre = build("lns"), build("pre")
    for layer in lns.decoder.layers:
        for where, carrier in layer._pre_norm_carriers():
            assert carrier.lns_scale == pytest.approx(1 / math.sqrt(layer.layer_number)), where
    with torch.no_grad():
        for name, p in lns.named_parameters():
            if name.endswith(PRE_NORM_PARAMS):
                p.copy_(1.0 + 0.5 * torch.randn_like(p) if "weight" in name else 0.1 * torch.randn_like(p))
    layer_of = lambda name: int(name.split("decoder.layers.")[1].split(".")[0]) + 1  # noqa: E731
    state = lns.state_dict()
    scaled = {k: v / math.sqrt(layer_of(k)) if k.endswith(PRE_NORM_PARAMS) else v for k, v in state.items()}
    missing, unexpected = pre.load_state_dict(scaled, strict=False)
    assert not [m for m in missing if not m.endswith("_extra_state")] and not unexpected
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    positions = torch.arange(SEQ, device="cuda").expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device="cuda"), 1)
    out_lns, out_pre = lns(tokens, positions, mask), pre(tokens, positions, mask)
    torch.testing.assert_close(out_lns, out_pre, rtol=2e-3, atol=2e-3)
    probe = torch.randn_like(out_lns)
    (out_lns * probe).sum().backward()
    (out_pre * probe).sum().backward()
    pre_params = dict(pre.named_parameters())
    for name, p in lns.named_parameters():
        factor = 1 / math.sqrt(layer_of(name)) if name.endswith(PRE_NORM_PARAMS) else 1.0
        expected = pre_params[name].grad * factor
        torch.testing.assert_close(p.grad, expected, rtol=5e-3, atol=5e-3 * max(1.0, expected.abs().max().item()),
                                   msg=name)
