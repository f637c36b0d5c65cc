"""Training data: the built-in default corpus and the token-shard format.

Default corpus: `default_corpus()` is the source text of the Python standard library (`.py` files
of the running interpreter, `site-packages` excluded), sorted by relative path, each file followed
by `<|endoftext|>`. It is always available and needs no download, which makes it the corpus of
last resort for smoke runs; it is code, not prose, and it varies with the Python version.

Token shards: a directory written by `python -m jaxlm.tokenize encode`:

    manifest.json             written last; its presence means the directory is complete:
                              {"format": "jaxlm-token-shards", "version": 1, "dtype": "uint16",
                               "vocab_size": V, "num_tokens": N, "num_documents": D,
                               "document_separator_id": id or null, "shards": [metadata, ...]}
    shard-00000.tokens.npy    1-D array of token ids, dtype uint16 (uint32 when V > 65536)
    shard-00000.doc_starts.npy  1-D int64, sorted: offsets in this shard where a document starts
    shard-00000.json          the shard's metadata (name, num_tokens, num_documents, source,
                              byte_range); written after both arrays, so it marks the shard done

A document starts at the beginning of every input file and after every document separator
token (the separator stays in the token stream, ending its document). A shard that continues
a document of the previous shard has no document start at offset 0. Every file is written to a
temporary name and renamed into place, so a killed run leaves no half-written shard.

Reading: `open_shards(directory)` memory-maps the token arrays; `TokenShards.window` returns a
token window with its `segment_ids`: 1 for the first document in the window, +1 at each document
start (0 is left for padding).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig

import numpy as np

SHARD_FORMAT = "jaxlm-token-shards"
MANIFEST_FILE = "manifest.json"
DEFAULT_SEPARATOR = "<|endoftext|>"


def default_corpus(max_bytes: int | None = None, separator: str = DEFAULT_SEPARATOR) -> str:
    """The running interpreter's standard-library `.py` sources, in sorted path order.

    Each file is followed by `separator`. Files that are not valid UTF-8 (a few test fixtures)
    are decoded with U+FFFD replacements. With `max_bytes`, the text stops once its UTF-8 size
    would exceed `max_bytes` (at a character boundary).
    """
    stdlib = sysconfig.get_paths()["stdlib"]
    pieces = []
    size = 0
    for path in _stdlib_sources(stdlib):
        with open(path, "rb") as file:
            data = file.read() + separator.encode("utf-8")
        if max_bytes is not None and size + len(data) > max_bytes:
            pieces.append(data[: max_bytes - size].decode("utf-8", errors="ignore"))
            break
        pieces.append(data.decode("utf-8", errors="replace"))
        size += len(data)
    return "".join(pieces)


def _stdlib_sources(stdlib: str) -> list[str]:
    sources = []
    for directory, subdirectories, files in os.walk(stdlib):
        subdirectories[:] = [name for name in subdirectories if name not in ("site-packages", "dist-packages", "__pycache__")]
        sources += [os.path.join(directory, name) for name in files if name.endswith(".py")]
    return sorted(sources, key=lambda path: os.path.relpath(path, stdlib).split(os.sep))


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _atomic_write(path: str, write) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as file:
        write(file)
    os.replace(temporary, path)


def _write_json(path: str, content: dict) -> None:
    _atomic_write(path, lambda file: file.write(json.dumps(content, indent=1).encode("utf-8")))


def write_shard(directory: str, name: str, tokens: np.ndarray, doc_starts: np.ndarray, metadata: dict) -> dict:
    """Writes one shard atomically (tokens, document starts, then its metadata) and returns the metadata."""
    tokens = np.asarray(tokens)
    doc_starts = np.asarray(doc_starts, dtype=np.int64)
    if tokens.ndim != 1 or doc_starts.ndim != 1:
        raise ValueError(f"shard {name}: tokens and doc_starts must be 1-D, got {tokens.shape} and {doc_starts.shape}")
    if doc_starts.size and (np.any(np.diff(doc_starts) <= 0) or doc_starts[0] < 0 or doc_starts[-1] >= max(tokens.size, 1)):
        raise ValueError(f"shard {name}: doc_starts must increase strictly and lie in [0, {tokens.size})")
    _atomic_write(os.path.join(directory, f"{name}.tokens.npy"), lambda file: np.save(file, tokens))
    _atomic_write(os.path.join(directory, f"{name}.doc_starts.npy"), lambda file: np.save(file, doc_starts))
    metadata = {**metadata, "name": name, "num_tokens": int(tokens.size), "num_documents": int(doc_starts.size)}
    _write_json(os.path.join(directory, f"{name}.json"), metadata)
    return metadata


def read_shard_metadata(directory: str, name: str) -> dict | None:
    """The metadata of a finished shard, or None when the shard is missing or incomplete."""
    path = os.path.join(directory, f"{name}.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def write_manifest(directory: str, shards: list[dict], *, vocab_size: int, document_separator_id: int | None) -> dict:
    """Writes manifest.json, the mark that all shards in it are complete."""
    manifest = {
        "format": SHARD_FORMAT,
        "version": 1,
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": vocab_size,
        "document_separator_id": document_separator_id,
        "num_tokens": sum(shard["num_tokens"] for shard in shards),
        "num_documents": sum(shard["num_documents"] for shard in shards),
        "shards": shards,
    }
    _write_json(os.path.join(directory, MANIFEST_FILE), manifest)
    return manifest


@dataclasses.dataclass
class TokenShards:
    """Memory-mapped token shards: `tokens[i]` and `doc_starts[i]` for shard i."""

    manifest: dict
    tokens: list[np.ndarray]
    doc_starts: list[np.ndarray]

    @property
    def num_tokens(self) -> int:
        return int(sum(array.size for array in self.tokens))

    def window(self, shard_index: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens `[start, start + length)` of one shard and their segment ids (from 1)."""
        tokens = self.tokens[shard_index]
        if start < 0 or start + length > tokens.size:
            raise ValueError(f"window [{start}, {start + length}) is outside shard {shard_index} of {tokens.size} tokens")
        doc_starts = self.doc_starts[shard_index]
        positions = np.arange(start, start + length)
        before = np.searchsorted(doc_starts, start, side="right")
        segment_ids = 1 + np.searchsorted(doc_starts, positions, side="right") - before
        return np.asarray(tokens[start : start + length]), segment_ids.astype(np.int32)

    def sample_batch(self, rng: np.random.Generator, batch_size: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """`batch_size` random windows of `seq_len` tokens: (tokens, segment_ids), each [B, T]."""
        starts_per_shard = np.array([max(array.size - seq_len + 1, 0) for array in self.tokens])
        if starts_per_shard.sum() == 0:
            raise ValueError(f"no shard holds {seq_len} tokens; use a smaller seq_len or larger shards")
        shard_indices = rng.choice(len(self.tokens), size=batch_size, p=starts_per_shard / starts_per_shard.sum())
        windows = [self.window(int(index), int(rng.integers(starts_per_shard[index])), seq_len) for index in shard_indices]
        return np.stack([tokens for tokens, _ in windows]), np.stack([segments for _, segments in windows])


def open_shards(directory: str | os.PathLike) -> TokenShards:
    """Opens a complete shard directory (one with manifest.json), memory-mapping every shard."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory!r} has no {MANIFEST_FILE}: it is not a token-shard directory or its encoding did not "
            "finish; run `python -m jaxlm.tokenize encode` (it resumes where it stopped)"
        )
    with open(path, encoding="utf-8") as file:
        manifest = json.load(file)
    if manifest.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a {SHARD_FORMAT} manifest")
    tokens = [np.load(os.path.join(directory, f"{shard['name']}.tokens.npy"), mmap_mode="r") for shard in manifest["shards"]]
    doc_starts = [np.load(os.path.join(directory, f"{shard['name']}.doc_starts.npy")) for shard in manifest["shards"]]
    return TokenShards(manifest=manifest, tokens=tokens, doc_starts=doc_starts)
