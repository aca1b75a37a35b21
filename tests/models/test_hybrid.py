"""LNS on megatron-core's HybridModel (0.19+): the same network as GPTModel+LNS gives the same logits.

On megatron-core before 0.19 (no HybridModel) each test checks instead that the builders refuse with the
reason; CI's Python 3.12 leg (megatron-core 0.19) runs them in full."""

import dataclasses
import math

import pytest
import torch

from lns_megatron.models.gpt import build_gpt_model, tiny_config
from lns_megatron.models.hybrid import HAVE_HYBRID, build_hybrid_lns_model, check_lns_pattern, get_hybrid_lns_stack_spec

VOCAB, SEQ, BATCH, PAIRS = 96, 12, 2, 4


def hybrid_available() -> bool:
    """True with megatron-core 0.19+; before it, checks that both builders refuse, naming the version."""
    if not HAVE_HYBRID:
        with pytest.raises(ImportError, match="build_hybrid_lns_model: HybridModel is in megatron-core 0.19"):
            build_hybrid_lns_model(tiny_config(num_layers=2), VOCAB, SEQ, "*-")
        with pytest.raises(ImportError, match="get_hybrid_lns_stack_spec: HybridModel is in megatron-core 0.19"):
            get_hybrid_lns_stack_spec()
    return HAVE_HYBRID


def hybrid_name(name: str) -> str:
    """GPTModel key -> HybridModel key: transformer layer i is hybrid layers 2i (attention) and 2i+1 (MLP)."""
    if name.startswith("decoder.layers."):
        i, rest = name[len("decoder.layers."):].split(".", 1)
        attention = rest.startswith(("input_layernorm", "self_attention"))
        return f"decoder.layers.{2 * int(i) + (0 if attention else 1)}.{rest}"
    return name.replace("decoder.final_layernorm.", "decoder.final_norm.")


def logits(model, tokens):
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1)
    return model(tokens, positions, mask)


