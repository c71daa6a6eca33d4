"""The prompt classifier: a class-weighted logistic-regression head over two kinds of features.

- the sentence embedding (all-MiniLM-L6-v2): what a prompt is about, in any wording;
- hashed character n-grams (3 to 5 characters, inside word boundaries): the names, places
  and spells themselves, even misspelt or inside another language. A mean-pooled sentence
  embedding blurs a single name (a question about which actor played a character reads as
  a sentence about actors, whichever film it names); the n-grams keep it. Hashing is
  stateless, so the only fitted n-gram state is the weight vector.

Follows scikit-learn's estimator contract: parameters in the constructor, `fit` returns the
estimator, fitted state in attributes ending with `_`. The artifact is a directory holding
`head.safetensors` (weights) and `classifier.json` (everything else): nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from classifier.artifact import META_FILE, read_artifact_meta
from classifier.encoder import DEFAULT_ENCODER, Encoder

ARTIFACT_FORMAT = 2  # 2: the head has n-gram weights
HEAD_FILE = "head.safetensors"


def training_hash(texts: Sequence[str], labels: Sequence[int]) -> str:
    """Identifies the training data regardless of its order."""
    rows = sorted(f"{int(label)}\t{text}" for text, label in zip(texts, labels))
    return hashlib.sha256("\n".join(rows).encode("utf-8")).hexdigest()


class PromptClassifier:
    kind = "logistic"

    def __init__(self, encoder: Encoder | str | None = None, C: float = 10.0, random_state: int = 0,
                 ngram_range: tuple[int, int] = (3, 5), ngram_features: int = 2**18, ngram_weight: float = 1.0):
        self.encoder = encoder
        self.C = C
        self.random_state = random_state
        self.ngram_range = tuple(ngram_range)
        self.ngram_features = ngram_features  # 0: the sentence embedding alone
        self.ngram_weight = ngram_weight  # the n-gram block's scale against the unit-norm embedding

    # -- encoder ------------------------------------------------------------------------
    @property
    def encoder_spec(self) -> str:
        if isinstance(self.encoder, Encoder):
            return self.encoder.spec
        return self.encoder or DEFAULT_ENCODER

    def _encoder(self) -> Encoder:
        if not isinstance(self.encoder, Encoder):
            self.encoder = Encoder(self.encoder_spec)  # built on first use: constructing stays cheap
        return self.encoder

    def _ngrams(self, windows: Sequence[str]) -> Any:
        """Sparse [windows, ngram_features] l2-normalised n-gram counts."""
        from sklearn.feature_extraction.text import HashingVectorizer

        if getattr(self, "_hashing", None) is None:  # stateless: built once for speed, not fitted
            self._hashing = HashingVectorizer(analyzer="char_wb", ngram_range=self.ngram_range,
                                              n_features=self.ngram_features, alternate_sign=False, norm="l2")
        return self._hashing.transform(windows)

    def _windows(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Every window of every text (a text that fits is its own window), and each window's text index."""
        encoder = self._encoder()
        windows, owners = [], []
        for index, text in enumerate(texts):
            pieces = encoder.windows(text)
            windows.extend(pieces)
            owners.extend([index] * len(pieces))
        return windows, np.asarray(owners, dtype=np.int64)

    # -- fit ----------------------------------------------------------------------------
    def fit(self, texts: Sequence[str], labels: Sequence[int], progress: bool = False) -> "PromptClassifier":
        """Labels: 1 for the forget target, 0 for retain. Every window of a long text gets its label."""
        from sklearn.linear_model import LogisticRegression

        labels = np.asarray(labels, dtype=np.int64)
        if len(texts) != len(labels) or set(np.unique(labels)) != {0, 1}:
            raise ValueError("fit needs as many labels as texts, with both classes (1 forget, 0 retain) present")
        windows, owners = self._windows(texts)
        embeddings = self._encoder().encode(windows, progress)
        features = embeddings
        if self.ngram_features:
            from scipy.sparse import csr_matrix, hstack

            features = hstack([csr_matrix(embeddings), self._ngrams(windows) * self.ngram_weight]).tocsr()
        head = LogisticRegression(C=self.C, class_weight="balanced", max_iter=5000, random_state=self.random_state)
        head.fit(features, labels[owners])
        dimension = embeddings.shape[1]
        self.coef_ = head.coef_[0, :dimension].astype(np.float32)
        self.ngram_coef_ = (head.coef_[0, dimension:] * self.ngram_weight).astype(np.float32)  # on unscaled counts
        self.intercept_ = float(np.float32(head.intercept_[0]))  # as saved, so a loaded artifact scores the same
        self.classes_ = np.array([0, 1])
        self.n_features_in_ = dimension
        self.training_hash_ = training_hash(texts, labels)
        self.threshold_: float | None = None
        self.alpha_: float | None = None
        self.metrics_: dict[str, Any] = {"train_n": {"forget": int(labels.sum()), "retain": int((labels == 0).sum())}}
        self.entities_: list[str] = []
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise ValueError("this PromptClassifier is not fitted yet: call fit or load")

    # -- predict ------------------------------------------------------------------------
    def score(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """P(forget target) per text; a long text scores the maximum over its windows."""
        self._check_fitted()
        if len(texts) == 0:
            return np.zeros(0, dtype=np.float64)
        windows, owners = self._windows(texts)
        scores = np.zeros(len(texts), dtype=np.float64)
        np.maximum.at(scores, owners, self.window_scores(windows, self._encoder().encode(windows, progress)))
        return scores

    def window_scores(self, windows: Sequence[str], embeddings: np.ndarray) -> np.ndarray:
        """P(forget target) of windows (texts that fit the encoder) whose embeddings are already computed."""
        logits = embeddings.astype(np.float64) @ self.coef_ + self.intercept_
        if self.ngram_coef_.size:
            logits += self._ngrams(windows) @ self.ngram_coef_
        return 1.0 / (1.0 + np.exp(-logits))

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        forget = self.score(texts)
        return np.stack([1.0 - forget, forget], axis=1)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        if getattr(self, "threshold_", None) is None:
            raise ValueError("no threshold: calibrate the classifier first")
        return (self.score(texts) > self.threshold_).astype(np.int64)

    def score_segments(self, segments: Sequence[str], stop_above: float | None = None) -> float:
        """The highest score among the pieces of one prompt (the whole prompt and each message). `stop_above`
        is part of the gate's interface; this head scores every window in one pass anyway."""
        return float(self.score(segments).max())

    # -- calibrate and evaluate ---------------------------------------------------------
    def calibrate(self, retain_texts: Sequence[str], alpha: float) -> "PromptClassifier":
        """Split-conformal threshold on held-out retain prompts: FPR <= alpha on exchangeable data.

        With n calibration scores, the threshold is the ceil((n+1)(1-alpha))-th smallest; a
        prompt is flagged when its score is above it.
        """
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        scores = np.sort(self.score(retain_texts))
        n = len(scores)
        if n == 0:
            raise ValueError("calibration needs retain prompts")
        rank = math.ceil((n + 1) * (1 - alpha))
        if rank > n:
            warnings.warn(f"{n} calibration prompts are too few for alpha={alpha}: the threshold is 1.0 "
                          f"(nothing is flagged); use at least {math.ceil(1 / alpha) - 1}", stacklevel=2)
            self.threshold_ = 1.0
        else:
            self.threshold_ = float(scores[rank - 1])
        self.alpha_ = float(alpha)
        self.metrics_["calibration_n"] = n
        return self

    # -- artifact -----------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"coef": self.coef_.astype(np.float32), "ngram_coef": self.ngram_coef_.astype(np.float32),
                   "intercept": np.array([self.intercept_], dtype=np.float32)}, str(directory / HEAD_FILE))
        meta = {
            "format": ARTIFACT_FORMAT, "encoder": self.encoder_spec, "dimension": int(self.n_features_in_),
            "C": self.C, "random_state": self.random_state, "ngram_range": list(self.ngram_range),
            "ngram_features": self.ngram_features, "ngram_weight": self.ngram_weight,
            "training_hash": self.training_hash_,
            "threshold": self.threshold_, "alpha": self.alpha_, "metrics": self.metrics_, "entities": self.entities_,
        }
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @staticmethod
    def _read_meta(directory: Path) -> dict[str, Any]:
        return read_artifact_meta(directory, (ARTIFACT_FORMAT,))

    @staticmethod
    def artifact_encoder_spec(directory: str | Path) -> str:
        return str(PromptClassifier._read_meta(Path(directory))["encoder"])

    @classmethod
    def load(cls, directory: str | Path, encoder: Encoder | None = None) -> "PromptClassifier":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        directory = Path(directory)
        meta = cls._read_meta(directory)
        try:
            head = load_file(str(directory / HEAD_FILE))
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{directory / HEAD_FILE}: cannot read the head weights: {exc}") from exc
        coef, ngram_coef, intercept = head.get("coef"), head.get("ngram_coef"), head.get("intercept")
        dimension, ngram_features = int(meta["dimension"]), int(meta["ngram_features"])
        if (coef is None or ngram_coef is None or intercept is None or coef.shape != (dimension,)
                or ngram_coef.shape != (ngram_features,) or intercept.shape != (1,)):
            raise ValueError(f"{directory / HEAD_FILE}: expected coef [{dimension}], ngram_coef [{ngram_features}] "
                             "and intercept [1]")
        if encoder is not None and encoder.spec != meta["encoder"]:
            raise ValueError(f"the artifact was trained with encoder {meta['encoder']!r}, not {encoder.spec!r}")
        classifier = cls(encoder if encoder is not None else meta["encoder"], C=meta["C"],
                         random_state=meta["random_state"], ngram_range=tuple(meta["ngram_range"]),
                         ngram_features=ngram_features, ngram_weight=meta["ngram_weight"])
        classifier.coef_ = coef.astype(np.float32)
        classifier.ngram_coef_ = ngram_coef.astype(np.float32)
        classifier.intercept_ = float(intercept[0])
        classifier.classes_ = np.array([0, 1])
        classifier.n_features_in_ = dimension
        classifier.training_hash_ = meta["training_hash"]
        classifier.threshold_ = meta["threshold"]
        classifier.alpha_ = meta["alpha"]
        classifier.metrics_ = meta.get("metrics", {})
        classifier.entities_ = list(meta.get("entities", []))
        return classifier
