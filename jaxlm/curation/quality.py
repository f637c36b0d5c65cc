"""Gopher quality rules (Rae et al. 2021, "Scaling Language Models", appendix A.1.1), a subset.

A document passes when all of these hold (bounds inclusive, all configurable):
- it has between 50 and 100,000 words;
- the mean word length is between 3 and 10 characters;
- at most 30% of its non-empty lines end with an ellipsis ("..." or "…");
- at least 80% of its words contain an alphabetic character.

`gopher_quality_filter(text) -> (passes, reason)`: `reason` is None for a document that passes,
else the name of the first rule it breaks, in the order above: "too_few_words",
"too_many_words", "mean_word_length_too_short", "mean_word_length_too_long", "ellipsis_lines",
"non_alphabetic_words". These names are the drop reasons of the pipeline's report.

Words are whitespace-separated tokens (a simplification of the paper's tokenizer: punctuation
stays attached, so "end." is one word of 4 characters). Trailing whitespace does not hide an
ellipsis at the end of a line.
"""

from __future__ import annotations

import dataclasses

import regex

# A whitespace-delimited word with no letter (Unicode category L) in it; one regex scan is
# about 10x faster than testing every character of every word in Python.
_WORD_WITHOUT_LETTERS = regex.compile(r"(?<!\S)[^\s\p{L}]+(?!\S)")


@dataclasses.dataclass(frozen=True)
class GopherConfig:
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_ellipsis_line_fraction: float = 0.3
    min_alphabetic_word_fraction: float = 0.8


def _ellipsis_line_fraction(text: str) -> float:
    lines = [line.rstrip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return 0.0
    return sum(line.endswith(("...", "…")) for line in lines) / len(lines)


def gopher_quality_filter(text: str, config: GopherConfig = GopherConfig()) -> tuple[bool, str | None]:
    """(passes, None) or (False, the name of the first rule broken)."""
    words = text.split()
    if len(words) < config.min_words:
        return False, "too_few_words"
    if len(words) > config.max_words:
        return False, "too_many_words"
    mean_length = sum(map(len, words)) / len(words)
    if mean_length < config.min_mean_word_length:
        return False, "mean_word_length_too_short"
    if mean_length > config.max_mean_word_length:
        return False, "mean_word_length_too_long"
    if _ellipsis_line_fraction(text) > config.max_ellipsis_line_fraction:
        return False, "ellipsis_lines"
    alphabetic = len(words) - len(_WORD_WITHOUT_LETTERS.findall(text))
    if alphabetic / len(words) < config.min_alphabetic_word_fraction:
        return False, "non_alphabetic_words"
    return True, None
