"""The byte-level BPE `Tokenizer`: encode/decode with a tiktoken fast path and a Python reference.

Encoding cuts the text at special tokens (longest first, so `<|endoftext|><|endoftext|>` as a
special token of its own beats two single ones), pre-tokenizes each ordinary piece with the GPT-2
regex, and applies the merges inside each pre-token: repeatedly merge every occurrence of the
adjacent pair with the lowest merge rank. `_encode_ordinary_reference` does exactly that in
Python.

The fast path hands ordinary pieces to a `tiktoken.Encoding` built from our vocabulary. tiktoken
merges, at each step, the adjacent pair whose *concatenated bytes* have the lowest rank, and it
takes its ranks from token ids. That is the same algorithm when:

- every non-special token is a single byte or the result of exactly one merge (no duplicate
  byte strings, no tokens that no merge creates), so "the concatenation is a token" means
  "the pair is a merge";
- the ids of merge results increase in merge order, so "lowest id" means "lowest merge rank".

Our trained vocabularies and GPT-2's satisfy both, and then tiktoken's ids are our ids with no
mapping. When a vocabulary does not, the tokenizer uses the Python path
(`Tokenizer.uses_tiktoken` says which). Special tokens never go to tiktoken: its special-token
matching does not prefer the longest match.

Decoding joins the token bytes and decodes UTF-8 with `errors="replace"`: a sequence that ends in
the middle of a character decodes to U+FFFD instead of raising. Text with lone surrogates (not
encodable as UTF-8) has them replaced by U+FFFD before encoding, as tiktoken does.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import tiktoken

from jaxlm.tokenizer import pretokenize

TOKENIZER_FILE = "tokenizer.json"
_CACHE_LIMIT = 1 << 17


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (vocab.json keys)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    byte_values = list(printable)
    code_points = list(printable)
    extra = 0
    for value in range(256):
        if value not in printable:
            byte_values.append(value)
            code_points.append(256 + extra)
            extra += 1
    return {value: chr(code_point) for value, code_point in zip(byte_values, code_points)}


def _unicode_to_latin1_table() -> dict[int, str]:
    """str.translate table: GPT-2 byte character -> the latin-1 character of its byte.

    Latin-1 characters that are not GPT-2 byte characters map to a character latin-1 cannot
    encode, so that invalid input fails instead of passing through.
    """
    table = {code_point: "\U0010ffff" for code_point in range(256)}
    table.update({ord(char): chr(value) for value, char in gpt2_bytes_to_unicode().items()})
    return table


_UNICODE_TO_LATIN1 = _unicode_to_latin1_table()
_LATIN1_TO_UNICODE = {value: char for value, char in gpt2_bytes_to_unicode().items()}


def gpt2_unicode_to_bytes(text: str) -> bytes:
    """Inverse of `gpt2_bytes_to_unicode` applied to a whole token string."""
    try:
        return text.translate(_UNICODE_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{text!r} contains characters that are not GPT-2 byte characters") from None


def gpt2_bytes_to_string(token: bytes) -> str:
    """The GPT-2 vocab.json spelling of a token's bytes."""
    return token.decode("latin-1").translate(_LATIN1_TO_UNICODE)


