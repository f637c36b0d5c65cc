"""Data curation: WARC/WET extraction, language ID, PII masking, quality filters and deduplication.

One module per stage, each usable alone:

    warc.py         WARC/WET reading (fastwarc + resiliparse), corrupt records counted and skipped
    langid.py       identify_language(text) -> (lang, score), bundled fastText lid.176.ftz, offline
    pii.py          mask_emails / mask_phone_numbers / mask_ips / mask_pii -> (text, count)
    quality.py      gopher_quality_filter(text) -> (passes, reason)
    classifier.py   fastText-style quality classifier: train from positive/negative files, score
    perplexity.py   perplexity under a jaxlm model trained on target text
    dsir.py         DSIR importance resampling with hashed n-gram features
    exact_dedup.py  exact document dedup and corpus-wide line dedup (hashes only in memory)
    minhash.py      MinHash + LSH + Jaccard check + union-find: minhash_dedup(...)
    documents.py    input formats and atomic JSONL output
    engines.py      local processes or Ray
    pipeline.py     the composable, resumable pipeline behind `python -m jaxlm.curate`

Needs the `curation` extra (`pip install 'jaxlm[curation]'`), and `ray` for `--engine ray`.
"""
