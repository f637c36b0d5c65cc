"""Oracle tests of BPE training and the Tokenizer.

Oracles: the CS336 reference merges for corpus.en, a naive trainer that recounts every pair at
every step, the plain-Python encoder for the tiktoken fast path, and an independently built
tiktoken GPT-2 encoding for `Tokenizer.from_files`.
"""

import collections
import json
import os
import pathlib
import random

import pytest
import regex
import tiktoken

from jaxlm.tokenizer import GPT2_PATTERN, Tokenizer, train_bpe
from jaxlm.tokenizer.tokenizer import gpt2_bytes_to_unicode, gpt2_unicode_to_bytes

GOLDEN = pathlib.Path(__file__).parent / "golden" / "tokenizer"
EOT = "<|endoftext|>"


def naive_train_bpe(text: str, vocab_size: int, special_tokens: list[str]) -> list[tuple[bytes, bytes]]:
    """Recounts all pairs at every step; max by (count, pair) gives the greater pair on ties."""
    pieces = regex.split("|".join(regex.escape(token) for token in special_tokens), text) if special_tokens else [text]
    words = collections.Counter()
    for piece in pieces:
        words.update(tuple(bytes([value]) for value in word.encode()) for word in regex.findall(GPT2_PATTERN, piece))
    merges = []
    while 256 + len(special_tokens) + len(merges) < vocab_size:
        pair_counts = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] += count
        if not pair_counts:
            break
        best = max(pair_counts, key=lambda pair: (pair_counts[pair], pair))
        merges.append(best)
        merged_words = collections.Counter()
        for word, count in words.items():
            parts, index = [], 0
            while index < len(word):
                if word[index : index + 2] == best:
                    parts.append(best[0] + best[1])
                    index += 2
                else:
                    parts.append(word[index])
                    index += 1
            merged_words[tuple(parts)] += count
        words = merged_words
    return merges


def random_text(rng: random.Random, length: int, special_tokens=()) -> str:
    """Mixed scripts, emoji (with ZWJ and variation selectors), combining marks, odd whitespace."""
    pools = [
        range(0x20, 0x7F), range(0x20, 0x7F), range(0xA0, 0x250), range(0x300, 0x370), range(0x391, 0x3CA),
        range(0x400, 0x450), range(0x600, 0x6FF), range(0x4E00, 0x4E60), range(0x1F600, 0x1F650),
        [0x9, 0xA, 0xD, 0xB, 0xC, 0x1C, 0x85, 0xA0, 0x2028, 0x3000, 0x200D, 0xFE0F, 0x1F3FD, 0x27],
    ]
    pieces = []
    for _ in range(length):
        if special_tokens and rng.random() < 0.03:
            pieces.append(rng.choice(special_tokens))
        elif rng.random() < 0.1:
            pieces.append(rng.choice([" ", "  ", "\n", "\n\n", "'s", "'ll", " the", "123"]))
        else:
            pieces.append(chr(rng.choice(rng.choice(pools))))
    return "".join(pieces)


def read_reference_merges() -> list[tuple[bytes, bytes]]:
    lines = (GOLDEN / "train-bpe-reference-merges.txt").read_text(encoding="utf-8").splitlines()
    return [tuple(gpt2_unicode_to_bytes(part) for part in line.split(" ")) for line in lines if line]


@pytest.fixture(scope="module")
def corpus_tokenizer() -> Tokenizer:
    vocab, merges = train_bpe(GOLDEN / "corpus.en", 1000, [EOT], num_workers=1)
    return Tokenizer(vocab, merges, [EOT])


@pytest.fixture(scope="module")
def gpt2_tokenizer() -> Tokenizer:
    return Tokenizer.from_files(GOLDEN / "gpt2_vocab.json", GOLDEN / "gpt2_merges.txt", [EOT])


def test_train_matches_reference_merges_and_vocab():
    vocab, merges = train_bpe(GOLDEN / "corpus.en", 500, [EOT], num_workers=1)
    assert merges == read_reference_merges()
    reference_vocab = json.loads((GOLDEN / "train-bpe-reference-vocab.json").read_text(encoding="utf-8"))
    expected = {token.encode() if token == EOT else gpt2_unicode_to_bytes(token) for token in reference_vocab}
    assert set(vocab.values()) == expected
    assert vocab[0] == EOT.encode() and vocab[1 + ord("a")] == b"a" and len(vocab) == 500
    assert all(vocab[257 + index] == first + second for index, (first, second) in enumerate(merges))


@pytest.mark.parametrize("seed", range(4))
def test_train_equals_naive_trainer_on_random_text(tmp_path, seed):
    rng = random.Random(seed)
    words = ["low", "lower", "newest", "widest", "ab", "ba", "aaaa", "abab", " é", "🙂", "x'll"]
    text = "".join(rng.choice(words + [" ", "\n", EOT, "<s>"]) for _ in range(400)) + random_text(rng, 100)
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8")
    _, merges = train_bpe(path, 256 + 2 + 60, [EOT, "<s>"], num_workers=1)
    assert merges == naive_train_bpe(text, 256 + 2 + 60, [EOT, "<s>"])


