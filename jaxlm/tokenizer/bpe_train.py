"""Byte-level BPE training (Sennrich et al. 2016, with GPT-2's byte-level variant).

Conventions of the returned `(vocab, merges)`:

- ids `0 .. k-1` are the special tokens in the order given, ids `k .. k+255` the byte values
  `0 .. 255` in byte order, then one id per merge in creation order;
- the text is split on special tokens, which never take part in merges, then pre-tokenized with
  the GPT-2 regex; merges never cross a pre-token;
- each step merges the most frequent adjacent pair; among equally frequent pairs the
  lexicographically greater pair `(a, b)` of byte strings wins (the GPT-2 / CS336 rule);
- training stops early, with a smaller vocabulary, when no pair occurs any more. A merge whose
  bytes equal an existing token still gets its own id (this keeps "one id per merge").

Speed and memory: the file is read in chunks cut at safe positions (see `pretokenize`), each
chunk is pre-tokenized and counted in a worker process, and only the counts of distinct
pre-tokens are kept, so memory is bounded by the number of distinct pre-tokens, not the file
size. The merge loop keeps pair counts and an index pair -> words; a merge only revisits the
words that contain the merged pair. The best pair comes from a lazy max-heap: an entry holds a
count at least as large as the pair's current count, and a stale entry is re-pushed with the
current count when it reaches the top.
"""

from __future__ import annotations

import collections
import gc
import heapq
import multiprocessing
import os
from collections.abc import Iterable, Sequence

from tqdm import tqdm

from jaxlm.tokenizer import pretokenize

DEFAULT_CHUNK_BYTES = 2 << 20

Pair = tuple[int, int]


