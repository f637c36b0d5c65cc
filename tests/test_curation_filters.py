"""PII masking, Gopher rules at their boundaries, the quality classifier, DSIR, perplexity."""

import collections
import random

import jax
import numpy as np
import pytest

from jaxlm.curation import classifier, dsir, pii
from jaxlm.curation.quality import GopherConfig, gopher_quality_filter

PHONES = ["2831823829", "(283)-182-3829", "(283) 182 3829", "283-182-3829", "283.182.3829", "+1 283 182 3829",
          "1-800-555-1234"]
PHONE_NEAR_MISSES = ["555-1234", "123-45-6789", "ISBN 978-3-16-148410-0", "1234-5678-9012-3456", "2024-01-15",
                     "12345678901234", "v283.182.3829.1", "28318238"]
IPS = ["192.168.0.1", "10.0.0.255", "255.255.255.255", "8.8.8.8"]
IP_NEAR_MISSES = ["256.1.1.1", "1.2.3.4.5", "1.2.3", "300.300.300.300", "192.168.01.1"]
EMAILS = ["bob@example.com", "a.b+tag@mail.example.co.uk", "X_Y-9@sub-domain.org"]
EMAIL_NEAR_MISSES = ["user@localhost", "a@b.c", "@handle", "name at example dot com", "x@y.com-z"]


@pytest.mark.parametrize("value", PHONES)
def test_phone_numbers_are_masked_in_context(value):
    assert pii.mask_phone_numbers(f"Call {value} today.") == (f"Call {pii.PHONE_MASK} today.", 1)


@pytest.mark.parametrize("value", IPS)
def test_ip_addresses_are_masked_in_context(value):
    assert pii.mask_ips(f"Server at {value}.") == (f"Server at {pii.IP_MASK}.", 1)


@pytest.mark.parametrize("value", EMAILS)
def test_emails_are_masked_in_context(value):
    assert pii.mask_emails(f"Write to <{value}>, please") == (f"Write to <{pii.EMAIL_MASK}>, please", 1)


@pytest.mark.parametrize("function, value", [(pii.mask_phone_numbers, value) for value in PHONE_NEAR_MISSES]
                         + [(pii.mask_ips, value) for value in IP_NEAR_MISSES]
                         + [(pii.mask_emails, value) for value in EMAIL_NEAR_MISSES])
def test_near_misses_are_not_masked(function, value):
    text = f"see {value} here"
    assert function(text) == (text, 0)


def test_mask_pii_counts_each_kind():
    text = "Mail bob@example.com or 283-182-3829; host 10.1.2.3 and alice@example.org"
    masked, counts = pii.mask_pii(text)
    assert counts == {"email": 2, "ip": 1, "phone": 1}
    assert masked == (f"Mail {pii.EMAIL_MASK} or {pii.PHONE_MASK}; host {pii.IP_MASK} and {pii.EMAIL_MASK}")


def _words(count, length=5):
    return " ".join(["w" * length] * count)


@pytest.mark.parametrize("text, expected", [
    (_words(50), (True, None)),
    (_words(49), (False, "too_few_words")),
    (_words(100_000), (True, None)),
    (_words(100_001), (False, "too_many_words")),
    (_words(60, 3), (True, None)),
    (" ".join(["ab"] * 30 + ["abcd"] * 30), (True, None)),  # mean exactly 3
    (" ".join(["ab"] * 31 + ["abcd"] * 29), (False, "mean_word_length_too_short")),
    (_words(60, 10), (True, None)),
    (" ".join(["w" * 11] * 30 + ["w" * 9] * 29 + ["w" * 12]), (False, "mean_word_length_too_long")),
    ("\n".join([_words(10)] * 7 + [_words(10) + " ..."] * 3), (True, None)),  # 30% of lines
    ("\n".join([_words(10)] * 6 + [_words(10) + " ...  "] * 3 + [_words(9) + "\u2026"]), (False, "ellipsis_lines")),
    (" ".join(["word"] * 40 + ["1234"] * 10), (True, None)),  # 80% alphabetic
    (" ".join(["word"] * 39 + ["1234"] * 11), (False, "non_alphabetic_words")),
])
def test_gopher_rules_at_their_boundaries(text, expected):
    assert gopher_quality_filter(text) == expected


def test_gopher_thresholds_are_configurable():
    assert gopher_quality_filter(_words(10), GopherConfig(min_words=10)) == (True, None)


