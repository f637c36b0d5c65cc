"""Exact and line dedup semantics; MinHash accuracy, LSH candidate rates, near-duplicate clusters."""

import numpy as np
import pytest

from jaxlm.curation import exact_dedup, minhash

MIT = """Permission is hereby granted, free of charge, to any person obtaining a copy of this software
and associated documentation files (the "Software"), to deal in the Software without restriction,
including without limitation the rights to use, copy, modify, merge, publish, distribute,
sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions: The above copyright notice and this
permission notice shall be included in all copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT
NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND
NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM,
DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT
OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE."""
BSD = """Redistribution and use in source and binary forms, with or without modification, are permitted
provided that the following conditions are met: Redistributions of source code must retain the
above copyright notice, this list of conditions and the following disclaimer. Redistributions in
binary form must reproduce the above copyright notice, this list of conditions and the following
disclaimer in the documentation and/or other materials provided with the distribution. Neither the
name of the copyright holder nor the names of its contributors may be used to endorse or promote
products derived from this software without specific prior written permission."""


def test_universal_hash_is_exact_modular_arithmetic():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**32, 300, dtype=np.uint64)
    x[:2] = [0, 2**32 - 1]
    prime = (1 << 61) - 1
    a = rng.integers(1, prime, 7, dtype=np.uint64)
    a[0] = prime - 1
    b = rng.integers(0, prime, 7, dtype=np.uint64)
    result = minhash.universal_hash(x[None, :], a[:, None], b[:, None])
    expected = [[(int(ai) * int(xi) + int(bi)) % prime for xi in x] for ai, bi in zip(a, b)]
    assert result.tolist() == expected


def test_normalization_folds_case_accents_punctuation_and_space():
    assert minhash.normalize_text("  H\u00e9llo,\tW\u00d6RLD!! It\u2019s  na\u00efve\u2014caf\u00e9. ") == "hello world it s naive cafe"
    assert minhash.normalize_text("Hello, World!! It's naive-cafe.") == "hello world it s naive cafe"
    first, second = minhash.shingle_hashes("A b c", 2), minhash.shingle_hashes("a, B; c!", 2)
    assert first.size == 2 and np.array_equal(first, second)
    assert minhash.shingle_hashes("b a", 2)[0] != minhash.shingle_hashes("a b", 2)[0]


def _sets_with_jaccard(rng, similarity, size=200):
    """Two random sets of `size` 64-bit values sharing enough of them for a Jaccard near `similarity`."""
    common = int(round(2 * size * similarity / (1 + similarity)))
    values = rng.integers(0, 2**63, 2 * size, dtype=np.uint64)
    first = np.unique(values[:size])
    second = np.unique(np.concatenate([values[:common], values[size:2 * size - common]]))
    return first, second


def test_minhash_estimate_is_within_three_over_sqrt_k_of_the_true_jaccard():
    rng = np.random.default_rng(1)
    config = minhash.MinHashConfig(num_hashes=128, num_bands=16)
    pairs = [_sets_with_jaccard(rng, rng.uniform(0, 1)) for _ in range(60)]
    signatures = minhash.minhash_signatures([s for pair in pairs for s in pair], config)
    errors = [abs(minhash.estimate_jaccard(signatures[2 * i], signatures[2 * i + 1]) - minhash.jaccard(*pair))
              for i, pair in enumerate(pairs)]
    assert max(errors) <= 3 / np.sqrt(128)
    assert np.mean(errors) < 0.06  # about sqrt(2 / pi) * 0.5 / sqrt(128) = 0.035 at worst


@pytest.mark.parametrize("num_bands, rows", [(20, 5), (10, 10)])
def test_lsh_candidate_rate_follows_the_s_curve(num_bands, rows):
    rng = np.random.default_rng(num_bands)
    config = minhash.MinHashConfig(num_hashes=num_bands * rows, num_bands=num_bands)
    for similarity in (0.3, 0.5, 0.6, 0.7, 0.9):
        pairs = [_sets_with_jaccard(rng, similarity, size=100) for _ in range(150)]
        true = np.mean([minhash.jaccard(*pair) for pair in pairs])
        signatures = minhash.minhash_signatures([s for pair in pairs for s in pair], config)
        keys = minhash.band_keys(signatures, num_bands)
        rate = np.mean([(keys[2 * i] == keys[2 * i + 1]).any() for i in range(len(pairs))])
        expected = 1 - (1 - true**rows) ** num_bands
        tolerance = 4 * np.sqrt(expected * (1 - expected) / len(pairs)) + 0.05
        assert abs(rate - expected) <= tolerance, (similarity, rate, expected)


def test_near_duplicate_licenses_collapse_and_a_different_text_survives(tmp_path):
    variant = MIT.replace("free of charge", "without charge").replace("the following conditions", "these conditions")
    paths = []
    for name, text in [("mit_one.txt", "Copyright (c) 2014 Alice\n\n" + MIT), ("bsd.txt", BSD),
                       ("mit_two.txt", "Copyright (c) 2019 Bob Builder\n\n" + variant)]:
        (tmp_path / name).write_text(text)
        paths.append(str(tmp_path / name))
    kept = minhash.minhash_dedup(paths, num_hashes=100, num_bands=10, ngrams=5, jaccard_threshold=0.7,
                                 output_dir=str(tmp_path / "out"))
    assert [path.split("/")[-1] for path in kept] == ["mit_one.txt", "bsd.txt"]
    assert (tmp_path / "out" / "bsd.txt").read_text() == BSD


def test_clusters_join_chains_and_keep_the_first_document():
    assert minhash.union_find_clusters(6, [(3, 4), (1, 3), (0, 5)]).tolist() == [0, 1, 2, 1, 1, 0]
    texts = [MIT, BSD, MIT.replace("Software", "software"), "tiny", MIT.upper()]
    clusters = minhash.duplicate_clusters(texts, minhash.MinHashConfig(num_hashes=60, num_bands=12))
    assert clusters.tolist() == [0, 1, 0, 3, 0]


def test_line_dedup_removes_every_copy_of_a_repeated_line(tmp_path):
    documents = {
        "a.txt": "unique a1\nshared footer\nunique a2\nrepeated inside\nrepeated inside",
        "b.txt": "shared footer\nunique b1",
        "c.txt": "unique c1\nunique c2",
    }
    for name, text in documents.items():
        (tmp_path / name).write_text(text)
    outputs = exact_dedup.line_dedup_files([str(tmp_path / name) for name in documents], str(tmp_path / "out"))
    results = [exact_dedup.read_text(path) for path in outputs]
    assert results == ["unique a1\nunique a2", "unique b1", "unique c1\nunique c2"]


def test_line_hash_counts_merge_across_files_like_one_counter():
    parts = [exact_dedup.line_hash_counts(["x\ny", "x"]), exact_dedup.line_hash_counts(["y\nz"])]
    unique, counts = exact_dedup.merge_counts(parts)
    expected = dict(zip(exact_dedup.hash64(["x", "y", "z"]).tolist(), [2, 2, 1]))
    assert dict(zip(unique.tolist(), counts.tolist())) == expected
    assert set(exact_dedup.repeated(unique, counts).tolist()) == set(exact_dedup.hash64(["x", "y"]).tolist())


def test_exact_document_dedup_keeps_first_occurrences_across_files():
    masks = exact_dedup.first_occurrences([exact_dedup.hash64(["a", "b", "a"]), exact_dedup.hash64(["b", "c", "a"])])
    assert [mask.tolist() for mask in masks] == [[True, True, False], [False, True, False]]