class Tokenizer:
    """Byte-level BPE tokenizer over `vocab: {id: bytes}` and `merges: [(bytes, bytes)]`.

    Special tokens found in the vocabulary keep their ids; the others get new ids after the
    largest id.
    """

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Iterable[str] | None = None,
    ):
        self.special_tokens = pretokenize.validate_special_tokens(special_tokens)
        self.vocab = dict(vocab)
        self.merges = [(bytes(first), bytes(second)) for first, second in merges]
        self.special_ids: dict[str, int] = {}
        bytes_to_ids: dict[bytes, list[int]] = {}
        for token_id in sorted(self.vocab):
            bytes_to_ids.setdefault(self.vocab[token_id], []).append(token_id)
        for token in self.special_tokens:
            existing = bytes_to_ids.get(token.encode("utf-8"))
            if existing:
                self.special_ids[token] = existing[0]
            else:
                self.special_ids[token] = max(self.vocab, default=-1) + 1
                self.vocab[self.special_ids[token]] = token.encode("utf-8")
        special_id_set = set(self.special_ids.values())
        self._bytes_to_id = {}
        for token, ids in bytes_to_ids.items():
            ordinary = [token_id for token_id in ids if token_id not in special_id_set]
            self._bytes_to_id[token] = ordinary[0] if ordinary else ids[0]
        self._check_bytes_and_merges()
        self._merge_ranks = {pair: rank for rank, pair in reversed(list(enumerate(self.merges)))}
        self._special_regex = pretokenize.special_token_regex(self.special_tokens)
        self._cache: dict[str, list[int]] = {}
        self._encoding = self._build_tiktoken_encoding(bytes_to_ids, special_id_set)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id: the size of an embedding table for this tokenizer."""
        return max(self.vocab) + 1

    @property
    def uses_tiktoken(self) -> bool:
        return self._encoding is not None

    def _check_bytes_and_merges(self) -> None:
        missing_bytes = [value for value in range(256) if bytes([value]) not in self._bytes_to_id]
        if missing_bytes:
            raise ValueError(f"the vocabulary lacks the single bytes {missing_bytes[:8]}...; byte-level BPE needs all 256")
        for rank, (first, second) in enumerate(self.merges):
            for part in (first, second, first + second):
                if part not in self._bytes_to_id:
                    raise ValueError(f"merge {rank} {(first, second)!r} uses or makes {part!r}, which is not in the vocabulary")

    def _build_tiktoken_encoding(self, bytes_to_ids, special_id_set) -> tiktoken.Encoding | None:
        ordinary = {token_id: token for token_id, token in self.vocab.items() if token_id not in special_id_set}
        if len(set(ordinary.values())) != len(ordinary):
            return None
        merge_results = [first + second for first, second in self.merges]
        if len(set(merge_results)) != len(merge_results):
            return None
        merge_ids = [self._bytes_to_id[result] for result in merge_results]
        if any(earlier >= later for earlier, later in zip(merge_ids, merge_ids[1:])):
            return None
        if len(merge_results) + 256 != len(ordinary):
            return None
        ranks = {token: token_id for token_id, token in ordinary.items()}
        return tiktoken.Encoding(
            name="jaxlm-bpe", pat_str=pretokenize.GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )

    @classmethod
    def from_files(
        cls,
        vocab_path: str | os.PathLike,
        merges_path: str | os.PathLike,
        special_tokens: Iterable[str] | None = None,
    ) -> Tokenizer:
        """Loads GPT-2 style files: vocab.json `{token: id}` and merges.txt lines `first second`.

        Both use GPT-2's byte-to-unicode characters. A `#version` first line and blank lines of
        merges.txt are skipped.
        """
        with open(vocab_path, encoding="utf-8") as file:
            token_to_id = json.load(file)
        vocab = {int(token_id): gpt2_unicode_to_bytes(token) for token, token_id in token_to_id.items()}
        merges = []
        with open(merges_path, encoding="utf-8") as file:
            for line_number, line in enumerate(file, start=1):
                line = line.rstrip("\r\n")
                if not line or (line_number == 1 and line.startswith("#version")):
                    continue
                parts = line.split(" ")
                if len(parts) != 2:
                    raise ValueError(f"{merges_path}:{line_number}: expected 'first second', got {line!r}")
                merges.append((gpt2_unicode_to_bytes(parts[0]), gpt2_unicode_to_bytes(parts[1])))
        return cls(vocab, merges, special_tokens)

    def save(self, directory: str | os.PathLike) -> str:
        """Writes `tokenizer.json` (GPT-2 byte characters for bytes) into `directory`; returns its path."""
        os.makedirs(directory, exist_ok=True)
        content = {
            "format": "jaxlm-byte-bpe",
            "version": 1,
            "pattern": pretokenize.GPT2_PATTERN,
            "special_tokens": self.special_tokens,
            "vocab": {str(token_id): gpt2_bytes_to_string(token) for token_id, token in sorted(self.vocab.items())},
            "merges": [f"{gpt2_bytes_to_string(first)} {gpt2_bytes_to_string(second)}" for first, second in self.merges],
        }
        path = os.path.join(directory, TOKENIZER_FILE)
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(content, file, ensure_ascii=False, indent=1)
        os.replace(temporary, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Reads a tokenizer written by `save`."""
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in {os.fspath(directory)!r}; train one with `python -m jaxlm.tokenize train`")
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
        if content.get("format") != "jaxlm-byte-bpe" or content.get("pattern") != pretokenize.GPT2_PATTERN:
            raise ValueError(f"{path} is not a jaxlm byte-level BPE tokenizer with the GPT-2 pattern")
        vocab = {int(token_id): gpt2_unicode_to_bytes(token) for token_id, token in content["vocab"].items()}
        merges = [tuple(gpt2_unicode_to_bytes(part) for part in line.split(" ")) for line in content["merges"]]
        return cls(vocab, merges, content["special_tokens"])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; every special token in the text is encoded as its special id."""
        pieces = pretokenize.split_on_special_tokens(text, self._special_regex)
        if len(pieces) == 1 and not pieces[0][1]:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for piece, is_special in pieces:
            if is_special:
                ids.append(self.special_ids[piece])
            else:
                ids.extend(self._encode_ordinary(piece))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        if self._encoding is not None:
            return self._encoding.encode_ordinary(text)
        return self._encode_ordinary_reference(text)

    def _encode_ordinary_reference(self, text: str) -> list[int]:
        """Plain-Python BPE of text without special tokens: the reference for the tiktoken path."""
        ids = []
        cache = self._cache
        for word in pretokenize.GPT2_REGEX.findall(text):
            word_ids = cache.get(word)
            if word_ids is None:
                word_ids = self._merge_word(_utf8_without_surrogates(word))
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                cache[word] = word_ids
            ids.extend(word_ids)
        return ids

    def _merge_word(self, word: bytes) -> list[int]:
        """Applies the merges to one pre-token: merge the lowest-rank pair everywhere, repeat."""
        parts = [word[index : index + 1] for index in range(len(word))]
        ranks = self._merge_ranks
        while len(parts) > 1:
            best_rank = min((ranks.get(pair, len(ranks)) for pair in zip(parts, parts[1:])))
            if best_rank == len(ranks):
                break
            first, second = self.merges[best_rank]
            merged = []
            index = 0
            while index < len(parts):
                if index + 1 < len(parts) and parts[index] == first and parts[index + 1] == second:
                    merged.append(first + second)
                    index += 2
                else:
                    merged.append(parts[index])
                    index += 1
            parts = merged
        return [self._bytes_to_id[part] for part in parts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        vocab = self.vocab
        try:
            return b"".join([vocab[token_id] for token_id in ids])
        except KeyError as error:
            raise ValueError(f"token id {error.args[0]!r} is not in the vocabulary (ids 0..{self.vocab_size - 1})") from None

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Encodes many texts; the tiktoken path releases the GIL, so threads run in parallel."""
        if num_threads <= 1 or len(texts) <= 1:
            return [self.encode(text) for text in texts]
        with concurrent.futures.ThreadPoolExecutor(num_threads) as executor:
            return list(executor.map(self.encode, texts))

    def encode_iterable(self, texts: Iterable[str], *, buffer_chars: int = 1 << 16) -> Iterator[int]:
        """Lazily encodes the concatenation of `texts` (e.g. a file's lines) in bounded memory.

        The result equals `encode("".join(texts))`: text is held back until a cut that cannot
        change the tokenization (see `_safe_cut`), looked for once `buffer_chars` are buffered.
        Memory stays about `buffer_chars` unless the text has no cut for long stretches.
        """
        buffer = ""
        for text in texts:
            buffer += text
            if len(buffer) >= buffer_chars:
                cut = self._safe_cut(buffer)
                if cut > 0:
                    yield from self.encode(buffer[:cut])
                    buffer = buffer[cut:]
        if buffer:
            yield from self.encode(buffer)

    def _safe_cut(self, buffer: str) -> int:
        """A position `c` with encode(buffer + more) == encode(buffer[:c]) + encode(buffer[c:] + more).

        A special token starting more than `longest` characters before the end is final, and so
        is the ordinary text before it. In the last ordinary segment, a pre-token ending at least
        3 characters before the end is final (the contraction alternative looks 3 characters
        ahead, the others one), as long as it also ends 3 characters before any special token
        that may still appear. The quick cut is a space after printable ASCII (`x| `): no
        pre-token runs from a non-space over a space, so a pre-token always ends there.
        """
        longest = max((len(token) for token in self.special_tokens), default=0)
        cut = 0
        if self._special_regex is not None:
            for match in self._special_regex.finditer(buffer):
                if match.start() + longest > len(buffer):
                    break
                cut = match.end()
        limit = len(buffer) - longest - 3
        space = buffer.rfind(" ", cut + 1, limit + 1)
        while space > cut:
            if 0x21 <= ord(buffer[space - 1]) <= 0x7E:
                return space
            space = buffer.rfind(" ", cut + 1, space)
        segment_start = cut
        for match in pretokenize.GPT2_REGEX.finditer(buffer, segment_start):
            if match.end() > limit:
                break
            cut = match.end()
        return cut


def _utf8_without_surrogates(text: str) -> bytes:
    """UTF-8 of `text`, each lone surrogate replaced by U+FFFD (what tiktoken does)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
