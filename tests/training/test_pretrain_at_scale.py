"""The driver's flags for a 7B-70B run, through the real driver on CPU: activation recompute, context parallelism
(refused without Transformer Engine), asynchronous checkpoints, WSD, batch-size ramp-up, the profiler, manual
garbage collection and the llama-8b/70b layouts. (Recompute's losses and gradients for every scheme under PP and
VPP are checked in tests/models/test_parallel.py; a kill during an async save in test_failures.py.)"""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from dist_launch import ROOT, script_env
from driver import (COMMON, MOCK, data_flags, driver_env, learnable_documents, logged, logged_losses, resume_error,
                    run_driver, write_dataset)
from lns_megatron import compat
from lns_megatron.config import ConfigError, PRESET_LAYOUTS, parse_args, validate

RECOMPUTE_FULL = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_flags(write_dataset(str(tmp_path_factory.mktemp("data") / "cycle_text_document"),
                                    learnable_documents()))


def test_recompute_trains_the_same_losses(data):
    base = [*COMMON, *data, "--train-iters", "3", "--log-interval", "1"]
    plain = logged_losses(run_driver(*base)[1])
    _, full = run_driver(*base, *RECOMPUTE_FULL)
    assert "activation recompute: full (uniform over 1 layer(s))" in full
    assert sorted(plain) == [1, 2, 3]
    assert logged_losses(full) == pytest.approx(plain, rel=1e-6, abs=0)  # recomputed: equal to float32 rounding


def test_async_save_resumes_exactly_at_two_ranks(data, tmp_path):
    """DP=2, a background save every 2 iterations; the run stops after 3 and is resumed to 6: the losses of a run
    never stopped. Each save became the latest only once written (the pointer follows the saves in order)."""
    ckpt = tmp_path / "ckpt"
    args = [*COMMON, *data, "--train-iters", "6", "--log-interval", "1", "--global-batch-size", "8"]
    _, straight = run_driver(*args, nproc=2)
    saving = [*args, "--save", ckpt, "--save-interval", "2", "--async-save"]
    _, first = run_driver(*saving, "--exit-interval", "3", nproc=2)
    assert "saving iteration 2 in the background" in first
    assert f"saved checkpoint to {ckpt}/iter_0000002 at iteration 2 (written in the background)" in first
    # iteration 3 trained while iteration 2 was written, and its own save finished before the run ended
    assert first.index("saving iteration 2 in the background") < first.index("iteration        3/")
    assert f"saved checkpoint to {ckpt}/iter_0000003 at iteration 3 (written in the background)" in first
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == "3"
    _, resumed = run_driver(*saving, "--load", ckpt, nproc=2)
    losses, expected = logged_losses(resumed), logged_losses(straight)
    assert sorted(losses) == [4, 5, 6] and all(losses[i] == expected[i] for i in losses), (losses, expected)
    assert open(ckpt / "latest_checkpointed_iteration.txt").read() == "6"
    assert sorted(os.listdir(ckpt)) == ["iter_0000002", "iter_0000003", "iter_0000004", "iter_0000006",
                                        "latest_checkpointed_iteration.txt"]


def wsd_lr(step, peak, low, warmup, decay, wsd, style):
    """megatron's WSD learning rate after ``step`` steps, written out here as the reference."""
    if step <= warmup:
        return peak * step / warmup
    start = decay - wsd
    if step <= start:
        return peak
    ratio = min(1.0, (step - start) / wsd)
    coeff = {"linear": 1 - ratio, "exponential": 2 * 0.5**ratio - 1}[style]
    return low + coeff * (peak - low)


