"""The training data pipeline: token shards -> deterministic batches, with a held-out split.

    train_shards, eval_regions = ...  see `TrainData`
    data = TrainData(shards, cfg.train)
    iterator = data.train_iterator(process_index, process_count)   # grain DatasetIterator
    batch = next(iterator)          # dict of numpy [B / process_count, seq_len] (loss.py layout)
    state = iterator.get_state()    # JSON-ready; iterator.set_state(state) resumes exactly

Sampling: record i of the stream is a window of seq_len + 1 tokens whose shard and start are drawn
from `np.random.default_rng([seed, i])`, uniformly over every window start in the training
regions. Records are a pure function of (seed, i), so the stream needs no shuffle buffer, its
iterator state is one integer, and resuming reproduces it exactly. Batch k holds records
[k * B, (k + 1) * B); process p takes records p, p + P, ... of them (grain slicing), so the global
batch does not depend on the number of processes.

Layouts (`train.layout`): "windows" feeds the model plain causal windows that cross document
boundaries (GPT-2 style); "documents" adds segment ids and positions restarting per document,
and masks the targets that would predict across a boundary.

Held-out split: the last `eval_fraction` of each shard's tokens (at least one window, and only in
shards holding two windows or more) is never sampled for training; evaluation uses a fixed set of
`eval_batches` batches drawn from it with the same sampler.

Preparing data (`prepare_data`): token-shard directories are used as they are; text files are
encoded into a cache directory (keyed by the files and the tokenizer) with `jaxlm.tokenize`; with
no data at all, the built-in default corpus is written, a tokenizer of the model's vocabulary
size is trained on it and cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from typing import Iterator, Optional, Sequence

import grain
import numpy as np

from jaxlm import data
from jaxlm.config import TrainConfig

NUM_RECORDS = 1 << 40  # the stream is practically endless; records are computed on demand
EVAL_SEED_OFFSET = 0x5EED


class DataError(ValueError):
    """Data that cannot feed the run (too small, wrong vocabulary, missing)."""


@dataclasses.dataclass(frozen=True)
class Region:
    """Tokens [start, stop) of one shard."""

    shard: int
    start: int
    stop: int


def split_regions(shards: data.TokenShards, window: int, eval_fraction: float) -> tuple[list[Region], list[Region]]:
    """Training and held-out regions: the tail `eval_fraction` of each shard is held out."""
    train, held_out = [], []
    for index, tokens in enumerate(shards.tokens):
        size = int(tokens.size)
        num_eval = int(size * eval_fraction) if eval_fraction > 0 else 0
        if 0 < num_eval < window:
            num_eval = window if size >= 2 * window else 0
        if size - num_eval >= window:
            train.append(Region(index, 0, size - num_eval))
        if num_eval:
            held_out.append(Region(index, size - num_eval, size))
    return train, held_out


class WindowSampler:
    """Random-access source: record i -> (tokens, segment_ids) of a window of `length` tokens."""

    def __init__(self, shards: data.TokenShards, regions: Sequence[Region], length: int, seed: int,
                 num_records: int = NUM_RECORDS):
        self.shards, self.regions, self.length = shards, list(regions), length
        self.seed, self.num_records = seed, num_records
        starts = np.array([region.stop - region.start - length + 1 for region in self.regions])
        self.cumulative_starts = np.cumsum(starts)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(index)])
        flat = int(rng.integers(self.cumulative_starts[-1]))
        which = int(np.searchsorted(self.cumulative_starts, flat, side="right"))
        region = self.regions[which]
        offset = flat - (self.cumulative_starts[which - 1] if which else 0)
        tokens, segment_ids = self.shards.window(region.shard, region.start + int(offset), self.length)
        return tokens.astype(np.int32), segment_ids


def document_positions(segment_ids: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 where the segment id changes, along the last dim."""
    index = np.broadcast_to(np.arange(segment_ids.shape[-1]), segment_ids.shape)
    boundary = np.ones(segment_ids.shape, bool)
    boundary[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    starts = np.maximum.accumulate(np.where(boundary, index, 0), axis=-1)
    return (index - starts).astype(np.int32)


def to_model_batch(windows: tuple[np.ndarray, np.ndarray], layout: str) -> dict:
    """Stacked windows [B, T + 1] (tokens, segment ids) -> the loss.py batch dict of [B, T]."""
    tokens, segment_ids = windows
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    if layout == "windows":
        batch["loss_mask"] = np.ones(batch["inputs"].shape, np.float32)
        return batch
    inputs_segments = segment_ids[:, :-1]
    batch["loss_mask"] = (inputs_segments == segment_ids[:, 1:]).astype(np.float32)
    batch["segment_ids"] = inputs_segments.astype(np.int32)
    batch["positions"] = document_positions(inputs_segments)
    return batch


class TrainData:
    """Shards split into training and held-out regions, and the iterators over them."""

    def __init__(self, shards: data.TokenShards, train: TrainConfig, vocab_size: Optional[int] = None):
        self.shards, self.train = shards, train
        window = train.seq_len + 1
        if vocab_size is not None and shards.manifest["vocab_size"] > vocab_size:
            raise DataError(f"the token shards use a vocabulary of {shards.manifest['vocab_size']} ids but "
                            f"model.vocab_size={vocab_size}; use a matching tokenizer or a larger model.vocab_size")
        self.train_regions, self.eval_regions = split_regions(shards, window, train.eval_fraction)
        train_tokens = sum(region.stop - region.start for region in self.train_regions)
        if train_tokens < train.batch_size * window:
            raise DataError(
                f"the training data ({train_tokens} tokens outside the held-out split, of {shards.num_tokens}) is "
                f"smaller than one batch of train.batch_size={train.batch_size} windows of train.seq_len+1="
                f"{window} tokens; give more data or lower train.batch_size / train.seq_len")

    def _dataset(self, regions: list[Region], seed: int, process_index: int, process_count: int,
                 num_records: int = NUM_RECORDS) -> grain.MapDataset:
        if self.train.batch_size % process_count:
            raise DataError(f"train.batch_size={self.train.batch_size} must be divisible by the "
                            f"{process_count} processes")
        sampler = WindowSampler(self.shards, regions, self.train.seq_len + 1, seed, num_records)
        layout = self.train.layout
        return (grain.MapDataset.source(sampler)[process_index::process_count]
                .batch(self.train.batch_size // process_count, drop_remainder=True)
                .map(lambda windows: to_model_batch(windows, layout)))

    def train_iterator(self, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
        dataset = self._dataset(self.train_regions, self.train.seed, process_index, process_count)
        return iter(dataset.to_iter_dataset())

    def eval_batches(self, process_index: int = 0, process_count: int = 1) -> list[dict]:
        """The fixed held-out batches (empty when there is no held-out split)."""
        if not self.eval_regions or not self.train.eval_batches:
            return []
        num_records = self.train.eval_batches * self.train.batch_size
        dataset = self._dataset(self.eval_regions, self.train.seed + EVAL_SEED_OFFSET, process_index,
                                process_count, num_records)
        return [dataset[i] for i in range(len(dataset))]


def combine_shards(directories: Sequence[str]) -> data.TokenShards:
    """Several token-shard directories read as one."""
    opened = [data.open_shards(directory) for directory in directories]
    if len(opened) == 1:
        return opened[0]
    manifest = dict(opened[0].manifest)
    manifest["vocab_size"] = max(shards.manifest["vocab_size"] for shards in opened)
    manifest["num_tokens"] = sum(shards.manifest["num_tokens"] for shards in opened)
    return data.TokenShards(manifest=manifest, tokens=[t for s in opened for t in s.tokens],
                            doc_starts=[d for s in opened for d in s.doc_starts])


# ---------------------------------------------------------------------------------------------
# Preparing data: default corpus, tokenizer training and text encoding, cached


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _file_key(path: str) -> list:
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def _train_tokenizer(text_files: list[str], vocab_size: int, directory: str) -> str:
    from jaxlm.tokenizer import Tokenizer, train_bpe

    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        print(f"training a {vocab_size}-token BPE tokenizer on {len(text_files)} file(s)", file=sys.stderr)
        special = [data.DEFAULT_SEPARATOR]
        vocab, merges = train_bpe(text_files, vocab_size, special, num_workers=1, progress=False)
        Tokenizer(vocab, merges, special).save(directory)
    return directory


def _encode(text_files: list[str], tokenizer_dir: str, out: str) -> str:
    from jaxlm import tokenize

    if not os.path.isfile(os.path.join(out, data.MANIFEST_FILE)):
        small = sum(os.path.getsize(path) for path in text_files) < 16 << 20
        arguments = ["encode", "--tokenizer", tokenizer_dir, "--input", *text_files, "--out", out,
                     "--no-progress"] + (["--num-workers", "1"] if small else [])
        if tokenize.main(arguments) != 0:
            raise DataError(f"encoding {text_files} failed (see the message above)")
    return out


def prepare_data(paths: Sequence[str], tokenizer_dir: Optional[str], cache_dir: str, vocab_size: int,
                 default_corpus_bytes: int) -> tuple[list[str], Optional[str]]:
    """(token-shard directories, tokenizer directory or None) for `--data PATHS`.

    A path holding manifest.json is a shard directory; any other path is a UTF-8 text file (or a
    directory whose files are all read as text). No paths: the default corpus.
    """
    shard_dirs, text_files = [], []
    for path in paths:
        if os.path.isfile(os.path.join(path, data.MANIFEST_FILE)):
            shard_dirs.append(path)
        elif os.path.isdir(path):
            text_files += sorted(os.path.join(path, name) for name in os.listdir(path)
                                 if os.path.isfile(os.path.join(path, name)))
        elif os.path.isfile(path):
            text_files.append(path)
        else:
            raise DataError(f"--data {path!r} is neither a token-shard directory nor a text file")
    if not paths:
        corpus_dir = os.path.join(cache_dir, f"default-corpus-{_digest(sys.version, default_corpus_bytes)}")
        corpus = os.path.join(corpus_dir, "corpus.txt")
        if not os.path.isfile(corpus):
            os.makedirs(corpus_dir, exist_ok=True)
            with open(corpus + ".tmp", "w", encoding="utf-8") as file:
                file.write(data.default_corpus(max_bytes=default_corpus_bytes))
            os.replace(corpus + ".tmp", corpus)
        text_files = [corpus]
    if text_files:
        if tokenizer_dir is None:
            key = _digest([_file_key(path) for path in text_files], vocab_size)
            tokenizer_dir = _train_tokenizer(text_files, vocab_size, os.path.join(cache_dir, f"tokenizer-{key}"))
        tokenizer_key = _file_key(os.path.join(tokenizer_dir, "tokenizer.json"))
        key = _digest([_file_key(path) for path in text_files], tokenizer_key)
        shard_dirs.append(_encode(text_files, tokenizer_dir, os.path.join(cache_dir, f"shards-{key}")))
    return shard_dirs, tokenizer_dir


def iterate(iterator: Iterator[dict]) -> Iterator[dict]:
    """`next` that turns the end of the stream into a clear error (it is 2^40 records long)."""
    for batch in iterator:
        yield batch
    raise DataError("the data stream ended")


def default_cache_dir(environ: dict) -> str:
    """Where tokenizers and encoded text are cached: $XDG_CACHE_HOME/jaxlm or ~/.cache/jaxlm."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxlm")
