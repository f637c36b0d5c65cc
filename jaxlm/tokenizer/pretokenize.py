"""Pre-tokenization: special-token splitting, the GPT-2 regex, and safe chunking of large files.

Byte-level BPE never merges across a pre-token. Text is first cut at special tokens (which are
kept whole and never take part in merges), then each ordinary segment is cut into pre-tokens by
the GPT-2 regex `GPT2_PATTERN`.

Large inputs are processed in chunks. A chunk boundary must not change the pre-tokenization, so
`find_chunk_boundaries` only cuts at two kinds of *safe* positions:

- right after a split token (a special token such as `<|endoftext|>`): text is split there anyway;
- right after a newline that sits between two printable ASCII characters (`x\\ny`): the regex
  always ends a pre-token after such a newline, and the newline alone at the end of a chunk is
  also a pre-token of its own, so the pieces pre-tokenize exactly as the whole.

NOTE: a position that is not safe is never used, so a file without any safe position becomes a
single chunk (correct, but held in memory whole).

Files are UTF-8. Invalid UTF-8 raises `ValueError` naming the file and the byte offset: silently
replacing bytes would train and encode text that is not in the file.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Iterable, Sequence

import regex

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_REGEX = regex.compile(GPT2_PATTERN)

_SCAN_WINDOW_BYTES = 1 << 16


def validate_special_tokens(special_tokens: Iterable[str] | None) -> list[str]:
    """Returns the special tokens as a list, raising a clear error for empty or repeated ones."""
    if special_tokens is None:
        return []
    if isinstance(special_tokens, (str, bytes)):
        raise TypeError(
            f"special_tokens must be a list of strings, got the single string {special_tokens!r}; "
            f"wrap it in a list: [{special_tokens!r}]"
        )
    tokens = list(special_tokens)
    for index, token in enumerate(tokens):
        if not isinstance(token, str):
            raise TypeError(f"special token {index} is {token!r}, not a str")
        if token == "":
            raise ValueError(
                f"special token {index} is the empty string, which would match everywhere; "
                "remove it from special_tokens"
            )
    repeated = sorted({token for token in tokens if tokens.count(token) > 1})
    if repeated:
        raise ValueError(f"special tokens must be distinct; repeated: {repeated}")
    return tokens


def special_token_regex(special_tokens: Sequence[str]) -> regex.Pattern | None:
    """A regex matching any special token, longest first, so `<a><a>` beats `<a>` twice."""
    if not special_tokens:
        return None
    ordered = sorted(special_tokens, key=lambda token: (-len(token), token))
    return regex.compile("|".join(regex.escape(token) for token in ordered))


def split_on_special_tokens(text: str, special_regex: regex.Pattern | None) -> list[tuple[str, bool]]:
    """Cuts `text` into `(piece, is_special)` pairs in order; empty ordinary pieces are dropped."""
    if special_regex is None:
        return [(text, False)] if text else []
    pieces = []
    position = 0
    for match in special_regex.finditer(text):
        if match.start() > position:
            pieces.append((text[position : match.start()], False))
        pieces.append((match.group(), True))
        position = match.end()
    if position < len(text):
        pieces.append((text[position:], False))
    return pieces


def count_pretokens(text: str, special_regex: regex.Pattern | None) -> collections.Counter:
    """Counts the UTF-8 bytes of every pre-token of `text`, special tokens excluded."""
    counts: collections.Counter = collections.Counter()
    for piece, is_special in split_on_special_tokens(text, special_regex):
        if not is_special:
            counts.update(GPT2_REGEX.findall(piece))
    return collections.Counter({word.encode("utf-8"): count for word, count in counts.items()})


def decode_utf8(data: bytes, source: str, start_offset: int = 0) -> str:
    """Decodes UTF-8, turning an error into a `ValueError` that names the file and byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start_offset + error.start
        raise ValueError(
            f"{source} is not valid UTF-8: byte {data[error.start:error.start + 1]!r} at byte offset "
            f"{offset} ({error.reason}); convert the file to UTF-8 first (for example with iconv)"
        ) from None


def read_text(path: str | os.PathLike, start: int, end: int) -> str:
    """Reads and decodes bytes `[start, end)` of a UTF-8 file."""
    with open(path, "rb") as file:
        file.seek(start)
        data = file.read(end - start)
    return decode_utf8(data, os.fspath(path), start)


def _is_printable_ascii(byte: int) -> bool:
    return 0x21 <= byte <= 0x7E


def _safe_positions(window: bytes, split_tokens: Sequence[bytes]) -> list[int]:
    """Safe cut positions inside `window` (see the module docstring), in increasing order."""
    positions = []
    for token in split_tokens:
        found = window.find(token)
        while found != -1:
            positions.append(found + len(token))
            found = window.find(token, found + 1)
    found = window.find(b"\n", 1)
    while found != -1 and found + 1 < len(window):
        if _is_printable_ascii(window[found - 1]) and _is_printable_ascii(window[found + 1]):
            positions.append(found + 1)
        found = window.find(b"\n", found + 1)
    return sorted(set(positions))


def _inside_split_token(window: bytes, position: int, split_tokens: Sequence[bytes]) -> bool:
    """Whether some occurrence of a split token strictly contains `position` of `window`."""
    for token in split_tokens:
        start = max(0, position - len(token) + 1)
        found = window.find(token, start)
        while found != -1 and found < position:
            if found + len(token) > position:
                return True
            found = window.find(token, found + 1)
    return False


def find_chunk_boundaries(
    path: str | os.PathLike, chunk_bytes: int, split_tokens: Sequence[bytes] = ()
) -> list[int]:
    """Byte offsets `[0, ..., file_size]` cutting the file into chunks of about `chunk_bytes`.

    Each boundary is the first safe position at or after a multiple of `chunk_bytes` (scanning
    forward in windows), so the file is read only around the boundaries.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
    file_size = os.path.getsize(path)
    longest_token = max((len(token) for token in split_tokens), default=1)
    overlap = longest_token + 2
    boundaries = [0]
    with open(path, "rb") as file:
        target = chunk_bytes
        while target < file_size:
            cut = _next_safe_position(file, target, file_size, overlap, split_tokens)
            if cut is None:
                break
            if cut > boundaries[-1]:
                boundaries.append(cut)
            target = max(cut, boundaries[-1]) + chunk_bytes
    if boundaries[-1] != file_size:
        boundaries.append(file_size)
    return boundaries


def _next_safe_position(file, target: int, file_size: int, overlap: int, split_tokens) -> int | None:
    """The first safe position >= `target`, or None when the rest of the file has none."""
    window_start = max(0, target - overlap)
    while window_start < file_size:
        file.seek(window_start)
        window = file.read(_SCAN_WINDOW_BYTES + 2 * overlap)
        for position in _safe_positions(window, split_tokens):
            absolute = window_start + position
            if absolute < target or absolute >= file_size:
                continue
            if not _inside_split_token(window, position, split_tokens):
                return absolute
        if window_start + len(window) >= file_size:
            return None
        window_start += _SCAN_WINDOW_BYTES
    return None
