"""Perplexity under a jaxlm model trained on target text: the "generative model of T" filter.

Train a small jaxlm model on text of the kind you want (`python -m jaxlm.train --run-dir RUN
--data target.txt`), then score web documents with it: documents the model finds likely (low
perplexity) look like the target; keep those below a threshold (Wenzek et al. 2020, CCNet, did
this with a Wikipedia 5-gram model).

    scorer = PerplexityScorer.from_run("RUN")       # latest checkpoint and its tokenizer
    scorer.perplexity("some text")                  # exp(mean next-token negative log-lik.)

Conventions: a document is tokenized once and scored in consecutive windows of up to
`max_seq_len` tokens; every token except the very first of the document is predicted once, from
the tokens before it in its window (windows do not overlap, so the first token of a window
has a shorter context than a sliding window would give: cheaper, and close enough to rank
documents). A document of fewer than 2 tokens gets perplexity inf. Windows are padded to a
fixed length so that one compiled forward serves every document.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import model
from jaxlm.config import ModelConfig
from jaxlm.loss import cross_entropy


class PerplexityScorer:
    def __init__(self, cfg: ModelConfig, params: dict, tokenizer, window: int | None = None):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        self.window = min(window or cfg.max_seq_len, cfg.max_seq_len)
        self._token_losses = jax.jit(self._window_losses)

    @classmethod
    def from_run(cls, run_dir: str, window: int | None = None) -> "PerplexityScorer":
        from jaxlm.checkpoint import load_run

        cfg, params, tokenizer = load_run(run_dir)
        if tokenizer is None:
            raise ValueError(f"the run {run_dir!r} saved no tokenizer; perplexity needs one to read text")
        return cls(cfg, params, tokenizer, window)

    def _window_losses(self, params: dict, tokens: jax.Array) -> jax.Array:
        logits, _ = model.forward(self.cfg, params, tokens[None, :-1])
        losses, _ = cross_entropy(logits, tokens[None, 1:])
        return losses[0]

    def token_negative_log_likelihoods(self, text: str) -> np.ndarray:
        """-log p(token_i | window context) for every token after the first, in float64."""
        ids = np.asarray(self.tokenizer.encode(text), dtype=np.int32)
        pieces = []
        for start in range(0, max(ids.size - 1, 0), self.window):
            chunk = ids[start:start + self.window + 1]  # window inputs + their next tokens
            padded = np.zeros(self.window + 1, np.int32)
            padded[:chunk.size] = chunk
            losses = np.asarray(self._token_losses(self.params, jnp.asarray(padded)), np.float64)
            pieces.append(losses[:chunk.size - 1])
        return np.concatenate(pieces) if pieces else np.zeros(0)

    def perplexity(self, text: str) -> float:
        losses = self.token_negative_log_likelihoods(text)
        return math.exp(losses.mean()) if losses.size else math.inf
