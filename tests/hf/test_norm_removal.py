"""Norm removal (lns_megatron.hf.norm_removal, norm_free) on tiny Llama (RMSNorm, plain and LNS) and GPT-2
(LayerNorm) models built here: the fixed-scale norm against a float64 reference, the schedule, the EMA, the
auxiliary loss, the two export forms and the folding, the fine-tuning run with its log, TensorBoard and
resume, DeepSpeed ZeRO-2/3 against the plain run, and the refusals."""

import copy
import os
import shutil

import pytest
import torch

from finetune_runs import override, run_example, scalars, sft_flags, word_tokenizer, write_examples
from lns_megatron.hf import apply_layernorm_scaling, from_pretrained
from lns_megatron.hf.finetune import finetune, main, parse_args
from lns_megatron.hf.norm_free import fold_fixed_scales, stock_error_bound, to_transformers
from lns_megatron.hf.norm_removal import (MOMENTUM, SPECIAL, FixedScaleNorm, NormRemoval, NormRemovalError,
                                          check_schedule, fixed_scale_norms, install_fixed_scale_norms,
                                          record_removal, removal_steps)

VOCAB, LAYERS, EOS = 64, 2, 0
REMOVAL = ["--norm-removal-start", "1", "--norm-removal-interval", "1"]
LLAMA_STEPS = 2 * LAYERS + 2  # removals: pre-MLP and attention input per layer, final norm, special cases


def llama(lns=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, eos_token_id=EOS, initializer_range=0.2))
    randomize_norms(model)
    return apply_layernorm_scaling(model) if lns else model


def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
                                       eos_token_id=EOS, bos_token_id=EOS, initializer_range=0.2))
    randomize_norms(model)
    return model


def randomize_norms(model):
    """gamma near 1 and beta near 0, but not equal: a swapped or dropped one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))


BUILDERS = {"llama": llama, "llama-lns": lambda: llama(lns=True), "gpt2": gpt2}


def batch(seed=0, n=3, seq=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    ids[0, 4] = ids[1, 7] = EOS  # EOS inside a sequence: a special position
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # padding: left out of every statistic
    return ids, mask


def norm_inputs(model, ids, mask):
    """Each fixed-scale norm's input and output on one forward, in eval mode."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, name=name: seen.__setitem__(name, (a[0].detach(), o.detach())))
             for name, m in fixed_scale_norms(model).items()]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return seen


def reference_fixed(x, norm, path, special):
    """x / c * gamma (+ beta; x centred for LayerNorm), with the special positions' own c, in float64."""
    h = x.double()
    if norm.centered:
        h = h - h.mean(-1, keepdim=True)
    c = torch.full(x.shape[:-1], float(norm.frozen_sigma[path]), dtype=torch.float64)
    if not norm.special_is_removed:
        c[special] = float(norm.frozen_special_sigma[path])
    out = h / c[..., None] * norm.weight.double()
    if norm.bias is not None:
        out = out + norm.bias.double()
    return out * getattr(norm, "lns_scale", 1.0)


