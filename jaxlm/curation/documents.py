"""Documents on disk: reading any supported input, and JSONL files written atomically.

A document is a dict with at least `{"id": str, "text": str}` (WARC input adds "url"). Inputs:

    *.warc, *.warc.gz, *.wet, *.wet.gz   WARC 1.0/1.1 (see warc.py)
    *.jsonl, *.jsonl.gz    one JSON object per line with a "text" field (an "id" is made up
                           from the file name and line number when missing)
    anything else          a UTF-8 text file = one document (id = the file name)

Intermediate and final stage files are JSONL, written to a temporary name and renamed, so a
file that exists is complete: that is what makes the pipeline resumable per input file.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Iterable, Iterator

from jaxlm.curation import warc

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")


def read_jsonl(path: str) -> Iterator[dict]:
    with _open_text(path) as file:
        for number, line in enumerate(file):
            if not line.strip():
                continue
            document = json.loads(line)
            if "text" not in document:
                raise ValueError(f"{path}:{number + 1}: a JSONL document needs a 'text' field")
            document.setdefault("id", f"{os.path.basename(path)}:{number}")
            yield document


def iter_input_documents(path: str, counts: dict) -> Iterator[dict]:
    """Documents of one input file; `counts` receives the reader's record counts."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"input {path!r} does not exist or is not a file")
    if path.endswith(WARC_SUFFIXES):
        yield from warc.iter_warc_documents(path, counts)
    elif path.endswith(JSONL_SUFFIXES):
        yield from read_jsonl(path)
    else:
        with open(path, encoding="utf-8", errors="replace") as file:
            yield {"id": os.path.basename(path), "text": file.read()}


def write_jsonl(path: str, documents: Iterable[dict]) -> int:
    """Write documents to `path` atomically; returns how many."""
    count = 0
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        for document in documents:
            file.write(json.dumps(document, ensure_ascii=False) + "\n")
            count += 1
    os.replace(path + ".tmp", path)
    return count


def write_json(path: str, value) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(value, file, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def write_text(path: str, documents: Iterable[dict], separator: str) -> int:
    """The tokenizer's input: each document's text followed by `separator`, atomically."""
    count = 0
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        for document in documents:
            file.write(document["text"] + separator)
            count += 1
    os.replace(path + ".tmp", path)
    return count
