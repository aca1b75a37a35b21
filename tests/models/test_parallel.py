"""(c) PP=2 and PP=2 x VPP=2, (d) TP=2 and TP=2 with sequence parallelism, under torchrun (LNS, and
Peri-LN + LNS, Mix-LN, DeepNorm and DyT at the two hardest layouts).

Each layout loads the TP=PP=1 model's weights through dist_checkpointing, checks each layer's
LNS scale against its global index, and must reproduce the TP=PP=1 loss and every gradient
through megatron DDP, finalize_model_grads and the real pipeline schedules.
"""

import os

import pytest

from dist_launch import torchrun

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
        # Peri-LN + LNS: the output norms under the pipeline schedules and sequence parallelism
        (["--pp", "2", "--vpp", "2", "--num-layers", "8", "--norm-scheme", "peri-lns"],
         ["rank 1 pp_rank 1 chunk 1: layers [7, 8]"]),
        (["--tp", "2", "--sequence-parallel", "--norm-scheme", "peri-lns"],
         ["rank 1 pp_rank 0 chunk 0: layers [1, 2, 3, 4]"]),
        # Mix-LN: Post-LN layers 1-2 of 8 by the global number (all in rank 0's first chunk); DeepNorm under SP
        (["--pp", "2", "--vpp", "2", "--num-layers", "8", "--norm-scheme", "mix"],
         ["rank 0 pp_rank 0 chunk 0: layers [1, 2]"]),
        (["--tp", "2", "--sequence-parallel", "--norm-scheme", "deepnorm"],
         ["rank 1 pp_rank 0 chunk 0: layers [1, 2, 3, 4]"]),
        # DyT: its alphas, gammas and the embedding scale under sequence parallelism
        (["--tp", "2", "--sequence-parallel", "--norm-scheme", "dyt"],
         ["rank 1 pp_rank 0 chunk 0: layers [1, 2, 3, 4]"]),
    ],
    ids=["pp2", "pp2-vpp2", "tp2", "tp2-sp", "peri-lns-pp2-vpp2", "peri-lns-tp2-sp", "mix-pp2-vpp2",
         "deepnorm-tp2-sp", "dyt-tp2-sp"],
)
def test_layout_matches_single_process(tmp_path, layout, expected_chunks):
    out = torchrun(SCRIPT, *layout, "--dir", tmp_path)
    for line in expected_chunks:
        assert line in out
    assert out.count("OK loss=") == 2
