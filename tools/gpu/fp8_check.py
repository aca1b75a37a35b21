"""Step ``fp8_lns``: LNS under Transformer Engine's fused norm, in BF16 and with every FP8 recipe the GPU has.

1. Exactness. LNS multiplies layer l's norm weights by 1/sqrt(l) inside the forward pass of TE's fused
   LayerNorm+GEMM. A Pre-LN TE model whose norm weights are stored pre-multiplied by 1/sqrt(l) is the
   same function, so the two must give the same logits and the same gradients (the LNS norm-weight
   gradient is 1/sqrt(l) times the Pre-LN one). Reported bitwise and as the largest difference.
2. Loss. The driver (``lns-pretrain --transformer-impl transformer_engine``) trains LNS for N steps on the
   same data in BF16 and with each FP8 recipe; each recipe's loss is compared with BF16's.

Recipes the GPU or TE lacks (mxfp8 needs Blackwell) are reported as unsupported, not failed. With
``--dry-run`` (CPU) both parts run with the local spec in float32 and every FP8 recipe is unsupported.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")  # deterministic attention backward
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from results import iterations, error_line, md_table, mean_tail, run_driver, step_args, write_json, write_text  # noqa: E402

RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
NORM_WEIGHTS = {  # where each spec keeps the pre-attention and pre-MLP norm weights
    "transformer_engine": ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
    "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
}


def recipe_support() -> dict:
    """{recipe: (supported, reason)} from Transformer Engine's own checks on this GPU."""
    import torch

    if not torch.cuda.is_available():
        return {r: (False, "needs a CUDA GPU") for r in RECIPES}
    try:
        try:
            from transformer_engine.pytorch import quantization as q  # TE >= 2.8
        except ImportError:
            from transformer_engine.pytorch import fp8 as q
    except ImportError as e:
        return {r: (False, f"needs Transformer Engine ({e})") for r in RECIPES}
    fp8 = q.check_fp8_support()
    checks = {"delayed": fp8, "tensorwise": fp8,
              "blockwise": getattr(q, "check_fp8_block_scaling_support", lambda: (False, "this TE has no blockwise"))(),
              "mxfp8": getattr(q, "check_mxfp8_support", lambda: (False, "this TE has no MXFP8"))()}
    return {r: (bool(ok), reason or "") for r, (ok, reason) in checks.items()}


