"""What the benchmarks share: the process groups and data of the first configuration, then one model and
optimizer per configuration, wired as the driver wires them."""

import torch
from megatron.core.distributed import finalize_model_grads

from lns_megatron.config import validate
from lns_megatron.data import datasets as data
from lns_megatron.schemes.lns import HAVE_TE
from lns_megatron.training import distributed
from lns_megatron.training.train import build_model, build_optimizer


def start(c):
    """Validate ``c``, start the process groups and build its tokenizer and training data: (vocab, train_ds)."""
    validate(c, torch.cuda.is_available(), HAVE_TE)
    distributed.initialize(c.tensor_model_parallel_size, c.pipeline_model_parallel_size,
                           c.virtual_pipeline_model_parallel_size, seed=c.seed)
    tokenizer = data.build_tokenizer_from_config(c)
    vocab = data.padded_vocab_size(tokenizer.vocab_size, c.make_vocab_size_divisible_by, c.tensor_model_parallel_size)
    train_ds, _, _ = data.build_datasets(c, tokenizer)
    return vocab, train_ds


def model_and_optimizer(c, vocab):
    validate(c, torch.cuda.is_available(), HAVE_TE)
    model = build_model(c, vocab)
    optimizer, _ = build_optimizer(c, model)
    model[0].config.grad_scale_func = optimizer.scale_loss
    model[0].config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer
