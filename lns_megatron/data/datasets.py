"""Training data: megatron-core's GPTDataset / MockGPTDataset blends, and their iterators."""

from __future__ import annotations

import logging
import math
import os
import re
from typing import Iterator, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from lns_megatron.config import ConfigError, PretrainConfig
from lns_megatron.data import metadata
from lns_megatron.data.tokenizer import build_tokenizer


SPLIT_NAMES = ("train", "validation", "test")


def build_tokenizer_from_config(c: PretrainConfig):
    """The tokenizer that tools/preprocess_data.py used; NullTokenizer for mock data."""
    if c.tokenizer_type is None:
        return build_tokenizer("NullTokenizer", vocab_size=c.vocab_size, eod_id=c.eod_id)
    try:
        return build_tokenizer(c.tokenizer_type, c.tokenizer_model, c.vocab_file, c.merge_file, c.vocab_size, c.eod_id)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Megatron-LM's padding: a multiple of divisible_by * TP, so every TP shard is equal."""
    multiple = divisible_by * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(values: List[str]) -> Tuple[List[str], Optional[List[float]]]:
    """--data-path as prefixes, or WEIGHT PREFIX pairs; megatron-core's parser asserts or guesses on
    anything else (a negative weight, an odd count), so the shapes are checked here first."""
    numeric = [_number(v) is not None and not os.path.isfile(v + ".idx") for v in values]
    if len(values) % 2 == 0 and all(numeric[0::2]) and not any(numeric[1::2]):
        weights = [float(v) for v in values[0::2]]
        for weight, prefix in zip(weights, values[1::2]):
            if not (math.isfinite(weight) and weight > 0):
                raise ConfigError(f"--data-path: weight {weight:g} of {prefix} must be a positive number; "
                                  "leave the prefix out to give it no data")
        return list(values[1::2]), weights
    if any(numeric):
        raise ConfigError(f"--data-path {' '.join(values)}: weights and prefixes must alternate "
                          "(WEIGHT PREFIX WEIGHT PREFIX ...), or give prefixes alone")
    return list(values), None


def parse_split(split: str) -> List[float]:
    """--split as up to three non-negative train,valid,test weights (megatron-core's parser drops a
    minus sign and divides by zero on an all-zero split)."""
    parts = [p for p in re.split(r"[,/\s]+", split.strip()) if p]
    example = "give up to three non-negative train,valid,test weights, e.g. --split 969,30,1"
    # Plain decimals only: megatron-core reads the string again with the regex [.0-9]+.
    if not 1 <= len(parts) <= 3 or not all(re.fullmatch(r"[0-9]*\.?[0-9]+", p) for p in parts):
        raise ConfigError(f"--split {split}: {example}")
    weights = [float(p) for p in parts]
    if sum(weights) == 0:
        raise ConfigError(f"--split {split}: the weights sum to 0; {example}")
    return weights + [0.0] * (3 - len(weights))


def _check_splits_needed(c: PretrainConfig, weights: List[float]) -> None:
    if weights[0] == 0:
        raise ConfigError(f"--split {c.split} gives training no data; give the first weight a share, e.g. --split 969,30,1")
    validates = c.eval_iters > 0 and c.eval_interval and c.eval_interval <= c.train_iters
    if weights[1] == 0 and validates:
        raise ConfigError(f"--split {c.split} leaves no validation data, but --eval-interval {c.eval_interval} validates "
                          "during the run; give validation a share (e.g. --split 98,2,0) or pass --eval-iters 0")


