"""The curation pipeline: input files -> filtered, deduplicated text for `jaxlm.tokenize encode`.

Stages, composable in any order by `PipelineConfig.stages` (reading the input always comes
first):

    per document  langid      keep the languages asked for, with confidence >= min_language_score
                  pii         mask emails, phone numbers, IPv4 addresses (drops nothing)
                  gopher      Gopher quality rules (quality.py)
                  classifier  keep p(positive) >= min_quality_score (classifier.py model file)
                  perplexity  keep perplexity <= max_perplexity under a jaxlm run (perplexity.py)
    whole corpus  exact_dedup drop later copies of identical documents
                  line_dedup  remove lines that occur more than once in the corpus (then drop
                              documents left empty)
                  minhash     keep one document per near-duplicate cluster (minhash.py)

Execution: consecutive per-document stages are fused into one step that runs once per input
file, in parallel over files (the engine: local processes or Ray, see engines.py). A corpus
stage is one step of two or three passes over the files, parallel over files, with only hashes
or signatures gathered in the driver. Each step writes `OUT/steps/<k>-<names>/<file>.jsonl`
and, last, `<file>.report.json`: a file whose report exists is not redone, so a killed run
resumes per input file. Final text goes to `OUT/text/<file>.txt`, each document followed by the
separator (`<|endoftext|>`), and `OUT/report.json` holds documents in and out and the drop
reasons of every stage.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import re
from typing import Optional

import numpy as np

from jaxlm.curation import documents, exact_dedup, minhash
from jaxlm.curation.quality import GopherConfig, gopher_quality_filter

DOCUMENT_STAGES = ("langid", "pii", "gopher", "classifier", "perplexity")
CORPUS_STAGES = ("exact_dedup", "line_dedup", "minhash")
DEFAULT_STAGES = ("langid", "pii", "gopher", "exact_dedup", "line_dedup", "minhash")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    stages: tuple[str, ...] = DEFAULT_STAGES
    languages: tuple[str, ...] = ("en",)  # empty: keep every language
    min_language_score: float = 0.5
    gopher: GopherConfig = GopherConfig()
    classifier_path: Optional[str] = None
    min_quality_score: float = 0.5
    perplexity_run: Optional[str] = None
    max_perplexity: float = 1000.0
    minhash: minhash.MinHashConfig = minhash.MinHashConfig()
    separator: str = "<|endoftext|>"

    def __post_init__(self):
        unknown = [stage for stage in self.stages if stage not in DOCUMENT_STAGES + CORPUS_STAGES]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; choose from {DOCUMENT_STAGES + CORPUS_STAGES}")
        if "classifier" in self.stages and not self.classifier_path:
            raise ValueError("the classifier stage needs classifier_path (--classifier MODEL.npz)")
        if "perplexity" in self.stages and not self.perplexity_run:
            raise ValueError("the perplexity stage needs perplexity_run (--perplexity-run RUN_DIR)")


def plan_steps(stages: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Group stages into steps: runs of per-document stages fused, corpus stages alone."""
    steps: list[tuple[str, ...]] = [("read",)]
    for stage in stages:
        if stage in DOCUMENT_STAGES and steps[-1][0] in DOCUMENT_STAGES + ("read",):
            steps[-1] = steps[-1] + (stage,)
        else:
            steps.append((stage,))
    return steps


