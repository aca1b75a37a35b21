"""LNS layer numerics on real megatron-core modules, single process (CPU mode without CUDA)."""

import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_layer import TransformerLayer

import reference_llama
from lns_megatron import LNSNorm, LNSTransformerLayer, get_gpt_lns_layer_spec, layernorm_scale
from lns_megatron.models.gpt import build_gpt_model, tiny_config

VOCAB, SEQ, BATCH = 96, 12, 2
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the same suite runs on one GPU


def causal_mask(s):
    return torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=DEVICE), 1)


def randomize_norms(model, gen):
    """Non-unit norm weights, so that a scale hidden in a weight cannot pass unnoticed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=gen).to(p.device))


def same_spec(a, b) -> bool:
    """Specs equal field by field; megatron-core 0.19 wraps some submodules in functools.partial, which
    compares by identity, so a partial is compared by its function and arguments."""
    import dataclasses
    import functools

    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return a.func == b.func and len(a.args) == len(b.args) and all(map(same_spec, a.args, b.args)) \
            and a.keywords.keys() == b.keywords.keys() and all(same_spec(a.keywords[k], b.keywords[k]) for k in a.keywords)
    if dataclasses.is_dataclass(a) and not isinstance(a, type) and type(a) is type(b):
        return all(same_spec(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_spec(a[k], b[k]) for k in a)
    return a == b


def test_layernorm_scale_values():
    assert layernorm_scale(1) == 1.0
    assert layernorm_scale(4) == 0.5
    assert math.isclose(layernorm_scale(24), 24**-0.5)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="layer_number"):
            layernorm_scale(bad)


@pytest.mark.parametrize("num_query_groups", [4, 2])
def test_gpt_model_matches_plain_pytorch_reference(megatron_tp1, num_query_groups):
    """(a) Logits and every parameter gradient equal an independent float32 reference."""
    torch.manual_seed(0)
    config = tiny_config(num_query_groups=num_query_groups)
    model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ).to(DEVICE)
    gen = torch.Generator().manual_seed(1)
    randomize_norms(model, gen)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen).to(DEVICE)
    positions = torch.arange(SEQ, device=DEVICE).expand(BATCH, SEQ)
    probe = torch.randn(BATCH, SEQ, VOCAB, generator=gen).to(DEVICE)

    logits = model(tokens, positions, causal_mask(SEQ))
    (logits * probe).sum().backward()

    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    ref = reference_llama.forward(
        params,
        tokens,
        num_layers=config.num_layers,
        num_heads=config.num_attention_heads,
        num_query_groups=num_query_groups,
        eps=config.layernorm_epsilon,
        lns=True,
    )
    (ref * probe).sum().backward()

    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    # The reference without LNS differs: the check can fail.
    plain = reference_llama.forward(
        params, tokens, num_layers=config.num_layers, num_heads=4,
        num_query_groups=num_query_groups, eps=config.layernorm_epsilon, lns=False,
    )
    assert (plain - logits).abs().max() > 1e-2


def test_pre_scheme_is_megatron_local_spec(megatron_tp1):
    """(b) norm_scheme='pre' is megatron-core's own local spec, and computes the same function."""
    assert same_spec(get_gpt_lns_layer_spec("local", "pre"), get_gpt_layer_local_spec(normalization="RMSNorm"))
    config = tiny_config()
    torch.manual_seed(3)
    ours = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme="pre").to(DEVICE)
    from megatron.core.models.gpt import GPTModel

    upstream = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), VOCAB, SEQ,
                        position_embedding_type="rope").to(DEVICE)
    upstream.load_state_dict(ours.state_dict())
    assert all(type(l) is TransformerLayer for l in ours.decoder.layers)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), device=DEVICE)
    positions = torch.arange(SEQ, device=DEVICE).expand(BATCH, SEQ)
    torch.testing.assert_close(ours(tokens, positions, causal_mask(SEQ)),
                               upstream(tokens, positions, causal_mask(SEQ)), rtol=0, atol=0)