def check_data_paths(c: PretrainConfig) -> None:
    """Before the model is built, on every process (cheap at any size: headers, pointers, the metadata
    and at most a bounded sample of each .bin): every prefix is whole, holds tokens in every split that
    is built, and was prepared with this run's tokenizer. Takes the EOD from the datasets' metadata
    when --eod-id is not given, so the run (and its checkpoints) use the one the data was made with."""
    prefixes, _ = parse_blend(c.data_path)
    weights = parse_split(c.split)
    _check_splits_needed(c, weights)
    split_matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(c.split))
    opened = []
    for prefix in prefixes:
        label = f"--data-path {prefix}"
        dataset = metadata.open_indexed(prefix, label)
        found = metadata.read_metadata(prefix, label)
        if found is not None:
            metadata.check_metadata_matches(found, dataset, label)
        opened.append((prefix, label, dataset, found))
    eods = {prefix: found["tokenizer"]["eod"] for prefix, _, _, found in opened if found is not None}
    if c.eod_id is None and len(set(eods.values())) > 1:
        raise ConfigError("--data-path: the datasets were prepared with different EOD ids ("
                          + ", ".join(f"{p}: {e}" for p, e in eods.items()) + "); prepare them with one --eod-id")
    for prefix, eod in eods.items():
        if c.eod_id is not None and eod != c.eod_id:
            raise ConfigError(f"--eod-id {c.eod_id}: --data-path {prefix} was prepared with EOD {eod}; drop --eod-id "
                              f"to use {eod}, or prepare the data with --eod-id {c.eod_id}")
    if eods:
        c.eod_id = next(iter(eods.values()))
    tokenizer = build_tokenizer_from_config(c)
    for prefix, label, dataset, found in opened:
        documents = len(dataset.document_indices) - 1
        metadata.check_token_ids(dataset, found, tokenizer, label)
        # megatron cuts each split by document index; an empty split would loop forever in GPTDataset.
        for name, bounds in zip(SPLIT_NAMES, split_matrix):
            if bounds is None:  # a 0-weight split is not built
                continue
            first, last = (int(round(b * documents)) for b in bounds)
            if metadata.tokens_in_documents(dataset, first, last) == 0:
                raise ConfigError(
                    f"--split {c.split}: the {name} split of {label} gets documents [{first}, {last}) of "
                    f"{documents}, which hold no tokens; give that split 0 weight (e.g. --split 98,2,0) or more data"
                )
    del opened, dataset  # megatron's readers hold memory maps of the files


def build_datasets(c: PretrainConfig, tokenizer):
    """(train, valid, test) datasets sized for the whole run, like Megatron-LM."""
    evals = c.train_iters // c.eval_interval + 1
    sizes = [c.train_iters * c.global_batch_size, evals * c.eval_iters * c.global_batch_size,
             c.eval_iters * c.global_batch_size]
    config = GPTDatasetConfig(
        random_seed=c.seed,
        sequence_length=c.seq_length,
        blend=None if c.mock_data else get_blend_from_list(c.data_path),  # checked by parse_blend
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


class TokenIdError(ConfigError):
    """A batch holds an id outside the vocabulary: seen by one rank, mid-run, so that rank reports it."""


def checked_batches(batches, vocab_size: int, source: str):
    """The batches, each checked (on the CPU, before it reaches the model) to hold only ids below
    ``vocab_size``: data the start-up checks could only sample fails here, as one line, instead of an
    IndexError on the CPU or a device-side assert on a GPU."""
    for batch in batches:
        for key in ("tokens", "labels"):
            ids = batch[key]
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= vocab_size:
                raise TokenIdError(f"{source}: a batch holds token id {high if high >= vocab_size else low}, outside the "
                                   f"tokenizer's vocabulary of {vocab_size}; the data was prepared with another "
                                   "tokenizer: prepare it with this one (tools/preprocess_data.py)")
        yield batch


def data_iterators(dataset, c: PretrainConfig, consumed_samples: int, num_chunks: int) -> Optional[list]:
    """One iterator per virtual-pipeline chunk over the same micro-batch sequence."""
    if dataset is None:
        return None
    vocab_size = dataset.config.tokenizer.vocab_size
    source = "--mock-data" if c.mock_data else f"--data-path {' '.join(c.data_path)}"
    iterators = []
    for _ in range(num_chunks):
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=MicroBatchSampler(len(dataset), consumed_samples, c.micro_batch_size),
            num_workers=c.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=c.num_workers > 0,
        )
        iterators.append(checked_batches(loader, vocab_size, source))
    return iterators
