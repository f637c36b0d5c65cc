"""Benchmarks of the byte-level BPE tokenizer on CPU.

    python tools/bench_tokenizer.py --small-corpus corpus.en --large-inputs a.txt b.txt \
        --min-large-bytes 20000000 --repeats 3

Measures (median of `--repeats` runs, each training in a fresh subprocess):
  1. train_bpe on the small corpus at vocab 500 with <|endoftext|>;
  2. train_bpe on the large inputs (concatenated, repeated until `--min-large-bytes`) at vocab
     10000 against the Hugging Face `tokenizers` ByteLevel BPE trainer, with peak memory;
  3. encode throughput of the trained 10k tokenizer against tiktoken on the same vocabulary,
     in one process, and of `python -m jaxlm.tokenize encode` with 1 and 2 processes.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TRAIN_OURS = """
import json, resource, sys, time
from jaxlm.tokenizer import train_bpe
if __name__ == "__main__":
    start = time.perf_counter()
    vocab, merges = train_bpe(sys.argv[1], int(sys.argv[2]), ["<|endoftext|>"], num_workers=int(sys.argv[3]), progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "merges": len(merges),
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

TRAIN_HUGGING_FACE = """
import json, resource, sys, time
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
start = time.perf_counter()
tokenizer = Tokenizer(models.BPE())
tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
trainer = trainers.BpeTrainer(vocab_size=int(sys.argv[2]), special_tokens=["<|endoftext|>"], show_progress=False,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tokenizer.train([sys.argv[1]], trainer)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_python(code: str, *arguments: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_runs(repeats: int, function) -> tuple[float, list]:
    runs = [function() for _ in range(repeats)]
    return statistics.median(run["seconds"] for run in runs), runs


def build_large_input(paths: list[str], min_bytes: int, out_path: str) -> int:
    size = 0
    with open(out_path, "wb") as out:
        while size < min_bytes:
            for path in paths:
                with open(path, "rb") as file:
                    data = file.read()
                out.write(data)
                size += len(data)
    return size


def bench_training(arguments, large_path: str) -> None:
    small, _ = median_runs(arguments.repeats, lambda: run_python(TRAIN_OURS, arguments.small_corpus, "500", "1"))
    print(f"train small corpus, vocab 500, 1 process: median {small:.3f} s")
    trainers = {"jaxlm train_bpe": (TRAIN_OURS, [str(arguments.num_workers)]), "HF tokenizers": (TRAIN_HUGGING_FACE, [])}
    runs = {name: [] for name in trainers}
    for _ in range(arguments.repeats):  # interleaved, so both see the same machine load
        for name, (code, extra) in trainers.items():
            runs[name].append(run_python(code, large_path, "10000", *extra))
    for name, name_runs in runs.items():
        seconds = statistics.median(run["seconds"] for run in name_runs)
        peaks = ", ".join(f"{key}={max(run[key] for run in name_runs):.0f}" for key in name_runs[0] if key.endswith("mib"))
        print(f"train large, vocab 10000, {name}: median {seconds:.2f} s of {[round(run['seconds'], 2) for run in name_runs]}; {peaks}")


def bench_encoding(arguments, large_path: str, work_directory: str) -> None:
    import tiktoken

    from jaxlm.tokenizer import Tokenizer, train_bpe

    tokenizer_directory = os.path.join(work_directory, "tokenizer")
    vocab, merges = train_bpe(large_path, 10000, ["<|endoftext|>"], progress=False)
    tokenizer = Tokenizer(vocab, merges, ["<|endoftext|>"])
    tokenizer.save(tokenizer_directory)
    reference = tiktoken.Encoding("reference", pat_str=tokenizer._encoding._pat_str,
                                  mergeable_ranks={token: token_id for token_id, token in vocab.items() if token_id > 0},
                                  special_tokens={"<|endoftext|>": 0})
    with open(large_path, encoding="utf-8") as file:
        text = file.read()
    megabytes = len(text.encode("utf-8")) / 1e6
    assert tokenizer.encode(text) == reference.encode(text, allowed_special="all")  # also the warm-up
    ours, theirs = [], []
    for _ in range(arguments.repeats):
        ours.append(_time(lambda: tokenizer.encode(text)))
        theirs.append(_time(lambda: reference.encode(text, allowed_special="all")))
    ours, theirs = statistics.median(ours), statistics.median(theirs)
    print(f"encode {megabytes:.1f} MB, 1 process: jaxlm {megabytes / ours:.2f} MB/s, tiktoken {megabytes / theirs:.2f} MB/s "
          f"(ratio {theirs / ours:.2f})")
    for processes in sorted({1, arguments.num_workers}):
        def encode_shards():
            out = os.path.join(work_directory, f"shards-{processes}")
            shutil.rmtree(out, ignore_errors=True)
            command = [sys.executable, "-m", "jaxlm.tokenize", "encode", "--tokenizer", tokenizer_directory, "--input",
                       large_path, "--out", out, "--num-workers", str(processes), "--shard-bytes", str(4 << 20), "--no-progress"]
            return _time(lambda: subprocess.run(command, check=True, capture_output=True))
        seconds = statistics.median(encode_shards() for _ in range(arguments.repeats))
        print(f"shard CLI, {processes} processes: {megabytes / seconds:.2f} MB/s ({seconds:.2f} s, start-up included)")


def _time(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small-corpus", required=True, help="small UTF-8 corpus (e.g. the CS336 corpus.en)")
    parser.add_argument("--large-inputs", nargs="+", required=True, help="UTF-8 files for the large benchmark")
    parser.add_argument("--min-large-bytes", type=int, default=20_000_000, help="repeat the large inputs to this size")
    parser.add_argument("--num-workers", type=int, default=os.cpu_count(), help="processes for training and the shard CLI")
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as work_directory:
        large_path = os.path.join(work_directory, "large.txt")
        size = build_large_input(arguments.large_inputs, arguments.min_large_bytes, large_path)
        print(f"large input: {size / 1e6:.1f} MB from {len(arguments.large_inputs)} files; "
              f"{os.cpu_count()} CPUs; python {sys.version.split()[0]}")
        bench_training(arguments, large_path)
        bench_encoding(arguments, large_path, work_directory)


if __name__ == "__main__":
    main()
