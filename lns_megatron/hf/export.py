"""Export a checkpoint to a Hugging Face ``LlamaForCausalLM`` directory (Pre-LN, LNS), or
``Gemma2ForCausalLM`` (Peri-LN, Peri-LN + LNS: Gemma 2's layer has the same four norms).

LayerNorm Scaling multiplies the outputs of layer ``l``'s pre-attention and pre-MLP RMSNorms by
the constant ``1/sqrt(l)``. RMSNorm's output is ``x / rms(x) * gamma``, so the multiplier folds
exactly into the weight: ``gamma' = gamma / sqrt(l)``. The exported model is a plain Llama
(no custom code, zero inference cost); the final norm is not scaled.

The checkpoint (torch_dist, any TP/PP it was saved with) is loaded into one TP=PP=1 model in
this process; dist_checkpointing reshards on load, so TP-split attention/MLP weights and the
PP-split layers arrive whole and numbered globally (``decoder.layers.{i}`` is layer ``i + 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from typing import Dict, Optional, Tuple

import torch

from lns_megatron.files import atomic_directory
from lns_megatron.training.checkpoint import (CONFIG_FILE, TRACKER, CheckpointError, LoadedModel, latest_checkpoint,
                                              load_model, saved_config)
from lns_megatron.config import PretrainConfig
from lns_megatron.schemes import NORM_SCHEMES
from lns_megatron.hf.scaling import (PRE_NORMS, LayerNormScalingError, fold_layernorm_scaling, from_pretrained,
                                     is_lns)

MAX_SHARD_BYTES = 5 * 1024**3  # Hugging Face's default shard size
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(ValueError):
    """Bad input for an export or a report: the message names the input and the fix."""


# The Hugging Face architecture that computes each norm scheme exactly; the others have none.
HF_ARCHITECTURES = {"pre": "llama", "lns": "llama", "peri": "gemma2", "peri-lns": "gemma2"}
ARCHITECTURE_NAMES = {"llama": "Llama", "gemma2": "Gemma 2"}


def check_exportable(c: PretrainConfig, model=None, keep_lns: bool = False) -> str:
    """The Hugging Face architecture of the checkpoint (``"llama"`` or ``"gemma2"``); what has no exact form in
    it is refused with the reason and the fix."""
    if getattr(c, "num_experts", None):
        raise ExportError(f"cannot export to Hugging Face: the checkpoint is a mixture of experts (--num-experts "
                          f"{c.num_experts}); the Llama and Gemma 2 exports are dense, and no MoE architecture is "
                          "mapped yet (export the dense runs, or load the checkpoint with the driver)")
    architecture = HF_ARCHITECTURES.get(c.norm_scheme)
    if architecture is None:
        raise ExportError(f"cannot export to Hugging Face: the checkpoint uses --norm-scheme {c.norm_scheme}; only "
                          "pre and lns (Llama) and peri and peri-lns (Gemma 2) have an exact Hugging Face architecture")
    name = ARCHITECTURE_NAMES[architecture]

    def refuse(what, why):
        raise ExportError(f"cannot export to {name}: the checkpoint uses {what}; {why}")

    if c.normalization != "RMSNorm":
        refuse(f"--normalization {c.normalization}", f"{name} has RMSNorm only (no mean subtraction, no norm bias); "
               "train with --normalization RMSNorm")
    if not c.swiglu:
        refuse("a non-gated GELU MLP", f"{name}'s MLP here is SwiGLU; train with --swiglu")
    if c.position_embedding_type != "rope":
        refuse(f"--position-embedding-type {c.position_embedding_type}", f"{name} uses RoPE; train with "
               "--position-embedding-type rope")
    if c.qk_layernorm:
        refuse("--qk-layernorm", f"{name} has no query/key norms")
    if architecture == "gemma2":
        if not c.untie_embeddings_and_output_weights:
            refuse("tied embeddings", "Gemma 2 multiplies its input embeddings by sqrt(hidden size), so the output "
                   "layer cannot share them; train with --untie-embeddings-and-output-weights")
        if not c.disable_bias_linear:
            refuse("linear biases", "Gemma 2's MLP has none; train with --disable-bias-linear")
        if keep_lns:
            refuse("--keep-lns", "Gemma 2 has no LNS form; drop --keep-lns to fold 1/sqrt(l) into the input norms")
    if model is not None and getattr(model, "rotary_pos_emb", None) is not None:
        rope = model.rotary_pos_emb
        if getattr(rope, "rotary_interleaved", False):
            refuse("interleaved RoPE", f"Hugging Face {name} rotates halves (megatron's default)")
        head_dim = model.config.kv_channels
        if rope.inv_freq.numel() * 2 != head_dim:
            refuse("RoPE on part of each head (--rotary-percent < 1)", f"{name} rotates the whole head")
    return architecture


def rope_base(model) -> float:
    """The RoPE base the model really uses, read back from its inverse frequencies.

    (Not the saved config's rotary_base: GPTModel takes the base from its constructor argument,
    so the two can disagree; the export must match the function that was trained.)
    """
    inv_freq = model.rotary_pos_emb.inv_freq.float().cpu()
    head_dim = 2 * inv_freq.numel()
    if inv_freq.numel() < 2:
        return 10000.0
    base = float(inv_freq[1].double() ** (-head_dim / 2.0))  # float32 rounding makes this inexact
    rounded = float(round(base))
    again = 1.0 / (rounded ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return rounded if torch.allclose(again, inv_freq, rtol=1e-6, atol=0) else base


def hf_weights(loaded: LoadedModel, dtype: torch.dtype = torch.float32,
               keep_lns: bool = False) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(Hugging Face state dict, config.json dict) of a loaded megatron model, as Llama or Gemma 2.

    LNS is folded into the pre-norm weights, unless ``keep_lns`` (Llama only): then the weights are the
    trained gamma and the config records the scheme, for :func:`lns_megatron.hf.scaling.from_pretrained`.
    Gemma 2 stores each norm's weight as ``gamma - 1`` and multiplies the input embeddings by ``sqrt(hidden)``
    rounded to the weights' dtype, which the exported embeddings are divided by.
    """
    model, c = loaded.model, loaded.config
    gemma = check_exportable(c, model, keep_lns) == "gemma2"
    tc = model.config
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    heads, groups, head_dim, hidden = tc.num_attention_heads, tc.num_query_groups, tc.kv_channels, tc.hidden_size
    per_group = heads // groups
    vocab = loaded.vocab_size
    biases = tc.add_bias_linear

    def w(name):
        return sd[name].detach().to(torch.float64).cpu()

    def norm_weight(name, scale=1.0):
        gamma = w(name)
        if tc.layernorm_zero_centered_gamma:  # the norm multiplies by 1 + weight
            gamma = gamma + 1.0
        return gamma * scale - 1.0 if gemma else gamma * scale  # Gemma's norm multiplies by 1 + weight

    embeddings = w("embedding.word_embeddings.weight")[:vocab]
    if gemma:
        embeddings = embeddings / torch.tensor(hidden**0.5, dtype=dtype).item()
    out = {"model.embed_tokens.weight": embeddings}
    lns = NORM_SCHEMES[c.norm_scheme].lns and not keep_lns
    for i in range(tc.num_layers):
        meg, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        scale = model.decoder.layers[i].lns_scale if lns else 1.0  # 1/sqrt(l), l kept by a grown model's layers
        out[hf + "input_layernorm.weight"] = norm_weight(meg + "input_layernorm.weight", scale)
        if gemma:  # Peri-LN: post_attention_layernorm is the attention's output norm, as in Gemma 2
            out[hf + "post_attention_layernorm.weight"] = norm_weight(meg + "self_attention.linear_proj.output_norm.weight")
            out[hf + "pre_feedforward_layernorm.weight"] = norm_weight(meg + "pre_mlp_layernorm.weight", scale)
            out[hf + "post_feedforward_layernorm.weight"] = norm_weight(meg + "mlp.linear_fc2.output_norm.weight")
        else:
            out[hf + "post_attention_layernorm.weight"] = norm_weight(meg + "pre_mlp_layernorm.weight", scale)
        # linear_qkv rows: per query group [q heads of the group, k, v], each head_dim rows.
        for kind in ("weight", "bias") if biases else ("weight",):
            qkv = w(meg + f"self_attention.linear_qkv.{kind}")
            qkv = qkv.view(groups, (per_group + 2) * head_dim, *qkv.shape[1:])
            q, k, v = qkv.split([per_group * head_dim, head_dim, head_dim], dim=1)
            out[hf + f"self_attn.q_proj.{kind}"] = q.reshape(heads * head_dim, *qkv.shape[2:])
            out[hf + f"self_attn.k_proj.{kind}"] = k.reshape(groups * head_dim, *qkv.shape[2:])
            out[hf + f"self_attn.v_proj.{kind}"] = v.reshape(groups * head_dim, *qkv.shape[2:])
            out[hf + f"self_attn.o_proj.{kind}"] = w(meg + f"self_attention.linear_proj.{kind}")
            gate, up = w(meg + f"mlp.linear_fc1.{kind}").chunk(2, dim=0)  # SwiGLU: [gate; up]
            out[hf + f"mlp.gate_proj.{kind}"], out[hf + f"mlp.up_proj.{kind}"] = gate, up
            out[hf + f"mlp.down_proj.{kind}"] = w(meg + f"mlp.linear_fc2.{kind}")
    out["model.norm.weight"] = norm_weight("decoder.final_layernorm.weight")  # the final norm: unscaled
    tied = not c.untie_embeddings_and_output_weights
    if not tied:
        out["lm_head.weight"] = w("output_layer.weight")[:vocab]
    out = {k: v.to(dtype).contiguous() for k, v in out.items()}

    eod = getattr(loaded.tokenizer, "eod", None)
    theta = rope_base(model)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": tc.ffn_hidden_size,
        "num_hidden_layers": tc.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": groups,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": tc.layernorm_epsilon,
        "rope_theta": theta,  # transformers 4.x, vLLM and llama.cpp converters read this key
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},  # transformers 5.x
        "rope_scaling": None,
        "attention_bias": biases,
        "mlp_bias": biases,
        "attention_dropout": 0.0,
        "initializer_range": c.init_method_std,
        "tie_word_embeddings": tied,
        "bos_token_id": None,
        "eos_token_id": eod if eod is not None and eod < vocab else None,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": str(dtype).replace("torch.", ""),
        "lns_megatron": {  # folded: provenance only; kept: lns_megatron.hf.from_pretrained restores the scale
            "norm_scheme": c.norm_scheme,
            "lns_folded_into": ", ".join(PRE_NORMS) if c.norm_scheme == "lns" and not keep_lns else None,
            "iteration": loaded.iteration,
            "lns_depths": c.lns_depths,  # depth growth's inherit: the l of each layer's 1/sqrt(l)
            "padded_vocab_size": int(sd["embedding.word_embeddings.weight"].shape[0]),
        },
    }
    if gemma:
        for key in ("hidden_act", "mlp_bias", "rope_scaling"):
            config.pop(key)
        config.update({
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "hidden_activation": "silu",  # SwiGLU: down(silu(gate) * up), Gemma 2's MLP with SiLU
            "query_pre_attn_scalar": head_dim,  # attention scores scaled by 1/sqrt(head_dim)
            "layer_types": ["full_attention"] * tc.num_layers,  # no sliding window
            "sliding_window": c.max_position_embeddings,
            "attn_logit_softcapping": None,
            "final_logit_softcapping": None,
        })
        config["lns_megatron"]["lns_folded_into"] = ("input_layernorm, pre_feedforward_layernorm"
                                                     if lns else None)
    return out, config