def train_bpe(
    input_path: str | os.PathLike | Sequence[str | os.PathLike],
    vocab_size: int,
    special_tokens: Iterable[str] = (),
    *,
    num_workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Trains a byte-level BPE tokenizer on one UTF-8 file (or several) and returns (vocab, merges).

    Args:
      input_path: a path or a list of paths; pre-tokens never cross files.
      vocab_size: total vocabulary size, special tokens and the 256 bytes included.
      special_tokens: strings kept whole; they take ids 0..k-1 and are never merged.
      num_workers: processes for pre-tokenization; None uses the CPU count, 1 stays in-process.
        Processes start with "spawn" (safe next to JAX's threads, unlike "fork"), so a script
        calling this must guard its entry point with `if __name__ == "__main__":`.
      chunk_bytes: size of the chunks read and pre-tokenized at a time.
      progress: show tqdm progress bars on stderr; None shows them only on a terminal.
    """
    special_tokens = pretokenize.validate_special_tokens(special_tokens)
    paths = _validate_paths(input_path)
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least {minimum} "
            f"(256 byte values + {len(special_tokens)} special tokens); pass a larger vocab_size"
        )
    word_counts = count_words(paths, special_tokens, num_workers=num_workers,
                              chunk_bytes=chunk_bytes, progress=progress)
    vocab: dict[int, bytes] = {index: token.encode("utf-8") for index, token in enumerate(special_tokens)}
    byte_offset = len(special_tokens)
    vocab.update({byte_offset + value: bytes([value]) for value in range(256)})
    # NOTE: the merge loop allocates millions of small lists and tuples, none cyclic; the cyclic
    # garbage collector would rescan the whole heap again and again (~40% of the time).
    collector_was_enabled = gc.isenabled()
    gc.disable()
    try:
        merges = _merge_loop(word_counts, vocab, vocab_size - len(vocab), byte_offset, progress)
    finally:
        if collector_was_enabled:
            gc.enable()
    return vocab, merges


def _validate_paths(input_path) -> list[str]:
    if isinstance(input_path, (str, os.PathLike)):
        input_path = [input_path]
    paths = [os.fspath(path) for path in input_path]
    if not paths:
        raise ValueError("no input files given; pass at least one UTF-8 text file")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"training input {path!r} does not exist or is not a file")
    if all(os.path.getsize(path) == 0 for path in paths):
        raise ValueError(f"training input is empty ({', '.join(paths)}): there is no text to learn merges from")
    return paths


def count_words(
    paths: Sequence[str],
    special_tokens: Sequence[str],
    *,
    num_workers: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool | None = None,
) -> collections.Counter:
    """Counts the distinct pre-tokens (as UTF-8 bytes) of the files, in parallel over chunks."""
    split_tokens = [token.encode("utf-8") for token in special_tokens]
    chunks = []
    for path in paths:
        boundaries = pretokenize.find_chunk_boundaries(path, chunk_bytes, split_tokens)
        chunks += [(path, start, end, tuple(special_tokens)) for start, end in zip(boundaries, boundaries[1:])]
    total_bytes = sum(end - start for _, start, end, _ in chunks)
    num_workers = min(num_workers or os.cpu_count() or 1, len(chunks))
    counts: collections.Counter = collections.Counter()
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="pre-tokenize", disable=_disabled(progress)) as bar:
        if num_workers <= 1:
            for chunk in chunks:
                counts.update(_count_chunk(chunk))
                bar.update(chunk[2] - chunk[1])
        else:
            context = multiprocessing.get_context("spawn")
            with context.Pool(num_workers) as pool:
                for chunk, chunk_counts in zip(chunks, pool.imap(_count_chunk, chunks)):
                    counts.update(chunk_counts)
                    bar.update(chunk[2] - chunk[1])
    return counts


def _count_chunk(chunk: tuple[str, int, int, tuple[str, ...]]) -> collections.Counter:
    path, start, end, special_tokens = chunk
    text = pretokenize.read_text(path, start, end)
    return pretokenize.count_pretokens(text, pretokenize.special_token_regex(special_tokens))


def _disabled(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _reverse_order_key(token: bytes) -> tuple[int, ...]:
    """A key whose ascending order is the descending lexicographic order of byte strings.

    The trailing 1 is larger than every negated byte, so a proper prefix sorts after its
    extensions, as `b"ab" < b"abc"` requires once reversed.
    """
    return tuple(-value for value in token) + (1,)


def _merge_loop(
    word_counts: collections.Counter,
    vocab: dict[int, bytes],
    num_merges: int,
    byte_offset: int,
    progress: bool | None,
) -> list[tuple[bytes, bytes]]:
    """Runs `num_merges` merges in place on `vocab` and returns the merges in creation order."""
    words = [[byte_offset + value for value in word] for word in word_counts]
    counts = list(word_counts.values())
    pair_counts: dict[Pair, int] = {}
    pair_words: dict[Pair, set[int]] = collections.defaultdict(set)
    for word_index, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + count
            pair_words[pair].add(word_index)
    order_keys = {token_id: _reverse_order_key(token) for token_id, token in vocab.items()}
    heap = [(-count, order_keys[a], order_keys[b], a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    for _ in tqdm(range(num_merges), desc="merge", unit="merge", disable=_disabled(progress)):
        best = _pop_best_pair(heap, pair_counts, order_keys)
        if best is None:
            break
        new_id = len(vocab)
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        order_keys[new_id] = _reverse_order_key(vocab[new_id])
        merges.append((vocab[best[0]], vocab[best[1]]))
        _apply_merge(best, new_id, words, counts, pair_counts, pair_words, heap, order_keys)
    return merges


def _pop_best_pair(heap: list, pair_counts: dict[Pair, int], order_keys: dict) -> Pair | None:
    while heap:
        negative_count, _, _, a, b = heapq.heappop(heap)
        current = pair_counts.get((a, b), 0)
        if current == -negative_count:
            return a, b
        if current > 0:
            heapq.heappush(heap, (-current, order_keys[a], order_keys[b], a, b))
    return None


def _apply_merge(
    pair: Pair,
    new_id: int,
    words: list[list[int]],
    counts: list[int],
    pair_counts: dict[Pair, int],
    pair_words: dict[Pair, set[int]],
    heap: list,
    order_keys: dict,
) -> None:
    """Rewrites the words that contain `pair` and updates the pair statistics incrementally.

    The index pair -> words is lazy: a word stays listed under pairs it no longer has (it is
    skipped when visited), so only the new pairs, those with `new_id`, are added.
    """
    added: dict[Pair, int] = {}
    for word_index in pair_words.pop(pair):
        merged = _merge_word(words[word_index], pair, new_id, counts[word_index], pair_counts, pair_words, added)
        if merged is not None:
            words[word_index] = merged
            for new_pair in zip(merged, merged[1:]):
                if new_id in new_pair:
                    pair_words[new_pair].add(word_index)
    for new_pair, count in added.items():
        pair_counts[new_pair] = count
        a, b = new_pair
        heapq.heappush(heap, (-count, order_keys[a], order_keys[b], a, b))


def _merge_word(
    word: list[int],
    pair: Pair,
    new_id: int,
    count: int,
    pair_counts: dict[Pair, int],
    pair_words: dict[Pair, set[int]],
    added: dict[Pair, int],
) -> list[int] | None:
    """Merges `pair` left to right in `word`, updating only the pair counts next to each merge.

    Each occurrence removes its own pair and the pairs with its neighbours, and adds the pairs of
    `new_id` with the new neighbours; between two adjacent occurrences the old pair is removed
    once and the pair (new_id, new_id) added once. Returns None when `word` lacks the pair.
    """
    first, second = pair
    length = len(word)
    try:
        position = word.index(first, 0, length - 1)
    except ValueError:
        return None
    merged = word[:position]
    removed = []
    previous_merged = False
    while position < length:
        if word[position] == first and position + 1 < length and word[position + 1] == second:
            if previous_merged:
                added[(new_id, new_id)] = added.get((new_id, new_id), 0) + count
            elif merged:
                removed.append((merged[-1], first))
                added[(merged[-1], new_id)] = added.get((merged[-1], new_id), 0) + count
            removed.append(pair)
            if position + 2 < length:
                removed.append((second, word[position + 2]))
            merged.append(new_id)
            position += 2
            previous_merged = True
        else:
            if previous_merged:
                added[(new_id, word[position])] = added.get((new_id, word[position]), 0) + count
            merged.append(word[position])
            position += 1
            previous_merged = False
    if not removed:
        return None
    for old_pair in removed:
        remaining = pair_counts[old_pair] - count
        if remaining:
            pair_counts[old_pair] = remaining
        else:
            del pair_counts[old_pair]
            pair_words.pop(old_pair, None)
    return merged