@pytest.mark.parametrize("style", ["linear", "exponential"])
def test_wsd_schedule_and_a_resume_across_the_decay_boundary(data, tmp_path, style):
    ckpt = tmp_path / "ckpt"
    schedule = [*COMMON, *data, "--train-iters", "8", "--log-interval", "1", "--lr", "1e-3", "--min-lr", "1e-4",
                "--lr-warmup-iters", "1", "--lr-decay-style", "WSD", "--lr-wsd-decay-style", style]
    args = [*schedule, "--lr-wsd-decay-iters", "4"]
    _, straight = run_driver(*args)
    lrs = logged(straight, "learning rate")
    for step, lr in lrs.items():
        assert lr == pytest.approx(wsd_lr(step, 1e-3, 1e-4, 1, 8, 4, style), rel=1e-5), (step, lr)
    assert lrs[3] == lrs[4] == pytest.approx(1e-3) and lrs[5] < 1e-3 and lrs[8] == pytest.approx(1e-4)
    if style != "exponential":
        return  # the resume once, with megatron's default decay shape
    run_driver(*args, "--save", ckpt, "--exit-interval", "3")  # stops in the stable phase
    _, resumed = run_driver(*args, "--load", ckpt)
    assert (f"WSD: resuming in the stable phase; the learning rate is constant to iteration 4 and decays ({style}) "
            "over iterations 5..8") in resumed
    assert logged_losses(resumed) == {i: v for i, v in logged_losses(straight).items() if i > 3}
    assert logged(resumed, "learning rate") == {i: v for i, v in lrs.items() if i > 3}
    error = resume_error(*schedule, "--lr-wsd-decay-iters", "2", "--load", ckpt)
    assert "the learning-rate schedule differs from the checkpoint's: --lr-wsd-decay-iters: checkpoint 4, now 2" in error
    # the checkpoint's WSD kept by --use-checkpoint-opt_param-scheduler under other schedule flags
    cosine = [a if a != "WSD" else "cosine" for a in schedule if a not in ("--lr-wsd-decay-style", style)]
    _, kept = run_driver(*cosine, "--load", ckpt, "--use-checkpoint-opt_param-scheduler")
    assert logged(kept, "learning rate") == {i: v for i, v in lrs.items() if i > 3}


def logged_padded(output, field):
    """{iteration: int} of a field the iteration line pads with spaces (consumed samples, global batch size)."""
    return {int(m.group(1)): int(m.group(2))
            for m in re.finditer(rf"iteration\s+(\d+)/\s*\d+ \|.*?{field}:\s+(\d+) \|", output)}