def file_key(path: str) -> str:
    """A stable output name per input: its base name and a hash of its absolute path."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(path))
    return f"{stem}-{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]}"


# ---------------------------------------------------------------------------------------------
# Per-document stages (run in workers)


@functools.lru_cache(maxsize=2)
def _classifier(path: str):
    from jaxlm.curation.classifier import QualityClassifier

    return QualityClassifier.load(path)


@functools.lru_cache(maxsize=1)
def _perplexity_scorer(run_dir: str):
    from jaxlm.curation.perplexity import PerplexityScorer

    return PerplexityScorer.from_run(run_dir)


def apply_stage(stage: str, document: dict, config: PipelineConfig, pii_counts: collections.Counter) -> Optional[str]:
    """Run one per-document stage in place; returns a drop reason, or None to keep."""
    text = document["text"]
    if stage == "langid":
        from jaxlm.curation.langid import identify_language

        language, score = identify_language(text)
        document["language"], document["language_score"] = language, round(score, 4)
        if config.languages and language not in config.languages:
            return "language"
        return "language_score" if score < config.min_language_score else None
    if stage == "pii":
        from jaxlm.curation.pii import mask_pii

        document["text"], counts = mask_pii(text)
        pii_counts.update(counts)
        return None
    if stage == "gopher":
        return gopher_quality_filter(text, config.gopher)[1]
    if stage == "classifier":
        document["quality_score"] = round(_classifier(config.classifier_path).score(text), 4)
        return "quality_score" if document["quality_score"] < config.min_quality_score else None
    if stage == "perplexity":
        document["perplexity"] = _perplexity_scorer(config.perplexity_run).perplexity(text)
        return "perplexity" if document["perplexity"] > config.max_perplexity else None
    raise ValueError(f"{stage!r} is not a per-document stage")


def new_stage_report(stage: str) -> dict:
    return {"stage": stage, "documents_in": 0, "documents_out": 0, "dropped": {}}


def _drop(report: dict, reason: str) -> None:
    report["dropped"][reason] = report["dropped"].get(reason, 0) + 1


def document_step(task: tuple) -> dict:
    """Read one input file (or the previous step's output) and apply per-document stages."""
    source, output, stages, config = task
    reports = [new_stage_report(stage) for stage in stages]
    counts = {}
    pii_counts: collections.Counter = collections.Counter()

    def kept_documents():
        for document in documents.iter_input_documents(source, counts):
            for stage, report in zip(stages, reports):
                report["documents_in"] += 1
                reason = "empty_text" if stage == "read" and not document["text"].strip() else (
                    None if stage == "read" else apply_stage(stage, document, config, pii_counts))
                if reason:
                    _drop(report, reason)
                    break
                report["documents_out"] += 1
            else:
                yield document

    documents.write_jsonl(output, kept_documents())
    return {"stages": reports, "records": counts, "pii": dict(pii_counts)}


# ---------------------------------------------------------------------------------------------
# Corpus stages: pass functions (run in workers) and the driver logic


def _texts(path: str) -> list[str]:
    return [document["text"] for document in documents.read_jsonl(path)]


def document_hashes(path: str) -> np.ndarray:
    return exact_dedup.hash64(_texts(path))


def line_hash_counts(path: str) -> tuple[np.ndarray, np.ndarray]:
    return exact_dedup.line_hash_counts(_texts(path))


def minhash_signatures(task: tuple) -> tuple[np.ndarray, np.ndarray]:
    path, config = task
    shingle_sets = [minhash.shingle_hashes(text, config.ngrams) for text in _texts(path)]
    valid = np.array([shingles.size > 0 for shingles in shingle_sets], dtype=bool)
    return minhash.minhash_signatures(shingle_sets, config), valid


def selected_shingles(task: tuple) -> dict[int, np.ndarray]:
    path, indices, config = task
    wanted = set(indices)
    return {index: minhash.shingle_hashes(text, config.ngrams) for index, text in enumerate(_texts(path)) if index in wanted}


def write_kept(task: tuple) -> dict:
    """Pass 2 of a corpus stage: copy the kept documents, removing repeated lines if asked."""
    source, output, stage, keep, repeated_lines = task
    report = new_stage_report(stage)

    def kept_documents():
        for index, document in enumerate(documents.read_jsonl(source)):
            report["documents_in"] += 1
            if keep is not None and not keep[index]:
                _drop(report, "duplicate")
                continue
            if repeated_lines is not None:
                document["text"] = exact_dedup.remove_repeated_lines(document["text"], repeated_lines)
                if not document["text"].strip():
                    _drop(report, "empty_after_line_dedup")
                    continue
            report["documents_out"] += 1
            yield document

    documents.write_jsonl(output, kept_documents())
    return {"stages": [report]}


def corpus_verdicts(stage: str, sources: list[str], config: PipelineConfig, engine) -> tuple[list, object]:
    """Per file: a keep mask (or None), and the repeated line hashes (or None)."""
    if stage == "exact_dedup":
        return exact_dedup.first_occurrences(engine.map(document_hashes, sources, "hash documents")), None
    if stage == "line_dedup":
        counts = engine.map(line_hash_counts, sources, "hash lines")
        return [None] * len(sources), exact_dedup.repeated(*exact_dedup.merge_counts(counts))
    return minhash_keep_masks(sources, config.minhash, engine), None


def minhash_keep_masks(sources: list[str], config: minhash.MinHashConfig, engine) -> list[np.ndarray]:
    """Signatures per file -> LSH candidates -> true Jaccard of candidates -> clusters."""
    results = engine.map(minhash_signatures, [(path, config) for path in sources], "minhash signatures")
    sizes = [signatures.shape[0] for signatures, _ in results]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    signatures = np.concatenate([part for part, _ in results]) if results else np.zeros((0, config.num_hashes), np.uint64)
    valid = np.concatenate([part for _, part in results]) if results else np.zeros(0, bool)
    pairs = minhash.candidate_pairs(signatures, config, valid)
    needed = sorted({index for pair in pairs for index in pair})
    by_file = collections.defaultdict(list)
    for index in needed:
        file = int(np.searchsorted(offsets, index, side="right") - 1)
        by_file[file].append(index - int(offsets[file]))
    files = sorted(by_file)
    tasks = [(sources[file], by_file[file], config) for file in files]
    shingles = {}
    for file, part in zip(files, engine.map(selected_shingles, tasks, "minhash candidates")):
        shingles.update({int(offsets[file]) + index: value for index, value in part.items()})
    clusters = minhash.union_find_clusters(len(signatures), minhash.verified_pairs(pairs, shingles, config.jaccard_threshold))
    keep = clusters == np.arange(len(signatures))
    return [keep[offsets[file]:offsets[file + 1]] for file in range(len(sources))]


def _load_report(path: str) -> Optional[dict]:
    import json

    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def _finish(results: list[dict], report_paths: list[str]) -> list[dict]:
    for result, path in zip(results, report_paths):
        documents.write_json(path, result)
    return results


def run_step(step: tuple[str, ...], sources: list[str], outputs: list[str], config: PipelineConfig, engine) -> list[dict]:
    """Run one step over every file whose report is missing; returns every file's report."""
    report_paths = [output + ".report.json" for output in outputs]
    reports = [_load_report(path) for path in report_paths]
    todo = [index for index, report in enumerate(reports) if report is None]
    if not todo:
        return reports
    if step[0] in ("read",) + DOCUMENT_STAGES:
        tasks = [(sources[index], outputs[index], step, config) for index in todo]
        results = engine.map(document_step, tasks, "+".join(step))
    else:
        keep, repeated = corpus_verdicts(step[0], sources, config, engine)
        tasks = [(sources[index], outputs[index], step[0], keep[index], repeated) for index in todo]
        results = engine.map(write_kept, tasks, step[0])
    for index, result in zip(todo, _finish(results, [report_paths[index] for index in todo])):
        reports[index] = result
    return reports


def summarize(inputs: list[str], steps_reports: list[list[dict]], text_paths: list[str]) -> dict:
    """The run's report: reader counts, and per stage documents in/out and drop reasons."""
    records: collections.Counter = collections.Counter()
    pii: collections.Counter = collections.Counter()
    stages: list[dict] = []
    for step_reports in steps_reports:
        for file_report in step_reports:
            records.update(file_report.get("records", {}))
            pii.update(file_report.get("pii", {}))
        for position, first in enumerate(step_reports[0]["stages"] if step_reports else []):
            total = new_stage_report(first["stage"])
            for file_report in step_reports:
                stage_report = file_report["stages"][position]
                total["documents_in"] += stage_report["documents_in"]
                total["documents_out"] += stage_report["documents_out"]
                for reason, count in stage_report["dropped"].items():
                    total["dropped"][reason] = total["dropped"].get(reason, 0) + count
            stages.append(total)
    return {"inputs": inputs, "records": dict(records), "pii_masked": dict(pii), "stages": stages,
            "documents_out": stages[-1]["documents_out"] if stages else 0, "outputs": text_paths}


def run_pipeline(inputs: list[str], out: str, config: PipelineConfig, engine) -> dict:
    """Run every step (resuming finished files), write the text files and OUT/report.json."""
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input {path!r} does not exist or is not a file")
    keys = [file_key(path) for path in inputs]
    if len(set(keys)) != len(keys):
        raise ValueError("the same input file is listed twice")
    sources = list(inputs)
    steps_reports = []
    for number, step in enumerate(plan_steps(config.stages)):
        directory = os.path.join(out, "steps", f"{number}-{'+'.join(step)}")
        os.makedirs(directory, exist_ok=True)
        outputs = [os.path.join(directory, key + ".jsonl") for key in keys]
        steps_reports.append(run_step(step, sources, outputs, config, engine))
        sources = outputs
    os.makedirs(os.path.join(out, "text"), exist_ok=True)
    text_paths = [os.path.join(out, "text", key + ".txt") for key in keys]
    for source, text_path in zip(sources, text_paths):
        documents.write_text(text_path, documents.read_jsonl(source), config.separator)
    report = summarize(list(inputs), steps_reports, text_paths)
    documents.write_json(os.path.join(out, "report.json"), report)
    return report