def train_through(model, removal, steps, seed=0):
    """``steps`` optimizer steps of plain SGD, each followed by the EMA update and the due removals; returns
    {step: labels removed}."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    done = {}
    model.train()
    for step in range(1, steps + 1):
        ids, mask = batch(seed + step)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        aux = removal.aux_loss()
        (loss + aux if aux is not None else loss).backward()
        opt.step()
        opt.zero_grad()
        removal.update_statistics()
        done[step] = removal.apply_due(step)
    model.eval()
    return done


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_real_norm_is_the_original_bit_for_bit(kind):
    model = BUILDERS[kind]().eval()
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        install_fixed_scale_norms(model, EOS)
        assert len(fixed_scale_norms(model)) == 2 * LAYERS + 1
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)
    keys = set(model.state_dict())
    assert all(f"{n}.weight" in keys for n in fixed_scale_norms(model))  # the checkpoint keys stay


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_each_removal_changes_exactly_the_norms_the_schedule_names_and_freezes_them_to_x_over_c(kind):
    model = BUILDERS[kind]()
    install_fixed_scale_norms(model, EOS)
    removal = NormRemoval(model, start=2, interval=3)
    steps = removal_steps(model, 2, 3)
    assert [s for s, _, _ in steps] == [2 + 3 * i for i in range(len(steps))]
    expected_events = (3 if kind == "gpt2" else 2) * LAYERS + 2
    assert len(steps) == expected_events and steps[-1][2] == "position-0 / EOS special cases"
    order = [label for _, _, label in steps]
    assert order[0] == "layer 1 pre-MLP norm" and order[LAYERS] .startswith("layer 1 attention-input norm")
    if kind == "gpt2":
        assert order[LAYERS:3 * LAYERS] == [f"layer {l} attention-input norm ({p})" for p in ("q/k", "v")
                                            for l in range(1, LAYERS + 1)]

    def state():
        return {n: (list(m.path_removed), m.special_is_removed) for n, m in fixed_scale_norms(model).items()}

    before = state()
    done = train_through(model, removal, steps[-1][0] + 1)
    # Replay: which flags each step turned on is exactly the event due at that step.
    flags = {n: ([False] * m.paths, False) for n, m in fixed_scale_norms(model).items()}
    assert before == flags
    for at, targets, label in steps:
        assert done[at] == [label]
        for name, path in targets:
            removed, special = flags[name]
            flags[name] = (removed, True) if path == SPECIAL else (
                [True if p == path else r for p, r in enumerate(removed)], special)
    assert sum(len(v) for v in done.values()) == len(steps)
    assert state() == flags and all(m.fully_removed for m in fixed_scale_norms(model).values())

    # Frozen: exactly x / c * gamma (+ beta), each path with its own c; the frozen c is the EMA of that moment.
    ids, mask = batch(seed=99)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    special |= ids == EOS
    for name, (x, out) in norm_inputs(model, ids, mask).items():
        norm = fixed_scale_norms(model)[name]
        expected = torch.cat([reference_fixed(x, norm, p, special) for p in range(norm.paths)], dim=-1)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    if kind == "gpt2":
        ln1 = fixed_scale_norms(model)["transformer.h.0.ln_1"]
        assert float(ln1.frozen_sigma[0]) != float(ln1.frozen_sigma[1])  # frozen at different steps


def test_special_positions_keep_their_own_value_until_their_step():
    model = llama()
    install_fixed_scale_norms(model, EOS)
    removal = NormRemoval(model, start=1, interval=1)
    train_through(model, removal, LLAMA_STEPS - 1)  # all but the special cases
    norm = fixed_scale_norms(model)["model.layers.1.input_layernorm"]
    assert all(norm.path_removed) and not norm.special_is_removed
    assert abs(float(norm.frozen_special_sigma[0]) / float(norm.frozen_sigma[0]) - 1) > 0.05  # they differ
    ids, mask = batch(seed=5)
    x, out = norm_inputs(model, ids, mask)["model.layers.1.input_layernorm"]
    ratio = (out / (x * norm.weight)).detach()  # 1/c per position
    assert torch.allclose(ratio[0, 0], 1 / norm.frozen_special_sigma[0]) and torch.allclose(
        ratio[0, 4], 1 / norm.frozen_special_sigma[0])  # position 0 and EOS
    assert torch.allclose(ratio[0, 2], 1 / norm.frozen_sigma[0])
    assert removal.apply_due(LLAMA_STEPS) == ["position-0 / EOS special cases"]
    x, out = norm_inputs(model, ids, mask)["model.layers.1.input_layernorm"]
    assert torch.allclose((out / (x * norm.weight))[0, 0], 1 / norm.frozen_sigma[0])


def test_the_ema_follows_the_live_sigma_over_real_ordinary_tokens():
    """The live sigma after three steps against the EMA recomputed here in float64 from the norm's inputs."""
    model = llama()
    install_fixed_scale_norms(model, EOS)
    removal = NormRemoval(model, start=1, interval=1)
    norm = fixed_scale_norms(model)["model.layers.0.post_attention_layernorm"]
    inputs = []
    hook = norm.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach().double()))
    ema = special_ema = None
    model.train()
    for step in range(1, 4):
        ids, mask = batch(step)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        removal.update_statistics()
        sigma = (inputs[-1].pow(2).mean(-1) + norm.eps).sqrt()
        special = torch.zeros_like(ids, dtype=torch.bool)
        special[:, 0] = True
        special |= ids == EOS
        valid = mask.bool()
        ordinary, extra = sigma[valid & ~special].mean(), sigma[valid & special].mean()
        ema = ordinary if ema is None else MOMENTUM * ema + (1 - MOMENTUM) * ordinary
        special_ema = extra if special_ema is None else MOMENTUM * special_ema + (1 - MOMENTUM) * extra
        assert float(norm.live_sigma) == pytest.approx(float(ema), rel=1e-6)
        assert float(norm.live_special_sigma) == pytest.approx(float(special_ema), rel=1e-6)
        assert float(norm.max_square) == pytest.approx(max(
            float((x.pow(2).mean(-1) + norm.eps)[valid].max()) for x in inputs), rel=1e-6)
    hook.remove()


