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


def forward(params, tokens, *, num_layers, num_heads, num_query_groups, eps, lns, peri=False, post_layers=0,
            residual_scale=1.0, final_norm=True, dyt=False, bhyt=False, bhyt_exact=False):
    """Logits [b, s, vocab] for ``tokens`` [b, s]; ``params`` maps megatron names to tensors.

    ``lns``: the input norms' outputs of layer l times 1/sqrt(l). ``peri`` (Peri-LN, Kim et al. 2025): each
    sublayer's output goes through its own RMSNorm before the residual add, x + Norm_out(F(Norm_in(x))).
    ``post_layers``: the first that many layers are Post-LN, x <- Norm(a x + F(x)) with ``a = residual_scale``
    (Post-LN: all layers, a = 1; Mix-LN: the first floor(alpha N); DeepNorm: all, a = (2N)^(1/4)).
    ``final_norm``: whether the last hidden state is normalized before the output layer.
    ``dyt`` (Zhu et al. 2025, LLaMA code): every RMSNorm is ``weight * tanh(alpha * x)`` and the embedding
    output is multiplied by the learnable ``embedding_scale``.
    ``bhyt`` (Byun et al. 2026): the input norms are ``weight * tanh(lam * x / (10 * sqrt(v + eps)))``, ``v`` the
    mean square of the attention's input, and before the MLP ``v + ||W_V W_O||_F^2 / (s d) * lam_attn^2 / 100``
    (value heads repeated for their query heads; no gradient through the weight term or ``lam_attn``);
    ``bhyt_exact``: the MLP's ``v`` is its own input's mean square instead (the paper's BHyT*).
    """
    p = params

    def norm(x, name, variance=None):
        if bhyt:
            variance = x.pow(2).mean(-1, keepdim=True) if variance is None else variance
            return p[name + ".weight"] * torch.tanh(p[name + ".lam"] * x / (10.0 * torch.sqrt(variance + eps)))
        if dyt:
            return p[name + ".weight"] * torch.tanh(p[name + ".alpha"] * x)
        return rms_norm(x, p[name + ".weight"], eps)

    h = p["embedding.word_embeddings.weight"][tokens].transpose(0, 1)  # [s, b, hidden]
    if dyt:
        h = h * p["embedding_scale"]
    s, b, hidden = h.shape
    head_dim = hidden // num_heads
    heads_per_group = num_heads // num_query_groups
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=h.device), 1)
    for i in range(num_layers):
        pre = f"decoder.layers.{i}."
        scale = 1.0 / math.sqrt(i + 1) if lns else 1.0
        is_post = i < post_layers
        x = h if is_post else norm(h, pre + "input_layernorm") * scale
        attention_input_variance = h.pow(2).mean(-1, keepdim=True)
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
        attn = attn @ p[pre + "self_attention.linear_proj.weight"].T
        if peri:
            attn = rms_norm(attn, p[pre + "self_attention.linear_proj.output_norm.weight"], eps)
        if is_post:
            h = rms_norm(residual_scale * h + attn, p[pre + "post_self_attn_layernorm.weight"], eps)
        else:
            h = h + attn
        mlp_variance = None
        if bhyt and not bhyt_exact:
            with torch.no_grad():
                values = p[pre + "self_attention.linear_qkv.weight"].view(
                    num_query_groups, (heads_per_group + 2) * head_dim, hidden)[:, -head_dim:, :]
                values = values.repeat_interleave(heads_per_group, dim=0).reshape(num_heads * head_dim, hidden)
                vo = p[pre + "self_attention.linear_proj.weight"] @ values
                added = vo.pow(2).sum() / (s * hidden) * p[pre + "input_layernorm.lam"].pow(2) / 100.0
            mlp_variance = attention_input_variance + added
        x = h if is_post else norm(h, pre + "pre_mlp_layernorm", mlp_variance) * scale
        gate, up = (x @ p[pre + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
        mlp = (F.silu(gate) * up) @ p[pre + "mlp.linear_fc2.weight"].T
        if peri:
            mlp = rms_norm(mlp, p[pre + "mlp.linear_fc2.output_norm.weight"], eps)
        if is_post:
            h = rms_norm(residual_scale * h + mlp, p[pre + "post_mlp_layernorm.weight"], eps)
        else:
            h = h + mlp
    if final_norm:
        h = rms_norm(h, p["decoder.final_layernorm.weight"], eps) if bhyt else norm(h, "decoder.final_layernorm")
    return (h @ p["output_layer.weight"].T).transpose(0, 1)


def check_model(model, config, vocab, seq, gen, batch=2, **scheme):
    """The float32 megatron ``model`` against this float64 reference with ``scheme`` (``forward``'s keywords),
    on random tokens and a random probe of the logits: logits equal at rtol 1e-5 / atol 2e-5, every parameter
    gradient at rtol 1e-4 / atol 1e-5 times that tensor's largest reference gradient (float32 rounding grows
    with the gradient's scale: randomized norm gammas give gradients near 100, off by up to ~1e-6 of it).
    Returns ``(other, logits)``: ``other(**scheme)`` evaluates the reference with other keywords on the same
    weights and tokens (to show that a variant differs)."""
    device = next(model.parameters()).device
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device), 1)
    probe = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64).to(device)
    logits = model(tokens, positions, mask)
    (logits.double() * probe).sum().backward()
    params = {n: p.detach().double().requires_grad_(True) for n, p in model.named_parameters()}
    shape = dict(num_layers=config.num_layers, num_heads=config.num_attention_heads,
                 num_query_groups=config.num_query_groups, eps=config.layernorm_epsilon)
    ref = forward(params, tokens, **shape, **scheme)
    (ref * probe).sum().backward()
    torch.testing.assert_close(logits.double(), ref, rtol=1e-5, atol=2e-5)
    for name, p in model.named_parameters():
        ref_grad = params[name].grad
        atol = 1e-5 * max(ref_grad.abs().max().item(), 1.0)
        torch.testing.assert_close(p.grad.double(), ref_grad, rtol=1e-4, atol=atol, msg=lambda m: f"{name}: {m}")

    def other(weights=None, **variant):
        with torch.no_grad():
            return forward(weights or params, tokens, **shape, **variant)

    return other, logits.detach().double(), params
