"""Safetensors files read and written directly, through memory maps, bf16 included.

The format: an 8-byte little-endian header length, a JSON header of dtype, shape and byte
offsets per tensor, then the raw little-endian data. Reading it here (rather than through the
safetensors package) works with any safetensors version, needs no torch, and reads bf16 (numpy
has no bfloat16; ml_dtypes provides it); loading touches each tensor once. A folder holds one
`model.safetensors` or several shards named in `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

INDEX_FILE = "model.safetensors.index.json"

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
SAFETENSORS_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint jaxlm cannot read or write: unsupported, incomplete or inconsistent."""




class SafetensorsFolder:
    """The tensors of one or several safetensors files, read lazily through memory maps."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._locations: dict[str, tuple[Path, int, dict]] = {}
        self._maps: dict[Path, np.memmap] = {}
        for file in files:
            data_start, header = read_safetensors_header(file)
            for name, entry in header.items():
                if name != "__metadata__":
                    self._locations[name] = (file, data_start, entry)

    @classmethod
    def open(cls, folder: Path) -> "SafetensorsFolder":
        index = folder / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return cls([folder / name for name in sorted(set(weight_map.values()))])
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {folder} (other formats such as "
                                  "pytorch_model.bin are not supported)")
        return cls(files)

    def names(self) -> set[str]:
        return set(self._locations)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._locations[name][2]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return _numpy_dtype(self._locations[name][2]["dtype"], name)

    def read(self, name: str) -> np.ndarray:
        """The tensor as a read-only view of the memory-mapped file (no copy)."""
        file, data_start, entry = self._locations[name]
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        raw = self._maps[file][data_start + begin:data_start + end]
        return raw.view(self.dtype(name)).reshape(self.shape(name))


def _numpy_dtype(code: str, name: str) -> np.dtype:
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"tensor {name!r} has safetensors dtype {code}, which jaxlm cannot "
                              f"read; readable: {', '.join(SAFETENSORS_DTYPES)}")
    return SAFETENSORS_DTYPES[code]


def read_safetensors_header(file: Path) -> tuple[int, dict]:
    """(byte offset where tensor data starts, the JSON header) of one safetensors file."""
    with open(file, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        if header_size > os.path.getsize(file) - 8:
            raise CheckpointError(f"{file} is not a safetensors file (header size {header_size} "
                                  "is larger than the file)")
        header = json.loads(handle.read(header_size))
    return 8 + header_size, header


def write_safetensors(file: Path, tensors: dict[str, np.ndarray]) -> None:
    """Write tensors (any dtype in SAFETENSORS_DTYPES, bf16 included) as one safetensors file."""
    header: dict = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for name, array in tensors.items():
        code = SAFETENSORS_CODES.get(array.dtype.newbyteorder("<"))
        if code is None:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {array.dtype}")
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header so data is 8-byte aligned
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for array in tensors.values():
            little_endian = array.astype(array.dtype.newbyteorder("<"), copy=False)
            np.ascontiguousarray(little_endian).reshape(-1).view(np.uint8).tofile(handle)
