"""Run under torchrun (2 processes): a parallel layout against TP=PP=1 on the same weights.

1. TP=PP=1: build, save the weights with dist_checkpointing, run forward-backward through
   megatron DDP and finalize_model_grads, keep loss and gradients.
2. The layout under test: load those weights (megatron reshards them), check every layer's
   LNS scale against its global index computed here, run the real schedule (1F1B or
   interleaved), save the gradients as a checkpoint.
3. TP=PP=1 again: load the layout's gradients and compare them with step 1's.
Prints "OK <scheme>" on success; any mismatch raises. ``--norm-scheme`` takes a comma-separated list,
checked one after the other in the same processes. The ``--recompute-*`` flags apply to the layout under
test only: the reference keeps every activation.
"""

import argparse
import math
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from lns_megatron.training import distributed
from lns_megatron.models.gpt import build_gpt_model, tiny_config
from lns_megatron.schemes import NORM_SCHEMES
from lns_megatron.schemes.bhyt import BHyT
from lns_megatron.schemes.lns import LNSNorm
from lns_megatron.schemes.post import PostNormTransformerLayer, mix_ln_post_layers
from lns_megatron.schemes.tanh import DyT
from lns_megatron.training.profiling import SavedActivationMeter

VOCAB, SEQ, MBS, MICROBATCHES = 96, 16, 2, 4
MIX_LN_ALPHA = 0.25


def build(num_layers, sequence_parallel=False, norm_scheme="lns", recompute=None):
    config = tiny_config(
        **(recompute or {}),
        num_layers=num_layers, num_query_groups=2,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        sequence_parallel=sequence_parallel, pipeline_dtype=torch.float32,
    )
    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ, norm_scheme=norm_scheme,
                                mix_ln_alpha=MIX_LN_ALPHA, vp_stage=vp_stage if vpp else None)
        chunks.append(DistributedDataParallel(config, DistributedDataParallelConfig(), model))
    config.finalize_model_grads_func = finalize_model_grads
    return config, chunks


def sharded(chunks):
    metadata = {"non_homogeneous_layers": True}  # Mix-LN's layers differ: one key per layer
    return {f"model{i}": c.module.sharded_state_dict(metadata=metadata) for i, c in enumerate(chunks)}


def load_weights(chunks, weights):
    state = dist_checkpointing.load(sharded(chunks), weights)
    for i, c in enumerate(chunks):
        c.module.load_state_dict(state[f"model{i}"])


def batches():
    gen = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (MICROBATCHES, MBS, SEQ + 1), generator=gen)
    return [dict(tokens=t[:, :-1], labels=t[:, 1:]) for t in tokens]


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    positions = torch.arange(SEQ).expand(MBS, SEQ)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1)
    output = model(batch["tokens"], positions, mask, labels=batch["labels"])

    def loss_func(per_token_loss):
        loss = per_token_loss.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def run_step(chunks):
    for c in chunks:
        c.zero_grad_buffer()
    iters = [iter(batches()) for _ in chunks]
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters if len(chunks) > 1 else iters[0],
        model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=MICROBATCHES,
        seq_length=SEQ, micro_batch_size=MBS, forward_only=False,
    )
    loss = torch.zeros(1)
    if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        loss += sum(l["lm loss"] for l in losses) / len(losses)
    dist.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
    return loss.item()


def grads_into_weights(chunks):
    with torch.no_grad():
        for c in chunks:
            for p in c.module.parameters():
                p.copy_(p.main_grad)


