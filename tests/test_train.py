"""The train step and loop: sharded == single device, accumulation, resume, NaN, signals, CLI.

Every test shares one config (`CFG`) so that compiled steps are reused across tests
(`train.make_train_step` is cached per config and mesh).
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxlm import config, data, pipeline, sharding, train
from jaxlm.checkpoint import CheckpointManager

MODEL = dataclasses.replace(config.load_preset("tiny").model, vocab_size=256, max_seq_len=64)
TRAIN = config.TrainConfig(steps=6, batch_size=16, seq_len=16, lr=1e-2, warmup_steps=2, eval_every=3,
                           eval_batches=1, checkpoint_every=3, eval_fraction=0.05)
CFG = config.Config(model=MODEL, train=TRAIN)


def write_markov_shards(directory, num_tokens=20000, vocab=256, seed=0):
    """A learnable stream: each token is a fixed function of the previous one, plus noise."""
    rng = np.random.default_rng(seed)
    table = rng.integers(1, vocab, size=vocab)
    tokens = np.empty(num_tokens, np.int64)
    tokens[0] = 1
    noise = rng.random(num_tokens) < 0.1
    random_tokens = rng.integers(1, vocab, size=num_tokens)
    for i in range(1, num_tokens):
        tokens[i] = random_tokens[i] if noise[i] else table[tokens[i - 1]]
    os.makedirs(directory, exist_ok=True)
    doc_starts = np.arange(0, num_tokens, 97)
    meta = data.write_shard(directory, "shard-00000", tokens.astype(np.uint16), doc_starts, {})
    data.write_manifest(directory, [meta], vocab_size=vocab, document_separator_id=None)
    return directory


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return data.open_shards(write_markov_shards(str(tmp_path_factory.mktemp("shards"))))


def mesh_of(spec):
    if spec == "single":
        return sharding.make_mesh("", devices=jax.devices()[:1])
    return sharding.make_mesh(spec)


def run_steps(cfg, mesh, shards, num_steps, batches=None):
    tx = train.optim.make_optimizer(cfg.model, cfg.train)
    step_fn = train.make_train_step(cfg, mesh)
    iterator = pipeline.TrainData(shards, cfg.train).train_iterator()
    losses = []
    with jax.set_mesh(mesh):
        state = train.init_state(cfg, mesh, tx)
        for i in range(num_steps):
            batch = batches[i] if batches is not None else next(iterator)
            state, metrics = step_fn(state, train.shard_batch(batch, mesh, cfg.train.grad_accum))
            losses.append(float(metrics["loss"]))
    return np.array(losses), state


@pytest.fixture(scope="module")
def reference(shards):
    return run_steps(CFG, mesh_of("single"), shards, 3)[0]


@pytest.mark.parametrize("spec,zero1", [("data=8", False), ("fsdp=8", False),
                                        ("data=2,fsdp=2,tensor=2", True)])
def test_sharded_losses_match_single_device(shards, reference, spec, zero1):
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(TRAIN, zero1=zero1))
    losses, state = run_steps(cfg, mesh_of(spec), shards, 3)
    np.testing.assert_allclose(losses, reference, rtol=2e-5)
    assert reference[-1] < reference[0]
    if zero1:
        mu = state["opt_state"][1][0].mu["blocks"]["mlp"]["up"]
        assert mu.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", ("tensor", "data"))  # the largest dim, F = 136
        assert state["params"]["blocks"]["mlp"]["up"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


def test_grad_accum_equals_one_big_batch(shards, reference):
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(TRAIN, grad_accum=4))
    losses, _ = run_steps(cfg, mesh_of("data=2,fsdp=2,tensor=2"), shards, 3)
    np.testing.assert_allclose(losses, reference, rtol=2e-5)


def test_chunked_loss_matches_full_logits(shards, reference):
    """loss_chunk 5 (not dividing seq 16) with the vocab sharded over tensor: the same losses as
    the full-logits step (the z-loss and each gradient: tests/test_loss.py)."""
    cfg = dataclasses.replace(CFG, model=dataclasses.replace(MODEL, loss_chunk=5))
    chunked, _ = run_steps(cfg, mesh_of("data=2,fsdp=2,tensor=2"), shards, 3)
    np.testing.assert_allclose(chunked, reference, rtol=2e-5)


def test_overfits_one_batch(shards):
    batch = next(pipeline.TrainData(shards, TRAIN).train_iterator())
    constant_lr = dataclasses.replace(TRAIN, steps=60, min_lr_ratio=1.0, weight_decay=0.0)
    losses, _ = run_steps(dataclasses.replace(CFG, train=constant_lr), mesh_of("single"), shards, 60,
                          batches=[batch] * 60)
    assert losses[0] > 5.0 and losses[-1] < 0.3, losses


def make_trainer(cfg, spec, shards, run_dir):
    return train.Trainer(cfg, mesh_of(spec), pipeline.TrainData(shards, cfg.train), str(run_dir), progress=False)


def losses_of(records):
    return np.array([r["loss"] for r in records])


def test_sigterm_saves_and_resume_reproduces_losses(shards, tmp_path):
    full = make_trainer(CFG, "data=8", shards, tmp_path / "full")
    expected = losses_of(full.train())
    full.close()
    assert len(expected) == 6
    lines = [json.loads(line) for line in open(tmp_path / "full" / train.METRICS_FILE)]
    assert [r["step"] for r in lines] == list(range(1, 7)) and "eval_loss" in lines[2]
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "step_time", "mfu", "tokens_seen"} <= set(lines[0])
    assert lines[0]["mfu"] is None  # CPU: unknown peak

    killed = make_trainer(CFG, "data=8", shards, tmp_path / "killed")
    next_batch = killed.next_batch

    def next_batch_then_sigterm():
        if killed.step == 1:  # delivered while step 2 runs: the loop stops after it
            os.kill(os.getpid(), signal.SIGTERM)
        return next_batch()

    killed.next_batch = next_batch_then_sigterm
    first = killed.train()
    killed.close()
    assert len(first) == 2
    assert CheckpointManager(tmp_path / "killed").latest_step() == 2
    os.system(f"cp -r {tmp_path / 'killed'} {tmp_path / 'killed_copy'}")

    resumed = make_trainer(CFG, "data=8", shards, tmp_path / "killed")
    assert resumed.step == 2
    rest = resumed.train()
    resumed.close()
    np.testing.assert_array_equal(np.concatenate([losses_of(first), losses_of(rest)]), expected)

    other_mesh = make_trainer(CFG, "fsdp=8", shards, tmp_path / "killed_copy")
    np.testing.assert_allclose(losses_of(other_mesh.train()), expected[2:], rtol=2e-5)
    other_mesh.close()


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(shards, tmp_path):
    trainer = make_trainer(CFG, "data=8", shards, tmp_path)
    next_batch = trainer.next_batch

    def poisoned():
        batch = next_batch()
        if trainer.step == 4:  # step 5: an out-of-range token id embeds as NaN
            batch["inputs"] = batch["inputs"].copy()
            batch["inputs"][0, 0] = MODEL.vocab_size
        return batch

    trainer.next_batch = poisoned
    with pytest.raises(train.NonFiniteLossError, match="at step 5; the last good checkpoint is step 3"):
        trainer.train()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trainer.state["params"]))
    trainer.close()
    resumed = make_trainer(CFG, "data=8", shards, tmp_path)
    assert resumed.step == 3
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(resumed.state["params"]))
    resumed.close()


def test_cli_errors_name_the_problem(capsys):
    assert train.main(["--train.no_such_key=1"]) == 2
    assert "unknown config key 'train.no_such_key'" in capsys.readouterr().err
    assert train.main(["--train.batch_size=0"]) == 2
    assert "train.batch_size must be positive" in capsys.readouterr().err
    assert train.main(["--mesh", "data=3"]) == 2
    assert "needs 3 devices but 8 are available" in capsys.readouterr().err
    assert train.main(["--model.loss_kernel=triton"]) == 2
    assert "set model.loss_chunk" in capsys.readouterr().err
    assert train.main(["--model.loss_kernel=triton", "--model.loss_chunk=8"]) == 2  # CPU here
    assert "needs a GPU and the jax-triton package" in capsys.readouterr().err


def test_small_data_is_an_error(tmp_path):
    small = data.open_shards(write_markov_shards(str(tmp_path), num_tokens=100))
    with pytest.raises(pipeline.DataError, match="smaller than one batch"):
        pipeline.TrainData(small, TRAIN)


def _without_triton_pallas(module: str, *args: str) -> list[str]:
    """`python -m module args` with `jax.experimental.pallas.triton` made unimportable (the
    Triton form of Pallas is deprecated upstream): training and decoding on CPU must not need
    it, so a JAX that drops it breaks only the GPU kernels built on it."""
    code = ("import runpy, sys; sys.modules['jax.experimental.pallas.triton'] = None; "
            f"sys.argv = {[module, *args]!r}; runpy.run_module({module!r}, run_name='__main__')")
    return [sys.executable, "-c", code]


def test_cli_without_data_trains_on_the_default_corpus(tmp_path):
    """The README's `python -m jaxlm.train`, shortened: 3 steps of a smaller corpus and batch
    (and, as the decode CLI after it, without Triton Pallas)."""
    command = _without_triton_pallas(
        "jaxlm.train", "--steps", "3", "--run-dir", str(tmp_path / "run"), "--cache-dir",
        str(tmp_path / "cache"), "--train.default_corpus_bytes=100000", "--train.batch_size=8",
        "--train.seq_len=32", "--no-progress")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory per device (estimate)" in result.stdout and "mesh: {'data': 8" in result.stdout
    records = [json.loads(line) for line in open(tmp_path / "run" / train.METRICS_FILE)]
    assert [r["step"] for r in records] == [1, 2, 3] and "eval_loss" in records[-1]
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "3")
    # The same run directory feeds the plot and decoding CLIs (README's next steps).
    plot = subprocess.run([sys.executable, "-m", "jaxlm.plot", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0, plot.stderr[-3000:]
    pngs = sorted(p for p in os.listdir(tmp_path / "run") if p.endswith(".png"))
    assert pngs, os.listdir(tmp_path / "run")
    for name in pngs:
        with open(tmp_path / "run" / name, "rb") as file:
            assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    decode = subprocess.run(_without_triton_pallas(
        "jaxlm.decode", "--run-dir", str(tmp_path / "run"), "--prompt", "def main(",
        "--max-new-tokens", "5", "--temperature", "0"),
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "XLA_FLAGS": ""})
    assert decode.returncode == 0, decode.stderr[-3000:]
    assert "tokens/s decoding (XLA's step)" in decode.stderr  # (on CPU: XLA's step)
