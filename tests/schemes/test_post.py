"""Post-LN, Mix-LN and DeepNorm on real megatron-core modules, against the independent float64 reference."""

import pytest
import torch

import reference_llama
from lns_megatron.models.gpt import build_gpt_model, tiny_config
from lns_megatron.models.specs import get_gpt_lns_layer_spec
from lns_megatron.schemes.post import PostNormTransformerLayer

VOCAB, SEQ, BATCH, LAYERS = 96, 12, 2, 4
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def build(scheme, **kwargs):
    config = tiny_config(num_layers=LAYERS, num_query_groups=2)
    return config, build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme=scheme,
                                   **kwargs).to(DEVICE)


def randomize_norms(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen).to(p.device))


# scheme, build kwargs, reference kwargs (Post-LN layers from the first, residual scale, final norm)
CASES = {
    "post": ({}, dict(post_layers=LAYERS, final_norm=False)),
    "mix": ({"mix_ln_alpha": 0.5}, dict(post_layers=2)),
    "mix-0.3": ({"mix_ln_alpha": 0.3}, dict(post_layers=1)),  # floor(0.3 * 4) = 1
    "deepnorm": ({}, dict(post_layers=LAYERS, residual_scale=(2 * LAYERS) ** 0.25, final_norm=False)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_matches_float64_reference(megatron_tp1, case):
    """Logits (rtol 1e-5, atol 2e-5) and every parameter gradient (rtol 1e-4, atol 1e-5) of the float32 model
    equal the float64 reference's; the reference with Pre-LN in place of the post-norm layers differs."""
    build_kwargs, ref_kwargs = CASES[case]
    torch.manual_seed(0)
    config, model = build(case.split("-")[0], **build_kwargs)
    gen = torch.Generator().manual_seed(1)
    randomize_norms(model, gen)
    other, logits, _ = reference_llama.check_model(model, config, VOCAB, SEQ, gen, lns=False, **ref_kwargs)
    if ref_kwargs.get("residual_scale"):  # without DeepNorm's residual scale it is another function
        assert (other(lns=False, **{**ref_kwargs, "residual_scale": 1.0}) - logits).abs().max() > 1e-3


def test_which_layers_are_post_norm(megatron_tp1):
    """Post-LN and DeepNorm: every layer, no input norms, no final norm. Mix-LN: the first floor(alpha N) by
    megatron's global layer number, then Pre-LN layers with their input norms, and the final norm."""
    _, post = build("post")
    assert all(isinstance(l, PostNormTransformerLayer) for l in post.decoder.layers)
    assert post.decoder.final_layernorm is None
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n, _ in post.named_parameters())
    _, mix = build("mix", mix_ln_alpha=0.25)
    kinds = [isinstance(l, PostNormTransformerLayer) for l in mix.decoder.layers]
    assert kinds == [True, False, False, False] and mix.decoder.final_layernorm is not None
    assert "decoder.layers.1.input_layernorm.weight" in dict(mix.named_parameters())
    for alpha, first in ((0.0, 0), (1.0, 4), (0.74, 2)):
        _, m = build("mix", mix_ln_alpha=alpha)
        assert sum(isinstance(l, PostNormTransformerLayer) for l in m.decoder.layers) == first, alpha


def test_deepnorm_initial_scales(megatron_tp1):
    """DeepNorm's b = (8N)^(-1/4) on the value rows of linear_qkv, linear_proj, linear_fc1 and linear_fc2 only:
    the same seed without DeepNorm (Post-LN) gives the unscaled weights."""
    b = (8 * LAYERS) ** -0.25
    torch.manual_seed(0)
    config, deep = build("deepnorm")
    torch.manual_seed(0)
    _, post = build("post")
    heads_per_group, head_dim = config.num_attention_heads // 2, config.kv_channels
    for d, p in zip(deep.decoder.layers, post.decoder.layers):
        qd = d.self_attention.linear_qkv.weight.view(2, (heads_per_group + 2) * head_dim, -1)
        qp = p.self_attention.linear_qkv.weight.view(2, (heads_per_group + 2) * head_dim, -1)
        split = (heads_per_group + 1) * head_dim
        torch.testing.assert_close(qd[:, :split], qp[:, :split], rtol=0, atol=0)  # queries and keys: unscaled
        torch.testing.assert_close(qd[:, split:], b * qp[:, split:], rtol=1e-6, atol=0)
        for name in ("self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            wd, wp = (dict(m.named_parameters())[name + ".weight"] for m in (d, p))
            torch.testing.assert_close(wd, b * wp, rtol=1e-6, atol=0, msg=name)
        assert d.residual_scale == pytest.approx((2 * LAYERS) ** 0.25)


def test_refusals(megatron_tp1):
    with pytest.raises(ValueError, match="norm_scheme='mix' has Post-LN and Pre-LN layers; .*get_gpt_lns_block_spec"):
        get_gpt_lns_layer_spec(norm_scheme="mix")
    with pytest.raises(ValueError, match="the post-norm schemes .* are built for dense attention and MLP layers"):
        get_gpt_lns_layer_spec(norm_scheme="post", num_experts=2)
    with pytest.raises(ValueError, match="norm_scheme='deepnorm' scales by the model's number of layers"):
        get_gpt_lns_layer_spec(norm_scheme="deepnorm")
    with pytest.raises(ValueError, match="mix_ln_alpha=1.5; it is a fraction"):
        build_gpt_model(tiny_config(), vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme="mix",
                        mix_ln_alpha=1.5)