def test_scales_live_on_the_norms_and_final_norm_is_plain(megatron_tp1):
    model = build_gpt_model(tiny_config(), vocab_size=VOCAB, max_sequence_length=SEQ).to(DEVICE)
    for layer in model.decoder.layers:
        assert isinstance(layer, LNSTransformerLayer)
        s = 1.0 / math.sqrt(layer.layer_number)
        assert layer.input_layernorm.lns_scale == s and layer.pre_mlp_layernorm.lns_scale == s
    assert [l.layer_number for l in model.decoder.layers] == [1, 2, 3, 4]
    final = model.decoder.final_layernorm
    assert final.lns_scale == 1.0
    x = torch.randn(3, 64, device=DEVICE)
    torch.testing.assert_close(final(x), F.rms_norm(x, (64,), final.weight, final.eps))
    # Constant, not state: nothing LNS-specific reaches the checkpoint.
    names = set(model.state_dict())
    assert not any("lns" in n for n in names)
    assert not any("lns" in n for n, _ in model.named_buffers())


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("zero_centered", [False, True])
def test_effective_affine_equals_scaled_output(normalization, zero_centered):
    """Zero-centered gamma and LayerNorm bias: s * norm(x), with the same gradients (float64)."""
    config = tiny_config(normalization=normalization, layernorm_zero_centered_gamma=zero_centered)
    x = torch.randn(5, 3, 64, dtype=torch.float64, device=DEVICE)
    scale = layernorm_scale(7)
    norm = LNSNorm(config, 64, eps=1e-5).double().to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 0.7, 64, device=DEVICE))
        if norm.bias is not None:
            norm.bias.copy_(torch.linspace(0.3, -0.2, 64, device=DEVICE))
    norm.lns_scale = scale
    out = norm(x)
    gamma = norm.weight.detach().clone().requires_grad_(True)
    beta = None if norm.bias is None else norm.bias.detach().clone().requires_grad_(True)
    effective_gamma = 1 + gamma if zero_centered else gamma
    if normalization == "RMSNorm":
        expected = reference_llama.rms_norm(x, effective_gamma, 1e-5) * scale
    else:
        expected = F.layer_norm(x, (64,), effective_gamma, beta, 1e-5) * scale
    probe = torch.randn_like(x)
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.weight.grad, gamma.grad, rtol=1e-12, atol=1e-12)
    if beta is not None:
        torch.testing.assert_close(norm.bias.grad, beta.grad, rtol=1e-12, atol=1e-12)


def test_biases_and_qk_layernorm(megatron_tp1):
    """Linear biases and qk-layernorm are untouched; only the two pre-norms are scaled."""
    config = tiny_config(add_bias_linear=True, add_qkv_bias=True, normalization="LayerNorm", qk_layernorm=True)
    spec = get_gpt_lns_layer_spec("local", "lns", normalization="LayerNorm", qk_layernorm=True)
    layer = LNSTransformerLayer(config, spec.submodules, layer_number=9).to(DEVICE)
    assert layer.input_layernorm.lns_scale == pytest.approx(1 / 3)
    assert getattr(layer.self_attention.q_layernorm, "lns_scale", 1.0) == 1.0
    assert getattr(layer.self_attention.k_layernorm, "lns_scale", 1.0) == 1.0
    assert layer.self_attention.linear_qkv.bias is not None
    # The layer's output differs from the same weights at scale 1 (the scale does something).
    x = torch.randn(SEQ, BATCH, 64, device=DEVICE)
    out, _ = layer(x, attention_mask=causal_mask(SEQ))
    layer.input_layernorm.lns_scale = layer.pre_mlp_layernorm.lns_scale = 1.0
    unscaled, _ = layer(x, attention_mask=causal_mask(SEQ))
    assert (out - unscaled).abs().max() > 1e-3


