"""lns_megatron.hf.scaling: LNS on Hugging Face Llama-family models, checked against gamma folded by hand
and against our megatron LNS layer on the same weights; export --keep-lns round trips; every refusal."""

import copy
import json
import math
import os

import pytest
import torch

from lns_megatron.hf import LayerNormScalingError, apply_layernorm_scaling, fold_layernorm_scaling, from_pretrained

LAYERS = 4


def small_model(kind):
    """A random float64 model of each Llama-family architecture, norms perturbed away from 1."""
    import transformers

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = getattr(transformers, f"{kind}Config")(**common)
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    return model


def fold_by_hand(model):
    """The same model with gamma_l / sqrt(l) written into both pre-norms (independent of our fold)."""
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(folded.model.layers):
            layer.input_layernorm.weight.div_(math.sqrt(i + 1))
            layer.post_attention_layernorm.weight.div_(math.sqrt(i + 1))
    return folded


def tokens(vocab=64, batch=2, length=16):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", ["Llama", "Mistral", "Qwen2"])
def test_lns_equals_the_scale_folded_into_gamma(kind):
    model = small_model(kind)
    plain_logits = model(tokens()).logits.detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = dict(model.named_buffers())
    folded = fold_by_hand(model)

    assert apply_layernorm_scaling(model) is model
    # No parameter, buffer or key added; nothing changed in place.
    assert list(model.state_dict()) == list(state) and dict(model.named_buffers()).keys() == buffers.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.config.lns_megatron == {"norm_scheme": "lns", "lns_folded_into": None}

    probe = torch.randn(2, 16, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    lns_logits = model(tokens()).logits
    (lns_logits * probe).sum().backward()
    ref_logits = folded(tokens()).logits
    (ref_logits * probe).sum().backward()
    torch.testing.assert_close(lns_logits, ref_logits, rtol=1e-12, atol=1e-12)  # float64: same function
    assert (lns_logits - plain_logits).abs().max() > 1e-2  # and not the unscaled one: the check can fail

    # The gradients are not those of the folded gamma: dL/dgamma = s * dL/d(s gamma).
    for i, (a, b) in enumerate(zip(model.model.layers, folded.model.layers)):
        s = 1.0 / math.sqrt(i + 1)
        for name in ("input_layernorm", "post_attention_layernorm"):
            torch.testing.assert_close(getattr(a, name).weight.grad, s * getattr(b, name).weight.grad,
                                       rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.model.norm.weight.grad, folded.model.norm.weight.grad, rtol=1e-10, atol=1e-12)
    assert not hasattr(model.model.norm, "lns_scale")  # the final norm is untouched


def test_fold_gives_the_same_plain_model():
    model = apply_layernorm_scaling(small_model("Llama"))
    lns_logits = model(tokens()).logits.detach()
    fold_layernorm_scaling(model)
    assert not any(hasattr(m, "lns_scale") or m._forward_hooks for m in model.modules())
    torch.testing.assert_close(model(tokens()).logits, lns_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.state_dict()["model.layers.3.input_layernorm.weight"],
                               fold_by_hand(small_model("Llama")).state_dict()["model.layers.3.input_layernorm.weight"])
    assert model.config.lns_megatron["lns_folded_into"] == "input_layernorm, post_attention_layernorm"
    with pytest.raises(LayerNormScalingError, match="already has LNS folded into its norm weights"):
        apply_layernorm_scaling(model)


def test_fold_refuses_a_norm_not_linear_in_its_weight():
    class OnePlusRMSNorm(torch.nn.Module):  # Gemma-style (1 + w): scaling w does not scale the output
        def __init__(self, n):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)

    model = small_model("Llama")
    model.model.layers[2].input_layernorm = OnePlusRMSNorm(32)
    apply_layernorm_scaling(model)
    with pytest.raises(LayerNormScalingError, match="layer 3's OnePlusRMSNorm is not linear in its weight"):
        fold_layernorm_scaling(model)


def test_refusals():
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64))
    with pytest.raises(LayerNormScalingError, match="GPT2LMHeadModel has 0 lists of decoder layers"):
        apply_layernorm_scaling(gpt2)
    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(LayerNormScalingError, match="post_feedforward_layernorm.*is not the pre-MLP norm"):
        apply_layernorm_scaling(gemma)
    assert not any(m._forward_hooks for m in gemma.modules())  # refused before touching anything

    model = apply_layernorm_scaling(small_model("Llama"))
    with pytest.raises(LayerNormScalingError, match="is already LNS"):
        apply_layernorm_scaling(model)
    assert len(model.model.layers[0].input_layernorm._forward_hooks) == 1