def test_the_aux_loss_is_the_mse_of_the_final_norms_input_sigma():
    model = llama()
    install_fixed_scale_norms(model, EOS)
    removal = NormRemoval(model, start=1, interval=1, aux_weight=0.5)
    captured = []
    final = fixed_scale_norms(model)["model.norm"]
    final.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().double()))
    model.train()
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask, labels=ids)
    aux = removal.aux_loss()
    sigma = (captured[0].pow(2).mean(-1) + final.eps).sqrt()
    keep = mask.bool() & (ids != EOS)
    keep[:, 0] = False
    expected = 0.5 * (sigma[keep] - sigma[keep].mean()).pow(2).mean()
    assert float(aux) == pytest.approx(float(expected), rel=1e-5) and aux.requires_grad
    assert removal.aux_loss() is None  # one forward, one aux term


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_both_export_forms_and_the_folding_give_the_fine_tuned_logits(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model = BUILDERS[kind]()
    install_fixed_scale_norms(model, EOS)
    removal = NormRemoval(model, start=1, interval=1)
    train_through(model, removal, removal.steps[-1][0] + 1)
    record_removal(model, 1, 1, 0.0)
    ids, mask = batch(seed=7)
    with torch.no_grad():
        tuned = model(input_ids=ids, attention_mask=mask).logits.double()

    # The exact form: save_pretrained, lns_megatron.hf.from_pretrained.
    model.save_pretrained(tmp_path / "exact")
    exact = from_pretrained(str(tmp_path / "exact")).eval()
    assert all(m.fully_removed for m in fixed_scale_norms(exact).values())
    with torch.no_grad():
        assert torch.equal(exact(input_ids=ids, attention_mask=mask).logits.double(), tuned)

    # The plain-transformers form: the stock class, eps huge; the error within the stated bound.
    bound = stock_error_bound(fixed_scale_norms(model))
    stock = to_transformers(copy.deepcopy(model))
    stock.save_pretrained(tmp_path / "stock")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "stock"), dtype=torch.float32).eval()
    assert not any(isinstance(m, FixedScaleNorm) for m in plain.modules())
    assert plain.config.lns_megatron["norm_free"]["relative_error_bound"] == pytest.approx(bound)
    with torch.no_grad():
        logits = plain(input_ids=ids, attention_mask=mask).logits.double()
    scale = tuned.abs().max()
    assert bound < 1e-9 and (logits - tuned).abs().max() <= 1e-5 * scale  # float32 rounding, far above the bound
    assert from_pretrained(str(tmp_path / "stock")).config.lns_megatron.get("norm_removal") is None

    # The folding: the norms become identities (or centerings), the logits stay.
    folded = fold_fixed_scales(copy.deepcopy(model)).eval()
    assert not any(isinstance(m, FixedScaleNorm) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(input_ids=ids, attention_mask=mask).logits.double(), tuned,
                                   rtol=0, atol=1e-5 * float(scale))
    for name, p in folded.named_parameters():
        assert "norm" not in name and ".ln_" not in name, name  # nothing is left of gamma or beta


