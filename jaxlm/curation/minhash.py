"""Fuzzy deduplication: MinHash signatures, LSH banding, Jaccard check, union-find clusters.

Pipeline for a corpus of documents (Broder 1997; Leskovec, Rajaraman & Ullman, "Mining of
Massive Datasets", ch. 3):

1. Normalize: lowercase, Unicode NFD with combining marks removed (e -> e, n~ -> n), every run
   of punctuation, symbols and whitespace folded into one space.
2. Shingles: the set of word n-grams, each hashed to 64 bits, all in vectorized uint64
   arithmetic that wraps mod 2^64: a word's hash is a polynomial hash of its UTF-8 bytes, an
   n-gram's a sum of its words' hashes times per-position odd constants, each passed through
   the splitmix64 finalizer. A document shorter than n words is one shingle.
3. MinHash: k functions h_i(x) = (a_i x + b_i) mod p with p = 2^61 - 1 (a Mersenne prime), a_i
   in [1, p), b_i in [0, p), x = the top 32 bits of a shingle hash. The product a_i x reaches
   2^93, so it is computed in pieces that fit uint64 (a = a_hi 2^32 + a_lo, and 2^61 = 1 mod p:
   see `universal_hash`). Signature = the minimum of each h_i over the shingles; the fraction of
   equal entries of two signatures estimates their Jaccard similarity with standard error
   sqrt(J(1 - J) / k).
4. LSH: the k values are cut into b bands of r = k / b rows; two documents are candidates when
   all r rows of at least one band agree, with probability 1 - (1 - s^r)^b at similarity s (the
   S-curve, steepest near s = (1/b)^(1/r)).
5. Candidates are checked by their true Jaccard similarity of shingle sets (of the 64-bit
   shingle hashes: exact up to a hash collision); pairs at or above the threshold are joined
   by union-find.
6. One document per cluster is kept: the first in input order (the lowest index). A documented,
   deterministic choice; "longest" or "best quality" are alternatives a caller can build from
   `duplicate_clusters`.

NOTE: a bucket holding m documents gives m(m - 1)/2 candidate pairs; past `max_bucket_pairs`
members, a bucket gives only the pairs with its first member (a star), to bound the work on
heavily duplicated data; clusters still form through union-find.
"""

from __future__ import annotations

import dataclasses
import os
import string
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import regex

MERSENNE_PRIME = np.uint64((1 << 61) - 1)
_LOW_32 = np.uint64(0xFFFFFFFF)
_LOW_29 = np.uint64((1 << 29) - 1)
_SHIFT_61, _SHIFT_32, _SHIFT_29 = np.uint64(61), np.uint64(32), np.uint64(29)
_CHUNK_SHINGLES = 1024  # [k, 1024] uint64 scratch arrays stay in the L2 cache
_COMBINING_MARKS = regex.compile(r"\p{Mn}+")
_SEPARATORS = regex.compile(r"[\p{P}\p{S}\s]+")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_ASCII_SEPARATORS = str.maketrans({character: " " for character in string.punctuation})
_POLYNOMIAL_BASE = np.uint64(0x100000001B3)  # odd, so invertible mod 2^64
_POLYNOMIAL_INVERSE = np.uint64(pow(int(_POLYNOMIAL_BASE), -1, 1 << 64))
_POSITION_MULTIPLIERS = [np.uint64((2 * position + 1) * 0x9E3779B97F4A7C15 % (1 << 64) | 1) for position in range(16)]


@dataclasses.dataclass(frozen=True)
class MinHashConfig:
    num_hashes: int = 112
    num_bands: int = 14
    ngrams: int = 5
    jaccard_threshold: float = 0.8
    seed: int = 0
    max_bucket_pairs: int = 64

    def __post_init__(self):
        if self.num_hashes % self.num_bands:
            raise ValueError(f"num_hashes ({self.num_hashes}) must be a multiple of num_bands ({self.num_bands})")
        if self.ngrams < 1 or not 0.0 < self.jaccard_threshold <= 1.0:
            raise ValueError(f"need ngrams >= 1 and 0 < jaccard_threshold <= 1, got {self.ngrams}, {self.jaccard_threshold}")

    @property
    def rows_per_band(self) -> int:
        return self.num_hashes // self.num_bands


