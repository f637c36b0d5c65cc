"""CPU benchmark of the curation pipeline on a WARC built from a folder of plain-text books.

    python tools/bench_curation.py --prose PATH/TO/prose --work /tmp/bench_curation
    python tools/bench_curation.py --prose PATH/TO/prose --stream-mb 1500   # + the memory check

What it measures (documents/s and MB/s of extracted text; one line of JSON per measurement,
also appended to WORK/results.jsonl):
1. A WARC: every `.txt` under --prose is cut into pages of --lines-per-page lines, each page an
   HTML response record, spread over 4 gzip WARC files.
2. Per stage, in one process: read+extract, langid, pii, gopher, exact-dedup hashing, line
   hashing, MinHash (shingles, signatures, LSH, Jaccard check, clusters).
3. End to end: `run_pipeline` with the default stages on 1 and on 2 worker processes.
4. MinHash+LSH against datatrove's MinHash stages 1-3 (signatures, buckets, clusters) on the
   same documents with the same parameters (5-word shingles, 14 bands x 8 rows, 64-bit hashes);
   datatrove gets a whitespace word tokenizer, like ours (its default for English is spaCy,
   which is slower). Needs `pip install 'jaxlm[bench]'` (datatrove); skipped with a note if
   missing.
5. With --stream-mb N: a plain WARC of about N MB (the pages repeated) is read and extracted by
   a child process whose address space is capped below the file size (RLIMIT_AS), and its peak
   resident memory is reported: the reader streams, it never holds the file.
"""

from __future__ import annotations

import argparse
import glob
import html
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

from jaxlm.curation import exact_dedup, minhash, warc
from jaxlm.curation.engines import LocalEngine
from jaxlm.curation.langid import identify_language
from jaxlm.curation.pii import mask_pii
from jaxlm.curation.pipeline import PipelineConfig, run_pipeline
from jaxlm.curation.quality import gopher_quality_filter

NUM_FILES = 4


def build_warcs(prose: str, work: str, lines_per_page: int) -> tuple[list[str], list[bytes]]:
    paths = sorted(glob.glob(os.path.join(prose, "**", "*.txt"), recursive=True))
    if not paths:
        raise SystemExit(f"error: no .txt files under {prose!r}; pass the prose folder with --prose")
    records = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as file:
            lines = file.read().split("\n")
        for start in range(0, len(lines), lines_per_page):
            body = "\n".join(f"<p>{html.escape(line)}</p>" for line in lines[start:start + lines_per_page] if line.strip())
            page = f"<html><head><title>{os.path.basename(path)}</title></head><body>{body}</body></html>"
            records.append(warc.make_record(f"http://prose/{os.path.basename(path)}/{start}", page.encode()))
    outputs = [os.path.join(work, f"prose-{index}.warc.gz") for index in range(NUM_FILES)]
    for index, output in enumerate(outputs):
        warc.write_warc(output, records[index::NUM_FILES])
    return outputs, records


