"""Helpers of the Hugging Face fine-tuning tests: a word-level tokenizer, examples, the flags of a short
run, its TensorBoard scalars, and examples/finetune_lns_deepspeed.sh launched on this machine."""

import json
import os
import random
import subprocess

from dist_launch import ROOT, script_env
from lns_megatron.training.distributed import free_port

VOCAB = 64
STEPS = 3


def word_tokenizer(directory, vocab=VOCAB):
    """A word-level fast tokenizer: '<eos>' is id 0, 'w{i}' is id i + 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>"] + [f"w{i}" for i in range(vocab - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.save_pretrained(directory)
    return fast


def write_examples(path, n, seed=0):
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a = r.randrange(1, 50)
            f.write(json.dumps({"prompt": f"w{a} w{a + 1}", "response": f"w{a + 2} w{a + 3} w{a + 4}"}) + "\n")
    return str(path)


def sft_flags(model_dir, data, output, *extra, steps=STEPS):
    return ["--model", str(model_dir), "--data", str(data), "--output-dir", str(output), "--max-steps", str(steps),
            "--micro-batch-size", "4", "--lr", "1e-3", "--logging-steps", "1", "--depth-log-interval", "1",
            "--seq-length", "64", "--warmup-ratio", "0", *extra]


def override(flags, change):
    """flags with each --name in change set to change's value (appended when absent)."""
    flags = list(flags)
    i = 0
    while i < len(change):
        name = change[i]
        has_value = i + 1 < len(change) and not change[i + 1].startswith("--")
        if name in flags:
            j = flags.index(name)
            if has_value:
                flags[j + 1] = change[i + 1]
        else:
            flags += change[i:i + 1 + has_value]
        i += 1 + has_value
    return flags


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def run_example(env, flags, node_ranks=(None,)):
    """examples/finetune_lns_deepspeed.sh with env, once per node (NODE_RANK) at the same time; its output."""
    base = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **env)
    script = os.path.join(ROOT, "examples", "finetune_lns_deepspeed.sh")
    base = script_env(base)
    procs = [subprocess.Popen(["bash", script, *flags], env=base if rank is None else dict(base, NODE_RANK=str(rank)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in node_ranks]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-4000:] for o in outputs)
    output = "".join(outputs)
    assert f"finetune: wrote {env['OUTPUT_DIR']}/final ({env['NORM_SCHEME']}" in output, output[-4000:]
    return output