def rampup_batch(consumed, start, increment, samples, final):
    """megatron-core's ramp-up rule, written out here: START plus one INCREMENT per SAMPLES/steps samples."""
    if consumed > samples:
        return final
    return start + int(consumed / (samples / ((final - start) // increment))) * increment


def test_rampup_batch_size_follows_megatron_and_resumes_exactly(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    args = [*COMMON, *data, "--micro-batch-size", "2", "--global-batch-size", "8", "--rampup-batch-size", "2", "2",
            "24", "--train-iters", "8", "--log-interval", "1"]
    _, straight = run_driver(*args)
    batches, consumed = logged_padded(straight, "global batch size"), logged_padded(straight, "consumed samples")
    total, expected = 0, {}
    for i in range(1, 9):
        expected[i] = rampup_batch(total, 2, 2, 24, 8)
        total += expected[i]
        assert consumed[i] == total
    assert batches == expected and list(expected.values()) == [2, 2, 2, 2, 4, 4, 6, 6]
    run_driver(*args, "--save", ckpt, "--exit-interval", "5")
    _, resumed = run_driver(*args, "--load", ckpt)
    assert logged_losses(resumed) == {i: v for i, v in logged_losses(straight).items() if i > 5}
    assert logged_padded(resumed, "global batch size") == {i: v for i, v in expected.items() if i > 5}


def test_profile_writes_a_trace_of_the_named_iterations(tmp_path):
    tb = tmp_path / "tb"
    _, out = run_driver("--preset", "tiny", *MOCK, "--micro-batch-size", "2", "--seq-length", "32", "--train-iters",
                        "5", "--log-interval", "1", "--eval-iters", "0", "--depth-log-interval", "0", "--profile",
                        "--profile-step-start", "3", "--profile-step-end", "5", "--tensorboard-dir", tb)
    assert f"rank 0: profiler trace of iterations 3..4 written to {tb}" in out
    traces = glob.glob(str(tb / "rank0.*.pt.trace.json"))  # tensorboard_trace_handler's name, for TensorBoard's plugin
    assert len(traces) == 1
    events = json.load(open(traces[0]))["traceEvents"]
    labels = {e["name"] for e in events if e.get("name", "").startswith(("iteration ", "ProfilerStep#"))}
    assert {"iteration 3", "iteration 4"} <= labels and "iteration 2" not in labels and "iteration 5" not in labels
    assert sum(1 for name in labels if name.startswith("ProfilerStep#")) == 2
    assert any(e.get("name") == "aten::mm" for e in events)  # the model's matmuls were recorded


GC_SCRIPT = """
import gc, sys
from lns_megatron.config import parse_args
from lns_megatron.training import distributed
from lns_megatron.training.train import pretrain
gc.callbacks.append(lambda phase, info: print("GC-EVENT", info["generation"], flush=True) if phase == "start" else None)
pretrain(parse_args(sys.argv[1:]))
print("GC-ENABLED", gc.isenabled(), flush=True)
distributed.destroy()
"""


def test_manual_gc_turns_automatic_collection_off_and_collects_at_the_interval():
    """Collections seen by gc.callbacks, printed into the run's own output in order, between the lines of
    iterations 1 and 6 (each iteration's collection comes after its line): automatic ones, of generations 0
    and 1, happen without --manual-gc and never with it; --manual-gc-interval 2 adds one full collection after
    iterations 2 and 4 (and 6); automatic collection is back on after the run."""
    base = ["--preset", "tiny", *MOCK, "--micro-batch-size", "2", "--seq-length", "32", "--train-iters", "6",
            "--log-interval", "1", "--eval-iters", "0", "--depth-log-interval", "0"]

    def collections(*flags):
        """[[generation of each collection after iteration i's line, before the next one] for i in 1..5]"""
        proc = subprocess.run([sys.executable, "-c", GC_SCRIPT, *base, *flags], cwd=ROOT, env=driver_env(),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        lines = proc.stdout.splitlines()
        marks = [i for i, l in enumerate(lines) if re.search(r"iteration\s+\d+/\s+6 \|", l)]
        assert len(marks) == 6, proc.stdout[-2000:]
        spans = [[int(l.split()[1]) for l in lines[i + 1:j] if l.startswith("GC-EVENT")]
                 for i, j in zip(marks, marks[1:])]
        return spans, "GC-ENABLED True" in proc.stdout

    spans, enabled = collections()
    assert any(g < 2 for span in spans for g in span) and enabled, spans  # the check sees automatic collections
    spans, enabled = collections("--manual-gc")
    assert spans == [[]] * 5 and enabled, spans
    spans, _ = collections("--manual-gc", "--manual-gc-interval", "2")
    assert spans == [[], [2], [], [2], []], spans


@pytest.mark.parametrize("args, world, expected", [
    (["--context-parallel-size", "2"], 2,
     "--context-parallel-size 2: megatron-core splits a sequence over ranks only inside Transformer Engine's attention"),
    (["--context-parallel-size", "2"], 3, "world size 3 is not divisible by --tensor-model-parallel-size 1 x "
     "--pipeline-model-parallel-size 1 x --context-parallel-size 2"),
    (["--recompute-method", "uniform"], 1, "--recompute-method needs --recompute-granularity full"),
    (["--recompute-granularity", "full"], 1, "--recompute-granularity full needs --recompute-method"),
    (["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3",
      "--pipeline-model-parallel-size", "2"], 2, "a pipeline chunk has 2 layers; recompute at most 2"),
    (["--recompute-modules", "mlp"], 1, "--recompute-modules needs --recompute-granularity selective"),
    (["--recompute-granularity", "selective", "--recompute-modules", "layernorm"], 1,
     "--recompute-modules layernorm needs Transformer Engine"),
    (["--recompute-granularity", "selective", "--recompute-modules", "attention"], 1,
     "megatron-core refuses these flags: Invalid choices for recompute_modules"),
    (["--lr-decay-style", "WSD"], 1, "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--lr-wsd-decay-iters", "5"], 1, "--lr-wsd-decay-iters needs --lr-decay-style WSD, not cosine"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "100", "--lr-warmup-iters", "10"], 1,
     "--lr-wsd-decay-iters 100 is longer than the decay length 100"),
    (["--rampup-batch-size", "4", "5", "100", "--global-batch-size", "16"], 1,
     "--global-batch-size 16 must be START plus a whole number of INCREMENTs"),
    (["--rampup-batch-size", "2", "2", "100", "--global-batch-size", "16", "--micro-batch-size", "4"], 1,
     "START and INCREMENT must be multiples of --micro-batch-size x data-parallel size = 4"),
    (["--profile"], 1, "--profile writes its trace into --tensorboard-dir; give one"),
    (["--profile", "--tensorboard-dir", "tb", "--profile-step-start", "5", "--profile-step-end", "5"], 1,
     "--profile-step-start 5 must be before --profile-step-end 5"),
    (["--profile", "--tensorboard-dir", "tb", "--profile-ranks", "0", "2"], 2, "--profile-ranks 2: no such rank"),
    (["--manual-gc-interval", "10"], 1, "--manual-gc-interval needs --manual-gc"),
    (["--async-save"], 1, "--async-save needs --save DIR"),
    (["--preset-layout"], 1, "--preset-layout: --preset tiny has no layout; layouts exist for --preset llama-8b"),
])
def test_bad_flags_are_refused_in_one_line(monkeypatch, args, world, expected):
    error = resume_error("--preset", "tiny", *MOCK, "--micro-batch-size", "1", *args, world_size=world,
                         monkeypatch=monkeypatch)
    assert expected in error and "\n" not in error, error


def test_bhyt_refuses_layernorm_recompute_where_te_would_allow_it():
    c = parse_args(["--preset", "tiny", *MOCK, "--norm-scheme", "bhyt", "--normalization", "RMSNorm",
                    "--recompute-granularity", "selective", "--recompute-modules", "layernorm"])
    with pytest.raises(ConfigError, match="--recompute-modules layernorm with --norm-scheme bhyt"):
        validate(c, cuda_available=True, have_te=True)


def test_a_flag_this_megatron_core_cannot_honour_is_refused_naming_its_version():
    import megatron.core

    c = parse_args(["--preset", "tiny", *MOCK, "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "5", "--async-save",
                    "--save", "x", "--rampup-batch-size", "2", "2", "10", "--recompute-granularity", "selective",
                    "--recompute-modules", "mlp"])
    assert compat.unsupported_flag(c) is None  # the installed version has every one of them
    missing = compat.VERSIONED_FLAGS + (("--lr-decay-style WSD", lambda c: c.lr_decay_style == "WSD", lambda: False),)
    assert compat.unsupported_flag(c, missing[-1:]) == (
        f"--lr-decay-style WSD is not supported by the installed megatron-core {megatron.core.__version__}; upgrade "
        "megatron-core or leave the flag out")
    assert compat.unsupported_flag(parse_args(["--preset", "tiny", *MOCK]), missing[-1:]) is None  # not used: fine


@pytest.mark.parametrize("preset, transformer_impl", [("llama-8b", "local"), ("llama-70b", "local"),
                                                      ("llama-8b", "transformer_engine")])
def test_presets_fill_a_layout_that_megatron_core_accepts(monkeypatch, preset, transformer_impl):
    """The layouts validate at the world size they are sized for, megatron-core's TransformerConfig takes them,
    and an explicit flag wins over the layout."""
    from lns_megatron.models.gpt import transformer_config

    layout = PRESET_LAYOUTS[preset]
    monkeypatch.setenv("WORLD_SIZE", str(layout["gpus"]))
    argv = ["--preset", preset, "--preset-layout", "--mock-data", "--vocab-size", "128000", "--bf16",
            "--global-batch-size", "128", "--transformer-impl", transformer_impl]
    c = parse_args(argv)
    for name, value in layout.items():
        if name != "gpus" and not (name == "recompute_granularity" and transformer_impl == "transformer_engine"):
            assert getattr(c, name) == value, name
    if transformer_impl == "transformer_engine":  # fused attention keeps no scores: no recompute
        assert c.recompute_granularity is None
        return  # TE needs a GPU to validate
    validate(c, cuda_available=False, have_te=False)
    assert c.data_parallel_size == 2
    config = transformer_config(c)
    assert config.recompute_granularity == "selective" and config.recompute_modules == ["core_attn"]
    assert config.num_query_groups == 8 and c.seq_length == 8192
    if preset == "llama-70b":
        assert c.virtual_pipeline_model_parallel_size == 5 and config.virtual_pipeline_model_parallel_size == 5
    assert parse_args(argv + ["--tensor-model-parallel-size", "2"]).tensor_model_parallel_size == 2


def launcher_command(**env):
    script = os.path.join(ROOT, "examples", "pretrain_gpt_lns.sh")
    proc = subprocess.run(["bash", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=script_env(dict(os.environ, PRINT_ONLY="1", CHECKPOINT_DIR="/nonexistent", **env)))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_the_launcher_takes_the_layout_from_the_preset_unless_one_is_given():
    words = launcher_command(PRESET="llama-8b")
    assert "--preset-layout" in words and "--tensor-model-parallel-size" not in words
    assert "--micro-batch-size" not in words  # the layout's
    words = launcher_command(PRESET="llama-8b", TP="2", MICRO_BATCH_SIZE="2")
    assert "--preset-layout" not in words
    assert words[words.index("--tensor-model-parallel-size") + 1] == "2"
    assert words[words.index("--micro-batch-size") + 1] == "2"
    words = launcher_command()  # the tiny preset has no layout
    assert "--preset-layout" not in words and words[words.index("--tensor-model-parallel-size") + 1] == "1"