def exactness(impl: str, recipe, dtype) -> dict:
    """LNS against Pre-LN with pre-multiplied norm weights: logits and every gradient."""
    import torch

    from lns_megatron.models.gpt import build_gpt_model, tiny_config
    from lns_megatron.schemes.lns import layernorm_scale

    cuda = torch.cuda.is_available()
    over = dict(num_layers=4, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, params_dtype=dtype,
                bf16=dtype == torch.bfloat16)
    if recipe:
        over.update(fp8="hybrid", fp8_recipe=recipe)
    vocab, seq, batch = 512, 128, 4
    models = {}
    for scheme in ("lns", "pre"):
        torch.manual_seed(0)
        model = build_gpt_model(tiny_config(**over), vocab_size=vocab, max_sequence_length=seq,
                                norm_scheme=scheme, transformer_impl=impl)
        models[scheme] = model.cuda() if cuda else model
    lns, pre = models["lns"], models["pre"]
    attn_key, mlp_key = NORM_WEIGHTS[impl]
    scales = {}
    with torch.no_grad():
        for name, p in lns.named_parameters():
            if name.endswith((attn_key, mlp_key)):
                p.copy_(0.5 * torch.randn_like(p) + 1.0)  # non-unit weights, so a wrong scale shows
        state = lns.state_dict()
        for key in list(state):
            if key.endswith((attn_key, mlp_key)):
                layer = int(key.split("decoder.layers.")[1].split(".")[0]) + 1
                scales[key] = layernorm_scale(layer)
                state[key] = state[key] * scales[key]  # the product LNS forms in the forward, same dtype
        missing, unexpected = pre.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.endswith("_extra_state")]:
            raise RuntimeError(f"the Pre-LN model's keys differ from the LNS model's: {missing} {unexpected}")
    scale_ok = all(layer.self_attention.linear_qkv.lns_scale == layernorm_scale(layer.layer_number)
                   if impl == "transformer_engine" else layer.input_layernorm.lns_scale == layernorm_scale(layer.layer_number)
                   for layer in lns.decoder.layers)
    device = "cuda" if cuda else "cpu"
    g = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    positions = torch.arange(seq, device=device).expand(batch, seq)
    mask = None if impl == "transformer_engine" else torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device), 1)
    probe = torch.randn(batch, seq, vocab, generator=g).to(device)
    logits = {}
    for scheme, model in models.items():
        logits[scheme] = model(tokens, positions, mask)
        (logits[scheme].float() * probe).sum().backward()
    diff = lambda a, b: (a.float() - b.float()).abs().max().item()
    pre_params = dict(pre.named_parameters())
    grad_diff, grad_bitwise, norm_diff, norm_bitwise = 0.0, True, 0.0, True
    for name, p in lns.named_parameters():
        want = pre_params[name].grad
        if name in scales:  # d/dw of (s * w) is s times the Pre-LN gradient, formed in the same dtype
            want = want * scales[name]
            norm_diff, norm_bitwise = max(norm_diff, diff(p.grad, want)), norm_bitwise and torch.equal(p.grad, want)
        else:
            grad_diff, grad_bitwise = max(grad_diff, diff(p.grad, want)), grad_bitwise and torch.equal(p.grad, want)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    rel = lambda d: d / max(logits["pre"].float().abs().max().item(), 1e-30)
    out = dict(
        recipe=recipe or ("bf16" if dtype == torch.bfloat16 else "fp32"), impl=impl,
        lns_scales_match_layer_numbers=scale_ok,
        logits_bitwise=torch.equal(logits["lns"], logits["pre"]), logits_max_abs_diff=diff(logits["lns"], logits["pre"]),
        grads_bitwise=grad_bitwise, grads_max_abs_diff=grad_diff,
        norm_grads_bitwise=norm_bitwise, norm_grads_max_abs_diff=norm_diff, tolerance=tol,
    )
    out["status"] = "ok" if scale_ok and rel(out["logits_max_abs_diff"]) <= tol else "failed"
    del models, lns, pre
    if cuda:
        torch.cuda.empty_cache()
    return out


