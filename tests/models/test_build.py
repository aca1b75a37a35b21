"""The driver's model from its flags (lns_megatron.models.build)."""

import torch

from lns_megatron.config import parse_args
from lns_megatron.models.build import build_model_chunk
from lns_megatron.models.gpt import transformer_config


def test_rotary_base_reaches_the_model(megatron_tp1):
    """--rotary-base sets RoPE's base (it was once recorded in the checkpoint but not given to GPTModel)."""
    c = parse_args(["--preset", "tiny", "--mock-data", "--vocab-size", "100", "--position-embedding-type", "rope",
                    "--rotary-base", "500000"])
    model = build_model_chunk(c, transformer_config(c), vocab_size=128)
    head_dim = c.hidden_size // c.num_attention_heads
    expected = 1.0 / 500000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    torch.testing.assert_close(model.rotary_pos_emb.inv_freq.cpu(), expected, rtol=1e-6, atol=0)
