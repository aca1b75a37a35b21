"""Pretraining configuration: one dataclass, Megatron-LM flag names, presets from the paper.

Every field is a command-line flag of the same name (``num_layers`` -> ``--num-layers``), with
Megatron-LM's meaning. ``--preset`` fills the model fields; flags given explicitly win.
Validation runs before any process group or model memory exists, and every error is one line
naming the flag and the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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
}
LLAMA_ARCH = dict(normalization="RMSNorm", swiglu=True, disable_bias_linear=True, position_embedding_type="rope",
                  untie_embeddings_and_output_weights=True, seq_length=1024, max_position_embeddings=1024)


class ConfigError(ValueError):
    """Bad input: the message names the flag and the fix."""


def _flag(help: str, default=None, **kw):
    return field(default=default, metadata=dict(help=help, **kw))


@dataclass
class PretrainConfig:
    # Model
    preset: Optional[str] = _flag("fill the model flags from a named shape", choices=sorted(PRESETS))
    num_layers: Optional[int] = _flag("transformer layers")
    hidden_size: Optional[int] = _flag("hidden size")
    ffn_hidden_size: Optional[int] = _flag("MLP hidden size (default 4 * hidden)")
    num_attention_heads: Optional[int] = _flag("attention heads")
    num_query_groups: Optional[int] = _flag("key/value groups for GQA (default: heads)")
    seq_length: int = _flag("sequence length", 1024)
    max_position_embeddings: Optional[int] = _flag("maximum positions (default: seq-length)")
    normalization: str = _flag("norm type", "LayerNorm", choices=["LayerNorm", "RMSNorm"])
    norm_epsilon: float = _flag("norm epsilon", 1e-5)
    apply_layernorm_1p: bool = _flag("zero-centered gamma: the norm multiplies by 1 + weight", False)
    qk_layernorm: bool = _flag("normalize queries and keys", False)
    swiglu: bool = _flag("SwiGLU MLP", False)
    disable_bias_linear: bool = _flag("no biases in linear layers", False)
    position_embedding_type: str = _flag("position embedding", "learned_absolute", choices=["learned_absolute", "rope"])
    rotary_base: int = _flag("RoPE base", 10000)
    untie_embeddings_and_output_weights: bool = _flag("separate input embedding and output layer", False)
    init_method_std: float = _flag("std of the normal init", 0.02)
    depth_scaled_output_init: bool = _flag("output layers init std/sqrt(2L) even with LNS (off by the paper's advice)", False)
    transformer_impl: str = _flag("layer implementation", "local", choices=["local", "transformer_engine"])
    norm_scheme: str = _flag("pre: Pre-LN; lns: LayerNorm Scaling 1/sqrt(layer)", "lns", choices=["pre", "lns"])
    make_vocab_size_divisible_by: int = _flag("pad the vocabulary to a multiple of this times TP", 128)
    # Batches and schedule
    micro_batch_size: int = _flag("samples per micro-batch per GPU", 1)
    global_batch_size: Optional[int] = _flag("samples per iteration (default: micro-batch * DP)")
    train_iters: int = _flag("iterations to train", 100)
    lr: float = _flag("peak learning rate", 3e-4)
    min_lr: float = _flag("final learning rate", 0.0)
    lr_warmup_iters: int = _flag("linear warmup iterations", 0)
    lr_decay_iters: Optional[int] = _flag("decay iterations (default: train-iters)")
    lr_decay_style: str = _flag("decay after warmup", "cosine", choices=["constant", "linear", "cosine"])
    weight_decay: float = _flag("weight decay", 0.01)
    clip_grad: float = _flag("gradient clipping by global norm", 1.0)
    adam_beta1: float = _flag("Adam beta1", 0.9)
    adam_beta2: float = _flag("Adam beta2", 0.999)
    adam_eps: float = _flag("Adam epsilon", 1e-8)
    seed: int = _flag("random seed", 1234)
    # Precision
    bf16: bool = _flag("bfloat16 training (fp32 main weights)", False)
    fp8_format: Optional[str] = _flag("FP8 through Transformer Engine", choices=["e4m3", "hybrid"])
    fp8_recipe: str = _flag("FP8 scaling recipe", "delayed", choices=["delayed", "tensorwise", "mxfp8", "blockwise"])
    fp8_amax_history_len: int = _flag("FP8 amax history length", 1)
    # Parallelism
    tensor_model_parallel_size: int = _flag("tensor parallel size", 1)
    pipeline_model_parallel_size: int = _flag("pipeline parallel size", 1)
    num_layers_per_virtual_pipeline_stage: Optional[int] = _flag("layers per virtual stage (interleaved 1F1B)")
    sequence_parallel: bool = _flag("sequence parallelism (needs TP > 1)", False)
    use_distributed_optimizer: bool = _flag("shard optimizer state over data parallel ranks", False)
    overlap_grad_reduce: bool = _flag("overlap the gradient reduce with backward", False)
    overlap_param_gather: bool = _flag("overlap the parameter all-gather (needs the distributed optimizer)", False)
    # Data
    data_path: Optional[List[str]] = _flag("dataset prefixes, optionally weighted: 0.7 a 0.3 b", nargs="+")
    split: str = _flag("train,valid,test proportions", "969,30,1")
    mock_data: bool = _flag("synthetic tokens (megatron's MockGPTDataset)", False)
    tokenizer_type: Optional[str] = _flag("HuggingFaceTokenizer, SentencePieceTokenizer, TikTokenizer, GPT2BPETokenizer, NullTokenizer")
    tokenizer_model: Optional[str] = _flag("tokenizer file or directory")
    vocab_file: Optional[str] = _flag("GPT2BPETokenizer vocab")
    merge_file: Optional[str] = _flag("GPT2BPETokenizer merges")
    vocab_size: Optional[int] = _flag("vocabulary size for NullTokenizer / mock data")
    data_cache_path: Optional[str] = _flag("where megatron caches dataset indices")
    num_workers: int = _flag("data loader worker processes", 2)
    eod_id: Optional[int] = _flag("end-of-document id (default: the one the --data-path datasets were prepared with, "
                                  "else the tokenizer's end-of-text token)")
    # Recorded by the driver in checkpoints, so the tools can refuse another tokenizer; not a flag.
    tokenizer_identity: Optional[dict] = field(default=None, metadata=dict(derived=True))
    # Checkpoints and evaluation
    save: Optional[str] = _flag("checkpoint directory to save to")
    load: Optional[str] = _flag("checkpoint directory to resume from")
    save_interval: Optional[int] = _flag("save every N iterations (and at the end)")
    exit_interval: Optional[int] = _flag("stop (and save, with --save) after this iteration")
    eval_interval: int = _flag("validate every N iterations", 1000)
    eval_iters: int = _flag("validation micro-batch rounds", 10)
    # Logging
    tensorboard_dir: Optional[str] = _flag("TensorBoard log directory (written by the last rank)")
    log_interval: int = _flag("console/TensorBoard interval", 100)
    depth_log_interval: int = _flag("depth-health diagnostics interval (0: off)", 100)

    # Derived at validation
    world_size: int = field(default=1, metadata=dict(derived=True))

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // (self.tensor_model_parallel_size * self.pipeline_model_parallel_size)

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lns-pretrain", description="GPT pretraining with LayerNorm Scaling on megatron-core",
        argument_default=argparse.SUPPRESS,  # only explicit flags reach the namespace
    )
    for f in dataclasses.fields(PretrainConfig):
        meta = dict(f.metadata)
        if meta.pop("derived", False):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        base = f.type.replace("Optional[", "").rstrip("]") if isinstance(f.type, str) else f.type
        kind = {"int": int, "float": float}.get(base.replace("List[", ""), str)
        parser.add_argument(flag, type=kind, **meta)
    return parser


def parse_args(argv=None) -> PretrainConfig:
    explicit = vars(build_parser().parse_args(argv))
    values = {}
    if "preset" in explicit:
        values.update(LLAMA_ARCH)
        values.update(PRESETS[explicit["preset"]])
    values.update(explicit)
    config = PretrainConfig(**values)
    config.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    fill_defaults(config)
    return config


def fill_defaults(c: PretrainConfig) -> None:
    if c.ffn_hidden_size is None and c.hidden_size is not None:
        c.ffn_hidden_size = 4 * c.hidden_size
    if c.num_query_groups is None:
        c.num_query_groups = c.num_attention_heads
    if c.max_position_embeddings is None:
        c.max_position_embeddings = c.seq_length
    if c.lr_decay_iters is None:
        c.lr_decay_iters = c.train_iters


def validate(c: PretrainConfig, cuda_available: bool, have_te: bool) -> None:
    """Fail fast, before any model memory is allocated, with one line per problem."""

    def need(ok, message):
        if not ok:
            raise ConfigError(message)

    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        need(getattr(c, name) is not None, f"--{name.replace('_', '-')} is required (or pick a --preset, e.g. --preset tiny)")
    tp, pp = c.tensor_model_parallel_size, c.pipeline_model_parallel_size
    need(c.num_attention_heads % tp == 0,
         f"--num-attention-heads {c.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}; "
         "choose a TP size that divides the heads")
    need(c.num_query_groups % tp == 0 and c.num_attention_heads % c.num_query_groups == 0,
         f"--num-query-groups {c.num_query_groups} must divide --num-attention-heads {c.num_attention_heads} "
         f"and be divisible by --tensor-model-parallel-size {tp}")
    need(c.hidden_size % c.num_attention_heads == 0,
         f"--hidden-size {c.hidden_size} is not divisible by --num-attention-heads {c.num_attention_heads}")
    chunk = pp * (c.num_layers_per_virtual_pipeline_stage or 1)
    need(c.num_layers % chunk == 0,
         f"--num-layers {c.num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
         + (f" x --num-layers-per-virtual-pipeline-stage {c.num_layers_per_virtual_pipeline_stage}"
            if c.num_layers_per_virtual_pipeline_stage else "")
         + f"; use a multiple of {chunk} layers")
    if c.num_layers_per_virtual_pipeline_stage is not None:
        need(pp > 1, "--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size > 1")
    need(c.world_size % (tp * pp) == 0,
         f"world size {c.world_size} is not divisible by --tensor-model-parallel-size {tp} x "
         f"--pipeline-model-parallel-size {pp}; launch a multiple of {tp * pp} processes")
    dp = c.data_parallel_size
    if c.global_batch_size is None:
        c.global_batch_size = c.micro_batch_size * dp
    need(c.global_batch_size % (c.micro_batch_size * dp) == 0,
         f"--global-batch-size {c.global_batch_size} is not a multiple of --micro-batch-size {c.micro_batch_size} "
         f"x data-parallel size {dp}; use a multiple of {c.micro_batch_size * dp}")
    if c.virtual_pipeline_model_parallel_size:
        need(c.num_microbatches % pp == 0,
             f"interleaved pipelining needs the number of micro-batches ({c.num_microbatches}) to be a multiple of "
             f"--pipeline-model-parallel-size {pp}; raise --global-batch-size")
    need(c.seq_length <= c.max_position_embeddings,
         f"--seq-length {c.seq_length} is longer than --max-position-embeddings {c.max_position_embeddings}; "
         "raise --max-position-embeddings or shorten --seq-length")
    if c.sequence_parallel:
        need(tp > 1, "--sequence-parallel needs --tensor-model-parallel-size > 1")
        need(c.transformer_impl == "transformer_engine" or c.norm_scheme == "lns",
             "--sequence-parallel with --transformer-impl local needs --norm-scheme lns "
             "(megatron's local Pre-LN norm refuses sequence parallelism); or use --transformer-impl transformer_engine")
    if c.apply_layernorm_1p and c.transformer_impl == "local":
        need(c.norm_scheme == "lns", "--apply-layernorm-1p with --transformer-impl local needs --norm-scheme lns "
             "(megatron's local Pre-LN norm refuses zero-centered gamma)")
    if c.overlap_param_gather:
        need(c.use_distributed_optimizer, "--overlap-param-gather needs --use-distributed-optimizer")
    if c.transformer_impl == "transformer_engine" or c.fp8_format:
        what = "--fp8-format" if c.fp8_format else "--transformer-impl transformer_engine"
        need(cuda_available, f"{what} needs a CUDA GPU; on this machine use --transformer-impl local without FP8")
        need(have_te, f"{what} needs Transformer Engine: pip install -e .[te]")
    if c.fp8_format:
        need(c.transformer_impl == "transformer_engine", "--fp8-format needs --transformer-impl transformer_engine")
        need(c.bf16, "--fp8-format needs --bf16 for the non-FP8 parts")
    need(c.train_iters > 0, "--train-iters must be positive")
    need(c.min_lr <= c.lr, f"--min-lr {c.min_lr} is above --lr {c.lr}; lower --min-lr")
    need(c.lr_warmup_iters < c.lr_decay_iters,
         f"--lr-warmup-iters {c.lr_warmup_iters} must be smaller than the decay length {c.lr_decay_iters} "
         "(--lr-decay-iters, default --train-iters); shorten the warmup")
    need(c.mock_data or c.data_path, "no training data: give --data-path PREFIX (from tools/preprocess_data.py) or --mock-data")
    need(not (c.mock_data and c.data_path), "--mock-data and --data-path are exclusive; drop one")
    if c.mock_data and c.tokenizer_type is None:
        need(c.vocab_size is not None, "--mock-data needs --vocab-size (or a --tokenizer-type and --tokenizer-model)")
    if c.data_path:
        need(c.tokenizer_type is not None, "--data-path needs --tokenizer-type (the tokenizer the data was prepared with)")
    if c.save_interval is not None:
        need(c.save is not None, "--save-interval needs --save DIR")
    if c.load is not None:
        need(os.path.isdir(c.load), f"--load {c.load}: no such directory; give the --save directory of an earlier run")