def loss_runs(a, impl: str, recipes: list, deadline: float, result: dict, save) -> None:
    """The driver in BF16 and each FP8 recipe, same data and seed; losses compared with BF16's."""
    if a.dry_run:
        common = ["--preset", "tiny", "--seq-length", "32", "--micro-batch-size", "4", "--train-iters", "4"]
    else:
        common = ["--preset", "llama-130m", "--seq-length", "1024", "--micro-batch-size", "8",
                  "--global-batch-size", "16", "--train-iters", str(a.steps), "--bf16"]
    common += ["--transformer-impl", impl, "--norm-scheme", "lns", "--lr", "6e-4", "--lr-warmup-iters", "10" if not a.dry_run else "1",
               "--log-interval", "1", "--eval-iters", "0", "--depth-log-interval", "0", "--num-workers", "0", "--seed", "1234"]
    if a.data_path:
        common += ["--data-path", a.data_path, "--split", "100,0,0", "--tokenizer-type", "HuggingFaceTokenizer",
                   "--tokenizer-model", a.tokenizer_model]
    else:
        common += ["--mock-data", "--vocab-size", "8192"]
    runs = result["loss_runs"]
    for recipe in [None] + recipes:
        name = recipe or ("bf16" if not a.dry_run else "fp32")
        elapsed = [r["wall_s"] for r in runs if r.get("wall_s")]
        if elapsed and time.time() + 1.2 * max(elapsed) > deadline:
            runs.append(dict(recipe=name, status="not run: out of time"))
            continue
        argv = common + (["--fp8-format", "hybrid", "--fp8-recipe", recipe] if recipe else [])
        rc, output, wall = run_driver(argv)
        its = iterations(output)
        losses = [its[i]["lm loss"] for i in sorted(its) if "lm loss" in its[i]]
        tflops = [its[i].get("throughput per GPU (TFLOP/s/GPU)") for i in sorted(its)][len(its) // 2:]
        row = dict(recipe=name, status="ok" if rc == 0 and losses else "failed", wall_s=round(wall, 1),
                   steps=len(losses), first_loss=losses[0] if losses else None,
                   final_loss=mean_tail(losses), losses=losses,
                   tflops_per_gpu=mean_tail([t for t in tflops if t], n=len(tflops)) if tflops else None)
        if rc != 0:
            row["error"] = error_line(output)
        base = runs[0] if runs and runs[0].get("final_loss") is not None else None
        if recipe and base and row["final_loss"] is not None:
            n = min(len(losses), len(base["losses"]))
            row["final_loss_minus_bf16"] = row["final_loss"] - base["final_loss"]
            row["relative_to_bf16"] = row["final_loss_minus_bf16"] / base["final_loss"]
            row["max_step_abs_diff_vs_bf16"] = max(abs(x - y) for x, y in zip(losses[:n], base["losses"][:n]))
        runs.append(row)
        save()


def markdown(result: dict) -> str:
    lines = ["### LNS with the Transformer Engine spec: exactness and FP8", ""]
    lines.append(md_table(
        ["recipe", "status", "LNS scales = 1/sqrt(l)", "logits bitwise", "logits max diff", "grads bitwise",
         "grads max diff", "norm grads bitwise", "norm grads max diff"],
        [[r["recipe"], r["status"], r.get("lns_scales_match_layer_numbers"), r.get("logits_bitwise"),
          r.get("logits_max_abs_diff"), r.get("grads_bitwise"), r.get("grads_max_abs_diff"),
          r.get("norm_grads_bitwise"), r.get("norm_grads_max_abs_diff")] for r in result["exactness"]]))
    lines += ["", md_table(
        ["recipe", "status", "steps", "first loss", "final loss (mean of last 5)", "minus BF16", "relative",
         "max per-step diff", "TFLOP/s/GPU"],
        [[r["recipe"], r["status"] + (f": {r['error']}" if r.get("error") else ""), r.get("steps"), r.get("first_loss"),
          r.get("final_loss"), r.get("final_loss_minus_bf16"), r.get("relative_to_bf16"),
          r.get("max_step_abs_diff_vs_bf16"), r.get("tflops_per_gpu")] for r in result["loss_runs"]])]
    return "\n".join(lines)


def main():
    ap = step_args(__doc__.split("\n\n")[0])
    ap.add_argument("--data-path", help="the indexed dataset of the data step (else mock data)")
    ap.add_argument("--tokenizer-model")
    ap.add_argument("--steps", type=int, default=100)
    a = ap.parse_args()
    deadline = time.time() + a.budget_s
    import torch

    from lns_megatron.training import distributed

    impl = "local" if a.dry_run else "transformer_engine"
    support = recipe_support()
    result = dict(status="running", impl=impl, supported={r: dict(supported=s, reason=why) for r, (s, why) in support.items()},
                  exactness=[], loss_runs=[])
    save = lambda: (write_json(a.json, result), write_text(a.md, markdown(result)))
    recipes = [r for r in RECIPES if support[r][0]]
    distributed.initialize(1, 1, seed=1234)
    try:
        dtype = torch.float32 if a.dry_run else torch.bfloat16
        for recipe in [None] + recipes:
            try:
                result["exactness"].append(exactness(impl, recipe, dtype))
            except Exception as e:  # one recipe's failure must not hide the others
                result["exactness"].append(dict(recipe=recipe or "bf16", status="failed", error=f"{type(e).__name__}: {e}"[:500]))
            save()
    finally:
        distributed.destroy()
    for r in RECIPES:
        if not support[r][0]:
            result["exactness"].append(dict(recipe=r, status=f"unsupported: {support[r][1]}"))
    loss_runs(a, impl, recipes, deadline, result, save)
    for r in RECIPES:
        if not support[r][0]:
            result["loss_runs"].append(dict(recipe=r, status=f"unsupported: {support[r][1]}"))
    failed = [r for r in result["exactness"] + result["loss_runs"] if r["status"] == "failed"]
    result["status"] = "failed" if failed else "ok"
    save()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
