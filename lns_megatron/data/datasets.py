"""Training data: megatron-core's GPTDataset / MockGPTDataset blends, and their iterators."""

from __future__ import annotations

import logging
import os
from typing import Iterator, List, Optional

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import get_blend_from_list

from lns_megatron.config import ConfigError, PretrainConfig
from lns_megatron.data.tokenizer import build_tokenizer


SPLIT_NAMES = ("train", "validation", "test")


def build_tokenizer_from_config(c: PretrainConfig):
    """The tokenizer that tools/preprocess_data.py used; NullTokenizer for mock data."""
    if c.tokenizer_type is None:
        return build_tokenizer("NullTokenizer", vocab_size=c.vocab_size)
    try:
        return build_tokenizer(c.tokenizer_type, c.tokenizer_model, c.vocab_file, c.merge_file, c.vocab_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Megatron-LM's padding: a multiple of divisible_by * TP, so every TP shard is equal."""
    multiple = divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def check_data_paths(c: PretrainConfig) -> None:
    """Every prefix exists and holds tokens: megatron's GPTDataset loops forever on an empty one."""
    prefixes, _ = get_blend_from_list(c.data_path)
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(c.split))
    for prefix in prefixes:
        missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
        if missing:
            raise ConfigError(
                f"--data-path {prefix}: {missing[0]} not found; give the --output-prefix of tools/preprocess_data.py "
                "plus _text_document (e.g. data/corpus_text_document)"
            )
        if os.path.getsize(prefix + ".bin") == 0:
            raise ConfigError(
                f"--data-path {prefix}: the dataset holds no tokens; re-run tools/preprocess_data.py on non-empty text"
            )
        dataset = IndexedDataset(prefix, mmap=True)  # keep it alive: its arrays view the mmap
        lengths = dataset.sequence_lengths.astype(np.int64)
        del dataset
        if lengths.sum() == 0:
            raise ConfigError(
                f"--data-path {prefix}: the dataset holds no tokens; re-run tools/preprocess_data.py on non-empty text"
            )
        # megatron cuts each split by document index; an empty split would also loop forever.
        for name, bounds in zip(SPLIT_NAMES, split_matrix):
            if bounds is None:  # a 0-weight split is not built
                continue
            first, last = (int(round(b * len(lengths))) for b in bounds)
            if lengths[first:last].sum() == 0:
                raise ConfigError(
                    f"--split {c.split}: the {name} split of --data-path {prefix} gets documents [{first}, {last}) of "
                    f"{len(lengths)}, which hold no tokens; give that split 0 weight (e.g. --split 98,2,0) or more data"
                )


def build_datasets(c: PretrainConfig, tokenizer):
    """(train, valid, test) datasets sized for the whole run, like Megatron-LM."""
    evals = c.train_iters // c.eval_interval + 1
    sizes = [c.train_iters * c.global_batch_size, evals * c.eval_iters * c.global_batch_size,
             c.eval_iters * c.global_batch_size]
    config = GPTDatasetConfig(
        random_seed=c.seed,
        sequence_length=c.seq_length,
        blend=None if c.mock_data else get_blend_from_list(c.data_path),
        split=c.split,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        path_to_cache=c.data_cache_path,
        mmap_bin_files=True,
    )
    if c.mock_data:  # its "unable to save MockGPTDataset indexes" note, once per split, is noise
        logging.getLogger("megatron.core.datasets.gpt_dataset").setLevel(logging.ERROR)
    dataset_class = MockGPTDataset if c.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_class, sizes, lambda: True, config).build()


class MicroBatchSampler:
    """Megatron's pretraining order: each global batch is a contiguous run of sample indices,
    split among data-parallel ranks; resuming at ``consumed_samples`` continues it exactly."""

    def __init__(self, num_samples: int, consumed_samples: int, micro_batch_size: int):
        self.num_samples = num_samples
        self.consumed = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size
        start = self.consumed
        while True:
            first = start + self.dp_rank * self.micro_batch_size
            yield [(first + i) % self.num_samples for i in range(self.micro_batch_size)]
            start += step


def data_iterators(dataset, c: PretrainConfig, consumed_samples: int, num_chunks: int) -> Optional[list]:
    """One iterator per virtual-pipeline chunk over the same micro-batch sequence."""
    if dataset is None:
        return None
    iterators = []
    for _ in range(num_chunks):
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=MicroBatchSampler(len(dataset), consumed_samples, c.micro_batch_size),
            num_workers=c.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=c.num_workers > 0,
        )
        iterators.append(iter(loader))
    return iterators