def normalize_text(text: str) -> str:
    """Lowercase, NFD without combining marks, punctuation and whitespace folded to one space."""
    text = text.lower()
    if text.isascii():  # fast path: most web text; same result as the general one
        return " ".join(text.translate(_ASCII_SEPARATORS).split())
    text = _COMBINING_MARKS.sub("", unicodedata.normalize("NFD", text))
    return _SEPARATORS.sub(" ", text).strip()


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a bijection of uint64 that spreads every input bit."""
    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def word_hashes(normalized: str) -> np.ndarray:
    """uint64 hash of each space-separated word, vectorized over the UTF-8 bytes.

    A word's hash is the polynomial sum(byte_j R^j) mod 2^64 over its bytes, from prefix sums
    (divided by R^start through R's inverse mod 2^64), then mixed.
    """
    data = np.frombuffer(normalized.encode("utf-8"), np.uint8)
    in_word = np.concatenate([[False], data > 32, [False]])
    edges = np.flatnonzero(in_word[1:] != in_word[:-1])
    starts, ends = edges[0::2], edges[1::2]
    if starts.size == 0:
        return np.zeros(0, np.uint64)
    powers = np.full(data.size, _POLYNOMIAL_BASE, np.uint64)
    powers[0] = 1
    powers = np.cumprod(powers)  # R^j, wrapping mod 2^64
    inverse_powers = np.full(data.size, _POLYNOMIAL_INVERSE, np.uint64)
    inverse_powers[0] = 1
    inverse_powers = np.cumprod(inverse_powers)
    prefix = np.concatenate([[np.uint64(0)], np.cumsum(data * powers, dtype=np.uint64)])
    return _mix64((prefix[ends] - prefix[starts]) * inverse_powers[starts])


def shingle_hashes(text: str, ngrams: int) -> np.ndarray:
    """Sorted unique uint64 hashes of the word n-grams of the normalized text."""
    words = word_hashes(normalize_text(text))
    if words.size == 0:
        return words
    span = min(ngrams, words.size)
    count = words.size - span + 1
    combined = np.zeros(count, np.uint64)
    for position in range(span):  # distinct odd multipliers per position: "a b" != "b a"
        combined += words[position:position + count] * _POSITION_MULTIPLIERS[position % len(_POSITION_MULTIPLIERS)]
    return np.unique(_mix64(combined))


def _reduce_mersenne(values: np.ndarray) -> np.ndarray:
    """A value congruent to `values` mod 2^61 - 1, below 2^61 + 7 (no overflow: values < 2^64)."""
    return (values & MERSENNE_PRIME) + (values >> _SHIFT_61)


def universal_hash(x: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(a x + b) mod (2^61 - 1) exactly, for x [1, n] < 2^32 and a, b [k, 1] < 2^61 - 1: [k, n].

    With a = a_hi 2^32 + a_lo: a_lo x < 2^64 is reduced with 2^61 = 1 (mod p); a_hi x < 2^61,
    and (a_hi x) 2^32 = 2^61 q + 2^32 r = q + 2^32 r (mod p) for a_hi x = 2^29 q + r. Every
    intermediate stays below 2^64. Written in place over two scratch arrays (this is the hot loop).
    """
    shape = np.broadcast_shapes(x.shape, a.shape)
    total, scratch = np.empty(shape, np.uint64), np.empty(shape, np.uint64)
    np.multiply(a & _LOW_32, x, out=total)  # low part; then reduce mod p
    np.right_shift(total, _SHIFT_61, out=scratch)
    total &= MERSENNE_PRIME
    total += scratch
    high = np.multiply(a >> _SHIFT_32, x, out=scratch)
    total += high >> _SHIFT_29  # q
    high &= _LOW_29
    high <<= _SHIFT_32  # 2^32 r
    total += high
    total += b  # below 3 * 2^61 + 2^32 < 2^64
    np.right_shift(total, _SHIFT_61, out=scratch)
    total &= MERSENNE_PRIME
    total += scratch  # now below p + 3
    np.greater_equal(total, MERSENNE_PRIME, out=scratch, casting="unsafe")
    scratch *= MERSENNE_PRIME
    total -= scratch
    return total


def hash_parameters(config: MinHashConfig) -> tuple[np.ndarray, np.ndarray]:
    """The k pairs (a_i, b_i), as uint64 columns [k, 1], drawn from `config.seed`."""
    rng = np.random.default_rng(config.seed)
    prime = int(MERSENNE_PRIME)
    a = rng.integers(1, prime, size=config.num_hashes, dtype=np.uint64)
    b = rng.integers(0, prime, size=config.num_hashes, dtype=np.uint64)
    return a[:, None], b[:, None]


def minhash_signatures(shingle_sets: Sequence[np.ndarray], config: MinHashConfig) -> np.ndarray:
    """[N, k] uint64 signatures; an empty set's row is all p (it matches nothing real).

    Small documents are batched, so that one pass of vectorized arithmetic covers many of them
    (`np.minimum.reduceat` takes each one's minimum); large ones are cut in chunks.
    """
    a, b = hash_parameters(config)
    signatures = np.full((len(shingle_sets), config.num_hashes), MERSENNE_PRIME, np.uint64)
    batch: list[int] = []
    batch_size = 0
    for index, shingles in enumerate(shingle_sets):
        if shingles.size > _CHUNK_SHINGLES:
            for start in range(0, shingles.size, _CHUNK_SHINGLES):
                chunk = universal_hash(shingles[None, start:start + _CHUNK_SHINGLES] >> _SHIFT_32, a, b)
                signatures[index] = np.minimum(signatures[index], chunk.min(axis=1))
        elif shingles.size:
            batch.append(index)
            batch_size += shingles.size
        if batch_size >= _CHUNK_SHINGLES or (batch and index == len(shingle_sets) - 1):
            _batch_signatures(shingle_sets, batch, a, b, signatures)
            batch, batch_size = [], 0
    return signatures


def _batch_signatures(shingle_sets, batch: list[int], a, b, signatures: np.ndarray) -> None:
    sizes = np.array([shingle_sets[index].size for index in batch])
    x = np.concatenate([shingle_sets[index] for index in batch]) >> _SHIFT_32
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    signatures[batch] = np.minimum.reduceat(universal_hash(x[None, :], a, b), starts, axis=1).T


def estimate_jaccard(signature_a: np.ndarray, signature_b: np.ndarray) -> float:
    return float(np.mean(signature_a == signature_b))


def jaccard(set_a: np.ndarray, set_b: np.ndarray) -> float:
    """|A & B| / |A | B| of two sorted unique hash arrays (0 for two empty sets)."""
    common = np.intersect1d(set_a, set_b, assume_unique=True).size
    union = set_a.size + set_b.size - common
    return common / union if union else 0.0


def band_keys(signatures: np.ndarray, num_bands: int) -> np.ndarray:
    """[N, b] uint64: one hash per band of each signature (equal bands give equal keys)."""
    rows = signatures.shape[1] // num_bands
    bands = signatures.reshape(signatures.shape[0], num_bands, rows)
    keys = np.zeros(bands.shape[:2], np.uint64)
    with np.errstate(over="ignore"):
        for row in range(rows):
            keys = _mix64(keys * _GOLDEN + bands[:, :, row])
    return keys


def candidate_pairs(signatures: np.ndarray, config: MinHashConfig, valid: np.ndarray | None = None) -> set[tuple[int, int]]:
    """Pairs (i < j) of documents that share a bucket in at least one band."""
    keys = band_keys(signatures, config.num_bands)
    indices = np.flatnonzero(np.ones(len(signatures), bool) if valid is None else valid)
    pairs: set[tuple[int, int]] = set()
    for band in range(config.num_bands):
        band_values = keys[indices, band]
        order = np.argsort(band_values, kind="stable")
        sorted_values = band_values[order]
        boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
        for group in np.split(indices[order], boundaries):
            if group.size > 1:
                pairs.update(_bucket_pairs(np.sort(group), config.max_bucket_pairs))
    return pairs


def _bucket_pairs(members: np.ndarray, max_members: int) -> Iterable[tuple[int, int]]:
    members = members.tolist()
    if len(members) > max_members:
        return ((members[0], other) for other in members[1:])
    return ((first, second) for position, first in enumerate(members) for second in members[position + 1:])


def union_find_clusters(num_items: int, pairs: Iterable[tuple[int, int]]) -> np.ndarray:
    """[N] cluster ids: each item's root, the smallest index of its connected component."""
    parent = list(range(num_items))

    def find(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]  # path halving
            item = parent[item]
        return item

    for first, second in pairs:
        root_first, root_second = find(first), find(second)
        if root_first != root_second:
            parent[max(root_first, root_second)] = min(root_first, root_second)
    return np.array([find(item) for item in range(num_items)], dtype=np.int64)


def verified_pairs(pairs: Iterable[tuple[int, int]], shingle_sets, threshold: float) -> list[tuple[int, int]]:
    """The candidate pairs whose true Jaccard similarity is >= threshold."""
    return [(i, j) for i, j in pairs if jaccard(shingle_sets[i], shingle_sets[j]) >= threshold]


def duplicate_clusters(texts: Sequence[str], config: MinHashConfig) -> np.ndarray:
    """[N] cluster ids (the lowest index of each cluster) of near-duplicate texts, in memory."""
    shingle_sets = [shingle_hashes(text, config.ngrams) for text in texts]
    signatures = minhash_signatures(shingle_sets, config)
    valid = np.array([shingles.size > 0 for shingles in shingle_sets], dtype=bool)
    pairs = verified_pairs(candidate_pairs(signatures, config, valid), shingle_sets, config.jaccard_threshold)
    return union_find_clusters(len(texts), pairs)


def minhash_dedup(input_files: Sequence[str], num_hashes: int, num_bands: int, ngrams: int,
                  jaccard_threshold: float, output_dir: str, seed: int = 0) -> list[str]:
    """Each file is a document: copy to `output_dir` (same names) one file per near-duplicate
    cluster, the first in input order. Returns the paths written."""
    config = MinHashConfig(num_hashes, num_bands, ngrams, jaccard_threshold, seed)
    texts = []
    for path in input_files:
        with open(path, encoding="utf-8") as file:
            texts.append(file.read())
    clusters = duplicate_clusters(texts, config)
    os.makedirs(output_dir, exist_ok=True)
    written = []
    for index, (path, text) in enumerate(zip(input_files, texts)):
        if clusters[index] == index:
            out = os.path.join(output_dir, os.path.basename(path))
            with open(out, "w", encoding="utf-8") as file:
                file.write(text)
            written.append(out)
    return written
