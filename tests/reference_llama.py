"""An independent plain-PyTorch LLaMA-style GPT (RMSNorm, SwiGLU, RoPE) for numerics tests.

It reads weights from a megatron-core ``GPTModel`` state dict but computes everything itself,
including the LNS multiply on the norm *output* (the definition in the paper), so it checks
the effective-parameter implementation rather than re-using it.
"""

import math

import torch
import torch.nn.functional as F


def rms_norm(x, weight, eps):
    x64 = x.to(torch.float64)
    return (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def rope(x, base=10000.0):
    """x: [s, b, heads, d]; rotate-half (non-interleaved) rotary embedding."""
    s, d = x.shape[0], x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d))
    angles = torch.outer(torch.arange(s, dtype=torch.float64, device=x.device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)[:, None, None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def forward(params, tokens, *, num_layers, num_heads, num_query_groups, eps, lns):
    """Logits [b, s, vocab] for ``tokens`` [b, s]; ``params`` maps megatron names to tensors."""
    p = params
    h = p["embedding.word_embeddings.weight"][tokens].transpose(0, 1)  # [s, b, hidden]
    s, b, hidden = h.shape
    head_dim = hidden // num_heads
    heads_per_group = num_heads // num_query_groups
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=h.device), 1)
    for i in range(num_layers):
        pre = f"decoder.layers.{i}."
        scale = 1.0 / math.sqrt(i + 1) if lns else 1.0
        x = rms_norm(h, p[pre + "input_layernorm.weight"], eps) * scale
        qkv = (x @ p[pre + "self_attention.linear_qkv.weight"].T).view(
            s, b, num_query_groups, (heads_per_group + 2) * head_dim
        )
        q, k, v = qkv.split([heads_per_group * head_dim, head_dim, head_dim], dim=-1)
        q = q.reshape(s, b, num_heads, head_dim)
        k = k.repeat_interleave(heads_per_group, dim=2)
        v = v.repeat_interleave(heads_per_group, dim=2)
        q, k = rope(q), rope(k)
        scores = torch.einsum("sbhd,tbhd->bhst", q, k) / math.sqrt(head_dim)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        attn = torch.einsum("bhst,tbhd->sbhd", probs, v).reshape(s, b, hidden)
        h = h + attn @ p[pre + "self_attention.linear_proj.weight"].T
        x = rms_norm(h, p[pre + "pre_mlp_layernorm.weight"], eps) * scale
        gate, up = (x @ p[pre + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        h = h + (F.silu(gate) * up) @ p[pre + "mlp.linear_fc2.weight"].T
    h = rms_norm(h, p["decoder.final_layernorm.weight"], eps)
    return (h @ p["output_layer.weight"].T).transpose(0, 1)
