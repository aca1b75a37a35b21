"""Pretraining configuration: one dataclass, Megatron-LM flag names, presets from the paper.

Every field is a command-line flag of the same name (``num_layers`` -> ``--num-layers``), with
Megatron-LM's meaning. ``--preset`` fills the model fields; flags given explicitly win.
Validation runs before any process group or model memory exists, and every error is one line
naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

# The paper's LLaMA shapes (hidden, layers, heads, FFN), plus a tiny one for CI and CPUs.
PRESETS = {
    "tiny": dict(hidden_size=64, num_layers=4, num_attention_heads=4, ffn_hidden_size=172,
                 seq_length=64, max_position_embeddings=64),
    "llama-130m": dict(hidden_size=768, num_layers=12, num_attention_heads=12, ffn_hidden_size=2048),
    "llama-250m": dict(hidden_size=768, num_layers=24, num_attention_heads=16, ffn_hidden_size=2560),
    "llama-350m": dict(hidden_size=1024, num_layers=24, num_attention_heads=16, ffn_hidden_size=2736),
    "llama-1b": dict(hidden_size=2048, num_layers=24, num_attention_heads=32, ffn_hidden_size=5461),
    "llama-7b": dict(hidden_size=4096, num_layers=32, num_attention_heads=32, ffn_hidden_size=11008),
    # Llama 3 8B and 70B (Grattafiori et al. 2024): GQA with 8 key/value groups, RoPE base 500000, 8192 context.
    "llama-8b": dict(hidden_size=4096, num_layers=32, num_attention_heads=32, num_query_groups=8,
                     ffn_hidden_size=14336, rotary_base=500000, seq_length=8192, max_position_embeddings=8192),
    "llama-70b": dict(hidden_size=8192, num_layers=80, num_attention_heads=64, num_query_groups=8,
                      ffn_hidden_size=28672, rotary_base=500000, seq_length=8192, max_position_embeddings=8192),
    # Mixture of experts. tiny-moe: tiny's shape with 4 experts of half tiny's MLP, top-2, so that its active
    # parameters equal tiny's. olmoe-1b-7b: OLMoE-1B-7B's shape (Muennighoff et al. 2024; 16 layers, 64 experts
    # of 1024, top-8, QK-norm, 4096 context, aux loss 0.01, z-loss 0.001): about 1.3B active of 6.9B parameters.
    "tiny-moe": dict(hidden_size=64, num_layers=4, num_attention_heads=4, ffn_hidden_size=172, seq_length=64,
                     max_position_embeddings=64, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=86,
                     moe_aux_loss_coeff=0.01),
    "olmoe-1b-7b": dict(hidden_size=2048, num_layers=16, num_attention_heads=16, ffn_hidden_size=1024,
                        seq_length=4096, max_position_embeddings=4096, qk_layernorm=True, num_experts=64,
                        moe_router_topk=8, moe_ffn_hidden_size=1024, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001),
}
# The parallel layout --preset-layout fills for a preset, and the GPUs it is sized for (docs/pretraining.md has
# the memory arithmetic): 80 GB H100s, bf16, one 8192-token sequence per micro-batch. The local spec's attention
# keeps its s x s scores for the backward pass, so it gets selective recompute; Transformer Engine's fused
# attention keeps none, and takes the layout without it.
PRESET_LAYOUTS = {
    # 8xH100: TP=4 with sequence parallelism inside the node, DP=2 over the distributed optimizer.
    "llama-8b": dict(gpus=8, tensor_model_parallel_size=4, pipeline_model_parallel_size=1, sequence_parallel=True,
                     use_distributed_optimizer=True, recompute_granularity="selective", micro_batch_size=1),
    # 64xH100 (8 nodes): TP=8 inside each node, PP=4 with 5 virtual stages of 4 layers, DP=2.
    "llama-70b": dict(gpus=64, tensor_model_parallel_size=8, pipeline_model_parallel_size=4, sequence_parallel=True,
                      num_layers_per_virtual_pipeline_stage=4, use_distributed_optimizer=True,
                      recompute_granularity="selective", micro_batch_size=1),
}
LLAMA_ARCH = dict(normalization="RMSNorm", swiglu=True, disable_bias_linear=True, position_embedding_type="rope",
                  untie_embeddings_and_output_weights=True, seq_length=1024, max_position_embeddings=1024)


# The runs of Sun et al. (lmsdss/LayerNorm-Scaling): Adam without weight decay or clipping, cosine to a tenth
# of the peak after 10% linear warmup, bf16, RMSNorm eps 1e-6, untied embeddings, plain N(0, 0.02) init,
# 512 sequences of 256 tokens per step. Peak lr and steps by model size:
PAPER_RECIPE = dict(adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, clip_grad=0.0, lr_decay_style="cosine",
                    lr_warmup_fraction=0.1, bf16=True, norm_epsilon=1e-6, untie_embeddings_and_output_weights=True,
                    init_method_std=0.02, output_layer_init="plain", global_batch_size=512, seq_length=256,
                    max_position_embeddings=256)
PAPER_SCHEDULES = {"llama-130m": (1e-3, 20000), "llama-250m": (1e-3, 40000), "llama-350m": (5e-4, 60000),
                   "llama-1b": (5e-4, 100000)}
PAPER_MIN_LR_RATIO = 0.1


def preset_layout_values(preset: Optional[str], transformer_impl: str) -> dict:
    """The flags --preset-layout fills (explicit flags still win)."""
    if preset not in PRESET_LAYOUTS:
        raise ConfigError(f"--preset-layout: --preset {preset} has no layout; layouts exist for "
                          f"{', '.join(f'--preset {p}' for p in PRESET_LAYOUTS)}; give the parallel flags instead")
    values = {k: v for k, v in PRESET_LAYOUTS[preset].items() if k != "gpus"}
    if transformer_impl == "transformer_engine" and values.get("recompute_granularity") == "selective":
        del values["recompute_granularity"]  # fused attention keeps no scores to recompute
    return values


def recipe_values(recipe: str, preset: Optional[str]) -> dict:
    """The flags a --recipe fills (explicit flags still win). Presets outside the paper take its small-model lr."""
    values = dict(PAPER_RECIPE)
    lr, steps = PAPER_SCHEDULES.get(preset, (1e-3, None))
    values["lr"] = lr
    if steps is not None:
        values["train_iters"] = steps
    return values


class ConfigError(ValueError):
    """Bad input: the message names the flag and the fix."""


POSITIVE, NON_NEGATIVE = dict(above=0), dict(at_least=0)


def _flag(help: str, default=None, flag: Optional[str] = None, **kw):
    """A field that is also a flag. Non-argparse keys: ``flag`` (a name other than the field's),
    ``above``/``at_least``/``below``/``at_most`` (bounds checked by :func:`validate`)."""
    metadata = dict(help=help, flag=flag, **kw)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class PretrainConfig:
    # Model
    preset: Optional[str] = _flag("fill the model flags from a named shape", choices=sorted(PRESETS))
    preset_layout: bool = _flag("fill the parallel layout (TP, PP, VPP, sequence parallelism, recompute, distributed "
                                "optimizer, micro-batch) from the --preset's layout for its cluster: llama-8b 8xH100, "
                                "llama-70b 64xH100; flags given explicitly win", False)
    recipe: Optional[str] = _flag("fill the optimizer, schedule, precision, norm-eps, batch and sequence flags (and "
                                  "lr/steps by --preset) from the paper's runs", choices=["paper"])
    num_layers: Optional[int] = _flag("transformer layers", **POSITIVE)
    hidden_size: Optional[int] = _flag("hidden size", **POSITIVE)
    ffn_hidden_size: Optional[int] = _flag("MLP hidden size (default 4 * hidden)", **POSITIVE)
    num_attention_heads: Optional[int] = _flag("attention heads", **POSITIVE)
    num_query_groups: Optional[int] = _flag("key/value groups for GQA (default: heads)", **POSITIVE)
    seq_length: int = _flag("sequence length", 1024, **POSITIVE)
    max_position_embeddings: Optional[int] = _flag("maximum positions (default: seq-length)", **POSITIVE)
    normalization: str = _flag("norm type", "LayerNorm", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = _flag("norm epsilon", 1e-5, **POSITIVE)
    apply_layernorm_1p: bool = _flag("zero-centered gamma: the norm multiplies by 1 + weight", False)
    qk_layernorm: bool = _flag("normalize queries and keys", False)
    swiglu: bool = _flag("SwiGLU MLP", False)
    disable_bias_linear: bool = _flag("no biases in linear layers", False)
    position_embedding_type: str = _flag("position embedding", "learned_absolute", choices=["learned_absolute", "rope"])
    rotary_base: int = _flag("RoPE base", 10000, **POSITIVE)
    untie_embeddings_and_output_weights: bool = _flag("separate input embedding and output layer", False)
    init_method_std: float = _flag("std of the normal init", 0.02, **POSITIVE)
    output_layer_init: str = _flag("init of linear_proj and linear_fc2, the same for every --norm-scheme: plain "
                                   "N(0, std) (the paper's, for both arms) or scaled N(0, std/sqrt(2L)) (megatron's)",
                                   "plain", choices=["plain", "scaled"])
    embedding_init_method_std: Optional[float] = _flag("std of the embedding init (default: --init-method-std)",
                                                       **POSITIVE)
    depth_scaled_output_init: bool = _flag("the same as --output-layer-init scaled (kept for old command lines)", False)
    hybrid_layer_pattern: Optional[str] = _flag("build megatron-core's HybridModel (0.19+) instead of GPTModel: "
                                                "'*-' (attention, MLP) once per transformer layer, e.g. '*-*-*-*-' "
                                                "for --num-layers 4; the same network, pipeline split as GPTModel's")
    transformer_impl: str = _flag("layer implementation", "local", choices=["local", "transformer_engine"])
    norm_scheme: str = _flag("pre: Pre-LN; lns: LayerNorm Scaling 1/sqrt(layer); peri: Peri-LN (norms on the "
                             "attention and MLP outputs too); peri-lns: Peri-LN with LNS on the input norms; post: "
                             "Post-LN; mix: Mix-LN (Post-LN in the first --mix-ln-alpha of the layers); deepnorm: "
                             "DeepNorm; dyt: Dynamic Tanh in place of every norm; bhyt: Bounded Hyperbolic Tanh in place of the "
                             "input norms", "lns",
                             choices=["pre", "lns", "peri", "peri-lns", "post", "mix", "deepnorm", "dyt", "bhyt"])
    mix_ln_alpha: float = _flag("--norm-scheme mix: the fraction of layers, from the first, that are Post-LN "
                                "(floor(alpha * layers))", 0.25, at_least=0, at_most=1)
    dyt_alpha_init: float = _flag("--norm-scheme dyt: the initial alpha of every DyT", 0.5, **POSITIVE)
    dyt_alpha_init_attention: Optional[float] = _flag("--norm-scheme dyt: the initial alpha before attention "
                                                      "(default --dyt-alpha-init; the paper's LLaMA 2 7B: 0.8)",
                                                      **POSITIVE)
    dyt_alpha_init_mlp: Optional[float] = _flag("--norm-scheme dyt: the initial alpha before the MLP (default "
                                                "--dyt-alpha-init; LLaMA 2 7B: 0.2)", **POSITIVE)
    dyt_alpha_init_final: Optional[float] = _flag("--norm-scheme dyt: the initial alpha of the final DyT (default "
                                                  "--dyt-alpha-init; LLaMA 2 7B: 0.2)", **POSITIVE)
    bhyt_lambda_init: float = _flag("--norm-scheme bhyt: the initial lambda of every BHyT", 2.0, **POSITIVE)
    bhyt_lambda_init_mlp: Optional[float] = _flag("--norm-scheme bhyt: the initial lambda before the MLP (default "
                                                  "--bhyt-lambda-init; the paper's released runs: 1.0)", **POSITIVE)
    # Mixture of experts (Megatron-LM's flags; megatron-core's MoELayer, router and token dispatchers)
    num_experts: Optional[int] = _flag("experts per MoE layer (default: a dense MLP in every layer)", above=1)
    moe_router_topk: int = _flag("experts each token is routed to", 2, **POSITIVE)
    moe_ffn_hidden_size: Optional[int] = _flag("hidden size of each expert's MLP (default: --ffn-hidden-size)",
                                               **POSITIVE)
    moe_layer_freq: str = _flag("which layers are MoE: N for every N-th layer from the first, or a 0/1 list per "
                                "layer such as '([0]+[1]*3)*2' or '[0,1,1,1]'", "1")
    moe_shared_expert_intermediate_size: Optional[int] = _flag("hidden size of the shared expert every token goes "
                                                               "through (default: none)", **POSITIVE)
    moe_router_score_function: str = _flag("router scores", "softmax", choices=["softmax", "sigmoid"])
    moe_router_pre_softmax: bool = _flag("softmax over all experts before the top-k (needed for top-1)", False)
    moe_router_load_balancing_type: str = _flag("the load-balancing loss: per micro-batch (aux_loss), per sequence "
                                                "(seq_aux_loss), over the global batch (global_aux_loss), "
                                                "sinkhorn routing, or none", "aux_loss",
                                                choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn",
                                                         "none"])
    moe_aux_loss_coeff: float = _flag("weight of the load-balancing loss", 0.0, **NON_NEGATIVE)
    moe_z_loss_coeff: Optional[float] = _flag("weight of the router z-loss (default: none)", **NON_NEGATIVE)
    moe_token_dispatcher_type: str = _flag("how tokens reach their experts' ranks", "allgather",
                                           choices=["allgather", "alltoall"])
    moe_grouped_gemm: bool = _flag("run a rank's experts as one grouped GEMM (Transformer Engine's TEGroupedMLP)",
                                   False)
    make_vocab_size_divisible_by: int = _flag("pad the vocabulary to a multiple of this times TP", 128, **POSITIVE)
    # Batches and schedule
    micro_batch_size: int = _flag("samples per micro-batch per GPU", 1, **POSITIVE)
    global_batch_size: Optional[int] = _flag("samples per iteration (default: micro-batch * DP)", **POSITIVE)
    train_iters: int = _flag("iterations to train", 100, **POSITIVE)
    lr: float = _flag("peak learning rate", 3e-4, **NON_NEGATIVE)
    min_lr: float = _flag("final learning rate", 0.0, **NON_NEGATIVE)
    lr_warmup_iters: int = _flag("linear warmup iterations", 0, **NON_NEGATIVE)
    lr_warmup_fraction: Optional[float] = _flag("warmup as a fraction of the decay length (instead of --lr-warmup-iters)",
                                                at_least=0, below=1)
    lr_decay_iters: Optional[int] = _flag("decay iterations (default: train-iters)", **POSITIVE)
    lr_decay_style: str = _flag("decay after warmup; WSD: warmup-stable-decay, constant until the last "
                                "--lr-wsd-decay-iters of the decay length", "cosine",
                                choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    lr_wsd_decay_style: str = _flag("--lr-decay-style WSD: the shape of its decay", "exponential",
                                    choices=["linear", "cosine", "exponential", "minus_sqrt"])
    lr_wsd_decay_iters: Optional[int] = _flag("--lr-decay-style WSD: iterations of the decay at the end of "
                                              "--lr-decay-iters", **POSITIVE)
    rampup_batch_size: Optional[List[int]] = _flag(
        "START INCREMENT SAMPLES: grow the global batch from START by INCREMENT up to --global-batch-size over the "
        "first SAMPLES samples (megatron-core's RampupBatchsizeNumMicroBatchesCalculator)", nargs=3)
    weight_decay: float = _flag("weight decay", 0.01, **NON_NEGATIVE)
    clip_grad: float = _flag("gradient clipping by global norm (0: off)", 1.0, **NON_NEGATIVE)
    adam_beta1: float = _flag("Adam beta1", 0.9, at_least=0, below=1)
    adam_beta2: float = _flag("Adam beta2", 0.999, at_least=0, below=1)
    adam_eps: float = _flag("Adam epsilon", 1e-8, **POSITIVE)
    seed: int = _flag("random seed", 1234, **NON_NEGATIVE)
    # Precision
    bf16: bool = _flag("bfloat16 training (fp32 main weights)", False)
    fp8_format: Optional[str] = _flag("FP8 through Transformer Engine", choices=["e4m3", "hybrid"])
    fp8_recipe: str = _flag("FP8 scaling recipe", "delayed", choices=["delayed", "tensorwise", "mxfp8", "blockwise"])
    fp8_amax_history_len: int = _flag("FP8 amax history length", 1, at_least=1)
    # Parallelism
    tensor_model_parallel_size: int = _flag("tensor parallel size", 1, at_least=1)
    pipeline_model_parallel_size: int = _flag("pipeline parallel size", 1, at_least=1)
    num_layers_per_virtual_pipeline_stage: Optional[int] = _flag("layers per virtual stage (interleaved 1F1B)", at_least=1)
    expert_model_parallel_size: int = _flag("expert parallel size: the experts are split over this many ranks", 1,
                                            at_least=1)
    expert_tensor_parallel_size: Optional[int] = _flag("tensor parallel size inside each expert (default: "
                                                       "--tensor-model-parallel-size)", at_least=1)
    sequence_parallel: bool = _flag("sequence parallelism (needs TP > 1)", False)
    use_distributed_optimizer: bool = _flag("shard optimizer state over data parallel ranks", False)
    overlap_grad_reduce: bool = _flag("overlap the gradient reduce with backward", False)
    overlap_param_gather: bool = _flag("overlap the parameter all-gather (needs the distributed optimizer)", False)
    context_parallel_size: int = _flag("context parallel size: each sequence split over this many ranks (Transformer "
                                       "Engine's attention)", 1, at_least=1)
    cp_comm_type: str = _flag("how context-parallel ranks exchange keys and values", "p2p",
                              choices=["p2p", "all_gather", "a2a"])
    recompute_granularity: Optional[str] = _flag("activation recompute: full (whole layers) or selective (the "
                                                 "--recompute-modules)", choices=["full", "selective"])
    recompute_method: Optional[str] = _flag("--recompute-granularity full: uniform (every layer, in units of "
                                            "--recompute-num-layers) or block (the first --recompute-num-layers "
                                            "of each pipeline chunk)", choices=["uniform", "block"])
    recompute_num_layers: Optional[int] = _flag("--recompute-granularity full: layers per recompute unit (uniform) "
                                                "or recomputed per pipeline chunk (block)", **POSITIVE)
    recompute_modules: Optional[List[str]] = _flag("--recompute-granularity selective: the submodules to recompute "
                                                   "(default core_attn): core_attn, layernorm, mlp, moe, moe_act, "
                                                   "shared_experts, mla_up_proj", nargs="+")
    distributed_timeout_minutes: float = _flag("end the job when a collective gets no answer for this long "
                                               "(a frozen rank or a lost node)", 10.0, **POSITIVE)
    # Data
    data_path: Optional[List[str]] = _flag("dataset prefixes, optionally weighted: 0.7 a 0.3 b", nargs="+")
    split: str = _flag("train,valid,test proportions", "969,30,1")
    mock_data: bool = _flag("synthetic tokens (megatron's MockGPTDataset)", False)
    tokenizer_type: Optional[str] = _flag("HuggingFaceTokenizer, SentencePieceTokenizer, TikTokenizer, GPT2BPETokenizer, NullTokenizer")
    tokenizer_model: Optional[str] = _flag("tokenizer file or directory")
    vocab_file: Optional[str] = _flag("GPT2BPETokenizer vocab")
    merge_file: Optional[str] = _flag("GPT2BPETokenizer merges")
    vocab_size: Optional[int] = _flag("vocabulary size for NullTokenizer / mock data", **POSITIVE)
    data_cache_path: Optional[str] = _flag("where megatron caches dataset indices")
    num_workers: int = _flag("data loader worker processes", 2, **NON_NEGATIVE)
    eod_id: Optional[int] = _flag("end-of-document id (default: the one the --data-path datasets were prepared with, "
                                  "else the tokenizer's end-of-text token)", **NON_NEGATIVE)
    # Checkpoints and evaluation
    save: Optional[str] = _flag("checkpoint directory to save to")
    load: Optional[str] = _flag("checkpoint directory to resume from")
    save_interval: Optional[int] = _flag("save every N iterations (and at the end)", **POSITIVE)
    exit_interval: Optional[int] = _flag("stop (and save, with --save) after this iteration", **POSITIVE)
    dist_ckpt_optim_fully_reshardable: bool = _flag(
        "save distributed-optimizer state per parameter (loads at any TP/PP/DP; gathers the state at save) instead "
        "of per DP shard (loads at any DP only)", False)
    async_save: bool = _flag("write checkpoints in the background (megatron-core's async dist-checkpointing): "
                             "training goes on while a forked process writes; the checkpoint becomes the latest "
                             "only when every rank's write is done", False)
    ckpt_fully_parallel_save: bool = _flag(
        "write each replicated tensor once, spread over the data-parallel ranks (megatron-core's "
        "FullyParallelSaveStrategyWrapper), instead of all from data-parallel rank 0", True,
        flag="--no-ckpt-fully-parallel-save")
    ckpt_fully_parallel_load: bool = _flag(
        "read each tensor once, spread over the data-parallel ranks, and exchange it (megatron-core's "
        "FullyParallelLoadStrategyWrapper), instead of every rank reading what it needs", False)
    use_checkpoint_args: bool = _flag("take the model and tokenizer flags from the --load checkpoint", False)
    finetune: bool = _flag("load the model weights only: iteration 0, fresh optimizer, scheduler and data order", False)
    no_load_optim: bool = _flag("do not load the optimizer state: fresh Adam moments; the weights, iteration, "
                                "learning-rate schedule and data position still load", False)
    no_load_rng: bool = _flag("do not load the random-number generator states", False)
    override_opt_param_scheduler: bool = _flag(
        "on --load, use this run's --lr/--min-lr/warmup/decay/weight-decay flags, not the checkpoint's", False,
        flag="--override-opt_param-scheduler")
    use_checkpoint_opt_param_scheduler: bool = _flag(
        "on --load, keep the checkpoint's learning-rate schedule and ignore the schedule flags", False,
        flag="--use-checkpoint-opt_param-scheduler")
    depth_growth: Optional[str] = _flag("grow the model during the run to --num-layers: midas (copy the middle block "
                                        "of --growth-block-size layers after itself), stack (repeat the whole stack) "
                                        "or identity (a zero-output copy after every --growth-block-size-th layer)",
                                        choices=["midas", "stack", "identity"])
    growth_block_size: Optional[int] = _flag("--depth-growth midas: the block b it copies; identity: a copy after "
                                             "every b-th layer", **POSITIVE)
    growth_stages: Optional[int] = _flag("--depth-growth: the number of stages K (the depth grows K - 1 times)",
                                         **POSITIVE)
    growth_schedule: str = _flag("--depth-growth: prop-ALPHA, stage i lasting in proportion to i^ALPHA (MIDAS's "
                                 "Prop-alpha)", "prop-1")
    growth_lns_scales: str = _flag("--depth-growth with LNS: position (each layer takes 1/sqrt(l) of its new place) "
                                   "or inherit (each layer keeps its l; a copy takes its source's)", "position",
                                   choices=["position", "inherit"])
    growth_optimizer_state: str = _flag("--depth-growth: copy the Adam moments to the copied layers, or reset every "
                                        "moment and Adam's step", "copy", choices=["copy", "reset"])
    eval_interval: int = _flag("validate every N iterations", 1000, **POSITIVE)
    eval_iters: int = _flag("validation micro-batch rounds (0: no validation)", 10, **NON_NEGATIVE)
    check_for_nan_in_loss_and_grad: bool = _flag(
        "stop at the first NaN/Inf loss or gradient, before the optimizer step", True,
        flag="--no-check-for-nan-in-loss-and-grad")
    # Logging
    tensorboard_dir: Optional[str] = _flag("TensorBoard log directory (written by the last rank)")
    log_interval: int = _flag("console/TensorBoard interval", 100, **POSITIVE)
    depth_log_interval: int = _flag("depth-health diagnostics interval (0: off)", 100, **NON_NEGATIVE)
    # Diagnosing a slow run
    profile: bool = _flag("record a torch profiler trace of iterations --profile-step-start..--profile-step-end into "
                          "--tensorboard-dir (TensorBoard's profile tab opens it)", False)
    use_pytorch_profiler: bool = _flag("accepted for Megatron-LM command lines: --profile always uses the torch "
                                       "profiler here", False)
    profile_step_start: int = _flag("first profiled iteration", 10, **POSITIVE)
    profile_step_end: int = _flag("profiling stops before this iteration", 12, **POSITIVE)
    profile_ranks: List[int] = _flag("global ranks that profile", [0], nargs="+")
    manual_gc: bool = _flag("turn Python's automatic garbage collection off (its pauses stall every rank at "
                            "random) and collect at --manual-gc-interval", False)
    manual_gc_interval: int = _flag("--manual-gc: collect every N iterations (0: never during training)", 0,
                                    **NON_NEGATIVE)
    manual_gc_eval: bool = _flag("--manual-gc: collect before and after each validation", True,
                                 flag="--no-manual-gc-eval")

    # Derived at start (and saved with each checkpoint, which a resume is compared with)
    world_size: int = field(default=1, metadata=dict(derived=True))
    tokenizer_identity: Optional[dict] = field(default=None, metadata=dict(derived=True))  # data.metadata's
    padded_vocab_size: Optional[int] = field(default=None, metadata=dict(derived=True))
    # The l of each layer's LNS scale 1/sqrt(l) where it is not the layer's place (set by depth growth's inherit)
    lns_depths: Optional[List[int]] = field(default=None, metadata=dict(derived=True))

    @property
    def data_parallel_size(self) -> int:
        """Ranks that see different samples (context-parallel ranks share a sample, each holding part of it)."""
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size
                                   * self.context_parallel_size)

    @property
    def virtual_pipeline_model_parallel_size(self) -> Optional[int]:
        if self.num_layers_per_virtual_pipeline_stage is None:
            return None
        return self.num_layers // (self.pipeline_model_parallel_size * self.num_layers_per_virtual_pipeline_stage)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict) -> "PretrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


ARGPARSE_KEYS = ("help", "choices", "nargs")


def flag_name(name: str) -> str:
    """The command-line flag of a config field (``lr_decay_iters`` -> ``--lr-decay-iters``)."""
    meta = PretrainConfig.__dataclass_fields__[name].metadata
    return meta.get("flag") or "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lns-pretrain", description="GPT pretraining with LayerNorm Scaling on megatron-core",
        argument_default=argparse.SUPPRESS,  # only explicit flags reach the namespace
    )
    for f in dataclasses.fields(PretrainConfig):
        if f.metadata.get("derived", False):
            continue
        kw = {k: v for k, v in f.metadata.items() if k in ARGPARSE_KEYS}
        if f.type in ("bool", bool):
            # --x and --no-x, so that a preset's or a recipe's choice can be undone. A flag that is on by
            # default has only its Megatron-LM name, --no-...; so has one named --no-... (--no-load-optim),
            # which BooleanOptionalAction would read as "off".
            flag = flag_name(f.name)
            if f.default:
                action = "store_false"
            elif flag.startswith("--no-"):
                action = "store_true"
            else:
                action = argparse.BooleanOptionalAction
            parser.add_argument(flag, dest=f.name, action=action, **kw)
            continue
        base = f.type.replace("Optional[", "").rstrip("]") if isinstance(f.type, str) else f.type
        kind = {"int": int, "float": float}.get(base.replace("List[", ""), str)
        parser.add_argument(flag_name(f.name), dest=f.name, type=kind, **kw)
    return parser


def _last_position(argv: List[str], flag: str) -> int:
    return max((i for i, a in enumerate(argv) if a == flag or a.startswith(flag + "=")), default=-1)


def parse_args(argv=None) -> PretrainConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    explicit = vars(build_parser().parse_args(argv))
    if "lr_warmup_iters" in explicit and "lr_warmup_fraction" in explicit:
        # Two spellings of one setting: the later one wins, as for any repeated flag (a launcher's default
        # --lr-warmup-fraction, overridden by the user's --lr-warmup-iters at the end of the line).
        if _last_position(argv, "--lr-warmup-iters") > _last_position(argv, "--lr-warmup-fraction"):
            del explicit["lr_warmup_fraction"]
        else:
            del explicit["lr_warmup_iters"]
    values = {}
    if "preset" in explicit:
        values.update(LLAMA_ARCH)
        values.update(PRESETS[explicit["preset"]])
    if "recipe" in explicit:
        values.update(recipe_values(explicit["recipe"], explicit.get("preset")))
        if "lr_warmup_iters" in explicit:
            values.pop("lr_warmup_fraction")
    if explicit.get("preset_layout"):
        values.update(preset_layout_values(explicit.get("preset"), explicit.get("transformer_impl", "local")))
    values.update(explicit)
    if "recipe" in explicit and "min_lr" not in explicit:
        values["min_lr"] = PAPER_MIN_LR_RATIO * values["lr"]
    config = PretrainConfig(**values)
    config.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    fill_defaults(config)
    return config


# Flags that only one --norm-scheme reads.
SCHEME_FLAGS = {"mix_ln_alpha": "mix", "dyt_alpha_init": "dyt", "dyt_alpha_init_attention": "dyt",
                "dyt_alpha_init_mlp": "dyt", "dyt_alpha_init_final": "dyt", "bhyt_lambda_init": "bhyt",
                "bhyt_lambda_init_mlp": "bhyt"}


def unused_scheme_flags(c: PretrainConfig) -> List[str]:
    """The scheme flags set away from their defaults that this run's --norm-scheme does not read (said at
    start-up, not refused: an A/B gives every arm the same flags)."""
    return [flag_name(name) for name, scheme in SCHEME_FLAGS.items()
            if c.norm_scheme != scheme and getattr(c, name) != PretrainConfig.__dataclass_fields__[name].default]


# Flags that only an MoE model (--num-experts) reads.
MOE_FLAGS = ("moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq", "moe_shared_expert_intermediate_size",
             "moe_router_score_function", "moe_router_pre_softmax", "moe_router_load_balancing_type",
             "moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_token_dispatcher_type", "moe_grouped_gemm",
             "expert_model_parallel_size", "expert_tensor_parallel_size")


def unused_moe_flags(c: PretrainConfig) -> List[str]:
    """The MoE flags set away from their defaults in a dense run (said at start-up, not refused, so that a
    dense/MoE comparison can share one command line; expert parallelism without experts is refused)."""
    if c.num_experts is not None:
        return []
    return [flag_name(name) for name in MOE_FLAGS
            if getattr(c, name) != PretrainConfig.__dataclass_fields__[name].default]


def _list_expression(node):
    """A 0/1 list from Megatron-LM's --moe-layer-freq syntax: list literals joined by + and repeated by *."""
    if isinstance(node, ast.List):
        return [_list_expression(e) for e in node.elts]
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _list_expression(node.left), _list_expression(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise ValueError(ast.dump(node))


def moe_layer_pattern(freq: str, num_layers: int) -> List[int]:
    """--moe-layer-freq as one 0/1 per layer (1: MoE): an integer N makes every N-th layer MoE from the first,
    as in Megatron-LM; a list gives each layer. A ConfigError names the flag otherwise."""
    flag = f"--moe-layer-freq {freq!r}"
    text = str(freq).strip()
    if text.isdigit():
        every = int(text)
        if every < 1:
            raise ConfigError(f"{flag}: every N-th layer needs N >= 1")
        return [1 if i % every == 0 else 0 for i in range(num_layers)]
    try:
        pattern = _list_expression(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, TypeError, RecursionError):
        pattern = None
    if not isinstance(pattern, list) or any(v not in (0, 1) or type(v) is not int for v in pattern):
        raise ConfigError(f"{flag}: give an integer N or a list of 0 (dense) and 1 (MoE), e.g. '([0]+[1]*3)*2'")
    if len(pattern) != num_layers:
        raise ConfigError(f"{flag} has {len(pattern)} entries for --num-layers {num_layers}; give one per layer")
    if not any(pattern):
        raise ConfigError(f"{flag} makes no layer MoE; leave --num-experts out for a dense model")
    return pattern


def fill_defaults(c: PretrainConfig) -> None:
    if c.ffn_hidden_size is None and c.hidden_size is not None:
        c.ffn_hidden_size = 4 * c.hidden_size
    if c.num_query_groups is None:
        c.num_query_groups = c.num_attention_heads
    if c.max_position_embeddings is None:
        c.max_position_embeddings = c.seq_length
    if c.lr_decay_iters is None:
        c.lr_decay_iters = c.train_iters
    if c.depth_scaled_output_init:
        c.output_layer_init = "scaled"
    if c.lr_warmup_fraction is not None and c.lr_decay_iters is not None:  # Megatron-LM: a fraction of the decay
        c.lr_warmup_iters = int(c.lr_warmup_fraction * c.lr_decay_iters)
    if c.num_experts is not None:
        if c.moe_ffn_hidden_size is None:
            c.moe_ffn_hidden_size = c.ffn_hidden_size
        if c.expert_tensor_parallel_size is None:  # Megatron-LM: experts split like the dense layers
            c.expert_tensor_parallel_size = c.tensor_model_parallel_size


def check_bounds(c: PretrainConfig) -> None:
    """Every numeric flag within its bounds and finite: one line naming the flag."""
    for f in dataclasses.fields(PretrainConfig):
        value, meta = getattr(c, f.name), f.metadata
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        flag = flag_name(f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} {value}: must be a finite number")
        if "above" in meta and not value > meta["above"]:
            raise ConfigError(f"{flag} {value}: must be greater than {meta['above']}")
        if "at_least" in meta and not value >= meta["at_least"]:
            raise ConfigError(f"{flag} {value}: must be at least {meta['at_least']}")
        if "below" in meta and not value < meta["below"]:
            raise ConfigError(f"{flag} {value}: must be less than {meta['below']}")
        if "at_most" in meta and not value <= meta["at_most"]:
            raise ConfigError(f"{flag} {value}: must be at most {meta['at_most']}")


def validate(c: PretrainConfig, cuda_available: bool, have_te: bool) -> None:
    """Fail fast, before any model memory is allocated, with one line per problem."""

    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        _need(getattr(c, name) is not None, f"{flag_name(name)} is required (or pick a --preset, e.g. --preset tiny)")
    check_bounds(c)
    tp, pp = c.tensor_model_parallel_size, c.pipeline_model_parallel_size
    _need(c.num_attention_heads % tp == 0,
         f"--num-attention-heads {c.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}; "
         "choose a TP size that divides the heads")
    _need(c.num_query_groups % tp == 0 and c.num_attention_heads % c.num_query_groups == 0,
         f"--num-query-groups {c.num_query_groups} must divide --num-attention-heads {c.num_attention_heads} "
         f"and be divisible by --tensor-model-parallel-size {tp}")
    _need(c.hidden_size % c.num_attention_heads == 0,
         f"--hidden-size {c.hidden_size} is not divisible by --num-attention-heads {c.num_attention_heads}")
    chunk = pp * (c.num_layers_per_virtual_pipeline_stage or 1)
    _need(c.num_layers % chunk == 0,
         f"--num-layers {c.num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
         + (f" x --num-layers-per-virtual-pipeline-stage {c.num_layers_per_virtual_pipeline_stage}"
            if c.num_layers_per_virtual_pipeline_stage else "")
         + f"; use a multiple of {chunk} layers")
    if c.num_layers_per_virtual_pipeline_stage is not None:
        _need(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
    cp = c.context_parallel_size
    _need(c.world_size % (tp * pp * cp) == 0,
         f"world size {c.world_size} is not divisible by --tensor-model-parallel-size {tp} x "
         f"--pipeline-model-parallel-size {pp}" + (f" x --context-parallel-size {cp}" if cp > 1 else "")
         + f"; launch a multiple of {tp * pp * cp} processes")
    if cp > 1:
        _need(c.transformer_impl == "transformer_engine" and cuda_available and have_te,
             f"--context-parallel-size {cp}: megatron-core splits a sequence over ranks only inside Transformer "
             "Engine's attention (TEDotProductAttention); use --transformer-impl transformer_engine on CUDA GPUs with "
             "Transformer Engine installed (pip install -e .[te]), or leave --context-parallel-size at 1")
        _need(c.seq_length % (2 * cp) == 0, f"--seq-length {c.seq_length} is not divisible by 2 x "
             f"--context-parallel-size {cp} (each rank holds two chunks, for causal load balance); use a multiple "
             f"of {2 * cp}")
    dp = c.data_parallel_size
    if c.global_batch_size is None:
        c.global_batch_size = c.micro_batch_size * dp
    _need(c.global_batch_size % (c.micro_batch_size * dp) == 0,
         f"--global-batch-size {c.global_batch_size} is not a multiple of --micro-batch-size {c.micro_batch_size} "
         f"x data-parallel size {dp}; use a multiple of {c.micro_batch_size * dp}")
    if c.virtual_pipeline_model_parallel_size:
        _need(c.num_microbatches % pp == 0,
             f"interleaved pipelining needs the number of micro-batches ({c.num_microbatches}) to be a multiple of "
             f"--pipeline-model-parallel-size {pp}; raise --global-batch-size")
    _need(c.seq_length <= c.max_position_embeddings,
         f"--seq-length {c.seq_length} is longer than --max-position-embeddings {c.max_position_embeddings}; "
         "raise --max-position-embeddings or shorten --seq-length")
    if c.sequence_parallel:
        _need(tp > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1")
        _need(c.transformer_impl == "transformer_engine" or c.norm_scheme != "pre",
             "--sequence-parallel with --transformer-impl local needs a --norm-scheme other than pre "
             "(megatron's local Pre-LN norm refuses sequence parallelism); or use --transformer-impl transformer_engine")
    if c.apply_layernorm_1p and c.transformer_impl == "local":
        _need(c.norm_scheme != "pre", "--apply-layernorm-1p with --transformer-impl local needs a --norm-scheme other "
             "than pre (megatron's local Pre-LN norm refuses zero-centered gamma)")
    if c.norm_scheme == "dyt":
        _need(c.transformer_impl == "local", "--norm-scheme dyt with --transformer-impl transformer_engine: Transformer "
             "Engine fuses LayerNorm and RMSNorm only, it has no tanh; use --transformer-impl local")
        _need(not c.qk_layernorm, "--norm-scheme dyt replaces every norm, and --qk-layernorm's are not DyT; leave "
             "--qk-layernorm out")
    if c.norm_scheme == "bhyt":
        _need(c.transformer_impl == "local", "--norm-scheme bhyt with --transformer-impl transformer_engine: Transformer "
             "Engine fuses LayerNorm and RMSNorm only, it has no tanh; use --transformer-impl local")
        _need(c.normalization == "RMSNorm", f"--norm-scheme bhyt with --normalization {c.normalization}: BHyT bounds "
             "by the root mean square (the paper's RMSNorm form); use --normalization RMSNorm")
    if c.overlap_param_gather:
        _need(c.use_distributed_optimizer, "--overlap-param-gather needs --use-distributed-optimizer")
    if c.transformer_impl == "transformer_engine" or c.fp8_format:
        what = "--fp8-format" if c.fp8_format else "--transformer-impl transformer_engine"
        _need(cuda_available, f"{what} needs a CUDA GPU; on this machine use --transformer-impl local without FP8")
        _need(have_te, f"{what} needs Transformer Engine: pip install -e .[te]")
    if c.fp8_format:
        _need(c.transformer_impl == "transformer_engine", "--fp8-format needs --transformer-impl transformer_engine")
        _need(c.bf16, "--fp8-format needs --bf16 for the non-FP8 parts")
    if c.num_experts is None:
        for name in ("expert_model_parallel_size", "expert_tensor_parallel_size"):
            _need(getattr(c, name) in (None, 1), f"{flag_name(name)} {getattr(c, name)} needs --num-experts: a dense "
                 "model has no experts to split")
    else:
        validate_moe(c, cuda_available, have_te)
    _need(c.min_lr <= c.lr, f"--min-lr {c.min_lr} is above --lr {c.lr}; lower --min-lr")
    _need(c.lr_warmup_iters < c.lr_decay_iters,
         f"--lr-warmup-iters {c.lr_warmup_iters} must be smaller than the decay length {c.lr_decay_iters} "
         "(--lr-decay-iters, default --train-iters); shorten the warmup")
    _need(c.mock_data or c.data_path, "no training data: give --data-path PREFIX (from tools/preprocess_data.py) or --mock-data")
    _need(not (c.mock_data and c.data_path), "--mock-data and --data-path are exclusive; drop one")
    if c.mock_data and c.tokenizer_type is None:
        _need(c.vocab_size is not None, "--mock-data needs --vocab-size (or a --tokenizer-type and --tokenizer-model)")
    if c.data_path:
        _need(c.tokenizer_type is not None, "--data-path needs --tokenizer-type (the tokenizer the data was prepared with)")
    if c.save_interval is not None:
        _need(c.save is not None, "--save-interval needs --save DIR")
    for name in ("use_checkpoint_args", "finetune", "no_load_optim", "no_load_rng", "override_opt_param_scheduler",
                 "use_checkpoint_opt_param_scheduler"):
        _need(not getattr(c, name) or c.load is not None, f"{flag_name(name)} needs --load DIR")
    _need(not (c.override_opt_param_scheduler and c.use_checkpoint_opt_param_scheduler),
         "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are exclusive; choose one")
    if c.load is not None:
        _need(os.path.isdir(c.load), f"--load {c.load}: no such directory; give the --save directory of an earlier run")
    validate_recompute(c, have_te)
    validate_schedule(c)
    validate_diagnosis(c)


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate_recompute(c: PretrainConfig, have_te: bool) -> None:
    """--recompute-*: each problem one line (megatron-core asserts some, others it would take silently)."""
    granularity = c.recompute_granularity
    if granularity != "full":
        for name in ("recompute_method", "recompute_num_layers"):
            _need(getattr(c, name) is None, f"{flag_name(name)} needs --recompute-granularity full (selective "
                  "recompute picks submodules with --recompute-modules, not layers)")
    else:
        _need(c.recompute_method is not None and c.recompute_num_layers is not None,
              "--recompute-granularity full needs --recompute-method (uniform or block) and --recompute-num-layers, "
              "e.g. --recompute-method uniform --recompute-num-layers 1 to recompute every layer")
        per_chunk = c.num_layers // (c.pipeline_model_parallel_size * (c.virtual_pipeline_model_parallel_size or 1))
        _need(c.recompute_method != "block" or c.recompute_num_layers <= per_chunk,
              f"--recompute-num-layers {c.recompute_num_layers} with --recompute-method block: a pipeline chunk has "
              f"{per_chunk} layers; recompute at most {per_chunk}")
    if c.recompute_modules is not None:
        _need(granularity == "selective", "--recompute-modules needs --recompute-granularity selective")
        without_output = sorted({"layernorm", "moe_act"} & set(c.recompute_modules))
        _need(have_te or not without_output,
              f"--recompute-modules {' '.join(without_output)} needs Transformer Engine: megatron-core recomputes "
              "them with CheckpointWithoutOutput, which calls TE's FP8GlobalStateManager even without FP8; install "
              "it (pip install -e .[te]) or leave them out")
        _need(c.norm_scheme != "bhyt" or "layernorm" not in c.recompute_modules,
              "--recompute-modules layernorm with --norm-scheme bhyt: BHyT's pre-MLP statistic is read from the "
              "attention norm's forward, which a recomputed norm does not repeat; leave layernorm out")


def validate_schedule(c: PretrainConfig) -> None:
    """WSD and the batch-size ramp-up."""
    if c.lr_decay_style == "WSD":
        _need(c.lr_wsd_decay_iters is not None, "--lr-decay-style WSD needs --lr-wsd-decay-iters (the length of "
              "the final decay)")
        stable_end = c.lr_decay_iters - c.lr_wsd_decay_iters
        _need(stable_end >= c.lr_warmup_iters,
              f"--lr-wsd-decay-iters {c.lr_wsd_decay_iters} is longer than the decay length {c.lr_decay_iters} "
              f"(--lr-decay-iters, default --train-iters) after --lr-warmup-iters {c.lr_warmup_iters}; shorten it")
    else:
        _need(c.lr_wsd_decay_iters is None, f"--lr-wsd-decay-iters needs --lr-decay-style WSD, not "
              f"{c.lr_decay_style}")
    if c.rampup_batch_size is not None:
        start, increment, samples = c.rampup_batch_size
        step = c.micro_batch_size * c.data_parallel_size
        if c.virtual_pipeline_model_parallel_size:
            step *= c.pipeline_model_parallel_size  # interleaving: micro-batches in multiples of PP
        where = f"--rampup-batch-size {start} {increment} {samples}"
        _need(start > 0 and increment > 0 and samples >= 0, f"{where}: START and INCREMENT must be positive, "
              "SAMPLES at least 0")
        _need(start < c.global_batch_size and (c.global_batch_size - start) % increment == 0,
              f"{where}: --global-batch-size {c.global_batch_size} must be START plus a whole number of INCREMENTs")
        _need(start % step == 0 and increment % step == 0,
              f"{where}: START and INCREMENT must be multiples of --micro-batch-size x data-parallel size"
              + (" x --pipeline-model-parallel-size (interleaving)" if c.virtual_pipeline_model_parallel_size else "")
              + f" = {step}")


def validate_diagnosis(c: PretrainConfig) -> None:
    """--profile, --manual-gc, --async-save."""
    if c.profile:
        _need(c.tensorboard_dir is not None, "--profile writes its trace into --tensorboard-dir; give one")
        _need(c.profile_step_start < c.profile_step_end, f"--profile-step-start {c.profile_step_start} must be "
              f"before --profile-step-end {c.profile_step_end}")
        outside = [r for r in c.profile_ranks if not 0 <= r < c.world_size]
        _need(not outside, f"--profile-ranks {' '.join(map(str, outside))}: no such rank in a world of "
              f"{c.world_size}")
    _need(c.manual_gc or c.manual_gc_interval == 0, "--manual-gc-interval needs --manual-gc")
    _need(c.save is not None or not c.async_save, "--async-save needs --save DIR")


def validate_moe(c: PretrainConfig, cuda_available: bool, have_te: bool) -> None:
    """The MoE flags, each problem one line (megatron-core would otherwise fail later, some of them inside the
    first forward pass). Whether the norm scheme is defined on MoE is models.build.check_moe_scheme's."""
    n, ep, pp = c.num_experts, c.expert_model_parallel_size, c.pipeline_model_parallel_size
    tp, etp = c.tensor_model_parallel_size, c.expert_tensor_parallel_size or c.tensor_model_parallel_size
    _need(not c.hybrid_layer_pattern, "--num-experts with --hybrid-layer-pattern: MoE layers are not mapped onto "
         "HybridModel's pattern here; leave --hybrid-layer-pattern out (GPTModel builds the MoE layers)")
    _need(n % ep == 0, f"--num-experts {n} is not divisible by --expert-model-parallel-size {ep}; choose an "
         "expert-parallel size that divides the experts")
    _need(c.moe_router_topk <= n, f"--moe-router-topk {c.moe_router_topk} is more than --num-experts {n}")
    _need(c.world_size % (etp * ep * pp) == 0,
         f"world size {c.world_size} is not divisible by --expert-tensor-parallel-size {etp} x "
         f"--expert-model-parallel-size {ep} x --pipeline-model-parallel-size {pp}; launch a multiple of "
         f"{etp * ep * pp} processes")
    _need(tp == 1 or c.sequence_parallel, f"--num-experts with --tensor-model-parallel-size {tp} needs "
         "--sequence-parallel (megatron-core's MoE layer refuses tensor parallelism without it in training)")
    _need(c.moe_router_topk > 1 or c.moe_router_pre_softmax or c.moe_router_load_balancing_type == "sinkhorn",
         "--moe-router-topk 1 needs --moe-router-pre-softmax (a softmax over one expert has zero gradient)")
    _need(c.moe_router_load_balancing_type != "sinkhorn" or not c.moe_aux_loss_coeff,
         f"--moe-router-load-balancing-type sinkhorn balances by routing and takes no aux loss (megatron-core "
         f"asserts it in the first forward); give --moe-aux-loss-coeff 0, not {c.moe_aux_loss_coeff}")
    _need(c.disable_bias_linear or etp == 1, f"--expert-tensor-parallel-size {etp}: megatron-core supports biases in "
         "experts only at 1; add --disable-bias-linear or use --expert-tensor-parallel-size 1")
    if c.moe_grouped_gemm:
        if c.transformer_impl == "local":
            import importlib.util

            _need(cuda_available and importlib.util.find_spec("grouped_gemm") is not None,
                 "--moe-grouped-gemm with --transformer-impl local needs a CUDA GPU and the grouped_gemm package "
                 "(megatron-core's GroupedMLP); use --transformer-impl transformer_engine (TEGroupedMLP), or leave "
                 "--moe-grouped-gemm out (one GEMM per expert)")
    pattern = moe_layer_pattern(c.moe_layer_freq, c.num_layers)
    if not str(c.moe_layer_freq).strip().isdigit():  # one spelling per pattern, for the resume check
        c.moe_layer_freq = str(pattern).replace(" ", "")
