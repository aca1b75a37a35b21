"""Supervised fine-tuning of a Hugging Face causal LM as LNS or Pre-LN, on the HF ``Trainer`` with DeepSpeed.

The LNS paper's second claim is that its gains carry over to fine-tuning. ``--norm-scheme`` is the one
switch between the arms, from the same checkpoint and the same function at step 0:

- ``lns``: the constant 1/sqrt(l) stays on the pre-norm outputs (:mod:`lns_megatron.hf.scaling`);
- ``pre``: the scale, if the model has one, is folded into the norm weights, and training is plain Pre-LN.

Prompt tokens are masked from the loss. TensorBoard gets the Trainer's scalars and, every
``--depth-log-interval`` steps, the same ``depth/{variance,angular-distance,grad-norm}/layer_NNN``
scalars as pretraining.

    deepspeed --num_gpus 8 -m lns_megatron.finetune --model hf/lns-1b --data sft.jsonl \\
        --output-dir runs/sft-lns --norm-scheme lns --deepspeed examples/ds_zero2.json --bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Dict, List, Optional

import torch
from transformers import Trainer, TrainerCallback

from lns_megatron.hf.norm_removal import (NormRemoval, NormRemovalError, check_schedule, install_fixed_scale_norms,
                                          norm_family, record_removal)
from lns_megatron.hf.scaling import (LayerNormScalingError, apply_layernorm_scaling, fold_layernorm_scaling,
                                     from_pretrained, is_lns, transformer_layers)

IGNORE_INDEX = -100  # the label Hugging Face's loss skips
FINAL = "final"  # OUTPUT_DIR/final: the fine-tuned model, renamed into place only once complete


class FinetuneError(ValueError):
    """Bad input: the message names the input, the place and the fix."""


@dataclasses.dataclass
class FinetuneConfig:
    model: str
    data: str
    output_dir: str
    norm_scheme: Optional[str] = None  # None: as the model was saved
    deepspeed: Optional[str] = None
    eval_data: Optional[str] = None
    tokenizer: Optional[str] = None  # default: the model directory's
    prompt_key: str = "prompt"
    response_key: str = "response"
    seq_length: int = 512
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    lr: float = 2e-5
    min_lr_ratio: float = 0.1  # cosine decay to lr * ratio, as pretraining decays to --min-lr
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    epochs: float = 1.0
    max_steps: int = -1
    seed: int = 1234
    bf16: bool = False
    gradient_checkpointing: bool = False
    resume: bool = False  # continue from the newest checkpoint-N in output_dir
    logging_steps: int = 10
    save_steps: int = 0  # 0: save only at the end
    eval_steps: int = 0
    depth_log_interval: int = 100
    tensorboard_dir: Optional[str] = None  # default: OUTPUT_DIR/tensorboard
    norm_removal_start: int = 0  # 0: keep the norms; N: remove the first at step N (lns_megatron.hf.norm_removal)
    norm_removal_interval: int = 0  # steps between two removals (required with --norm-removal-start)
    norm_removal_aux_weight: float = 0.0  # the papers' auxiliary loss on the final norm's input sigma


# ------------------------------------------------------------------------------------------------ data


def read_examples(path: str, prompt_key: str, response_key: str) -> List[Dict[str, str]]:
    """(prompt, response) pairs from JSON lines, a JSON list, or a ``datasets`` save_to_disk directory."""
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise FinetuneError(f"--data {path}: not a directory written by datasets' save_to_disk ({e}); "
                                "give a .jsonl file or such a directory") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise FinetuneError(f"--data {path}: a DatasetDict without a 'train' split (has {sorted(ds)})")
            ds = ds["train"]
        rows = ((f"{path} row {i}", row) for i, row in enumerate(ds))
    elif os.path.isfile(path):
        rows = _json_rows(path)
    else:
        raise FinetuneError(f"--data {path}: no such file or directory")
    examples = []
    for where, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get(response_key), str) or not row[response_key]:
            raise FinetuneError(f"{where}: no non-empty string {response_key!r}; every example needs one "
                                f"(set --response-key to the field that holds the answer)")
        prompt = row.get(prompt_key, "")
        if not isinstance(prompt, str):
            raise FinetuneError(f"{where}: {prompt_key!r} is a {type(prompt).__name__}, not a string")
        examples.append({"prompt": prompt, "response": row[response_key]})
    if not examples:
        raise FinetuneError(f"--data {path}: no examples")
    return examples


def _json_rows(path: str):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            yield from ((f"{path} item {i}", row) for i, row in enumerate(json.loads(text)))
        except json.JSONDecodeError as e:
            raise FinetuneError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise FinetuneError(f"{path}:{n}: invalid JSON ({e.msg}); one JSON object per line") from None


def tokenize(examples: List[Dict[str, str]], tokenizer, seq_length: int, source: str) -> List[Dict[str, List[int]]]:
    """input_ids = prompt + response + EOS, cut to ``seq_length``; labels hide the prompt.

    An example whose prompt leaves no response token inside ``seq_length`` teaches nothing and is
    dropped, with a count; if all are, that is an error.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise FinetuneError("the tokenizer has no eos_token; set it in the model directory's tokenizer_config.json")
    out, dropped = [], 0
    for ex in examples:
        prompt = tokenizer(ex["prompt"])["input_ids"] if ex["prompt"] else []
        response = tokenizer(ex["response"], add_special_tokens=False)["input_ids"] + [eos]
        ids = (prompt + response)[:seq_length]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:seq_length]
        if all(l == IGNORE_INDEX for l in labels[1:]):  # the first label is never predicted
            dropped += 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    if not out:
        raise FinetuneError(f"{source}: every prompt fills --seq-length {seq_length}; raise it")
    if dropped:
        print(f"finetune: {source}: dropped {dropped} of {len(examples)} examples whose prompt fills "
              f"--seq-length {seq_length}", flush=True)
    return out


