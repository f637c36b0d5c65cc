"""Command line for data curation: WARC/WET/JSONL files -> filtered, deduplicated text.

    python -m jaxlm.curate --input crawl/*.warc.gz --out runs/curated --lang en
    python -m jaxlm.tokenize encode --tokenizer runs/tokenizer --input runs/curated/text/*.txt \\
        --out runs/shards

Stages (default: langid pii gopher exact_dedup line_dedup minhash) run in the order given by
`--stages`; see jaxlm/curation/pipeline.py. Work is spread over input files (`--num-workers`
processes, or `--engine ray`). Rerunning the same command resumes: finished files are skipped.
The run's report (documents in and out, drop reasons per stage) is OUT/report.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from jaxlm.curation.engines import make_engine
from jaxlm.curation.minhash import MinHashConfig
from jaxlm.curation.pipeline import CORPUS_STAGES, DEFAULT_STAGES, DOCUMENT_STAGES, PipelineConfig, run_pipeline
from jaxlm.curation.quality import GopherConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jaxlm.curate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="WARC/WET (.warc, .warc.gz, .wet, .wet.gz), JSONL (.jsonl[.gz], 'text' field) or text files")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created; reused to resume)")
    parser.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES), choices=DOCUMENT_STAGES + CORPUS_STAGES,
                        metavar="STAGE", help=f"stages in order, from {DOCUMENT_STAGES + CORPUS_STAGES}")
    parser.add_argument("--lang", nargs="*", default=["en"], metavar="CODE",
                        help="languages to keep (ISO 639-1); none given: keep all")
    parser.add_argument("--min-lang-score", type=float, default=0.5, help="minimum language-ID confidence")
    parser.add_argument("--min-words", type=int, default=50, help="Gopher: fewest words")
    parser.add_argument("--max-words", type=int, default=100_000, help="Gopher: most words")
    parser.add_argument("--classifier", default=None, metavar="MODEL.npz", help="quality classifier (classifier stage)")
    parser.add_argument("--min-quality", type=float, default=0.5, help="classifier stage: minimum p(positive)")
    parser.add_argument("--perplexity-run", default=None, metavar="RUN_DIR", help="jaxlm run (perplexity stage)")
    parser.add_argument("--max-perplexity", type=float, default=1000.0, help="perplexity stage: highest kept")
    parser.add_argument("--num-hashes", type=int, default=112, help="MinHash: signature length k")
    parser.add_argument("--num-bands", type=int, default=14, help="MinHash LSH: bands b (k / b rows each)")
    parser.add_argument("--ngrams", type=int, default=5, help="MinHash: words per shingle")
    parser.add_argument("--jaccard-threshold", type=float, default=0.8, help="MinHash: duplicates at or above")
    parser.add_argument("--separator", default="<|endoftext|>", help="written after every document of the output text")
    parser.add_argument("--engine", choices=["local", "ray"], default="local", help="where per-file work runs")
    parser.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--num-workers", type=int, default=None, help="processes (default: CPU count)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def config_from_arguments(arguments: argparse.Namespace) -> PipelineConfig:
    gopher = dataclasses.replace(GopherConfig(), min_words=arguments.min_words, max_words=arguments.max_words)
    minhash = MinHashConfig(arguments.num_hashes, arguments.num_bands, arguments.ngrams, arguments.jaccard_threshold)
    return PipelineConfig(
        stages=tuple(arguments.stages), languages=tuple(arguments.lang), min_language_score=arguments.min_lang_score,
        gopher=gopher, classifier_path=arguments.classifier, min_quality_score=arguments.min_quality,
        perplexity_run=arguments.perplexity_run, max_perplexity=arguments.max_perplexity, minhash=minhash,
        separator=arguments.separator,
    )


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        config = config_from_arguments(arguments)
        num_workers = arguments.num_workers or min(os.cpu_count() or 1, len(arguments.input))
        with make_engine(arguments.engine, num_workers, not arguments.no_progress, arguments.ray_address) as engine:
            report = run_pipeline(arguments.input, arguments.out, config, engine)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    summary = {stage["stage"]: [stage["documents_in"], stage["documents_out"]] for stage in report["stages"]}
    print(f"{report['documents_out']} documents kept; per stage [in, out]: {json.dumps(summary)}; "
          f"report: {os.path.join(arguments.out, 'report.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
