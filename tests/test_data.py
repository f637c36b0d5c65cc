"""Tests of the default corpus and the token-shard format (writer, reader, segment ids)."""

import os
import sysconfig

import numpy as np
import pytest

from jaxlm import data


def test_default_corpus_is_the_stdlib_sources_in_sorted_order():
    corpus = data.default_corpus(max_bytes=2_000_000)
    assert 1_900_000 < len(corpus.encode("utf-8")) <= 2_000_000
    assert corpus == data.default_corpus(max_bytes=2_000_000)
    first_file = data._stdlib_sources(sysconfig.get_paths()["stdlib"])[0]
    with open(first_file, encoding="utf-8") as file:
        assert corpus.startswith(file.read() + data.DEFAULT_SEPARATOR)
    assert "def " in corpus and "site-packages" not in first_file


def test_default_corpus_prefix_is_stable():
    short = data.default_corpus(max_bytes=50_000, separator="\n")
    assert data.default_corpus(max_bytes=200_000, separator="\n").startswith(short)


def test_token_dtype():
    assert data.token_dtype(50257) == np.uint16
    assert data.token_dtype(65536) == np.uint16
    assert data.token_dtype(65537) == np.uint32


def write_example(directory, rng):
    shards = []
    for index, size in enumerate([29, 41]):
        tokens = rng.integers(0, 70000, size=size).astype(np.uint32)
        doc_starts = np.sort(rng.choice(np.arange(1, size), size=3, replace=False))
        if index == 0:
            doc_starts = np.concatenate([[0], doc_starts])
        shards.append((tokens, doc_starts))
        data.write_shard(str(directory), data.shard_name(index), tokens, doc_starts, {"source": "example"})
    return shards


def test_shards_round_trip_and_segment_ids(tmp_path):
    rng = np.random.default_rng(0)
    shards = write_example(tmp_path, rng)
    metadata = [data.read_shard_metadata(str(tmp_path), data.shard_name(index)) for index in range(2)]
    manifest = data.write_manifest(str(tmp_path), metadata, vocab_size=70000, document_separator_id=None)
    assert manifest["num_tokens"] == 70 and manifest["num_documents"] == 7 and manifest["dtype"] == "uint32"
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]
    opened = data.open_shards(tmp_path)
    for index, (tokens, doc_starts) in enumerate(shards):
        np.testing.assert_array_equal(opened.tokens[index], tokens)
        np.testing.assert_array_equal(opened.doc_starts[index], doc_starts)
    tokens, doc_starts = shards[1]
    window_tokens, segment_ids = opened.window(1, 5, 30)
    np.testing.assert_array_equal(window_tokens, tokens[5:35])
    expected = [1 + sum(1 for start in doc_starts if 5 < start <= position) for position in range(5, 35)]
    np.testing.assert_array_equal(segment_ids, expected)
    batch_tokens, batch_segments = opened.sample_batch(rng, batch_size=7, seq_len=13)
    assert batch_tokens.shape == (7, 13) and batch_segments.shape == (7, 13)
    assert np.all(batch_segments[:, 0] == 1) and np.all(np.diff(batch_segments, axis=1) >= 0)


def test_shard_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        data.open_shards(tmp_path)
    with pytest.raises(ValueError, match="must increase strictly"):
        data.write_shard(str(tmp_path), "bad", np.arange(5), np.array([3, 1]), {})
    assert data.read_shard_metadata(str(tmp_path), "bad") is None