def test_a_model_mid_schedule_is_refused_by_the_exports():
    model = llama()
    install_fixed_scale_norms(model, EOS)
    removal = NormRemoval(model, start=1, interval=1)
    train_through(model, removal, 2)
    for export in (to_transformers, fold_fixed_scales):
        with pytest.raises(NormRemovalError, match="not fully removed yet"):
            export(copy.deepcopy(model))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("removal")
    for kind, build in BUILDERS.items():
        build().save_pretrained(root / kind)
        word_tokenizer(root / kind)
    write_examples(root / "sft.jsonl", 8)
    return root


def removal_flags(models, kind, out, *extra):
    steps = (3 * LAYERS + 2 if kind == "gpt2" else LLAMA_STEPS) + 2
    return sft_flags(models / kind, models / "sft.jsonl", out, *REMOVAL, "--norm-removal-aux-weight", "0.1",
                     *extra, steps=steps)


@pytest.fixture(scope="module")
def plain_removal(models):
    out = models / "plain-llama-lns"
    finetune(parse_args(removal_flags(models, "llama-lns", out, "--save-steps", "3")))
    return out


def test_the_run_logs_each_removal_and_plots_frozen_against_live(models, plain_removal, capsys):
    out = models / "gpt2-run"
    finetune(parse_args(removal_flags(models, "gpt2", out)))
    log = capsys.readouterr().out
    assert "finetune: step 1: removed the layer 1 pre-MLP norm (1 of 8 removals done)" in log
    assert "finetune: step 4: removed the layer 2 attention-input norm (q/k) (4 of 8 removals done)" in log
    assert "finetune: step 8: removed the position-0 / EOS special cases (8 of 8 removals done)" in log
    logged = scalars(str(out))
    assert [logged["norm_removal/removed"][s] for s in range(1, 11)] == [1, 2, 3, 4, 5, 6, 7, 8, 8, 8]
    live, frozen = logged["norm_removal/layer_1_pre-MLP_norm/live"], logged["norm_removal/layer_1_pre-MLP_norm/frozen"]
    assert sorted(frozen) == list(range(1, 11)) and len(set(frozen.values())) == 1  # frozen at step 1
    assert frozen[1] == pytest.approx(live[1])  # the value it froze at is the live EMA of that step
    assert sorted(logged["norm_removal/layer_2_attention-input_norm/frozen_v"]) == list(range(6, 11))
    tuned = from_pretrained(str(out / "final")).eval()
    assert all(m.fully_removed for m in fixed_scale_norms(tuned).values())
    assert tuned.config.lns_megatron["norm_removal"]["aux_weight"] == 0.1

    # Shipped: tools/export_hf.py writes the plain-transformers form, which stock GPT-2 loads.
    from transformers import GPT2LMHeadModel

    from lns_megatron.hf.export import main as export_main

    assert export_main(["--load", str(out / "final"), "--output", str(models / "gpt2-shipped")]) == 0
    assert "a norm-free model in the plain-transformers form (norm eps 1e+12" in capsys.readouterr().out
    shipped = GPT2LMHeadModel.from_pretrained(str(models / "gpt2-shipped")).eval()
    assert os.path.isfile(models / "gpt2-shipped" / "tokenizer.json")
    ids, mask = batch(seed=3)
    with torch.no_grad():
        exact = tuned(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(shipped(input_ids=ids, attention_mask=mask).logits, exact, rtol=0,
                                   atol=1e-5 * float(exact.abs().max()))


def test_resume_mid_schedule_is_exact(models, plain_removal):
    out = models / "resumed"
    shutil.copytree(plain_removal / "checkpoint-3", out / "checkpoint-3")  # the job died after step 3
    finetune(parse_args(removal_flags(models, "llama-lns", out, "--save-steps", "3", "--resume")))
    a, b = scalars(str(plain_removal))["train/loss"], scalars(str(out))["train/loss"]
    assert sorted(b) == list(range(4, LLAMA_STEPS + 3))
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step
    first, second = from_pretrained(str(plain_removal / "final")), from_pretrained(str(out / "final"))
    for (name, x), y in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_zero_gives_the_plain_runs_losses(models, plain_removal, tmp_path, zero):
    """Two processes of micro-batch 2 against the plain run's batch of 4: the sigma statistics are reduced over
    the ranks, so the EMAs, the frozen values and the losses agree."""
    out = tmp_path / "ds"
    flags = override(removal_flags(models, "llama-lns", "")[6:], ["--micro-batch-size", "2"])
    run_example(dict(MODEL=str(models / "llama-lns"), DATA=str(models / "sft.jsonl"), OUTPUT_DIR=str(out),
                     NORM_SCHEME="lns", ZERO=str(zero), GPUS_PER_NODE="2"), flags)
    ds, plain = scalars(str(out)), scalars(str(plain_removal))
    for step in range(1, LLAMA_STEPS + 3):
        assert ds["train/loss"][step] == pytest.approx(plain["train/loss"][step], rel=1e-5), step
        assert ds["norm_removal/removed"][step] == plain["norm_removal/removed"][step]
    for tag in (t for t in plain if t.startswith("norm_removal/")):
        for step, value in plain[tag].items():
            assert ds[tag][step] == pytest.approx(value, rel=1e-5), (tag, step)
    final = from_pretrained(str(out / "final"))
    assert all(m.fully_removed for m in fixed_scale_norms(final).values())


def test_bad_input_is_refused_in_one_line(models, plain_removal, tmp_path, capsys):
    import json

    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    gemma.save_pretrained(tmp_path / "gemma")
    word_tokenizer(tmp_path / "gemma")
    shutil.copytree(models / "llama", tmp_path / "dyt")
    config = json.loads((tmp_path / "dyt" / "config.json").read_text())
    config["lns_megatron"] = {"norm_scheme": "dyt"}
    (tmp_path / "dyt" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    base = removal_flags(models, "llama", tmp_path / "out")
    cases = [
        (["--max-steps", "4"], "--norm-removal-start 1 --norm-removal-interval 1", "ends at step 6"),
        (["--model", str(tmp_path / "gemma")], "Gemma2ForCausalLM", "neither Llama-family norms"),
        (["--model", str(tmp_path / "dyt")], "--norm-scheme dyt", "no norms to remove"),
        (["--norm-removal-interval", "0"], "--norm-removal-start 1", "--norm-removal-interval"),
        (["--norm-removal-start", "0"], "--norm-removal-interval", "norm removal is off"),
    ]
    for change, name, fix in cases:
        code = main(override(base, change))
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "it/s]" not in line]  # not tqdm's
        assert code == 2 and len(err) == 1 and err[0].startswith("finetune: error: ") and name in err[0] \
            and fix in err[0], (change, err)
    assert not (tmp_path / "out" / "final").exists()

    from lns_megatron.hf.export import main as export_main

    assert export_main(["--load", str(plain_removal / "checkpoint-3"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("export_hf: error: the plain-transformers export: 5 norms are not fully removed yet")
    assert not (tmp_path / "x").exists()
    with pytest.raises(NormRemovalError, match="must be at least 1"):
        check_schedule(llama(), 0, 1, 100)