@pytest.mark.parametrize("scheme", ["lns", "peri-lns"])
def test_hybrid_lns_equals_gpt_lns_on_the_same_weights(megatron_tp1, scheme):
    if not hybrid_available():
        return
    pattern = "*-" * PAIRS
    torch.manual_seed(0)
    config = tiny_config(num_layers=PAIRS)
    gpt = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme=scheme)
    with torch.no_grad():
        for name, p in gpt.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    hybrid = build_hybrid_lns_model(dataclasses.replace(config, num_layers=2 * PAIRS), VOCAB, SEQ, pattern,
                                    norm_scheme=scheme)
    gpt_state = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    hybrid_keys = {k for k in hybrid.state_dict() if not k.endswith("_extra_state")}
    assert {hybrid_name(k) for k in gpt_state} == hybrid_keys  # the same network, parameter for parameter
    hybrid.load_state_dict({hybrid_name(k): v for k, v in gpt_state.items()}, strict=False)

    for i, layer in enumerate(hybrid.decoder.layers):  # attention and MLP of pair l share 1/sqrt(l)
        assert layer.lns_scale == pytest.approx(1 / math.sqrt(i // 2 + 1))
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    expected = logits(gpt, tokens)
    got = logits(hybrid, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # Counting l over hybrid layers instead of pairs would be another network: the check can fail.
    for i, layer in enumerate(hybrid.decoder.layers):
        for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
            if hasattr(norm, "lns_scale"):
                norm.lns_scale = 1 / math.sqrt(i + 1)
    assert (logits(hybrid, tokens) - expected).abs().max() > 1e-3


def test_patterns_lns_cannot_map_are_refused(megatron_tp1):
    assert check_lns_pattern("*-*-") == 2 and check_lns_pattern("*-|*-/*-") == 2
    for bad in ("*--*", "-*-*", "**--", "M*-", "*-E-", "*-*"):
        with pytest.raises(ValueError, match="must alternate attention and MLP"):
            check_lns_pattern(bad)
    if not hybrid_available():
        return
    with pytest.raises(ValueError, match="num_layers=4 but hybrid_layer_pattern '\\*-\\*-\\*-' has 6 layers"):
        build_hybrid_lns_model(tiny_config(num_layers=4), VOCAB, SEQ, "*-*-*-")
    # The spec used with megatron's own HybridModel: a symbol without an LNS mapping is refused, not skipped.
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    with pytest.raises(ValueError, match="layer 1 of the pattern is not attention"):
        HybridModel(tiny_config(num_layers=2), get_hybrid_lns_stack_spec(), VOCAB, SEQ, hybrid_layer_pattern="M-",
                    position_embedding_type="rope")


def test_megatron_lm_spec_attribute(megatron_tp1):
    """Megatron-LM's `pretrain_hybrid.py --spec lns_megatron.specs lns_hybrid_stack_spec` does
    vars(import_module(M))[NAME] and hands it to megatron's own HybridModel."""
    import importlib

    specs = vars(importlib.import_module("lns_megatron.specs"))
    if not hybrid_available():
        assert "lns_hybrid_stack_spec" not in specs
        return
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    model = HybridModel(tiny_config(num_layers=4), specs["lns_hybrid_stack_spec"], VOCAB, SEQ,
                        hybrid_layer_pattern="*-*-", position_embedding_type="rope")
    assert [layer.lns_scale for layer in model.decoder.layers] == pytest.approx([1.0, 1.0, 2 ** -0.5, 2 ** -0.5])


def test_depth_comes_from_the_global_layer_number(megatron_tp1):
    """A later pipeline stage's layers carry megatron's global numbers (offset included): hybrid layers
    5 and 6 are transformer layer 3; an attention layer at an even position is refused."""
    from lns_megatron.models.hybrid import LNSHybridLayer

    if not hybrid_available():
        return
    spec = get_hybrid_lns_stack_spec().submodules
    config = tiny_config(num_layers=8)
    attention = LNSHybridLayer(config, spec.attention_layer.submodules, layer_number=5)
    mlp = LNSHybridLayer(config, spec.mlp_layer.submodules, layer_number=6)
    assert attention.lns_scale == mlp.lns_scale == pytest.approx(1 / math.sqrt(3))
    assert attention.input_layernorm.lns_scale == mlp.pre_mlp_layernorm.lns_scale == attention.lns_scale
    with pytest.raises(ValueError, match="an attention layer at position 6"):
        LNSHybridLayer(config, spec.attention_layer.submodules, layer_number=6)
    with pytest.raises(ValueError, match="an MLP layer at position 5"):
        LNSHybridLayer(config, spec.mlp_layer.submodules, layer_number=5)


# The driver with --hybrid-layer-pattern: the same network as its GPTModel, at every layout.
DRIVER = ["--preset", "tiny", "--seq-length", "32", "--max-position-embeddings", "32", "--mock-data", "--vocab-size",
          "200", "--num-workers", "0", "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", "4",
          "--lr", "3e-3", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
          "--depth-log-interval", "2", "--save-interval", "2", "--output-layer-init", "scaled"]  # scaled: std/sqrt(2L), L transformer layers
HYBRID = ["--hybrid-layer-pattern", "*-*-*-*-"]
DEPTH = [f"depth/{m}/layer_{l:03d}" for m in ("variance", "angular-distance", "grad-norm") for l in range(1, 5)]


def driver_run(tmp_path, name, *flags, nproc=1):
    from driver import logged_losses, read_tensorboard, run_driver

    _, out = run_driver(*DRIVER, *flags, "--tensorboard-dir", tmp_path / name / "tb", "--save", tmp_path / name / "ckpt",
                        nproc=nproc)
    scalars = read_tensorboard(tmp_path / name / "tb")
    return logged_losses(out), {tag: scalars[tag] for tag in DEPTH}, out


def test_driver_trains_the_gpt_network_as_hybrid_model(tmp_path):
    """The same seed gives the same losses, depth scalars and exported weights as GPTModel; resumed from its
    checkpoint at PP=2 x VPP=2 and at TP=2 with sequence parallelism, the single process's losses and scalars."""
    from driver import driver_error

    if not HAVE_HYBRID:
        error = driver_error(*DRIVER, *HYBRID, "--save", tmp_path / "ckpt")
        assert "--hybrid-layer-pattern: HybridModel is in megatron-core 0.19 and later" in error, error
        return
    from safetensors.torch import load_file

    from lns_megatron.hf.export import main as export

    gpt_losses, gpt_depth, _ = driver_run(tmp_path, "gpt")
    losses, depth, out = driver_run(tmp_path, "hybrid", *HYBRID)
    assert "HybridModel" in out
    assert sorted(losses) == [1, 2, 3, 4] and losses == pytest.approx(gpt_losses, rel=1e-6, abs=0)
    for tag in DEPTH:
        assert depth[tag] == pytest.approx(gpt_depth[tag], rel=1e-6, abs=1e-12), tag

    for name in ("gpt", "hybrid"):  # a HybridModel checkpoint loads as the GPTModel of the same network
        assert export(["--load", str(tmp_path / name / "ckpt"), "--output", str(tmp_path / name / "hf")]) == 0
    exported = [load_file(str(tmp_path / name / "hf" / "model.safetensors")) for name in ("gpt", "hybrid")]
    assert exported[0].keys() == exported[1].keys()
    for key in exported[0]:
        torch.testing.assert_close(exported[1][key], exported[0][key], rtol=1e-6, atol=1e-7)

    # Other layouts, from the same weights and optimizer state (resharded from iteration 2).
    for name, layout in [("pp2-vpp2", ["--pipeline-model-parallel-size", "2",
                                       "--num-layers-per-virtual-pipeline-stage", "1"]),
                         ("tp2-sp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"])]:
        got, got_depth, _ = driver_run(tmp_path, name, *HYBRID, *layout, "--load",
                                       tmp_path / "hybrid" / "ckpt" / "iter_0000002", nproc=2)
        assert sorted(got) == [3, 4] and got == pytest.approx({i: losses[i] for i in got}, rel=1e-5), name
        for tag in DEPTH:  # logged at iteration 4
            assert got_depth[tag][-1] == pytest.approx(depth[tag][-1], rel=1e-4, abs=1e-9), (name, tag)


def test_driver_refuses_patterns_it_cannot_lay_out():
    from lns_megatron.models.hybrid import layout_pattern

    assert layout_pattern("*-*-*-*-", 4, 1) == "*-*-*-*-"
    assert layout_pattern("*-*-*-*-", 4, 4) == "*-|*-|*-|*-"
    for pattern, message in [("*-*-", "has 2 attention\\+MLP pairs but --num-layers is 4; give '\\*-\\*-\\*-\\*-'"),
                             ("*-|*-*-*-", "give it without '\\|' or '/'"),
                             ("*-*-*-*-/*-", "give it without '\\|' or '/'"),
                             ("M-*-*-*-", "must alternate attention and MLP")]:
        with pytest.raises(ValueError, match="--hybrid-layer-pattern .*" + message):
            layout_pattern(pattern, 4, 2)
