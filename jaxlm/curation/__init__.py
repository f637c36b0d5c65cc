"""Data curation: WARC/WET extraction, language ID, PII masking, quality filters and deduplication."""