def test_save_and_from_pretrained_restore_lns(tmp_path):
    from transformers import AutoModelForCausalLM

    model = apply_layernorm_scaling(small_model("Qwen2"))
    expected = model(tokens()).logits.detach()
    model.save_pretrained(tmp_path / "m")
    assert json.load(open(tmp_path / "m" / "config.json"))["lns_megatron"]["norm_scheme"] == "lns"
    again = from_pretrained(str(tmp_path / "m"), dtype=torch.float64).eval()
    torch.testing.assert_close(again(tokens()).logits, expected, rtol=1e-12, atol=1e-12)
    # Plain transformers loads the unscaled weights as a Pre-LN model: a different function.
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float64).eval()
    assert (plain(tokens()).logits - expected).abs().max() > 1e-2


def test_same_logits_and_gamma_gradients_as_our_megatron_lns_layer(tmp_path):
    """A megatron LNS GPTModel exported with keep_lns, loaded with from_pretrained: the same logits and the
    same gradients for every norm weight (float32; ours scales gamma, the hook scales the output)."""
    from lns_megatron.config import PretrainConfig, fill_defaults
    from lns_megatron.data.tokenizer import build_tokenizer
    from lns_megatron.diagnostics.report import forward_logits
    from lns_megatron.hf.export import LoadedModel, export
    from lns_megatron.models.gpt import build_gpt_model
    from lns_megatron.training import distributed
    from lns_megatron.training.train import transformer_config

    c = PretrainConfig(num_layers=LAYERS, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                       ffn_hidden_size=48, normalization="RMSNorm", swiglu=True, position_embedding_type="rope",
                       seq_length=16, untie_embeddings_and_output_weights=True, norm_scheme="lns",
                       disable_bias_linear=True, rotary_base=10000)
    fill_defaults(c)
    batch = tokens(vocab=100)
    probe = torch.randn(2, 16, 100, generator=torch.Generator().manual_seed(5))
    distributed.initialize(1, 1, seed=5)
    try:
        model = build_gpt_model(transformer_config(c), vocab_size=128, max_sequence_length=16, norm_scheme="lns")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.copy_(1.0 + 0.5 * torch.randn_like(p))
        loaded = LoadedModel(model.eval(), c, "in-memory", 0, build_tokenizer("NullTokenizer", vocab_size=99), 100)
        export(loaded, str(tmp_path / "hf"), keep_lns=True)
        meg = forward_logits(model, batch)[..., :100]
        (meg * probe).sum().backward()
        meg_grads = {n: p.grad.clone() for n, p in model.named_parameters() if "layernorm" in n}
    finally:
        distributed.destroy()
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["lns_megatron"] == {**config["lns_megatron"], "norm_scheme": "lns", "lns_folded_into": None}

    hf = from_pretrained(str(tmp_path / "hf"), dtype=torch.float32, attn_implementation="eager").eval()
    logits = hf(batch).logits
    (logits * probe).sum().backward()
    torch.testing.assert_close(logits, meg.detach(), rtol=0, atol=2e-5)
    layers = hf.model.layers
    for i in range(LAYERS):
        for meg_name, hf_name in (("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "post_attention_layernorm")):
            torch.testing.assert_close(getattr(layers[i], hf_name).weight.grad,
                                       meg_grads[f"decoder.layers.{i}.{meg_name}.weight"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hf.model.norm.weight.grad, meg_grads["decoder.final_layernorm.weight"],
                               rtol=1e-4, atol=1e-6)

    # Re-export folds: a plain Llama with the same logits, loadable by any tool.
    from transformers import LlamaForCausalLM

    from lns_megatron.hf.export import main

    assert main(["--load", str(tmp_path / "hf"), "--output", str(tmp_path / "plain")]) == 0
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path / "plain"), dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(batch).logits, logits.detach(), rtol=0, atol=2e-5)
    assert json.load(open(tmp_path / "plain" / "config.json"))["lns_megatron"]["lns_folded_into"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
