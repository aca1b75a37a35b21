"""(c) PP=2 and PP=2 x VPP=2, (d) TP=2 and TP=2 with sequence parallelism, under torchrun (LNS, and every
other norm scheme but Pre-LN at the two hardest layouts); and activation recompute, full and selective, for every
scheme under PP and VPP (the reference keeps every activation, so the losses and gradients must not change; the
recomputed layout must hold fewer bytes for the backward pass than the same layout without recompute).

Each layout loads the TP=PP=1 model's weights through dist_checkpointing, checks each layer's
LNS scale against its global index, and must reproduce the TP=PP=1 loss and every gradient
through megatron DDP, finalize_model_grads and the real pipeline schedules.
"""

import os

import pytest

from dist_launch import torchrun
from lns_megatron.schemes import NORM_SCHEMES

OTHER_SCHEMES = ",".join(s for s in NORM_SCHEMES if s not in ("pre", "lns"))
ALL_SCHEMES = ",".join(NORM_SCHEMES)
VPP_LAYOUT = ["--pp", "2", "--vpp", "2", "--num-layers", "8"]
SCRIPT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "dist", "parallel_equivalence.py")


@pytest.mark.parametrize(
    "layout, expected_chunks",
    [
        (["--pp", "2"], ["rank 0 pp_rank 0 chunk 0: layers [1, 2]", "rank 1 pp_rank 1 chunk 0: layers [3, 4]"]),
        (
            ["--pp", "2", "--vpp", "2", "--num-layers", "8"],
            [
                "rank 0 pp_rank 0 chunk 0: layers [1, 2]",
                "rank 0 pp_rank 0 chunk 1: layers [5, 6]",
                "rank 1 pp_rank 1 chunk 0: layers [3, 4]",
                "rank 1 pp_rank 1 chunk 1: layers [7, 8]",
            ],
        ),
        (["--tp", "2"], ["rank 0 pp_rank 0 chunk 0: layers [1, 2, 3, 4]"]),
        (["--tp", "2", "--sequence-parallel"], ["rank 1 pp_rank 0 chunk 0: layers [1, 2, 3, 4]"]),
        # every other scheme at the two hardest layouts, one after the other in the same processes: Peri-LN's
        # output norms, Mix-LN's Post-LN layers 1-2 of 8 by the global number (all in rank 0's first chunk),
        # DyT's and BHyT's parameters (the embedding scale, BHyT's all-reduced weight term) under SP
        (["--pp", "2", "--vpp", "2", "--num-layers", "8", "--norm-scheme", OTHER_SCHEMES],
         ["rank 0 pp_rank 0 chunk 0: layers [1, 2]", "rank 1 pp_rank 1 chunk 1: layers [7, 8]"]),
        (["--tp", "2", "--sequence-parallel", "--norm-scheme", OTHER_SCHEMES],
         ["rank 1 pp_rank 0 chunk 0: layers [1, 2, 3, 4]"]),
        (VPP_LAYOUT + ["--norm-scheme", ALL_SCHEMES, "--recompute-granularity", "full", "--recompute-method", "uniform",
                       "--recompute-num-layers", "1"], ["rank 1: bhyt with recompute held"]),
        (["--pp", "2", "--norm-scheme", "lns,mix", "--recompute-granularity", "full",
          "--recompute-method", "block", "--recompute-num-layers", "1"], ["rank 0: mix with recompute held"]),
        # layernorm recompute needs TE (megatron-core's CheckpointWithoutOutput); the GPU kit runs it
        (VPP_LAYOUT + ["--norm-scheme", "pre,lns,peri-lns,mix,bhyt", "--recompute-granularity", "selective",
                       "--recompute-modules", "core_attn", "mlp"], ["rank 0: peri-lns with recompute held"]),
    ],
    ids=["pp2", "pp2-vpp2", "tp2", "tp2-sp", "other-schemes-pp2-vpp2", "other-schemes-tp2-sp",
         "recompute-full-uniform-pp2-vpp2", "recompute-full-block-pp2", "recompute-selective-pp2-vpp2"],
)
def test_layout_matches_single_process(tmp_path, layout, expected_chunks):
    out = torchrun(SCRIPT, *layout, "--dir", tmp_path)
    for line in expected_chunks:
        assert line in out
    schemes = layout[layout.index("--norm-scheme") + 1].split(",") if "--norm-scheme" in layout else ["lns"]
    for scheme in schemes:
        assert out.count(f"OK {scheme} loss=") == 2, scheme