def _save_safetensors(tensors: Dict[str, torch.Tensor], directory: str) -> None:
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > MAX_SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}, "weight_map": {}}
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        index["weight_map"].update({k: name for k in shard})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def tokenizer_files(c: PretrainConfig) -> Dict[str, str]:
    """{name in the export: source path} of the tokenizer files, checked to exist."""
    kind, model = c.tokenizer_type, c.tokenizer_model
    if kind in (None, "NullTokenizer"):
        return {}
    if kind == "GPT2BPETokenizer":
        files = {"vocab.json": c.vocab_file, "merges.txt": c.merge_file}
    elif kind == "HuggingFaceTokenizer":
        if model and os.path.isdir(model):
            files = {n: os.path.join(model, n) for n in ("tokenizer.json", "tokenizer_config.json",
                                                          "special_tokens_map.json")
                     if n == "tokenizer.json" or os.path.isfile(os.path.join(model, n))}
        else:
            files = {"tokenizer.json": model}
    elif kind == "SentencePieceTokenizer":
        files = {"tokenizer.model": model}
    else:  # TikTokenizer: copied as is; Hugging Face loads it only through conversion
        files = {os.path.basename(model or "tokenizer.tiktoken"): model}
    for name, path in files.items():
        if not path or not os.path.isfile(path):
            raise ExportError(f"tokenizer file {path!r} ({kind}, for {name}) not found; pass --tokenizer-model PATH "
                              "(the file or directory the model was trained with)")
    return files


