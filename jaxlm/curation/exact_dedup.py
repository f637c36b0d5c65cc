"""Exact deduplication of documents and of lines, in two passes with bounded memory.

Only 64-bit hashes are held in memory, never the text: pass 1 hashes every document (or line) of
every input file, pass 2 rewrites the files with the verdicts. Hashes are the first 8 bytes of
BLAKE2b of the UTF-8 text, so a false duplicate needs a 64-bit collision (about n^2 / 2^65 for n
items: 1e-3 for 200 million lines).

- Documents: the first occurrence in input order (file order, then position in the file) is
  kept, every later copy dropped.
- Lines: a line whose exact text occurs more than once anywhere in the corpus (in one document
  or across documents) is removed from every document, the first occurrence included: repeated
  lines are boilerplate (menus, footers, cookie notices). Documents are split on "\n"; the text
  that remains is joined with "\n" again.

File-level helpers treat each input file as one document (`line_dedup_files`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Sequence

import numpy as np


def hash64(texts: Iterable[str]) -> np.ndarray:
    """uint64 hashes of strings (BLAKE2b, 8 bytes, little-endian)."""
    digests = b"".join(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest() for text in texts)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def count_hashes(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique hashes, their counts)."""
    return np.unique(hashes, return_counts=True)


def merge_counts(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Add up (unique, counts) pairs of several files into one (unique, counts)."""
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    unique, inverse = np.unique(np.concatenate([part[0] for part in parts]), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate([part[1] for part in parts]), minlength=unique.size)
    return unique, counts.astype(np.int64)


def repeated(unique: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The sorted hashes that occur more than once."""
    return unique[counts > 1]


def line_hash_counts(texts: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 of line dedup for one file: (unique line hashes, counts) over its documents."""
    return count_hashes(hash64(line for text in texts for line in text.split("\n")))


def remove_repeated_lines(text: str, repeated_hashes: np.ndarray) -> str:
    """Pass 2 of line dedup: `text` without the lines whose hash is in `repeated_hashes`."""
    lines = text.split("\n")
    keep = ~np.isin(hash64(lines), repeated_hashes, assume_unique=False)
    return "\n".join(line for line, kept in zip(lines, keep) if kept)


def first_occurrences(hashes_per_file: Sequence[np.ndarray]) -> list[np.ndarray]:
    """For exact document dedup: per file, a boolean mask of the documents to keep."""
    sizes = [hashes.size for hashes in hashes_per_file]
    all_hashes = np.concatenate(hashes_per_file) if hashes_per_file else np.zeros(0, np.uint64)
    _, first = np.unique(all_hashes, return_index=True)
    keep = np.zeros(all_hashes.size, dtype=bool)
    keep[first] = True
    return np.split(keep, np.cumsum(sizes)[:-1]) if sizes else []


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def line_dedup_files(input_files: Sequence[str], output_directory: str) -> list[str]:
    """Each file is a document: write each to `output_directory` (same name) without the lines
    that occur more than once in all of them."""
    os.makedirs(output_directory, exist_ok=True)
    duplicates = repeated(*merge_counts([line_hash_counts([read_text(path)]) for path in input_files]))
    outputs = []
    for path in input_files:  # read again: only the hashes were kept
        out = os.path.join(output_directory, os.path.basename(path))
        with open(out, "w", encoding="utf-8") as file:
            file.write(remove_repeated_lines(read_text(path), duplicates))
        outputs.append(out)
    return outputs