class Collator:
    """Pads a batch to its longest example; padding is masked from attention and loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        width = max(len(b["input_ids"]) for b in batch)

        def pad(values, fill):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values])

        return {"input_ids": pad([b["input_ids"] for b in batch], self.pad_id),
                "labels": pad([b["labels"] for b in batch], IGNORE_INDEX),
                "attention_mask": pad([[1] * len(b["input_ids"]) for b in batch], 0)}


# ------------------------------------------------------------------------------------------------ model


def prepare_model(c: FinetuneConfig):
    """The model in the requested scheme, computing the same function it was saved with."""
    model = from_pretrained(c.model, dtype=torch.float32)
    if c.norm_removal_start:
        norm_family(model)  # a model without the norms removal maps is refused before anything else
    saved = "lns" if is_lns(model) else "pre"
    scheme = c.norm_scheme or saved
    if scheme == "pre" and saved == "lns":
        fold_layernorm_scaling(model)  # the same function; training it is Pre-LN
        print(f"finetune: {c.model} is LNS; --norm-scheme pre folds 1/sqrt(l) into the norm weights "
              "and fine-tunes it as Pre-LN", flush=True)
    elif scheme == "lns" and saved == "pre":
        apply_layernorm_scaling(model)
        print(f"finetune: {c.model} was not trained with LNS; --norm-scheme lns adds 1/sqrt(l), which changes "
              "the function it computes", flush=True)
    if c.norm_removal_start:
        install_fixed_scale_norms(model, model.config.eos_token_id)
        record_removal(model, c.norm_removal_start, c.norm_removal_interval, c.norm_removal_aux_weight)
    print(f"finetune: {type(model).__name__}, {len(transformer_layers(model))} layers, norm scheme {scheme}"
          + (f", norm removal from step {c.norm_removal_start} every {c.norm_removal_interval}"
             if c.norm_removal_start else ""), flush=True)
    return model, scheme


# ------------------------------------------------------------------------------------------------ depth


class DepthCallback(TrainerCallback):
    """Per-layer depth scalars, named as in pretraining (``depth/<metric>/layer_NNN``).

    variance and angular-distance come from a forward pass over a fixed batch (every rank runs it:
    ZeRO-3 gathers parameters). grad-norm is each layer's gradient norm before clipping, read where
    the gradients are whole: :class:`DepthTrainer` reads them before the Trainer clips, or here
    before the optimizer step when nothing clips; DeepSpeed clips and steps inside ``backward``, so
    under DeepSpeed the engine's ``step`` is wrapped for this run to read them first
    (``safe_get_full_grad``: reduced over data parallelism, gathered under ZeRO-3).
    """

    def __init__(self, batch: Dict[str, torch.Tensor], interval: int, log_dir: str):
        self.batch, self.interval, self.log_dir = batch, interval, log_dir
        self.writer, self.grad_norms, self.trainer = None, None, None

    def due(self, step: int) -> bool:
        return bool(self.interval) and step % self.interval == 0

    def read_gradients(self, model, next_step: int) -> None:
        if self.due(next_step) and self.grad_norms is None:
            self.grad_norms = layer_grad_norms(model)

    def watch_deepspeed(self, engine, state) -> None:
        step = engine.step

        def step_reading_gradients(*args, **kwargs):
            if engine.is_gradient_accumulation_boundary():
                self.read_gradients(engine.module, state.global_step + 1)
            return step(*args, **kwargs)

        engine.step = step_reading_gradients

    def on_train_begin(self, args, state, control, **kw):
        if self.trainer is not None and self.trainer.is_deepspeed_enabled:
            self.watch_deepspeed(self.trainer.model_wrapped, state)  # the DeepSpeedEngine by now
        if state.is_world_process_zero and self.interval:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        self.read_gradients(model, state.global_step + 1)  # a no-op when already read before clipping

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kw):
        if self.trainer is not None and self.trainer.nonfinite_loss_anywhere():
            control.should_save, control.should_training_stop = False, True  # never save what follows a NaN
            return
        if not self.due(state.global_step):
            return
        stats = hidden_state_stats(model, self.batch)
        if self.grad_norms is not None:
            stats["grad-norm"] = self.grad_norms
        self.grad_norms = None
        if self.writer is not None:
            for metric, per_layer in stats.items():
                for layer, value in enumerate(per_layer, start=1):
                    self.writer.add_scalar(f"depth/{metric}/layer_{layer:03d}", value, state.global_step)
            self.writer.flush()

    def on_train_end(self, args, state, control, **kw):
        if self.writer is not None:
            self.writer.close()


class NormRemovalCallback(TrainerCallback):
    """Runs the norm-removal schedule: the sigma EMAs once per optimizer step, each removal at its step (a line in
    the log), and the ``norm_removal/*`` TensorBoard scalars (each norm's live sigma beside its frozen value)."""

    def __init__(self, removal: NormRemoval, log_dir: str):
        self.removal, self.log_dir, self.writer = removal, log_dir, None

    def on_train_begin(self, args, state, control, **kw):
        check_schedule(self.removal.model, self.removal.start, self.removal.interval, state.max_steps)
        self.removal.apply_due(state.global_step)  # a resumed run: the checkpoint's flags already say so
        if state.is_world_process_zero:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=self.log_dir)

    def on_step_end(self, args, state, control, **kw):
        self.removal.update_statistics()
        removed = self.removal.apply_due(state.global_step)
        if state.is_world_process_zero:
            for label in removed:
                print(f"finetune: step {state.global_step}: removed the {label} "
                      f"({self.removal.removed_count()} of {self.removal.total()} removals done)", flush=True)
        if self.writer is not None and (removed or state.global_step % max(args.logging_steps, 1) == 0):
            for tag, value in self.removal.scalars().items():
                self.writer.add_scalar(tag, value, state.global_step)
            self.writer.flush()

    def on_train_end(self, args, state, control, **kw):
        if self.writer is not None:
            self.writer.close()


class DepthTrainer(Trainer):
    """The Hugging Face Trainer, reading per-layer gradient norms before it clips them, stopping
    (with nothing saved from then on) at the first step whose loss is NaN or Inf on any rank, and
    adding norm removal's auxiliary loss when asked."""

    def __init__(self, *args, depth: DepthCallback, removal: Optional[NormRemoval] = None, **kwargs):
        callbacks = [depth] + ([NormRemovalCallback(removal, depth.log_dir)] if removal is not None else [])
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.depth, self.removal = depth, removal
        depth.trainer = self
        self.nonfinite_step = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        aux = self.removal.aux_loss() if self.removal is not None else None
        if aux is None:
            return result
        # The Trainer divides by the accumulation steps only a loss not already normalized over the whole batch.
        scaled = self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None else (
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)
        if scaled:
            aux = aux / self.current_gradient_accumulation_steps
        if return_outputs:
            return result[0] + aux, result[1]
        return result + aux

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.nonfinite_step is None and not bool(torch.isfinite(loss)):
            self.nonfinite_step = self.state.global_step + 1
        return loss

    def nonfinite_loss_anywhere(self) -> bool:
        flag = torch.tensor([float(self.nonfinite_step is not None)], device=self.args.device)
        if torch.distributed.is_initialized():  # every rank stops at the same step
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.nonfinite_step is None:
            self.nonfinite_step = self.state.global_step
        return bool(flag.item())

    def _clip_grad_norm(self, model):
        if not self.is_deepspeed_enabled:
            self.depth.read_gradients(model, self.state.global_step + 1)
        return super()._clip_grad_norm(model)


def layer_grad_norms(model) -> List[float]:
    """The L2 norm of each decoder layer's parameter gradients (full, reduced gradients under DeepSpeed)."""
    try:
        from deepspeed.utils import safe_get_full_grad
    except ImportError:
        safe_get_full_grad = None
    norms = []
    for layer in transformer_layers(model):
        sq = 0.0
        for p in layer.parameters():
            grad = safe_get_full_grad(p) if safe_get_full_grad is not None else p.grad
            if grad is not None:
                sq += float(grad.double().square().sum())
        norms.append(sq ** 0.5)
    return norms


def hidden_state_stats(model, batch: Dict[str, torch.Tensor]) -> Dict[str, List[float]]:
    """Residual-stream variance after each layer and the angular distance between its input and output,
    over the batch's real (unpadded) tokens."""
    from lns_megatron.training.probes import angular_distance, layer_input, layer_output

    layers = transformer_layers(model)
    mask = batch["attention_mask"].bool()
    variance, angle = [0.0] * len(layers), [0.0] * len(layers)

    def hook(index):
        def record(module, args, kwargs, output):
            x, y = layer_input(args, kwargs)[mask].double(), layer_output(output)[mask].double()
            variance[index] = float(y.var(unbiased=False))
            angle[index] = float(angular_distance(x, y).mean())
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {"variance": variance, "angular-distance": angle}


# ------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    defaults = FinetuneConfig(model="", data="", output_dir="")
    p = argparse.ArgumentParser(prog="lns_megatron.finetune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="Hugging Face model directory (tools/export_hf.py --keep-lns "
                   "for an LNS checkpoint)")
    p.add_argument("--data", required=True, help="training examples: JSON lines, a JSON list, or a datasets "
                   "save_to_disk directory, with a prompt and a response field")
    p.add_argument("--output-dir", required=True, help="where checkpoints, the final model and TensorBoard go")
    p.add_argument("--norm-scheme", choices=["lns", "pre"], help="lns: keep (or add) 1/sqrt(l) on the pre-norm "
                   "outputs; pre: fold it into the norm weights and fine-tune as Pre-LN (default: as saved)")
    p.add_argument("--deepspeed", help="DeepSpeed config (examples/ds_zero2.json, examples/ds_zero3.json)")
    p.add_argument("--eval-data", help="held-out examples, same format as --data")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer directory (default: the model directory's)")
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name in ("model", "data", "output_dir", "norm_scheme", "deepspeed", "eval_data", "tokenizer"):
            continue
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type=type(default) if default is not None else str, default=default)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def parse_args(argv=None) -> FinetuneConfig:
    args = vars(build_parser().parse_args(argv))
    args.pop("local_rank")
    c = FinetuneConfig(**args)
    for name in ("seq_length", "micro_batch_size", "gradient_accumulation_steps"):
        if getattr(c, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} {getattr(c, name)}: must be at least 1")
    for name in ("logging_steps", "save_steps", "eval_steps", "depth_log_interval"):
        if getattr(c, name) < 0:
            raise FinetuneError(f"--{name.replace('_', '-')} {getattr(c, name)}: must be 0 or more")
    if c.norm_removal_start < 0 or c.norm_removal_interval < 0 or c.norm_removal_aux_weight < 0:
        raise FinetuneError("--norm-removal-start, --norm-removal-interval and --norm-removal-aux-weight must be 0 or "
                            "more")
    if c.norm_removal_start and not c.norm_removal_interval:
        raise FinetuneError(f"--norm-removal-start {c.norm_removal_start}: give --norm-removal-interval too (the steps "
                            "between two removals)")
    if not c.norm_removal_start and (c.norm_removal_interval or c.norm_removal_aux_weight):
        raise FinetuneError("--norm-removal-interval/--norm-removal-aux-weight: norm removal is off without "
                            "--norm-removal-start N (the step of the first removal)")
    if not os.path.isfile(os.path.join(c.model, "config.json")):
        raise FinetuneError(f"--model {c.model}: not a Hugging Face model directory (no config.json); export one "
                            "with tools/export_hf.py --keep-lns (nothing is downloaded)")
    with open(os.path.join(c.model, "config.json")) as f:
        record = json.load(f).get("lns_megatron") or {}
    if c.norm_removal_start and record.get("norm_scheme") in ("dyt", "bhyt"):
        raise FinetuneError(f"--norm-removal-start: --model {c.model} uses --norm-scheme {record['norm_scheme']}, "
                            "which has no norms to remove (its tanh is not a normalization)")
    if c.norm_removal_start and (record.get("norm_free") or record.get("norm_removal")):
        raise FinetuneError(f"--norm-removal-start: --model {c.model} already went through norm removal "
                            f"({'norm-free' if record.get('norm_free') else 'a removal save'}); fine-tune it without "
                            "--norm-removal-start")
    if c.norm_scheme == "lns" and record.get("lns_folded_into"):
        raise FinetuneError(f"--model {c.model} has LNS folded into its norm weights (a default export); export the "
                            "checkpoint again with tools/export_hf.py --keep-lns to fine-tune it as LNS")
    if c.tokenizer and not os.path.exists(c.tokenizer):
        raise FinetuneError(f"--tokenizer {c.tokenizer}: no such file or directory")
    if c.deepspeed and not os.path.isfile(c.deepspeed):
        raise FinetuneError(f"--deepspeed {c.deepspeed}: no such file; the shipped configs are examples/ds_zero2.json "
                            "and examples/ds_zero3.json")
    final = os.path.join(c.output_dir, FINAL)
    if os.path.exists(final):
        raise FinetuneError(f"--output-dir {c.output_dir} already holds a finished run ({final}); choose another "
                            "directory")
    if checkpoints(c.output_dir) and not c.resume:
        raise FinetuneError(f"--output-dir {c.output_dir} holds checkpoints ({checkpoints(c.output_dir)[-1]}); pass "
                            "--resume to continue from the newest, or choose another directory")
    if c.resume and not checkpoints(c.output_dir):
        raise FinetuneError(f"--resume: --output-dir {c.output_dir} holds no checkpoint-N directory to resume from")
    return c


def checkpoints(output_dir: str) -> List[str]:
    """The Trainer's checkpoint-N directories, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d[11:].isdigit()]
    return sorted(found, key=lambda d: int(d[11:]))


def finetune(c: FinetuneConfig) -> str:
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    set_seed(c.seed)
    model, scheme = prepare_model(c)
    tokenizer = AutoTokenizer.from_pretrained(c.tokenizer or c.model)
    train = tokenize(read_examples(c.data, c.prompt_key, c.response_key), tokenizer, c.seq_length, c.data)
    evaluation = None
    if c.eval_data:
        evaluation = tokenize(read_examples(c.eval_data, c.prompt_key, c.response_key), tokenizer, c.seq_length,
                              c.eval_data)
    collator = Collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    tensorboard_dir = c.tensorboard_dir or os.path.join(c.output_dir, "tensorboard")
    os.environ["TENSORBOARD_LOGGING_DIR"] = tensorboard_dir  # where transformers 5's TensorBoard callback writes
    args = TrainingArguments(
        output_dir=c.output_dir, deepspeed=c.deepspeed, per_device_train_batch_size=c.micro_batch_size,
        per_device_eval_batch_size=c.micro_batch_size, gradient_accumulation_steps=c.gradient_accumulation_steps,
        learning_rate=c.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": c.min_lr_ratio},
        warmup_steps=c.warmup_ratio,  # a float below 1 is a fraction of the steps
        weight_decay=c.weight_decay, max_grad_norm=c.clip_grad,
        num_train_epochs=c.epochs, max_steps=c.max_steps, seed=c.seed, data_seed=c.seed, bf16=c.bf16,
        gradient_checkpointing=c.gradient_checkpointing, logging_steps=c.logging_steps, logging_first_step=True,
        report_to=["tensorboard"],
        save_strategy="steps" if c.save_steps else "no", save_steps=c.save_steps or 500,
        eval_strategy="steps" if evaluation and c.eval_steps else "no", eval_steps=c.eval_steps or None,
        remove_unused_columns=False, dataloader_num_workers=0, logging_nan_inf_filter=False, use_cpu=not torch.cuda.is_available(),
    )
    depth = DepthCallback(collator(train[:4]), c.depth_log_interval, tensorboard_dir)
    removal = None
    if c.norm_removal_start:
        removal = NormRemoval(model, c.norm_removal_start, c.norm_removal_interval, c.norm_removal_aux_weight)
    trainer = DepthTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                           data_collator=collator, processing_class=tokenizer, depth=depth, removal=removal)
    trainer.train(resume_from_checkpoint=c.resume or None)
    if trainer.nonfinite_step is not None:
        last = checkpoints(c.output_dir)
        raise FinetuneError(f"the loss is NaN or Inf at step {trainer.nonfinite_step}: training stopped and nothing "
                            f"was saved from that step on ({'the last checkpoint is ' + last[-1] if last else 'no checkpoint'}"
                            "); lower --lr or check the data")
    final = os.path.join(c.output_dir, FINAL)
    partial = final + ".partial"
    trainer.save_model(partial)  # every rank takes part (ZeRO-3 gathers); LNS stays unfolded, the config records it
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(partial)
        os.rename(partial, final)
        print(f"finetune: wrote {final} ({scheme}"
              + (": load it with lns_megatron.hf.from_pretrained, or fold it with tools/export_hf.py"
                 if scheme == "lns" else "") + ")", flush=True)
    return c.output_dir


def main(argv=None) -> int:
    try:
        finetune(parse_args(argv))
        code = 0
    except (FinetuneError, LayerNormScalingError, NormRemovalError) as e:  # every rank meets these alike
        print(f"finetune: error: {e}", file=sys.stderr, flush=True)
        code = 2
    if torch.distributed.is_initialized():  # left to interpreter exit, gloo's threads can abort a rank
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