def _synthetic_corpora(seed=0):
    rng = random.Random(seed)
    good = "the river valley holds old stone bridges where farmers crossed with grain during the long harvest season".split()
    spam = "buy cheap pills click here free offer best price win money now login account password deal".split()
    make = lambda vocabulary: " ".join(rng.choice(vocabulary) for _ in range(rng.randint(20, 40)))  # noqa: E731
    return [make(good) for _ in range(120)], [make(spam) for _ in range(120)]


def test_classifier_trains_from_files_and_separates_held_out_documents(tmp_path):
    positives, negatives = _synthetic_corpora()
    (tmp_path / "positives.txt").write_text("\n".join(positives[:100]) + "\n")
    (tmp_path / "negatives.txt").write_text("\n".join(negatives[:100]) + "\n")
    config = classifier.ClassifierConfig(num_buckets=4099, dim=8, epochs=4)
    model = classifier.train_classifier(str(tmp_path / "positives.txt"), str(tmp_path / "negatives.txt"), config)
    model.save(str(tmp_path / "model.npz"))
    loaded = classifier.QualityClassifier.load(str(tmp_path / "model.npz"))
    assert all(loaded.score(text) > 0.9 for text in positives[100:])
    assert all(loaded.score(text) < 0.1 for text in negatives[100:])
    assert loaded.score(positives[0]) == model.score(positives[0])


def test_dsir_log_weights_match_a_hand_computation_and_selection_favours_the_target():
    config = dsir.DsirConfig(num_buckets=97, ngrams=2, alpha=0.5)
    target = ["river bridge stone", "stone bridge river valley"]
    raw = ["river bridge", "buy cheap pills", "cheap river"]
    # oracle: counts with a Counter over the bucket ids, smoothed log-probabilities in float64
    def log_probs(texts):
        counter = collections.Counter(i for text in texts for i in dsir.hashed_ngrams(text, 97, 2).tolist())
        counts = np.array([counter[i] for i in range(97)], dtype=np.float64)
        return np.log((counts + 0.5) / (counts.sum() + 0.5 * 97))
    difference = log_probs(target) - log_probs(raw)
    expected = [sum(difference[i] for i in dsir.hashed_ngrams(text, 97, 2).tolist()) for text in raw]
    weights = dsir.importance_log_weights(raw, dsir.log_probabilities(dsir.bucket_counts(target, config), 0.5),
                                          dsir.log_probabilities(dsir.bucket_counts(raw, config), 0.5), config)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    assert len(dsir.hashed_ngrams("a b c", 97, 2)) == 3 + 2  # unigrams + bigrams
    positives, negatives = _synthetic_corpora(1)
    chosen = dsir.dsir_select(positives[:50] + negatives[:50], positives[50:], 40, dsir.DsirConfig(num_buckets=1031))
    assert len(set(chosen.tolist())) == 40 and (chosen < 50).mean() >= 0.95


def test_perplexity_matches_a_float64_reference_over_windows():
    from jaxlm import model
    from jaxlm.config import ModelConfig
    from jaxlm.curation.perplexity import PerplexityScorer
    from jaxlm.tokenizer import Tokenizer

    tokenizer = Tokenizer({i: bytes([i]) for i in range(256)}, [], [])
    cfg = ModelConfig(vocab_size=257, embed_dim=48, num_layers=1, num_heads=6, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, max_seq_len=32, compute_dtype="float32")
    params = model.init_params(cfg, jax.random.key(3))
    text = "A river of thirty-seven bytes or more, surely."
    ids = np.array(tokenizer.encode(text))
    scorer = PerplexityScorer(cfg, params, tokenizer, window=13)
    losses = scorer.token_negative_log_likelihoods(text)
    expected = []
    for start in range(0, ids.size - 1, 13):  # oracle: each window alone, log-softmax in float64
        chunk = ids[start:start + 14]
        logits = np.asarray(model.forward(cfg, params, chunk[None, :-1])[0][0], np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        expected.extend(-log_probs[np.arange(chunk.size - 1), chunk[1:]])
    assert losses.shape == (ids.size - 1,)
    np.testing.assert_allclose(losses, expected, rtol=1e-4, atol=1e-4)
    assert scorer.perplexity(text) == pytest.approx(np.exp(np.mean(expected)), rel=1e-4)
    assert scorer.perplexity("a") == float("inf")
