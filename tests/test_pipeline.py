"""The grain pipeline: determinism, resumable state, process split, layouts, held-out split."""

import dataclasses
import os

import numpy as np
import pytest

from jaxlm import config, data, pipeline

TRAIN = config.TrainConfig(batch_size=8, seq_len=29, eval_fraction=0.1, eval_batches=2, seed=3)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("shards"))
    rng = np.random.default_rng(0)
    metas = []
    for index, size in enumerate([3000, 1700, 50]):
        tokens = rng.integers(0, 257, size=size).astype(np.uint16)
        doc_starts = np.unique(np.concatenate([[0], rng.integers(1, size, size=size // 40)]))
        metas.append(data.write_shard(directory, data.shard_name(index), tokens, doc_starts, {}))
    data.write_manifest(directory, metas, vocab_size=257, document_separator_id=None)
    return data.open_shards(directory)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_deterministic_and_resumable(shards):
    dataset = pipeline.TrainData(shards, TRAIN)
    first = take(dataset.train_iterator(), 5)
    again = dataset.train_iterator()
    take(again, 2)
    state = again.get_state()
    resumed = pipeline.TrainData(shards, TRAIN).train_iterator()
    resumed.set_state(state)
    for expected, got in zip(first[2:], take(resumed, 3)):
        np.testing.assert_array_equal(expected["inputs"], got["inputs"])
    other_seed = pipeline.TrainData(shards, dataclasses.replace(TRAIN, seed=4)).train_iterator()
    assert not np.array_equal(next(other_seed)["inputs"], first[0]["inputs"])


def test_targets_are_inputs_shifted(shards):
    batch = next(pipeline.TrainData(shards, TRAIN).train_iterator())
    assert batch["inputs"].shape == (8, 29) and batch["inputs"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    assert set(batch) == {"inputs", "targets", "loss_mask"} and batch["loss_mask"].all()


def test_processes_split_the_global_batch(shards):
    dataset = pipeline.TrainData(shards, TRAIN)
    whole = take(dataset.train_iterator(), 2)
    parts = [take(dataset.train_iterator(p, 4), 2) for p in range(4)]
    for step in range(2):
        rows = np.concatenate([part[step]["inputs"] for part in parts])
        assert sorted(map(tuple, rows)) == sorted(map(tuple, whole[step]["inputs"]))


def test_documents_layout_restarts_positions_and_masks_boundaries(shards):
    train = dataclasses.replace(TRAIN, layout="documents", seq_len=64)
    batch = next(pipeline.TrainData(shards, train).train_iterator())
    segments, positions, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    assert (segments >= 1).all() and (segments[:, 0] == 1).all()
    changes = np.zeros_like(segments, bool)
    changes[:, 1:] = segments[:, 1:] != segments[:, :-1]
    assert changes.any()
    assert (positions[changes] == 0).all() and (positions[:, 0] == 0).all()
    assert (positions[:, 1:][~changes[:, 1:]] == positions[:, :-1][~changes[:, 1:]] + 1).all()
    # A target in the next document is not predicted from the previous one.
    np.testing.assert_array_equal(mask[:, :-1], (~changes[:, 1:]).astype(np.float32))


def test_held_out_regions_are_never_trained_on(shards):
    dataset = pipeline.TrainData(shards, TRAIN)
    window = TRAIN.seq_len + 1
    assert [(r.shard, r.start, r.stop) for r in dataset.eval_regions] == [(0, 2700, 3000), (1, 1530, 1700)]
    # 50 tokens hold one window but not two: that shard is only trained on.
    assert [(r.shard, r.start, r.stop) for r in dataset.train_regions] == [(0, 0, 2700), (1, 0, 1530), (2, 0, 50)]
    sampler = pipeline.WindowSampler(shards, dataset.train_regions, window, seed=0)
    for i in range(300):
        tokens, _ = sampler[i]
        assert tokens.shape == (window,)
    eval_batches = dataset.eval_batches()
    assert len(eval_batches) == 2 and eval_batches[0]["inputs"].shape == (8, 29)


def test_errors_for_small_data_and_vocabulary(shards):
    with pytest.raises(pipeline.DataError, match="smaller than one batch"):
        pipeline.TrainData(shards, dataclasses.replace(TRAIN, batch_size=200))
    with pytest.raises(pipeline.DataError, match="model.vocab_size=256"):
        pipeline.TrainData(shards, TRAIN, vocab_size=256)


def test_text_files_are_encoded_into_a_cache(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("def f(x):\n    return x + 1\n<|endoftext|>" * 200, encoding="utf-8")
    cache = tmp_path / "cache"
    dirs, tokenizer_dir = pipeline.prepare_data([str(text)], None, str(cache), 300, 0)
    assert os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json"))
    shards = pipeline.combine_shards(dirs)
    assert shards.manifest["vocab_size"] <= 300 and shards.num_tokens > 100
    assert len(shards.doc_starts[0]) == 200
    again, _ = pipeline.prepare_data([str(text)], None, str(cache), 300, 0)
    assert again == dirs