def expected_global_layers(num_layers, pp_rank, pp, vpp, vp_stage):
    """Global 1-based layer numbers of a chunk, computed independently of megatron."""
    per_chunk = num_layers // (pp * (vpp or 1))
    first = ((vp_stage or 0) * pp + pp_rank) * per_chunk
    return list(range(first + 1, first + per_chunk + 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--sequence-parallel", action="store_true")
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--norm-scheme", default="lns", help="one scheme, or several separated by commas")
    ap.add_argument("--recompute-granularity", choices=["full", "selective"])
    ap.add_argument("--recompute-method", choices=["uniform", "block"])
    ap.add_argument("--recompute-num-layers", type=int)
    ap.add_argument("--recompute-modules", nargs="+")
    ap.add_argument("--dir", required=True)
    args = ap.parse_args()
    for name in args.norm_scheme.split(","):
        check(args, name, os.path.join(args.dir, name))
    distributed.destroy()


def check(args, name, directory):
    args.norm_scheme, scheme = name, NORM_SCHEMES[name]
    weights, grads = os.path.join(directory, "weights"), os.path.join(directory, "grads")

    distributed.initialize(1, 1, seed=11)
    _, ref = build(args.num_layers, norm_scheme=args.norm_scheme)
    torch.manual_seed(5)
    with torch.no_grad():  # non-unit norm weights, identical on every rank
        for n, p in ref[0].module.named_parameters():
            if "norm" in n:  # input norms, Peri-LN output norms, the final norm
                p.copy_(1.0 + 0.5 * torch.randn(p.shape))
            if scheme.bhyt and n.endswith(("linear_qkv.weight", "linear_proj.weight")):
                p.mul_(20.0)  # BHyT's weight-derived variance term large enough to matter
    if dist.get_rank() == 0:
        os.makedirs(weights, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded(ref), weights)
    ref_loss = run_step(ref)
    ref_grads = {n: p.main_grad.clone() for n, p in ref[0].module.named_parameters()}
    parallel_state.destroy_model_parallel()

    distributed.initialize(args.tp, args.pp, args.vpp, seed=11)
    recompute = {k: v for k, v in vars(args).items() if k.startswith("recompute_") and v is not None}
    if name == "bhyt" and "layernorm" in recompute.get("recompute_modules", ()):
        recompute["recompute_modules"] = [m for m in recompute["recompute_modules"] if m != "layernorm"]  # refused
    if recompute:  # the same layout keeping every activation, for the memory the recompute saves
        _, plain = build(args.num_layers, args.sequence_parallel, args.norm_scheme)
        load_weights(plain, weights)
        with SavedActivationMeter(plain) as kept:
            run_step(plain)
        del plain
    _, chunks = build(args.num_layers, args.sequence_parallel, args.norm_scheme, recompute)
    load_weights(chunks, weights)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    for vp_stage, c in enumerate(chunks):
        layers = c.module.decoder.layers
        expected = expected_global_layers(args.num_layers, pp_rank, args.pp, args.vpp, vp_stage)
        got = [l.layer_number for l in layers]
        assert got == expected, f"rank {dist.get_rank()} chunk {vp_stage}: layers {got} != {expected}"
        for l, g in zip(layers, expected):
            norms = [m for m in l.modules() if isinstance(m, (LNSNorm, DyT, BHyT))]  # input, output and post norms
            if scheme.lns:
                assert l.input_layernorm.lns_scale == 1 / math.sqrt(g) == l.pre_mlp_layernorm.lns_scale
            if scheme.post_norm:  # Mix-LN: Post-LN up to floor(alpha N), by the global number
                post = g <= (mix_ln_post_layers(args.num_layers, MIX_LN_ALPHA) if scheme.post_norm == "first"
                             else args.num_layers)
                assert isinstance(l, PostNormTransformerLayer) == post, (g, type(l))
            if args.sequence_parallel:
                assert norms and all(n.weight.sequence_parallel for n in norms)
        print(f"rank {dist.get_rank()} pp_rank {pp_rank} chunk {vp_stage}: layers {got}", flush=True)
    with SavedActivationMeter(chunks) as meter:
        loss = run_step(chunks)
    if recompute:
        assert meter.peak < kept.peak, f"recompute {recompute} held {meter.peak} bytes for backward, not less than {kept.peak}"
        print(f"rank {dist.get_rank()}: {name} with recompute held {meter.peak} of {kept.peak} bytes", flush=True)
    assert math.isclose(loss, ref_loss, rel_tol=1e-5), f"loss {loss} != TP=PP=1 loss {ref_loss}"
    grads_into_weights(chunks)
    if dist.get_rank() == 0:
        os.makedirs(grads)
    dist.barrier()
    dist_checkpointing.save(sharded(chunks), grads)
    parallel_state.destroy_model_parallel()

    distributed.initialize(1, 1, seed=11)
    _, back = build(args.num_layers, norm_scheme=args.norm_scheme)
    back[0].module.load_state_dict(dist_checkpointing.load(sharded(back), grads)["model0"])
    for n, p in back[0].module.named_parameters():
        torch.testing.assert_close(p.detach(), ref_grads[n], rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    print(f"OK {name} loss={loss:.6f} ref={ref_loss:.6f}", flush=True)
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    main()
