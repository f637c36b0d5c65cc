"""A fastText-style quality classifier: hashed n-gram embeddings, averaged, then logistic.

Model (Joulin et al. 2016, "Bag of Tricks for Efficient Text Classification"): each unigram
and bigram of the normalized text is hashed into one of `num_buckets` rows of an embedding
matrix E [num_buckets, dim]; the document vector is the mean of its rows, and
p(positive) = sigmoid(w . mean + bias). Training is plain SGD on the log loss, one document at
a time, with a linearly decaying learning rate, as fastText does (without its threads).

Data: positives and negatives are files, either JSONL with a "text" field or plain text with one
document per line (fastText's format). A typical use: positives = pages linked from Wikipedia
(or the target domain), negatives = random Common Crawl pages; then keep documents whose score
is above a threshold.

    classifier = train_classifier("positives.jsonl", "negatives.txt")
    classifier.score("some text")      # p(positive) in (0, 1)
    classifier.save("quality.npz"); QualityClassifier.load("quality.npz")
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from jaxlm.curation.dsir import hashed_ngrams


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    num_buckets: int = 1 << 18
    dim: int = 16
    epochs: int = 5
    learning_rate: float = 0.5
    ngrams: int = 2
    seed: int = 0


def read_documents(path: str) -> list[str]:
    """Documents of a `.jsonl` file ("text" field) or of a text file (one per non-empty line)."""
    with open(path, encoding="utf-8") as file:
        if path.endswith(".jsonl"):
            return [json.loads(line)["text"] for line in file if line.strip()]
        return [line.strip() for line in file if line.strip()]


@dataclasses.dataclass
class QualityClassifier:
    embeddings: np.ndarray  # [num_buckets, dim]
    weights: np.ndarray  # [dim]
    bias: float
    config: ClassifierConfig

    def _features(self, text: str) -> np.ndarray:
        ids = hashed_ngrams(text, self.config.num_buckets, self.config.ngrams)
        return ids if ids.size else np.zeros(1, np.int64)  # an empty text: bucket 0

    def score(self, text: str) -> float:
        """p(positive | text)."""
        hidden = self.embeddings[self._features(text)].mean(axis=0)
        return float(1.0 / (1.0 + np.exp(-(hidden @ self.weights + self.bias))))

    def save(self, path: str) -> None:
        np.savez(path, embeddings=self.embeddings, weights=self.weights, bias=self.bias,
                 config=json.dumps(dataclasses.asdict(self.config)))

    @classmethod
    def load(cls, path: str) -> "QualityClassifier":
        with np.load(path) as data:
            config = ClassifierConfig(**json.loads(str(data["config"])))
            return cls(data["embeddings"], data["weights"], float(data["bias"]), config)


def train_classifier(positive_path: str, negative_path: str, config: ClassifierConfig = ClassifierConfig()) -> QualityClassifier:
    """Train on the documents of two files (label 1 and 0)."""
    positives, negatives = read_documents(positive_path), read_documents(negative_path)
    if not positives or not negatives:
        raise ValueError(f"need documents in both files: {len(positives)} positives in {positive_path!r}, "
                         f"{len(negatives)} negatives in {negative_path!r}")
    return train_on_texts(positives + negatives, [1] * len(positives) + [0] * len(negatives), config)


def train_on_texts(texts: list[str], labels: list[int], config: ClassifierConfig = ClassifierConfig()) -> QualityClassifier:
    rng = np.random.default_rng(config.seed)
    model = QualityClassifier(rng.uniform(-1.0 / config.dim, 1.0 / config.dim, (config.num_buckets, config.dim)),
                              np.zeros(config.dim), 0.0, config)
    features = [model._features(text) for text in texts]
    total_steps = config.epochs * len(texts)
    step = 0
    for _ in range(config.epochs):
        for index in rng.permutation(len(texts)):
            learning_rate = config.learning_rate * (1.0 - step / total_steps)
            ids = features[index]
            hidden = model.embeddings[ids].mean(axis=0)
            probability = 1.0 / (1.0 + np.exp(-(hidden @ model.weights + model.bias)))
            gradient = probability - labels[index]  # d log-loss / d logit
            embedding_gradient = gradient * model.weights / ids.size
            model.weights -= learning_rate * gradient * hidden
            model.bias -= learning_rate * gradient
            np.add.at(model.embeddings, ids, -learning_rate * embedding_gradient)
            step += 1
    return model