def test_unfused_foreign_norm_is_refused(megatron_tp1):
    """A pre-norm module that cannot apply the scale is an error, never a silent no-op."""
    import dataclasses

    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    spec = get_gpt_lns_layer_spec("local", "lns")
    bad = dataclasses.replace(spec.submodules, pre_mlp_layernorm=WrappedTorchNorm)
    with pytest.raises(TypeError, match="pre-MLP norm is a RMSNorm"):
        LNSTransformerLayer(tiny_config(), bad, layer_number=2)


@pytest.mark.parametrize("output_layer_init, divisor", [("plain", 1.0), ("scaled", math.sqrt(16))])
def test_output_layer_init(megatron_tp1, output_layer_init, divisor):
    """plain: N(0, std) on linear_proj and linear_fc2 (the paper's code); scaled: megatron's std/sqrt(2L)."""
    std = 0.02
    config = tiny_config(output_layer_init, num_layers=8, init_method_std=std, hidden_size=128, ffn_hidden_size=512)
    assert config.output_layer_init_method.keywords["std"] == pytest.approx(std / divisor)
    torch.manual_seed(0)
    model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    for w in (model.decoder.layers[0].mlp.linear_fc2.weight, model.decoder.layers[0].self_attention.linear_proj.weight):
        assert 0.9 * std / divisor < w.std().item() < 1.1 * std / divisor
    with pytest.raises(ValueError, match="output_layer_init='depth'"):
        tiny_config("depth")


@pytest.mark.parametrize("output_layer_init", ["plain", "scaled"])
def test_pre_and_lns_start_from_identical_weights(megatron_tp1, output_layer_init):
    """The same flags and seed give Pre-LN and LNS bit-identical weights (norms included), so an A/B
    of the two differs in --norm-scheme alone."""
    from lns_megatron.config import parse_args
    from lns_megatron.models.gpt import transformer_config
    from lns_megatron.training.distributed import set_seed

    def build(scheme):
        c = parse_args(["--preset", "tiny", "--mock-data", "--vocab-size", "100", "--norm-scheme", scheme,
                        "--output-layer-init", output_layer_init, "--embedding-init-method-std", "0.01"])
        set_seed(c.seed)
        model = build_gpt_model(transformer_config(c), vocab_size=128, max_sequence_length=c.max_position_embeddings,
                                norm_scheme=scheme, position_embedding_type=c.position_embedding_type)
        return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}

    pre, lns = build("pre"), build("lns")
    assert sorted(pre) == sorted(lns)
    assert all(torch.equal(pre[k], lns[k]) for k in pre), [k for k in pre if not torch.equal(pre[k], lns[k])]
    assert 0.008 < pre["embedding.word_embeddings.weight"].std().item() < 0.012  # --embedding-init-method-std


@pytest.mark.parametrize("how", ["meta", "use_cpu_initialization"])
def test_scale_survives_meta_and_cpu_initialization(megatron_tp1, how):
    """(e) A meta-device build materialized with to_empty(), and use_cpu_initialization."""
    config = tiny_config(use_cpu_initialization=True)
    if how == "meta":
        with torch.device("meta"):
            model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    else:
        model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ)
    expected = [1 / math.sqrt(l) for l in range(1, 5)]
    assert [l.input_layernorm.lns_scale for l in model.decoder.layers] == expected
    assert [l.pre_mlp_layernorm.lns_scale for l in model.decoder.layers] == expected
    # The scale still acts in the forward: layer 4's norm output is half the unscaled one.
    norm = model.decoder.layers[3].input_layernorm
    x = torch.randn(3, 64, device=norm.weight.device)
    torch.testing.assert_close(norm(x), 0.5 * F.rms_norm(x, (64,), norm.weight, norm.eps))


def test_module_level_spec_works_as_megatron_lm_spec_argument(megatron_tp1):
    """Megatron-LM's `--spec lns_megatron.specs lns_local_spec` does vars(import_module(M))[NAME]."""
    import importlib

    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = vars(importlib.import_module("lns_megatron.specs"))["lns_local_spec"]
    assert isinstance(spec, ModuleSpec) and spec.module is LNSTransformerLayer
    model = GPTModel(tiny_config(), spec, VOCAB, SEQ, position_embedding_type="rope")
    assert [l.input_layernorm.lns_scale for l in model.decoder.layers] == [1 / math.sqrt(i) for i in range(1, 5)]


