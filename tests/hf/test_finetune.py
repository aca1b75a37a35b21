"""lns_megatron.finetune: supervised fine-tuning as LNS or Pre-LN on the Hugging Face Trainer, plain and through
DeepSpeed ZeRO-2/ZeRO-3 on the CPU (DeepSpeed's CPU accelerator, gloo), its data handling, its depth scalars
(checked against gradients computed here), resume, and the trip from our driver's checkpoint and back."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dist_launch import ROOT
from finetune_runs import STEPS, VOCAB, override, run_example, scalars, sft_flags, word_tokenizer, write_examples
from lns_megatron.hf import apply_layernorm_scaling, from_pretrained
from lns_megatron.hf.finetune import (IGNORE_INDEX, Collator, FinetuneError, finetune, main, parse_args,
                                      read_examples, tokenize)
from lns_megatron.hf.scaling import is_lns

LAYERS = 4


@pytest.fixture(scope="module")
def lns_model(tmp_path_factory):
    """A small LNS Llama as tools/export_hf.py --keep-lns leaves one: unfolded gamma, LNS in config.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, eos_token_id=0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    apply_layernorm_scaling(model).save_pretrained(root / "model")
    word_tokenizer(root / "model")
    return root


@pytest.fixture(scope="module")
def plain_runs(lns_model):
    """Both arms from the same LNS checkpoint, without DeepSpeed, in this process."""
    data = write_examples(lns_model / "sft.jsonl", 4)
    runs = {}
    for scheme in ("lns", "pre"):
        out = lns_model / f"plain-{scheme}"
        finetune(parse_args(sft_flags(lns_model / "model", data, out, "--norm-scheme", scheme)))
        runs[scheme] = str(out)
    return data, runs


def test_lns_and_pre_arms_differ_only_in_the_scale(lns_model, plain_runs):
    data, runs = plain_runs
    lns, pre = scalars(runs["lns"]), scalars(runs["pre"])
    # The same function at step 0, so the same first loss; then different gradients, different training.
    assert lns["train/loss"][1] == pytest.approx(pre["train/loss"][1], rel=1e-6)
    assert lns["train/loss"][STEPS] != pytest.approx(pre["train/loss"][STEPS], rel=1e-6)
    for metric in ("variance", "angular-distance", "grad-norm"):
        for layer in range(1, LAYERS + 1):
            values = lns[f"depth/{metric}/layer_{layer:03d}"]
            assert sorted(values) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in values.values())

    start = [layer.input_layernorm.weight.detach() / math.sqrt(l)
             for l, layer in enumerate(from_pretrained(str(lns_model / "model")).model.layers, 1)]
    final_lns = from_pretrained(os.path.join(runs["lns"], "final"))
    assert is_lns(final_lns) and final_lns.config.lns_megatron["lns_folded_into"] is None
    final_pre = from_pretrained(os.path.join(runs["pre"], "final"))
    assert not is_lns(final_pre) and final_pre.config.lns_megatron["lns_folded_into"]
    assert os.path.isfile(os.path.join(runs["lns"], "final", "tokenizer.json"))
    # Adam moves gamma by about lr a step; under LNS the effective weight s*gamma moves s times less.
    for l, (a, b) in enumerate(zip(final_lns.model.layers, final_pre.model.layers), 1):
        moved_lns = float((a.input_layernorm.weight.detach() / math.sqrt(l) - start[l - 1]).abs().max())
        moved_pre = float((b.input_layernorm.weight.detach() - start[l - 1]).abs().max())
        assert moved_lns == pytest.approx(moved_pre / math.sqrt(l), rel=0.05), l


def test_depth_grad_norm_is_the_gradient_before_clipping(lns_model, plain_runs):
    """Step 1's per-layer gradient norms, recomputed here on the same (only) batch of 4 examples."""
    from transformers import AutoTokenizer

    data, runs = plain_runs
    model = from_pretrained(str(lns_model / "model"), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(lns_model / "model"))
    batch = Collator(0)(tokenize(read_examples(data, "prompt", "response"), tokenizer, 64, data))
    model(**batch).loss.backward()
    expected = [math.sqrt(sum(float(p.grad.double().square().sum()) for p in layer.parameters()))
                for layer in model.model.layers]
    logged = scalars(runs["lns"])
    assert logged["train/grad_norm"][1] > 1.0  # the Trainer clipped this step: the check sees through it
    for layer, value in enumerate(expected, 1):
        assert logged[f"depth/grad-norm/layer_{layer:03d}"][1] == pytest.approx(value, rel=1e-4)


