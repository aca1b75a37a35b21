"""tools/export_hf.py: checkpoints of several layouts -> Hugging Face Llama, checked logit for logit
against the megatron model in float32, plus every refusal and bad input."""

import json
import math
import os

import pytest
import torch

from trained_checkpoints import RUNS, TOKENIZER_VOCAB, copy_checkpoint, trained_checkpoint

# bf16 keeps 8 significant bits: one ulp is 2^-7 for logits in [1, 2), 2^-6 in [2, 4). Observed 0.0083 at
# max |logit| 2.4; the same export with the norms left unfolded differs by 0.56.
BF16_LOGIT_ATOL = 0.03


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: trained_checkpoint(tmp_path_factory, name) for name in RUNS}


def export_cli(*args):
    """tools/export_hf.py's main in this process; returns (exit code, stderr text)."""
    import contextlib
    import io

    from lns_megatron.hf.export import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def megatron_and_hf_logits(ckpt, export_dir, vocab, tokens, tokenizer_model=None):
    """Logits of the checkpoint's megatron GPTModel (resharded to TP=PP=1) and of the export."""
    from transformers import LlamaForCausalLM

    from lns_megatron.training import distributed
    from lns_megatron.diagnostics.report import forward_logits
    from lns_megatron.training.checkpoint import load_model

    try:
        loaded = load_model(ckpt, tokenizer_model=tokenizer_model, device="cpu")
        with torch.no_grad():
            meg = forward_logits(loaded.model, tokens)
        megatron_state = {k: v.clone() for k, v in loaded.model.state_dict().items() if not k.endswith("_extra_state")}
    finally:
        distributed.destroy()
    hf = LlamaForCausalLM.from_pretrained(export_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(tokens).logits
    assert meg.shape[-1] == 256 and ref.shape[-1] == vocab  # padded rows trimmed
    return meg[..., :vocab], ref, megatron_state, hf


def random_tokens(vocab, batch=2, length=32, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["lns", "lns_pp2_tied", "pre_tp2"])
def test_export_logits_match_megatron(checkpoints, tmp_path, name):
    out = tmp_path / "hf"
    code, err = export_cli("--load", checkpoints[name], "--output", out)
    assert code == 0, err
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no temp dir left behind
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == TOKENIZER_VOCAB
    assert config["tie_word_embeddings"] == (name == "lns_pp2_tied")
    assert config["num_key_value_heads"] == (2 if name == "lns" else 4)

    tokens = random_tokens(TOKENIZER_VOCAB)
    meg, ref, state, hf = megatron_and_hf_logits(checkpoints[name], str(out), TOKENIZER_VOCAB, tokens)
    # float32 end to end through 4 layers; observed max difference ~1e-7 on logits of size ~1.
    assert meg.abs().max() > 0.1, "an untrained-looking model would make the comparison weak"
    torch.testing.assert_close(ref, meg, rtol=0, atol=2e-5)

    # The fold itself: HF norm weight = megatron gamma / sqrt(l) for LNS, unchanged for Pre-LN; final norm unscaled.
    hf_state = hf.state_dict()
    for i in range(4):
        scale = 1.0 / math.sqrt(i + 1) if name.startswith("lns") else 1.0
        for meg_name, hf_name in (("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "post_attention_layernorm")):
            torch.testing.assert_close(hf_state[f"model.layers.{i}.{hf_name}.weight"],
                                       state[f"decoder.layers.{i}.{meg_name}.weight"] * scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(hf_state["model.norm.weight"], state["decoder.final_layernorm.weight"])
    torch.testing.assert_close(hf_state["model.embed_tokens.weight"],
                               state["embedding.word_embeddings.weight"][:TOKENIZER_VOCAB])
    if name == "lns_pp2_tied":
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert "lm_head.weight" not in f.keys()


def test_export_of_a_bf16_run(checkpoints, tmp_path):
    """A --bf16 run exports bfloat16 weights by default: every tensor is the checkpoint's own bf16 value,
    except the folded norm weights, which are gamma/sqrt(l) rounded once to bf16."""
    from safetensors import safe_open

    out = tmp_path / "hf"
    code, err = export_cli("--load", checkpoints["lns_bf16"], "--output", out)
    assert code == 0, err
    assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"
    tokens = random_tokens(TOKENIZER_VOCAB)
    meg, ref, state, hf = megatron_and_hf_logits(checkpoints["lns_bf16"], str(out), TOKENIZER_VOCAB, tokens)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    hf_state = hf.state_dict()
    for i in range(4):
        for meg_name, hf_name in (("input_layernorm", "input_layernorm"), ("pre_mlp_layernorm", "post_attention_layernorm")):
            gamma = state[f"decoder.layers.{i}.{meg_name}.weight"]
            assert torch.equal(gamma, gamma.bfloat16().float())  # the checkpoint holds bf16 values
            folded = (gamma.double() / math.sqrt(i + 1)).bfloat16().float()
            assert torch.equal(hf_state[f"model.layers.{i}.{hf_name}.weight"], folded)
        assert torch.equal(hf_state[f"model.layers.{i}.mlp.down_proj.weight"],
                           state[f"decoder.layers.{i}.mlp.linear_fc2.weight"])
    # The megatron model computes in bf16, as the run trained; the export is loaded in float32.
    assert meg.dtype == torch.bfloat16 and meg.abs().max() > 0.1
    torch.testing.assert_close(ref, meg.float(), rtol=0, atol=BF16_LOGIT_ATOL)


def test_export_copies_and_trims_to_a_real_tokenizer(checkpoints, tmp_path):
    """A Hugging Face tokenizer with 150 ids: the 256 padded rows are trimmed to 150 and the tokenizer loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lns_megatron.data.metadata import tokenizer_identity
    from lns_megatron.data.tokenizer import build_tokenizer

    words = ["<|endoftext|>"] + [f"w{i}" for i in range(149)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok.save(str(tok_dir / "tokenizer.json"))
    # As if the run had trained with this tokenizer, since moved: the driver records its identity.
    ckpt = copy_checkpoint(checkpoints["lns"], tmp_path / "ckpt",
                           tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "moved_away"),
                           tokenizer_identity=tokenizer_identity(build_tokenizer("HuggingFaceTokenizer", str(tok_dir))))

    code, err = export_cli("--load", ckpt, "--output", tmp_path / "hf")
    assert code == 2 and "--tokenizer-model" in err and "moved_away" in err, err
    assert not (tmp_path / "hf").exists()

    code, err = export_cli("--load", ckpt, "--output", tmp_path / "hf", "--tokenizer-model", tok_dir)
    assert code == 0, err
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok("w3 w7 w148")["input_ids"] == [4, 8, 149] and hf_tok.eos_token == "<|endoftext|>"
    assert json.load(open(tmp_path / "hf" / "config.json"))["eos_token_id"] == 0
    tokens = random_tokens(150, seed=1)
    meg, ref, _, _ = megatron_and_hf_logits(ckpt, str(tmp_path / "hf"), 150, tokens, tokenizer_model=str(tok_dir))
    torch.testing.assert_close(ref, meg, rtol=0, atol=2e-5)


@pytest.mark.parametrize("change, flags, message", [
    (dict(normalization="LayerNorm"), [], "cannot export to Llama: the checkpoint uses --normalization LayerNorm"),
    (dict(norm_scheme="dyt"), [], "cannot export to Hugging Face: the checkpoint uses --norm-scheme dyt; only pre "
     "and lns (Llama) and peri and peri-lns (Gemma 2)"),
    (dict(swiglu=False), [], "cannot export to Llama: the checkpoint uses a non-gated GELU MLP"),
    (dict(qk_layernorm=True), [], "cannot export to Llama: the checkpoint uses --qk-layernorm"),
    (dict(position_embedding_type="learned_absolute"), [], "Llama uses RoPE"),
    (dict(norm_scheme="peri", untie_embeddings_and_output_weights=False), [],
     "cannot export to Gemma 2: the checkpoint uses tied embeddings; Gemma 2 multiplies its input embeddings"),
    (dict(norm_scheme="peri", disable_bias_linear=False), [], "cannot export to Gemma 2: the checkpoint uses linear "
     "biases"),
    (dict(norm_scheme="peri-lns"), ["--keep-lns"], "cannot export to Gemma 2: the checkpoint uses --keep-lns"),
    (dict(num_experts=4), [], "cannot export to Hugging Face: the checkpoint is a mixture of experts (--num-experts 4)"),
])
def test_refuses_what_the_architecture_cannot_express(checkpoints, tmp_path, change, flags, message):
    ckpt = copy_checkpoint(checkpoints["lns"], tmp_path / "ckpt", **change)
    code, err = export_cli("--load", ckpt, "--output", tmp_path / "hf", *flags)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "hf").exists() and os.listdir(tmp_path) == ["ckpt"]


def test_missing_and_corrupt_checkpoints_are_named(checkpoints, tmp_path):
    code, err = export_cli("--load", tmp_path / "nowhere", "--output", tmp_path / "hf")
    assert code == 2 and "nowhere: no such directory" in err, err

    ckpt = copy_checkpoint(checkpoints["lns"], tmp_path / "torn")
    iter_dir = os.path.join(ckpt, "iter_0000030")
    for name in os.listdir(iter_dir):
        if name.endswith(".distcp"):
            with open(os.path.join(iter_dir, name), "r+b") as f:
                f.truncate(100)
    code, err = export_cli("--load", ckpt, "--output", tmp_path / "hf")
    assert code == 2 and "iter_0000030: cannot be loaded" in err, err

    open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w").write("garbage")
    code, err = export_cli("--load", ckpt, "--output", tmp_path / "hf")
    assert code == 2 and "not an iteration number" in err, err
    assert not (tmp_path / "hf").exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_refuses_to_run_under_torchrun(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, err = export_cli("--load", checkpoints["lns"], "--output", tmp_path / "hf")
    assert code == 2 and "export_hf: error: run it as one process, not under torchrun" in err, err
    assert os.listdir(tmp_path) == []


def test_refuses_to_overwrite(checkpoints, tmp_path):
    (tmp_path / "hf").mkdir()
    code, err = export_cli("--load", checkpoints["lns"], "--output", tmp_path / "hf")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    code, err = export_cli("--load", checkpoints["lns"], "--output", tmp_path / "hf", "--overwrite")
    assert code == 0 and os.path.isfile(tmp_path / "hf" / "model.safetensors"), err


def test_linear_biases_map_to_llama_bias_options(tmp_path):
    """--add-bias-linear has an exact Llama form (attention_bias, mlp_bias): random weights, no training."""
    from transformers import LlamaForCausalLM

    from lns_megatron.training import distributed
    from lns_megatron.config import PretrainConfig, fill_defaults
    from lns_megatron.diagnostics.report import forward_logits
    from lns_megatron.hf.export import LoadedModel, export
    from lns_megatron.models.gpt import build_gpt_model
    from lns_megatron.data.tokenizer import build_tokenizer
    from lns_megatron.training.train import transformer_config

    c = PretrainConfig(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=48,
                       normalization="RMSNorm", swiglu=True, position_embedding_type="rope", seq_length=16,
                       untie_embeddings_and_output_weights=True, norm_scheme="lns", rotary_base=10000)
    fill_defaults(c)
    distributed.initialize(1, 1, seed=5)
    try:
        model = build_gpt_model(transformer_config(c), vocab_size=128, max_sequence_length=16, norm_scheme="lns")
        with torch.no_grad():
            for name, p in model.named_parameters():  # every bias and norm weight non-trivial
                p.add_(torch.randn_like(p) * (0.3 if ("bias" in name or "norm" in name) else 0.02))
        loaded = LoadedModel(model.eval(), c, "in-memory", 0, build_tokenizer("NullTokenizer", vocab_size=99), 100)
        export(loaded, str(tmp_path / "hf"))
        tokens = random_tokens(100, length=16)
        with torch.no_grad():
            meg = forward_logits(model, tokens)[..., :100]
    finally:
        distributed.destroy()
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert config["attention_bias"] and config["mlp_bias"]
    hf = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(tokens).logits, meg, rtol=0, atol=2e-5)
