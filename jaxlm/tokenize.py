"""Command line for the tokenizer: train a byte-level BPE, encode files into token shards.

    python -m jaxlm.tokenize train --input a.txt b.txt --vocab-size 32000 \\
        --special-tokens '<|endoftext|>' --out runs/tokenizer
    python -m jaxlm.tokenize encode --tokenizer runs/tokenizer --input a.txt b.txt --out runs/shards

`encode` cuts each input file into chunks of about `--shard-bytes` at positions that cannot
change the tokenization (after a special token, or at a newline between printable ASCII) and
encodes one chunk per shard in worker processes. Finished shards are skipped when the command
is run again, so an interrupted run resumes; the shard format is described in `jaxlm.data`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys

import numpy as np
from tqdm import tqdm

from jaxlm import data
from jaxlm.tokenizer import Tokenizer, train_bpe
from jaxlm.tokenizer import pretokenize
from jaxlm.tokenizer.tokenizer import TOKENIZER_FILE

PLAN_FILE = "plan.json"
_worker_state: dict = {}


def train_command(arguments: argparse.Namespace) -> None:
    vocab, merges = train_bpe(
        arguments.input,
        arguments.vocab_size,
        arguments.special_tokens,
        num_workers=arguments.num_workers,
        progress=False if arguments.no_progress else None,
    )
    path = Tokenizer(vocab, merges, arguments.special_tokens).save(arguments.out)
    print(f"wrote {path}: {len(vocab)} tokens, {len(merges)} merges", file=sys.stderr)


def plan_shards(paths: list[str], shard_bytes: int, split_tokens: list[bytes]) -> list[dict]:
    """One work unit per chunk of each input file, in input order."""
    units = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path!r} does not exist or is not a file")
        boundaries = pretokenize.find_chunk_boundaries(path, shard_bytes, split_tokens)
        for start, end in zip(boundaries, boundaries[1:]):
            units.append({"name": data.shard_name(len(units)), "source": os.path.abspath(path), "byte_range": [start, end]})
    return units


def _file_digest(path: str) -> str:
    with open(path, "rb") as file:
        return hashlib.sha256(file.read()).hexdigest()


def _check_plan(out: str, plan: dict) -> None:
    """Writes the plan, or checks that an existing one (an earlier, interrupted run) matches."""
    path = os.path.join(out, PLAN_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as file:
            if json.load(file) != plan:
                raise ValueError(
                    f"{out!r} holds shards of other inputs, sizes or tokenizer; use a new --out directory or delete it"
                )
        return
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(plan, file, indent=1)
    os.replace(path + ".tmp", path)


def _start_worker(tokenizer_directory: str, out: str, separator: str | None) -> None:
    tokenizer = Tokenizer.load(tokenizer_directory)
    _worker_state.update(tokenizer=tokenizer, out=out, separator=separator)


def _encode_unit(unit: dict) -> dict:
    tokenizer: Tokenizer = _worker_state["tokenizer"]
    separator = _worker_state["separator"]
    start, end = unit["byte_range"]
    ids = np.array(tokenizer.encode(pretokenize.read_text(unit["source"], start, end)), dtype=data.token_dtype(tokenizer.vocab_size))
    if separator is None:
        doc_starts = np.zeros(0 if start > 0 else 1, dtype=np.int64)
    else:
        separator_id = tokenizer.special_ids[separator]
        doc_starts = np.flatnonzero(ids == separator_id) + 1
        doc_starts = doc_starts[doc_starts < ids.size]
        if start == 0 or _follows_separator(unit["source"], start, separator.encode("utf-8")):
            doc_starts = np.concatenate([[0], doc_starts])
    return data.write_shard(_worker_state["out"], unit["name"], ids, doc_starts, {"source": unit["source"], "byte_range": unit["byte_range"]})


def _follows_separator(path: str, start: int, separator: bytes) -> bool:
    if start < len(separator):
        return False
    with open(path, "rb") as file:
        file.seek(start - len(separator))
        return file.read(len(separator)) == separator


def encode_command(arguments: argparse.Namespace) -> None:
    tokenizer = Tokenizer.load(arguments.tokenizer)
    separator = arguments.document_separator
    if separator is None and data.DEFAULT_SEPARATOR in tokenizer.special_ids:
        separator = data.DEFAULT_SEPARATOR
    if separator == "":
        separator = None
    if separator is not None and separator not in tokenizer.special_ids:
        raise ValueError(f"document separator {separator!r} is not a special token of the tokenizer ({tokenizer.special_tokens})")
    os.makedirs(arguments.out, exist_ok=True)
    units = plan_shards(arguments.input, arguments.shard_bytes, [token.encode("utf-8") for token in tokenizer.special_tokens])
    plan = {"tokenizer_sha256": _file_digest(os.path.join(arguments.tokenizer, TOKENIZER_FILE)), "separator": separator,
            "inputs": [[os.path.abspath(path), os.path.getsize(path)] for path in arguments.input], "units": units}
    _check_plan(arguments.out, plan)
    finished = {unit["name"]: data.read_shard_metadata(arguments.out, unit["name"]) for unit in units}
    pending = [unit for unit in units if finished[unit["name"]] is None]
    total = sum(unit["byte_range"][1] - unit["byte_range"][0] for unit in pending)
    initargs = (arguments.tokenizer, arguments.out, separator)
    num_workers = max(1, min(arguments.num_workers or os.cpu_count() or 1, len(pending)))
    with tqdm(total=total, unit="B", unit_scale=True, desc="encode", disable=arguments.no_progress or None) as bar:
        if num_workers == 1:
            _start_worker(*initargs)
            results = map(_encode_unit, pending)
            for metadata in results:
                finished[metadata["name"]] = metadata
                bar.update(metadata["byte_range"][1] - metadata["byte_range"][0])
        else:
            with multiprocessing.get_context("spawn").Pool(num_workers, _start_worker, initargs) as pool:
                for metadata in pool.imap_unordered(_encode_unit, pending):
                    finished[metadata["name"]] = metadata
                    bar.update(metadata["byte_range"][1] - metadata["byte_range"][0])
    separator_id = tokenizer.special_ids[separator] if separator is not None else None
    manifest = data.write_manifest(arguments.out, [finished[unit["name"]] for unit in units],
                                   vocab_size=tokenizer.vocab_size, document_separator_id=separator_id)
    print(f"wrote {len(units)} shards ({len(units) - len(pending)} already done), {manifest['num_tokens']} tokens, "
          f"{manifest['num_documents']} documents to {arguments.out}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.tokenize", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a byte-level BPE tokenizer",
                                description="Train a byte-level BPE tokenizer and write DIR/tokenizer.json.")
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    train.add_argument("--vocab-size", type=int, required=True, help="total vocabulary size (>= 256 + specials)")
    train.add_argument("--special-tokens", nargs="*", default=[], metavar="TOKEN",
                       help="special tokens, ids 0..k-1 in this order (e.g. '<|endoftext|>')")
    train.add_argument("--out", required=True, metavar="DIR", help="directory for tokenizer.json")
    train.add_argument("--num-workers", type=int, default=None, help="pre-tokenization processes (default: CPU count)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    train.set_defaults(function=train_command)
    encode = commands.add_parser("encode", help="encode files into token shards",
                                 description="Encode UTF-8 files into token shards (format: see jaxlm/data.py); "
                                             "rerunning resumes and skips finished shards.")
    encode.add_argument("--tokenizer", required=True, metavar="DIR", help="directory holding tokenizer.json")
    encode.add_argument("--input", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    encode.add_argument("--out", required=True, metavar="DIR", help="shard directory (created if missing)")
    encode.add_argument("--shard-bytes", type=int, default=16 << 20, help="input bytes per shard (default 16 MiB)")
    encode.add_argument("--document-separator", default=None, metavar="TOKEN",
                        help="special token that ends a document (default: <|endoftext|> if the tokenizer has it; "
                             "'' for none: then each file is one document)")
    encode.add_argument("--num-workers", type=int, default=None, help="encoding processes (default: CPU count)")
    encode.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    encode.set_defaults(function=encode_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        arguments.function(arguments)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