@pytest.mark.parametrize("zero, scheme, nodes", [(2, "lns", 2), (3, "pre", 1)])
def test_deepspeed_matches_plain_training(lns_model, plain_runs, tmp_path, zero, scheme, nodes):
    """examples/finetune_lns_deepspeed.sh on the CPU, 2 processes of micro-batch 2 (ZeRO-2 as two nodes on
    this machine, without ssh; ZeRO-3 as one): the losses and depth scalars of the plain run of batch 4."""
    data, runs = plain_runs
    out = tmp_path / "ds"
    env = dict(MODEL=str(lns_model / "model"), DATA=data, OUTPUT_DIR=str(out), NORM_SCHEME=scheme, ZERO=str(zero))
    flags = override(sft_flags("", "", "")[6:], ["--micro-batch-size", "2"])  # the plain run's, half the batch
    if nodes == 1:
        run_example(dict(env, GPUS_PER_NODE="2"), flags)
    else:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")  # two names for this machine: two nodes
        run_example(dict(env, GPUS_PER_NODE="1", HOSTFILE=str(hostfile)), flags, node_ranks=(0, 1))

    ds, plain = scalars(str(out)), scalars(runs[scheme])
    for step in range(1, STEPS + 1):
        assert ds["train/loss"][step] == pytest.approx(plain["train/loss"][step], rel=1e-5), step
        for layer in range(1, LAYERS + 1):
            for metric in ("variance", "angular-distance", "grad-norm"):
                tag = f"depth/{metric}/layer_{layer:03d}"
                assert ds[tag][step] == pytest.approx(plain[tag][step], rel=1e-4), (tag, step)
    final = from_pretrained(str(out / "final"))
    assert is_lns(final) == (scheme == "lns")
    reference = from_pretrained(os.path.join(runs[scheme], "final"))
    for (name, a), b in zip(final.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_resume_continues_exactly(lns_model, plain_runs, tmp_path):
    data, runs = plain_runs
    out = tmp_path / "run"
    flags = sft_flags(lns_model / "model", data, out, "--norm-scheme", "lns", "--save-steps", "2")
    finetune(parse_args(flags))
    uninterrupted = scalars(str(out))["train/loss"]
    # As if the job died after the step-2 checkpoint: only checkpoint-2 is left.
    import shutil

    for name in os.listdir(out):
        if name not in ("checkpoint-2",):
            shutil.rmtree(out / name)
    assert main(flags) == 2  # checkpoints present: refused without --resume
    finetune(parse_args(flags + ["--resume"]))
    resumed = scalars(str(out))["train/loss"]
    assert resumed[STEPS] == pytest.approx(uninterrupted[STEPS], rel=1e-6)
    assert is_lns(from_pretrained(str(out / "final")))


def test_a_nan_loss_stops_the_run_and_nothing_after_it_is_saved(lns_model, plain_runs, tmp_path, capsys):
    data, _ = plain_runs
    out = tmp_path / "run"
    flags = override(sft_flags(lns_model / "model", data, out), ["--lr", "1e12", "--max-steps", "8",
                                                                 "--save-steps", "1", "--clip-grad", "0"])
    assert main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("finetune: error: the loss is NaN or Inf at step ") and "lower --lr" in err, err
    step = int(err.split("at step ")[1].split(":")[0])
    assert 1 < step <= 8 and not (out / "final").exists()
    from safetensors.torch import load_file

    saved = sorted(int(d.split("-")[1]) for d in os.listdir(out) if d.startswith("checkpoint-"))
    assert saved == list(range(1, step))  # every step before the NaN, none from it on
    for n in saved:
        assert all(torch.isfinite(t).all() for t in load_file(str(out / f"checkpoint-{n}" / "model.safetensors")).values())


def test_from_our_driver_to_deepspeed_and_back(tmp_path_factory, tmp_path):
    """A checkpoint trained by the driver, exported with --keep-lns, fine-tuned as LNS through DeepSpeed
    ZeRO-2 and as Pre-LN with the one flag changed, then exported again: the folded export computes what
    the fine-tuned LNS model computes."""
    from transformers import LlamaForCausalLM

    from lns_megatron.hf.export import main as export_main
    from trained_checkpoints import TOKENIZER_VOCAB, trained_checkpoint

    ckpt = trained_checkpoint(tmp_path_factory, "lns")
    assert export_main(["--load", ckpt, "--output", str(tmp_path / "hf"), "--keep-lns"]) == 0
    word_tokenizer(tmp_path / "tok", vocab=TOKENIZER_VOCAB)
    data = write_examples(tmp_path / "sft.jsonl", 8)
    flags = sft_flags(tmp_path / "hf", data, tmp_path / "sft-lns", "--tokenizer", str(tmp_path / "tok"))
    run_example(dict(MODEL=flags[1], DATA=data, OUTPUT_DIR=str(tmp_path / "sft-lns"), NORM_SCHEME="lns", ZERO="2",
                     GPUS_PER_NODE="1"), flags[6:])
    finetune(parse_args(override(flags, ["--output-dir", str(tmp_path / "sft-pre"), "--norm-scheme", "pre"])))
    lns, pre = scalars(str(tmp_path / "sft-lns")), scalars(str(tmp_path / "sft-pre"))
    assert lns["train/loss"][1] == pytest.approx(pre["train/loss"][1], rel=1e-6)  # one function at step 0
    assert lns["train/loss"][STEPS] != pytest.approx(pre["train/loss"][STEPS], rel=1e-6)

    tuned = from_pretrained(str(tmp_path / "sft-lns" / "final"), dtype=torch.float32).eval()
    assert is_lns(tuned)  # the scheme came through the export and the fine-tuning
    assert export_main(["--load", str(tmp_path / "sft-lns" / "final"), "--output", str(tmp_path / "plain")]) == 0
    plain = LlamaForCausalLM.from_pretrained(str(tmp_path / "plain"), dtype=torch.float32).eval()
    tokens = torch.randint(0, TOKENIZER_VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, tuned(tokens).logits, rtol=0, atol=2e-5)
    assert os.path.isfile(tmp_path / "plain" / "tokenizer.json")


def test_reading_and_masking(tmp_path, capsys):
    import datasets

    tok = word_tokenizer(tmp_path / "tok")
    rows = [{"prompt": "w1 w2", "response": "w3 w4"}, {"prompt": "", "response": "w5"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    for source in ("a.jsonl", "a.json", "ds"):
        assert read_examples(str(tmp_path / source), "prompt", "response") == rows

    ex = tokenize(rows, tok, 64, "a")
    assert ex[0] == {"input_ids": [2, 3, 4, 5, 0], "labels": [IGNORE_INDEX, IGNORE_INDEX, 4, 5, 0]}
    assert ex[1] == {"input_ids": [6, 0], "labels": [6, 0]}
    batch = Collator(pad_id=0)(ex)
    assert batch["input_ids"].tolist() == [[2, 3, 4, 5, 0], [6, 0, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [6, 0] + [IGNORE_INDEX] * 3
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]

    long = [{"prompt": " ".join(["w1"] * 10), "response": "w2"}]
    assert len(tokenize(rows + long, tok, 8, "b")) == 2
    assert "b: dropped 1 of 3 examples whose prompt fills --seq-length 8" in capsys.readouterr().out
    with pytest.raises(FinetuneError, match="every prompt fills --seq-length 8"):
        tokenize(long, tok, 8, "c")


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "w1", "response": "w2"}\n{"prompt": "w1", "response": \n', "bad.jsonl:2: invalid JSON"),
    ('{"prompt": "w1", "answer": "w2"}\n', "bad.jsonl:1: no non-empty string 'response'"),
    ('{"prompt": 3, "response": "w2"}\n', "bad.jsonl:1: 'prompt' is a int, not a string"),
    ("", "bad.jsonl: no examples"),
])
def test_bad_data_is_named(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(FinetuneError, match=message):
        read_examples(str(tmp_path / "bad.jsonl"), "prompt", "response")


def test_bad_invocations_are_refused_in_one_line(lns_model, tmp_path, capsys):
    from lns_megatron.hf.scaling import fold_layernorm_scaling

    data = write_examples(tmp_path / "sft.jsonl", 4)
    folded = fold_layernorm_scaling(from_pretrained(str(lns_model / "model")))
    folded.save_pretrained(tmp_path / "folded")
    word_tokenizer(tmp_path / "folded")
    (tmp_path / "done" / "final").mkdir(parents=True)
    capsys.readouterr()
    cases = [
        (["--model", str(tmp_path / "nowhere")], "--model", "not a Hugging Face model directory"),
        (["--deepspeed", str(tmp_path / "ds.json")], "--deepspeed", "no such file"),
        (["--output-dir", str(tmp_path / "done")], "--output-dir", "already holds a finished run"),
        (["--resume"], "--resume", "holds no checkpoint-N directory"),
        (["--model", str(tmp_path / "folded"), "--norm-scheme", "lns"], "--model", "--keep-lns"),
        (["--seq-length", "0"], "--seq-length 0", "at least 1"),
    ]
    for change, name, fix in cases:
        code = main(override(sft_flags(lns_model / "model", data, tmp_path / "out"), change))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("finetune: error: ") and name in err[0] \
            and fix in err[0], (change, err)
    assert not (tmp_path / "out" / "final").exists()


def test_module_entry_points():
    """python -m lns_megatron.finetune (tools/finetune_hf.py runs in the DeepSpeed tests, via the example)."""
    proc = subprocess.run([sys.executable, "-m", "lns_megatron.finetune", "--help"], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and "--norm-scheme {lns,pre}" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bf16 ZeRO-3 with NCCL)")
def test_bf16_zero3_on_a_gpu(lns_model, tmp_path):
    data = write_examples(tmp_path / "sft.jsonl", 8)
    run_example(dict(MODEL=str(lns_model / "model"), DATA=data, OUTPUT_DIR=str(tmp_path / "out"), ZERO="3",
                     NORM_SCHEME="lns", GPUS_PER_NODE="1"), ["--max-steps", "3", "--seq-length", "64"])
    assert is_lns(from_pretrained(str(tmp_path / "out" / "final")))