def emit(work: str, record: dict) -> None:
    print(json.dumps(record), flush=True)
    with open(os.path.join(work, "results.jsonl"), "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def stage_rates(work: str, warcs: list[str], config: minhash.MinHashConfig) -> list[str]:
    documents, seconds = timed(lambda: [d for path in warcs for d in warc.iter_warc_documents(path)])
    texts = [document["text"] for document in documents]
    megabytes = sum(len(text.encode()) for text in texts) / 1e6
    stages = {
        "read+extract": lambda: None,
        "langid": lambda: [identify_language(text) for text in texts],
        "pii": lambda: [mask_pii(text) for text in texts],
        "gopher": lambda: [gopher_quality_filter(text) for text in texts],
        "exact_dedup hashing": lambda: exact_dedup.hash64(texts),
        "line_dedup hashing": lambda: exact_dedup.line_hash_counts(texts),
        "minhash+lsh": lambda: minhash.duplicate_clusters(texts, config),
    }
    for name, function in stages.items():
        elapsed = seconds if name == "read+extract" else timed(function)[1]
        emit(work, {"measure": "stage", "stage": name, "documents": len(texts), "seconds": round(elapsed, 3),
                    "documents_per_s": round(len(texts) / elapsed, 1), "text_mb_per_s": round(megabytes / elapsed, 2)})
    return texts


def end_to_end(work: str, warcs: list[str], num_records: int) -> None:
    for workers in (1, 2):
        out = os.path.join(work, f"pipeline-{workers}")
        shutil.rmtree(out, ignore_errors=True)
        with LocalEngine(workers, progress=False) as engine:
            report, seconds = timed(run_pipeline, warcs, out, PipelineConfig(), engine)
        emit(work, {"measure": "end_to_end", "processes": workers, "documents_in": num_records,
                    "documents_out": report["documents_out"], "seconds": round(seconds, 2),
                    "documents_per_s": round(num_records / seconds, 1),
                    "stages": {s["stage"]: [s["documents_in"], s["documents_out"]] for s in report["stages"]}})


def datatrove_minhash(work: str, texts: list[str], config: minhash.MinHashConfig) -> None:
    try:
        from datatrove.data import Document
        from datatrove.executor import LocalPipelineExecutor
        from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                      MinhashDedupSignature)
        from datatrove.utils.hashing import HashConfig
        from datatrove.utils.word_tokenizers import WordTokenizer
    except ImportError:
        emit(work, {"measure": "minhash_vs_datatrove", "skipped": "datatrove is not installed: pip install 'jaxlm[bench]'"})
        return

    class WhitespaceTokenizer(WordTokenizer):
        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            raise NotImplementedError

    dt_config = MinhashConfig(hash_config=HashConfig(precision=64), num_buckets=config.num_bands,
                              hashes_per_bucket=config.rows_per_band, n_grams=config.ngrams)
    folder = os.path.join(work, "datatrove")
    shutil.rmtree(folder, ignore_errors=True)
    documents = [Document(text=text, id=str(index)) for index, text in enumerate(texts)]
    steps = [
        [documents, MinhashDedupSignature(os.path.join(folder, "signatures"), config=dt_config, language=WhitespaceTokenizer())],
        [MinhashDedupBuckets(os.path.join(folder, "signatures"), os.path.join(folder, "buckets"), config=dt_config)],
        [MinhashDedupCluster(os.path.join(folder, "buckets"), os.path.join(folder, "remove_ids"), config=dt_config)],
    ]
    total = 0.0
    for number, pipeline in enumerate(steps):
        tasks = config.num_bands if number == 1 else 1
        executor = LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1,
                                         logging_dir=os.path.join(folder, f"logs-{number}"))
        total += timed(executor.run)[1]
    ours, seconds = timed(minhash.duplicate_clusters, texts, config)
    emit(work, {"measure": "minhash_vs_datatrove", "documents": len(texts), "ours_seconds": round(seconds, 2),
                "datatrove_seconds": round(total, 2), "speedup": round(total / seconds, 2),
                "ours_duplicates_removed": int((ours != np.arange(len(texts))).sum()),
                "parameters": {"ngrams": config.ngrams, "bands": config.num_bands, "rows": config.rows_per_band}})


def stream_check(work: str, records: list[bytes], megabytes: int) -> None:
    path = os.path.join(work, "stream.warc")
    block = b"".join(records)
    with open(path, "wb") as file:
        for _ in range(max(1, int(megabytes * 1e6 // len(block)))):
            file.write(block)
    size = os.path.getsize(path)
    limit = size // 2
    child = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (%d, %d)); "
             "from jaxlm.curation import warc; counts = warc.new_counts(); "
             "chars = sum(len(d['text']) for d in warc.iter_warc_documents(sys.argv[1], counts)); "
             "print(counts['documents'], chars)") % (limit, limit)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", child, path], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    emit(work, {"measure": "stream", "file_mb": round(size / 1e6), "address_space_limit_mb": round(limit / 1e6),
                "ok": result.returncode == 0, "documents": result.stdout.split()[0] if result.returncode == 0 else None,
                "peak_rss_mb": round(peak_mb), "seconds": round(seconds, 1),
                "error": result.stderr[-300:] if result.returncode else None})
    os.remove(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prose", required=True, help="folder of .txt files (searched recursively)")
    parser.add_argument("--work", default="bench_curation", help="scratch folder (created)")
    parser.add_argument("--lines-per-page", type=int, default=200, help="lines of text per HTML page")
    parser.add_argument("--stream-mb", type=int, default=0, help="size of the streamed WARC (0: skip the check)")
    arguments = parser.parse_args()
    os.makedirs(arguments.work, exist_ok=True)
    warcs, records = build_warcs(arguments.prose, arguments.work, arguments.lines_per_page)
    emit(arguments.work, {"measure": "input", "records": len(records), "warc_files": len(warcs),
                          "load_average": os.getloadavg(), "cpus": os.cpu_count()})
    config = minhash.MinHashConfig(num_hashes=112, num_bands=14, ngrams=5, jaccard_threshold=0.8)
    texts = stage_rates(arguments.work, warcs, config)
    end_to_end(arguments.work, warcs, len(records))
    datatrove_minhash(arguments.work, texts, config)
    if arguments.stream_mb:
        stream_check(arguments.work, records, arguments.stream_mb)
    emit(arguments.work, {"measure": "done", "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
