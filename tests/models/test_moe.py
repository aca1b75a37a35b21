"""Mixture-of-experts layers with the norm schemes, on real megatron-core modules (single process, CPU mode).

The reference for LNS on MoE is megatron-core's own MoE block (``get_gpt_decoder_block_spec``, Pre-LN) with
each layer's pre-norm weights multiplied by 1/sqrt(l): the same function by the definition of LNS.
"""

import math

import pytest
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer

from lns_megatron.config import moe_layer_pattern
from lns_megatron.models.gpt import build_gpt_model, tiny_config
from lns_megatron.models.specs import get_gpt_lns_layer_spec
from lns_megatron.schemes import NORM_SCHEMES

VOCAB, SEQ, BATCH = 96, 12, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PRE_NORMS = ("input_layernorm.weight", "pre_mlp_layernorm.weight")


def moe_config(pattern="1", **overrides):
    return tiny_config(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                       moe_layer_freq=moe_layer_pattern(pattern, 4), moe_aux_loss_coeff=0.01, **overrides)


def batch():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).to(DEVICE)
    positions = torch.arange(SEQ, device=DEVICE).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device=DEVICE), 1)
    return tokens, positions, mask


def build(config, scheme):
    torch.manual_seed(0)
    return build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme=scheme).to(DEVICE)


def layer_of(name: str) -> int:
    """The global 1-based layer number of a decoder parameter name."""
    return int(name.split("decoder.layers.")[1].split(".")[0]) + 1


@pytest.mark.parametrize("pattern", ["1", "[0,1,0,1]"], ids=["every-layer", "alternating"])
def test_lns_on_moe_equals_megatron_pre_ln_moe_with_scaled_norm_weights(megatron_tp1, pattern):
    """Logits, and every gradient (the norm weights' scaled by the chain rule), in float32."""
    config = moe_config(pattern)
    lns, pre = build(config, "lns"), build(config, "pre")
    expected = moe_layer_pattern(pattern, 4)
    for model in (lns, pre):
        assert [isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers] == [bool(v) for v in expected]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lns.named_parameters():
            if name.endswith(PRE_NORMS):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen).to(p.device))
    state = lns.state_dict()
    scaled = {k: (v / math.sqrt(layer_of(k)) if k.endswith(PRE_NORMS) else v) for k, v in state.items()}
    missing, unexpected = pre.load_state_dict(scaled, strict=False)
    assert not [m for m in missing if not m.endswith("_extra_state")] and not unexpected
    tokens, positions, mask = batch()
    probe = torch.randn(BATCH, SEQ, VOCAB, generator=gen).to(DEVICE)
    out_lns, out_pre = lns(tokens, positions, mask), pre(tokens, positions, mask)
    torch.testing.assert_close(out_lns, out_pre, rtol=1e-5, atol=1e-5)
    (out_lns * probe).sum().backward()
    (out_pre * probe).sum().backward()
    pre_params = dict(pre.named_parameters())
    for name, p in lns.named_parameters():
        factor = 1 / math.sqrt(layer_of(name)) if name.endswith(PRE_NORMS) else 1.0
        expected = pre_params[name].grad * factor  # float32 sums in another order: tolerance by the largest entry
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6 * max(1.0, expected.abs().max().item()),
                                   msg=name)


def test_moe_layers_get_their_aux_loss_and_scale(megatron_tp1):
    """megatron-core's router records the load-balancing loss of every MoE layer; each layer's pre-MLP norm in
    front of its router carries 1/sqrt(l)."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

    clear_aux_losses_tracker()
    model = build(moe_config(), "lns")
    for layer in model.decoder.layers:
        assert layer.pre_mlp_layernorm.lns_scale == pytest.approx(1 / math.sqrt(layer.layer_number))
    tokens, positions, mask = batch()
    model(tokens, positions, mask, labels=tokens).mean().backward()
    values = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
    assert values.shape == (4,) and bool((values > 0).all()), values
    clear_aux_losses_tracker()


@pytest.mark.parametrize("scheme", ["dyt", "bhyt"])
def test_tanh_schemes_run_on_moe_layers(megatron_tp1, scheme):
    """DyT and BHyT replace the pre-MLP norm in front of the router; the experts are megatron's."""
    model = build(moe_config(), scheme)
    assert all(isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers)
    tokens, positions, mask = batch()
    loss = model(tokens, positions, mask, labels=tokens).mean()
    loss.backward()
    assert torch.isfinite(loss)
    experts = [p.grad for n, p in model.named_parameters() if ".experts." in n]
    assert experts and all(g is not None and torch.isfinite(g).all() for g in experts)


@pytest.mark.parametrize("scheme", [s for s in NORM_SCHEMES if not NORM_SCHEMES[s].moe])
def test_schemes_not_defined_on_moe_are_refused_with_the_reason(megatron_tp1, scheme):
    with pytest.raises(ValueError, match="on MoE layers: .*(output projection|dense attention and MLP)"):
        build(moe_config(), scheme)


def test_moe_schemes_are_the_pre_norm_ones():
    assert sorted(s for s in NORM_SCHEMES if NORM_SCHEMES[s].moe) == ["bhyt", "dyt", "lns", "pre"]


def test_multi_latent_attention_needs_transformer_engine():
    """megatron-core's local DotProductAttention takes no k_channels, so MLA cannot be built with the local spec
    (seen on 0.16.1 and 0.19.2): refused in one line instead of a TypeError deep in the build."""
    for scheme in ("pre", "lns"):
        with pytest.raises(ValueError, match="multi_latent_attention with transformer_impl='local'"):
            get_gpt_lns_layer_spec("local", scheme, multi_latent_attention=True)


@pytest.mark.parametrize("scheme", ["peri", "post", "mix", "dyt"])
def test_schemes_other_than_pre_and_lns_refuse_multi_latent_attention(megatron_tp1, scheme):
    import dataclasses

    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from lns_megatron.models.specs import get_gpt_lns_block_spec

    base = tiny_config()
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    config = MLATransformerConfig(**{**fields, "multi_latent_attention": True}, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8,
                                  v_head_dim=16, rope_type="rope")
    with pytest.raises(ValueError, match="with multi-latent attention: only pre and lns"):
        get_gpt_lns_block_spec(config, "transformer_engine", scheme)
