"""End-to-end tests of `python -m jaxlm.tokenize`: train, encode to shards, decode back, resume."""

import os
import pathlib
import random
import subprocess
import sys

import numpy as np
import pytest

from jaxlm import data, tokenize
from jaxlm.tokenizer import Tokenizer

GOLDEN = pathlib.Path(__file__).parent / "golden" / "tokenizer"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer_directory(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("tokenizer")
    code = tokenize.main(["train", "--input", str(GOLDEN / "corpus.en"), "--vocab-size", "700",
                          "--special-tokens", EOT, "--out", str(directory), "--num-workers", "1", "--no-progress"])
    assert code == 0
    return str(directory)


def write_inputs(directory: pathlib.Path) -> list[pathlib.Path]:
    rng = random.Random(0)
    stories = (GOLDEN / "tinystories_sample.txt").read_text(encoding="utf-8")
    lines = (GOLDEN / "corpus.en").read_text(encoding="utf-8").splitlines(keepends=True)[:400]
    first = directory / "first.txt"
    first.write_text(EOT.join(rng.sample(lines, 200)) + EOT + stories, encoding="utf-8")
    second = directory / "second.txt"
    second.write_text("".join(lines) + "caf\u00e9 \U0001F642\n", encoding="utf-8")
    return [first, second]


def encode(tokenizer_directory, inputs, out, *extra):
    return tokenize.main(["encode", "--tokenizer", tokenizer_directory, "--input", *map(str, inputs),
                          "--out", str(out), "--shard-bytes", "4000", "--no-progress", *extra])


def test_train_writes_a_loadable_tokenizer(tokenizer_directory):
    tokenizer = Tokenizer.load(tokenizer_directory)
    assert tokenizer.vocab_size == 700 and tokenizer.special_ids == {EOT: 0}


def test_encoded_shards_decode_back_to_the_input(tokenizer_directory, tmp_path):
    inputs = write_inputs(tmp_path)
    assert encode(tokenizer_directory, inputs, tmp_path / "shards", "--num-workers", "2") == 0
    shards = data.open_shards(tmp_path / "shards")
    tokenizer = Tokenizer.load(tokenizer_directory)
    assert shards.manifest["dtype"] == "uint16" and len(shards.tokens) > 4
    decoded = {}
    for shard, tokens in zip(shards.manifest["shards"], shards.tokens):
        decoded[shard["source"]] = decoded.get(shard["source"], "") + tokenizer.decode(tokens.tolist())
    assert decoded == {str(path.resolve()): path.read_text(encoding="utf-8") for path in inputs}
    # Documents: one per file start plus one after each separator that does not end its file.
    texts = [path.read_text(encoding="utf-8") for path in inputs]
    assert shards.manifest["num_documents"] == sum(1 + text.removesuffix(EOT).count(EOT) for text in texts) > 200
    all_tokens = np.concatenate(shards.tokens).tolist()
    assert all_tokens == sum((tokenizer.encode(path.read_text(encoding="utf-8")) for path in inputs), [])


def test_encode_resumes_and_skips_finished_shards(tokenizer_directory, tmp_path, capsys):
    inputs = write_inputs(tmp_path)
    out = tmp_path / "shards"
    assert encode(tokenizer_directory, inputs, out, "--num-workers", "1") == 0
    expected = [np.array(tokens) for tokens in data.open_shards(out).tokens]
    os.remove(out / "manifest.json")
    os.remove(out / "shard-00002.json")
    os.remove(out / "shard-00002.tokens.npy")
    capsys.readouterr()
    assert encode(tokenizer_directory, inputs, out, "--num-workers", "1") == 0
    assert f"({len(expected) - 1} already done)" in capsys.readouterr().err
    for tokens, reference in zip(data.open_shards(out).tokens, expected):
        np.testing.assert_array_equal(tokens, reference)
    assert encode(tokenizer_directory, inputs[:1], out) == 2
    assert "holds shards of other inputs" in capsys.readouterr().err


def test_cli_errors_are_clear(tokenizer_directory, tmp_path, capsys):
    assert encode(tokenizer_directory, [tmp_path / "missing.txt"], tmp_path / "out") == 2
    assert "missing.txt' does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    assert encode(tokenizer_directory, [bad], tmp_path / "out2") == 2
    error = capsys.readouterr().err
    assert "not valid UTF-8" in error and "byte offset 5" in error
    code = tokenize.main(["train", "--input", str(bad), "--vocab-size", "100", "--out", str(tmp_path / "t")])
    assert code == 2 and "vocab_size=100 is too small" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "encode"])
def test_help(command):
    result = subprocess.run([sys.executable, "-m", "jaxlm.tokenize", command, "--help"],
                            capture_output=True, text=True, cwd=pathlib.Path(__file__).parent.parent)
    assert result.returncode == 0 and "--input" in result.stdout and "--out" in result.stdout