def test_fused_submodule_swap_handles_specs_and_partials():
    """The TE spec's fused norm+linear is swapped in a ModuleSpec (0.16) and in a partial (0.19's MLP)."""
    import functools

    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec

    from lns_megatron.models.specs import _with_submodule

    class Fused(ColumnParallelLinear):
        pass

    sub = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    as_spec = _with_submodule(ModuleSpec(module=MLP, submodules=sub), "linear_fc1", Fused)
    assert as_spec.module is MLP and as_spec.submodules.linear_fc1 is Fused
    assert as_spec.submodules.linear_fc2 is RowParallelLinear
    as_partial = _with_submodule(functools.partial(MLP, submodules=sub), "linear_fc1", Fused)
    assert as_partial.func is MLP and as_partial.keywords["submodules"].linear_fc1 is Fused
    assert sub.linear_fc1 is ColumnParallelLinear  # the original is not modified
    no_field = ModuleSpec(module=MLP, submodules=None)
    assert _with_submodule(no_field, "linear_fc1", Fused) is no_field


class ZeroCenteredRMSNorm(torch.nn.Module):
    """A reference norm that multiplies by (1 + weight), as Transformer Engine's zero-centered gamma does."""

    def __init__(self, hidden):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(hidden))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), 1.0 + self.weight, 1e-6)


class NormWithResidual(torch.nn.RMSNorm):
    """A norm returning (normed, residual), as megatron-core 0.19's fused-residual TE RMSNorm does."""

    def forward(self, x):
        return super().forward(x), x


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm", "zero-centered", "scaled-output", "with-residual"])
def test_with_layernorm_scaling_equals_the_scaled_norm_output(kind):
    """The mechanism behind LNSTENorm, on torch norms (TE's own are tested on the GPU kit): the output and the
    gradients of the affine parameters equal those of ``s * norm(x)`` in float64; parameters and state-dict keys
    are unchanged; an output tuple has only its first element scaled."""
    from lns_megatron.schemes.lns import with_layernorm_scaling

    torch.manual_seed(0)
    hidden, scale = 16, 1 / math.sqrt(3)
    make = {"rmsnorm": lambda: torch.nn.RMSNorm(hidden, eps=1e-6, dtype=torch.float64),
            "layernorm": lambda: torch.nn.LayerNorm(hidden, dtype=torch.float64),
            "zero-centered": lambda: ZeroCenteredRMSNorm(hidden).double(),
            "scaled-output": lambda: torch.nn.RMSNorm(hidden, eps=1e-6, dtype=torch.float64),
            "with-residual": lambda: NormWithResidual(hidden, eps=1e-6, dtype=torch.float64)}[kind]
    reference, scaled = make(), make()
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn_like(p))
    scaled.load_state_dict(reference.state_dict())
    keys = list(scaled.state_dict())
    with_layernorm_scaling(scaled, zero_centered_gamma=kind == "zero-centered",
                           scale_output=kind in ("scaled-output", "with-residual"))
    scaled.lns_scale = scale
    assert isinstance(scaled, type(reference)) and list(scaled.state_dict()) == keys
    assert all(type(p) is torch.nn.Parameter for p in scaled.parameters())
    x = torch.randn(5, hidden, dtype=torch.float64, requires_grad=True)
    out, expected = scaled(x), reference(x)
    if kind == "with-residual":
        (out, residual), (expected, reference_residual) = out, expected
        assert torch.equal(residual, reference_residual)
    expected = expected * scale
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(out)
    grads = torch.autograd.grad((out * probe).sum(), [x, *scaled.parameters()])
    reference_grads = torch.autograd.grad((expected * probe).sum(), [x, *reference.parameters()])
    for got, want in zip(grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match="already"):
        with_layernorm_scaling(scaled, zero_centered_gamma=False)
