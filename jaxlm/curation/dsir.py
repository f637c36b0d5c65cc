"""DSIR: data selection by importance resampling with hashed n-gram features (Xie et al. 2023).

Goal: from a large raw corpus, pick k documents whose distribution resembles a small target
corpus. Both are modelled as bags of hashed n-grams (unigrams and bigrams of the normalized
words, hashed into `num_buckets` buckets):

    p(bucket) = (count(bucket) + alpha) / (total + alpha * num_buckets)      (per corpus)
    log w(doc) = sum over the doc's n-grams of  log p_target(bucket) - log p_raw(bucket)

and k documents are drawn without replacement with probability proportional to w, by the
Gumbel top-k trick: the k largest log w + Gumbel noise (Kool et al. 2019).

`hashed_ngrams(text)` is also the feature map of the fastText-style classifier (classifier.py).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np

from jaxlm.curation.minhash import normalize_text, word_hashes

_BIGRAM_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)


@dataclasses.dataclass(frozen=True)
class DsirConfig:
    num_buckets: int = 10_000
    ngrams: int = 2
    alpha: float = 1.0
    seed: int = 0


def hashed_ngrams(text: str, num_buckets: int, ngrams: int = 2) -> np.ndarray:
    """Bucket ids (int64) of the word 1..ngrams-grams of the normalized text, in order."""
    words = word_hashes(normalize_text(text))
    pieces = [words]
    combined = words
    for order in range(1, ngrams):
        combined = combined[:-1] * _BIGRAM_MULTIPLIER + words[order:]
        pieces.append(combined)
    return (np.concatenate(pieces) % np.uint64(num_buckets)).astype(np.int64)


def bucket_counts(texts: Iterable[str], config: DsirConfig) -> np.ndarray:
    """[num_buckets] float64 total n-gram counts of a corpus."""
    counts = np.zeros(config.num_buckets)
    for text in texts:
        counts += np.bincount(hashed_ngrams(text, config.num_buckets, config.ngrams), minlength=config.num_buckets)
    return counts


def log_probabilities(counts: np.ndarray, alpha: float) -> np.ndarray:
    """Additively smoothed log p(bucket)."""
    return np.log(counts + alpha) - np.log(counts.sum() + alpha * counts.size)


def importance_log_weights(texts: Sequence[str], target_log_probs: np.ndarray, raw_log_probs: np.ndarray,
                           config: DsirConfig) -> np.ndarray:
    """[N] log w of each raw document."""
    difference = target_log_probs - raw_log_probs
    return np.array([difference[hashed_ngrams(text, config.num_buckets, config.ngrams)].sum() for text in texts])


def dsir_select(raw_texts: Sequence[str], target_texts: Iterable[str], num_selected: int,
                config: DsirConfig = DsirConfig()) -> np.ndarray:
    """Indices of `num_selected` raw documents resampled toward the target distribution."""
    if not 0 <= num_selected <= len(raw_texts):
        raise ValueError(f"num_selected must be in [0, {len(raw_texts)}], got {num_selected}")
    target = log_probabilities(bucket_counts(target_texts, config), config.alpha)
    raw = log_probabilities(bucket_counts(raw_texts, config), config.alpha)
    log_weights = importance_log_weights(raw_texts, target, raw, config)
    gumbel = np.random.default_rng(config.seed).gumbel(size=len(raw_texts))
    return np.sort(np.argsort(-(log_weights + gumbel), kind="stable")[:num_selected])