def test_ties_prefer_the_lexicographically_greater_pair(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("ab cd", encoding="utf-8")
    _, merges = train_bpe(path, 259, num_workers=1)
    # All three pairs occur once: (c, d) > (a, b) > (' ', c) as byte strings.
    assert merges == [(b"c", b"d"), (b"a", b"b"), (b" ", b"cd")]


def test_special_tokens_are_never_merged(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(("hello" + EOT) * 200 + "<|x|>" * 50, encoding="utf-8")
    vocab, merges = train_bpe(path, 300, [EOT, "<|x|>"], num_workers=1)
    merged = [first + second for first, second in merges]
    assert not any(byte in token for token in merged for byte in (b"<", b"|", b">"))
    assert vocab[0] == EOT.encode() and vocab[1] == b"<|x|>"
    assert merged[-1] == b"hello" and len(merges) == 4


def test_file_larger_than_a_chunk_trains_like_one_piece(tmp_path):
    path = tmp_path / "input.txt"
    rng = random.Random(5)
    documents = [(GOLDEN / "tinystories_sample.txt").read_text(encoding="utf-8"), random_text(rng, 3000)]
    path.write_text((EOT.join(documents) + "\n") * 6 + "no special tokens here\nline two\n" * 300, encoding="utf-8")
    whole = train_bpe(path, 600, [EOT], num_workers=1, chunk_bytes=1 << 30)
    chunked = train_bpe(path, 600, [EOT], num_workers=2, chunk_bytes=4096)
    assert chunked == whole


def test_several_files_are_separate(tmp_path):
    (tmp_path / "a.txt").write_text("ab", encoding="utf-8")
    (tmp_path / "b.txt").write_text("ba", encoding="utf-8")
    _, merges = train_bpe([tmp_path / "a.txt", tmp_path / "b.txt"], 300, num_workers=1)
    assert merges == [(b"b", b"a"), (b"a", b"b")]


def test_bad_training_input_gives_clear_errors(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("some text", encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size=257 is too small: it must be at least 258"):
        train_bpe(path, 257, ["<a>", "<b>"])
    with pytest.raises(ValueError, match="special token 1 is the empty string"):
        train_bpe(path, 300, ["<a>", ""])
    with pytest.raises(ValueError, match="repeated"):
        train_bpe(path, 300, ["<a>", "<a>"])
    with pytest.raises(TypeError, match="wrap it in a list"):
        train_bpe(path, 300, EOT)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe(tmp_path / "missing.txt", 300)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        train_bpe(tmp_path / "empty.txt", 300)


def test_non_utf8_input_raises_with_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ok\n".encode("utf-8") * 1000 + "caf\u00e9".encode("latin-1") + b" tail\n")
    with pytest.raises(ValueError, match=r"not valid UTF-8: byte b'\\xe9' at byte offset 9003"):
        train_bpe(path, 300, num_workers=1, chunk_bytes=1000)


def test_training_stops_when_no_pair_is_left(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("abc abc", encoding="utf-8")
    vocab, merges = train_bpe(path, 1000, num_workers=1)
    assert [first + second for first, second in merges] == [b"bc", b"abc", b" abc"]
    assert len(vocab) == 259


@pytest.mark.parametrize("seed", range(3))
def test_round_trip_random_unicode(corpus_tokenizer, gpt2_tokenizer, seed):
    rng = random.Random(seed)
    for _ in range(40):
        text = random_text(rng, rng.randint(0, 300), special_tokens=[EOT])
        for tokenizer in (corpus_tokenizer, gpt2_tokenizer):
            assert tokenizer.decode(tokenizer.encode(text)) == text


def test_fast_path_equals_python_path(corpus_tokenizer, gpt2_tokenizer):
    assert corpus_tokenizer.uses_tiktoken and gpt2_tokenizer.uses_tiktoken
    rng = random.Random(11)
    texts = [random_text(rng, rng.randint(1, 400)) for _ in range(100)]
    texts.append((GOLDEN / "corpus.en").read_text(encoding="utf-8")[:30000])
    texts.append("unpaired \ud800 surrogate")
    for tokenizer in (corpus_tokenizer, gpt2_tokenizer):
        for text in texts:
            assert tokenizer._encode_ordinary(text) == tokenizer._encode_ordinary_reference(text)


def test_python_path_when_ids_do_not_follow_merge_order():
    # tiktoken ranks by id: with "bc" (299) before "ab" (300) it would give [a, bc] for "abc".
    vocab = {value: bytes([value]) for value in range(256)}
    vocab.update({299: b"bc", 300: b"ab"})
    tokenizer = Tokenizer(vocab, [(b"a", b"b"), (b"b", b"c")])
    assert not tokenizer.uses_tiktoken
    assert tokenizer.encode("abc") == [300, ord("c")]


def test_python_path_when_vocab_has_duplicates():
    vocab = {value: bytes([value]) for value in range(256)}
    vocab.update({256: b"ab", 257: b"abc", 258: b"bc", 259: b"abc"})
    tokenizer = Tokenizer(vocab, [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c"), (b"a", b"bc")])
    assert not tokenizer.uses_tiktoken
    assert tokenizer.encode("abc xbc") == [257, ord(" "), ord("x"), 258]
    assert tokenizer.decode([259]) == "abc"


def independent_gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding built from the files the way tiktoken's loader does."""
    ranks = {bytes([value]): rank for rank, value in enumerate(gpt2_bytes_to_unicode())}
    for line in (GOLDEN / "gpt2_merges.txt").read_text(encoding="utf-8").split("\n"):
        if line and not line.startswith("#version"):
            first, second = line.split(" ")
            ranks[gpt2_unicode_to_bytes(first) + gpt2_unicode_to_bytes(second)] = len(ranks)
    return tiktoken.Encoding("gpt2-test", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})


def test_gpt2_files_give_tiktoken_gpt2_ids(gpt2_tokenizer):
    encoding = independent_gpt2_encoding()
    rng = random.Random(3)
    texts = [
        (GOLDEN / "corpus.en").read_text(encoding="utf-8")[:50000],
        (GOLDEN / "tinystories_sample.txt").read_text(encoding="utf-8"),
        "Hello, world! It's 2024; we'll see   you\n\n  there. \u00e9\u00e8 \u4f60\u597d \U0001F44D\U0001F3FD",
        *[random_text(rng, 300, special_tokens=[EOT]) for _ in range(30)],
    ]
    for text in texts:
        expected = encoding.encode(text, allowed_special="all")
        assert gpt2_tokenizer.encode(text) == expected
        plain = text.replace(EOT, "")
        assert gpt2_tokenizer._encode_ordinary_reference(plain) == encoding.encode_ordinary(plain)
    assert gpt2_tokenizer.special_ids == {EOT: 50256} and gpt2_tokenizer.vocab_size == 50257


def test_longest_special_token_wins():
    vocab = {value: bytes([value]) for value in range(256)}
    tokenizer = Tokenizer(vocab, [], [EOT, EOT + EOT])
    ids = tokenizer.encode(f"a{EOT}{EOT}{EOT}b")
    assert ids == [ord("a"), tokenizer.special_ids[EOT + EOT], tokenizer.special_ids[EOT], ord("b")]
    assert tokenizer.special_ids == {EOT: 256, EOT + EOT: 257}


def test_encode_iterable_equals_encode_on_a_file(corpus_tokenizer, tmp_path):
    rng = random.Random(7)
    text = (GOLDEN / "tinystories_sample.txt").read_text(encoding="utf-8") + random_text(rng, 20000, special_tokens=[EOT])
    path = tmp_path / "input.txt"
    path.write_text(text, encoding="utf-8", newline="")
    expected = corpus_tokenizer.encode(text)
    with open(path, encoding="utf-8", newline="") as file:
        assert list(corpus_tokenizer.encode_iterable(file)) == expected
    with open(path, encoding="utf-8", newline="") as file:
        assert list(corpus_tokenizer.encode_iterable(file, buffer_chars=64)) == expected


def test_encode_iterable_with_tokens_straddling_pieces(corpus_tokenizer):
    rng = random.Random(8)
    for _ in range(30):
        text = random_text(rng, 600, special_tokens=[EOT]) + "  \n\n" + EOT + "it'll  "
        cuts = sorted(rng.sample(range(len(text)), 40))
        pieces = [text[start:end] for start, end in zip([0, *cuts], [*cuts, len(text)])]
        assert list(corpus_tokenizer.encode_iterable(pieces, buffer_chars=rng.choice([1, 20, 100]))) == corpus_tokenizer.encode(text)


def test_encode_batch_equals_encode(corpus_tokenizer):
    rng = random.Random(9)
    texts = [random_text(rng, 200, special_tokens=[EOT]) for _ in range(20)]
    assert corpus_tokenizer.encode_batch(texts, num_threads=4) == [corpus_tokenizer.encode(text) for text in texts]


def test_decode_invalid_utf8_gives_replacement_character(corpus_tokenizer):
    euro = "\u20ac".encode()
    ids = [corpus_tokenizer._bytes_to_id[euro[:1]], corpus_tokenizer._bytes_to_id[b"a"]]
    assert corpus_tokenizer.decode(ids) == "\ufffda"
    with pytest.raises(ValueError, match="token id 5000 is not in the vocabulary"):
        corpus_tokenizer.decode([5000])


def test_save_and_load_round_trip(corpus_tokenizer, tmp_path):
    corpus_tokenizer.save(tmp_path)
    loaded = Tokenizer.load(tmp_path)
    assert loaded.vocab == corpus_tokenizer.vocab and loaded.merges == corpus_tokenizer.merges
    assert loaded.special_tokens == [EOT] and loaded.uses_tiktoken
    text = random_text(random.Random(1), 500, special_tokens=[EOT])
    assert loaded.encode(text) == corpus_tokenizer.encode(text)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.load(os.path.join(tmp_path, "nowhere"))
