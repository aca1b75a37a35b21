"""Dynamic Tanh on real megatron-core modules, against the independent float64 reference."""

import math

import pytest
import torch

import reference_llama
from lns_megatron.models.gpt import build_gpt_model, tiny_config
from lns_megatron.models.specs import get_gpt_lns_layer_spec
from lns_megatron.schemes.tanh import DyT, DyTGPTModel

VOCAB, SEQ, BATCH = 96, 12, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALPHAS = (0.8, 0.2, 0.3)  # before attention, before the MLP, final


def test_model_matches_float64_reference(megatron_tp1):
    """Logits (rtol 1e-5, atol 2e-5) and every gradient (rtol 1e-4, atol 1e-5), alphas and the embedding scale
    included, equal the float64 reference's; with RMSNorm in place of DyT the reference differs."""
    torch.manual_seed(0)
    config = tiny_config(num_query_groups=2)
    model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme="dyt",
                            dyt_alpha_init=ALPHAS).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # gammas away from 1, so that a swapped or missing one shows
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen))
    other, logits, params = reference_llama.check_model(model, config, VOCAB, SEQ, gen, lns=False, dyt=True)
    embedded = {**params, "embedding.word_embeddings.weight": params["embedding.word_embeddings.weight"]
                * params["embedding_scale"]}  # RMSNorm in place of DyT, on the same scaled embeddings
    assert (other(embedded, lns=False) - logits).abs().max() > 1e-2


def test_initial_values_by_position(megatron_tp1):
    """Alpha starts at the value of its position; gamma at 1, no beta with RMSNorm; the embedding scale at
    sqrt(hidden); every norm, the final one included, is a DyT."""
    config = tiny_config()
    model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme="dyt",
                            dyt_alpha_init=ALPHAS)
    assert isinstance(model, DyTGPTModel)
    assert model.embedding_scale.item() == pytest.approx(math.sqrt(config.hidden_size))
    for layer in model.decoder.layers:
        assert isinstance(layer.input_layernorm, DyT) and layer.input_layernorm.alpha.item() == pytest.approx(0.8)
        assert layer.pre_mlp_layernorm.alpha.item() == pytest.approx(0.2) and layer.pre_mlp_layernorm.bias is None
        assert torch.equal(layer.input_layernorm.weight, torch.ones(config.hidden_size))
    assert isinstance(model.decoder.final_layernorm, DyT) and model.decoder.final_layernorm.alpha.item() == pytest.approx(0.3)
    assert not any(type(m).__name__ in ("LNSNorm", "WrappedTorchNorm") for m in model.modules())


def test_layernorm_config_has_beta_and_zero_centered_gamma(megatron_tp1):
    """With LayerNorm's shape DyT has beta; with --apply-layernorm-1p gamma is stored as gamma - 1."""
    config = tiny_config(normalization="LayerNorm", layernorm_zero_centered_gamma=True, params_dtype=torch.float64)
    dyt = DyT(config, 16, alpha_init=0.7)
    with torch.no_grad():
        dyt.weight.normal_()
        dyt.bias.normal_()
    x = torch.randn(3, 16, dtype=torch.float64)
    expected = (1 + dyt.weight) * torch.tanh(0.7 * x) + dyt.bias
    torch.testing.assert_close(dyt(x), expected, rtol=1e-12, atol=1e-12)
    sp = DyT(tiny_config(tensor_model_parallel_size=2, sequence_parallel=True), 16)
    assert all(p.sequence_parallel for p in sp.parameters())


def test_refusals():
    with pytest.raises(ValueError, match="norm_scheme='dyt' replaces every norm with a tanh, which Transformer Engine"):
        get_gpt_lns_layer_spec("transformer_engine", "dyt")
    with pytest.raises(ValueError, match="qk_layernorm would not get"):
        get_gpt_lns_layer_spec("local", "dyt", qk_layernorm=True)