def _tokenizer_config(c: PretrainConfig, tokenizer) -> Optional[dict]:
    """A minimal tokenizer_config.json when the source has none, so AutoTokenizer can load it."""
    eos = None
    try:
        eos = tokenizer.detokenize([tokenizer.eod])
    except Exception:  # a tokenizer without a decodable end token: leave eos unset
        pass
    classes = {"HuggingFaceTokenizer": "PreTrainedTokenizerFast", "SentencePieceTokenizer": "LlamaTokenizer",
               "GPT2BPETokenizer": "GPT2Tokenizer"}
    if c.tokenizer_type not in classes:
        return None
    return {"tokenizer_class": classes[c.tokenizer_type], "eos_token": eos, "model_max_length": c.max_position_embeddings}


def export(loaded: LoadedModel, output: str, dtype: torch.dtype = torch.float32, overwrite: bool = False,
           keep_lns: bool = False) -> str:
    """Write the Hugging Face directory ``output`` atomically (temp dir, then rename)."""
    output = _check_output(output, overwrite)
    files = tokenizer_files(loaded.config)  # fail on a missing tokenizer before any work
    tensors, config = hf_weights(loaded, dtype, keep_lns)
    with atomic_directory(output) as partial:
        _save_safetensors(tensors, partial)
        with open(os.path.join(partial, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(partial, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": config["eos_token_id"], "bos_token_id": None}, f, indent=2)
        for name, path in files.items():
            shutil.copyfile(path, os.path.join(partial, name))
        if files and "tokenizer_config.json" not in files:
            tok_config = _tokenizer_config(loaded.config, loaded.tokenizer)
            if tok_config is not None:
                with open(os.path.join(partial, "tokenizer_config.json"), "w") as f:
                    json.dump(tok_config, f, indent=2)
    return output


def _check_output(output: str, overwrite: bool) -> str:
    output = os.path.abspath(output)
    if os.path.exists(output) and not overwrite:
        raise ExportError(f"--output {output} already exists; remove it, choose another directory, or pass --overwrite")
    return output


def is_hf_directory(path: str) -> bool:
    """A Hugging Face model directory (config.json), not a megatron checkpoint."""
    return os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, TRACKER)) \
        and not os.path.isfile(os.path.join(path, CONFIG_FILE))


def export_hf_directory(source: str, output: str, dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> str:
    """Re-export a Hugging Face model (one fine-tuned as LNS, say) as a plain model: an unfolded LNS scale is
    folded into the norm weights; a norm-removed model becomes the plain-transformers norm-free form
    (:func:`lns_megatron.hf.norm_free.to_transformers`); the tokenizer files travel with it."""
    from lns_megatron.hf.norm_free import to_transformers
    from lns_megatron.hf.norm_removal import fixed_scale_norms

    output = _check_output(output, overwrite)
    model = from_pretrained(source, dtype=torch.float32)  # fold in float32, round once to dtype
    if fixed_scale_norms(model):
        to_transformers(model)  # the LNS scale goes into the same weights
    elif is_lns(model):
        fold_layernorm_scaling(model)
    with open(os.path.join(source, "config.json")) as f:
        saved = json.load(f)
    target = dtype or DTYPES.get(saved.get("dtype") or saved.get("torch_dtype"), torch.float32)  # transformers 5 / 4
    model.to(target)
    overflow = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if overflow:
        raise ExportError(f"--dtype {str(target).replace('torch.', '')}: {overflow[0]} overflows it (a norm-free model's "
                          "norm weights are near gamma * 1e6 / c); export float32 or bfloat16")
    with atomic_directory(output) as partial:
        model.save_pretrained(partial)
        for name in os.listdir(source):
            if name.startswith(("tokenizer", "special_tokens_map", "vocab.", "merges.txt")) or name.endswith(".tiktoken"):
                shutil.copyfile(os.path.join(source, name), os.path.join(partial, name))
    return output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export_hf", description="Export an lns_megatron checkpoint to a Hugging Face "
                                "LlamaForCausalLM directory (Gemma2ForCausalLM for Peri-LN), with LNS folded into the norm weights (or kept, with "
                                "--keep-lns); or fold a Hugging Face model fine-tuned as LNS into a plain one")
    p.add_argument("--load", required=True, help="checkpoint directory (the --save of a run, or one iter_* dir), "
                   "or a Hugging Face model directory (a model fine-tuned as LNS: the scale is folded)")
    p.add_argument("--output", required=True, help="directory to create")
    p.add_argument("--keep-lns", action="store_true", help="write the trained norm weights unscaled and record LNS "
                   "in config.json, for fine-tuning as LNS with lns_megatron.hf.from_pretrained (plain "
                   "transformers would load it as Pre-LN: a different model)")
    p.add_argument("--tokenizer-model", help="tokenizer file or directory (default: the one the run was trained with)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: float32, bfloat16 for bf16 runs; "
                   "a Hugging Face source keeps its own)")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    return p


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    args = build_parser().parse_args(argv)
    if is_hf_directory(args.load):
        return _main_hf(args)
    from lns_megatron.training import distributed

    try:
        check_exportable(PretrainConfig.from_dict(saved_config(latest_checkpoint(args.load)[0])),  # before loading
                         keep_lns=args.keep_lns)
        loaded = load_model(args.load, tokenizer_model=args.tokenizer_model, device="cpu")
        dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if loaded.config.bf16 else torch.float32)
        path = export(loaded, args.output, dtype, args.overwrite, args.keep_lns)
    except (ExportError, CheckpointError) as e:
        print(f"export_hf: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        distributed.destroy()
    c = loaded.config
    lns = ""
    if NORM_SCHEMES[c.norm_scheme].lns:
        lns = (" (LNS kept: load it with lns_megatron.hf.from_pretrained)" if args.keep_lns
               else " (1/sqrt(l) folded into the norm weights)")
    architecture = {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM"}[HF_ARCHITECTURES[c.norm_scheme]]
    print(f"export_hf: wrote {path}: {architecture}, {c.num_layers} layers, vocab {loaded.vocab_size}, "
          f"norm scheme {c.norm_scheme}" + lns
          + ("" if tokenizer_files(c) else "; no tokenizer files (NullTokenizer)"), flush=True)
    return 0


def _main_hf(args) -> int:
    def fail(message):
        print(f"export_hf: error: {message}", file=sys.stderr, flush=True)
        return 2

    if args.keep_lns:
        return fail(f"--keep-lns with the Hugging Face directory {args.load}: it is already in the form "
                    "lns_megatron.hf.from_pretrained loads; copy it, or drop --keep-lns to fold it into a plain model")
    if args.tokenizer_model:
        return fail(f"--tokenizer-model with the Hugging Face directory {args.load}: its own tokenizer files are "
                    "copied; drop the flag")
    from lns_megatron.hf.norm_removal import NormRemovalError

    try:
        path = export_hf_directory(args.load, args.output, DTYPES[args.dtype] if args.dtype else None, args.overwrite)
    except (ExportError, LayerNormScalingError, NormRemovalError) as e:
        return fail(e)
    with open(os.path.join(path, "config.json")) as f:
        norm_free = (json.load(f).get("lns_megatron") or {}).get("norm_free")
    if norm_free:
        print(f"export_hf: wrote {path}: a norm-free model in the plain-transformers form (norm eps {norm_free['eps']:g}, "
              f"norm outputs within a relative {norm_free['relative_error_bound']:.1e} of the exact form)", flush=True)
    else:
        print(f"export_hf: wrote {path}: a plain model (any LNS scale folded into the norm weights)", flush=True)
    return 0
